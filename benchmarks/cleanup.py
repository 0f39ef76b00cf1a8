"""Delete every broker object whose name contains a run's id, whichever implementation made it,
so runs never see each other's messages and the brokers do not fill up."""

from __future__ import annotations

import contextlib
from urllib.parse import parse_qs, urlsplit

from benchmarks.raw_clients import kafka_bootstrap


async def cleanup(broker: str, url: str, topic: str, group: str) -> None:
    await {"memory": _nothing, "rabbitmq": _rabbitmq, "redis": _redis, "kafka": _kafka, "sqs": _sqs}[broker](
        url, topic, group
    )


async def _nothing(url: str, topic: str, group: str) -> None:
    pass


async def _rabbitmq(url: str, topic: str, group: str) -> None:
    import aiormq

    conn = await aiormq.connect(url)
    try:
        # msgkit's group queue and dead letters, the raw client's and FastStream's queue
        for queue in (f"{topic}:{group}", f"{topic}:{group}:dead-letters", f"{topic}.{group}"):
            channel = await conn.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        channel = await conn.channel()
        with contextlib.suppress(Exception):
            await channel.exchange_delete(topic)
    finally:
        await conn.close()


async def _redis(url: str, topic: str, group: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"*{topic}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _kafka(url: str, topic: str, group: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap(url))
    await admin.start()
    try:
        names = [name for name in await admin.list_topics() if topic in name]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


async def _sqs(url: str, topic: str, group: str) -> None:
    from aiobotocore.session import get_session

    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    scheme = "http" if query.get("secure", "true") == "false" else "https"
    async with get_session().create_client(
        "sqs",
        endpoint_url=f"{scheme}://{parts.hostname}:{parts.port}" if parts.hostname else None,
        region_name=query.get("region", "us-east-1"),
        aws_access_key_id="x",
        aws_secret_access_key="x",
    ) as client:
        reply = await client.list_queues(MaxResults=1000)
        for queue_url in reply.get("QueueUrls", ()):
            if topic in queue_url.rsplit("/", 1)[-1]:
                with contextlib.suppress(Exception):
                    await client.delete_queue(QueueUrl=queue_url)

"""Each test broker answers and works: one real round trip per broker with its raw client library.

These prove that `scripts/brokers` (or testcontainers) gives working brokers; CI runs them with
MSGKIT_REQUIRE_BROKERS=1 so a missing broker fails instead of skipping. No msgkit code is involved.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest

TIMEOUT = 60.0


def _name(prefix: str) -> str:
    return f"{prefix}-reach-{uuid.uuid4().hex[:12]}"


@pytest.mark.asyncio
async def test_rabbitmq_declares_publishes_and_gets(msgkit_rabbitmq_url: str) -> None:
    import aio_pika

    async with asyncio.timeout(TIMEOUT):
        connection = await aio_pika.connect(msgkit_rabbitmq_url)
        async with connection:
            channel = await connection.channel()  # publisher confirms: publish returns once queued
            queue = await channel.declare_queue(_name("q"), auto_delete=True)
            await channel.default_exchange.publish(aio_pika.Message(b"hello \x00 rabbit"), routing_key=queue.name)
            message = await queue.get(timeout=10)
            assert message is not None
            assert message.body == b"hello \x00 rabbit"
            await message.ack()
            await queue.delete(if_unused=False, if_empty=False)


@pytest.mark.asyncio
async def test_redis_appends_and_reads_a_stream(msgkit_redis_url: str) -> None:
    import redis.asyncio as redis

    async with asyncio.timeout(TIMEOUT):
        client = redis.from_url(msgkit_redis_url)
        stream = _name("stream")
        try:
            entry_id = await client.xadd(stream, {"body": b"hello \x00 redis"})
            entries = await client.xrange(stream)
            assert entries == [(entry_id, {b"body": b"hello \x00 redis"})]
        finally:
            await client.delete(stream)
            await client.aclose()


@pytest.mark.asyncio
async def test_kafka_produces_and_consumes_with_a_group(msgkit_kafka_url: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = urlsplit(msgkit_kafka_url).netloc
    topic = _name("topic")
    async with asyncio.timeout(TIMEOUT):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
            await producer.start()
            try:
                await producer.send_and_wait(topic, b"hello \x00 kafka", key=b"k")
            finally:
                await producer.stop()
            consumer = AIOKafkaConsumer(
                topic,
                bootstrap_servers=bootstrap,
                group_id=_name("group"),
                auto_offset_reset="earliest",
                enable_auto_commit=False,
            )
            await consumer.start()
            try:
                records = []
                while not records:
                    batches = await consumer.getmany(timeout_ms=1000)
                    records = [r for rs in batches.values() for r in rs]
                assert [(r.key, r.value) for r in records] == [(b"k", b"hello \x00 kafka")]
                await consumer.commit()
            finally:
                await consumer.stop()
        finally:
            await admin.delete_topics([topic])
            await admin.close()


@pytest.mark.asyncio
async def test_sqs_sends_receives_with_a_receive_count_and_deletes(msgkit_sqs_url: str) -> None:
    from aiobotocore.session import get_session

    parts = urlsplit(msgkit_sqs_url)
    options = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    scheme = "https" if options.get("secure", "true").lower() == "true" else "http"
    session = get_session()
    async with (
        asyncio.timeout(TIMEOUT),
        session.create_client(
            "sqs",
            endpoint_url=f"{scheme}://{parts.netloc}",
            region_name=options.get("region", "us-east-1"),
            aws_access_key_id="x",
            aws_secret_access_key="x",
        ) as sqs,
    ):
        queue_url = (await sqs.create_queue(QueueName=_name("queue")))["QueueUrl"]
        try:
            await sqs.send_message(QueueUrl=queue_url, MessageBody="hello sqs ✓")
            messages = []
            deadline = time.monotonic() + 20
            while not messages and time.monotonic() < deadline:
                reply = await sqs.receive_message(
                    QueueUrl=queue_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=2,
                    MessageSystemAttributeNames=["ApproximateReceiveCount"],
                )
                messages = reply.get("Messages", [])
            assert [m["Body"] for m in messages] == ["hello sqs ✓"]
            assert messages[0]["Attributes"]["ApproximateReceiveCount"] == "1"
            await sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=messages[0]["ReceiptHandle"])
        finally:
            await sqs.delete_queue(QueueUrl=queue_url)


@pytest.mark.asyncio
async def test_postgres_selects_and_round_trips_a_row(msgkit_postgres_url: str) -> None:
    import asyncpg

    async with asyncio.timeout(TIMEOUT):
        connection = await asyncpg.connect(msgkit_postgres_url)
        try:
            assert await connection.fetchval("SELECT 1") == 1
            await connection.execute("CREATE TEMPORARY TABLE reach (id bigserial PRIMARY KEY, body bytea NOT NULL)")
            row_id = await connection.fetchval("INSERT INTO reach (body) VALUES ($1) RETURNING id", b"hello \x00 pg")
            assert await connection.fetchval("SELECT body FROM reach WHERE id = $1", row_id) == b"hello \x00 pg"
        finally:
            await connection.close()

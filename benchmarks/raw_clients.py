"""Each broker's client used directly, the way an expert writes a consumer for this one job:
batch fetch, one ack/commit call for many messages, pipelined publishes with windowed confirms.
Same work as msgkit: validate each body into an Order, await the handler, ack after it
(at least once), at most ``max_in_flight`` unacked. No retries or dead letters: the ceiling.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any
from urllib.parse import parse_qs, urlsplit

from benchmarks.common import ACK_BATCH, OnOrder, Order, Window

validate = Order.model_validate_json


class RawMemoryBench:
    """memory:// has no client: a deque and a loop. The ceiling for any in-process design."""

    def __init__(self, url: str, topic: str, group: str) -> None:
        self.queue: deque[bytes] = deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        pass

    async def publish(self, bodies: list[bytes]) -> None:
        self.queue.extend(bodies)
        self.wakeup.set()

    async def start(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        self.task = asyncio.create_task(self._run(on_order, max_in_flight, slow))

    async def _run(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        queue, window = self.queue, Window(max_in_flight)
        while True:
            if not queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            if slow:
                await window.submit(on_order(validate(queue.popleft())))
            else:
                for _ in range(min(len(queue), max_in_flight)):
                    await on_order(validate(queue.popleft()))
                await asyncio.sleep(0)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def close(self) -> None:
        pass


class RawRabbitMQBench:
    """aiormq (what aio-pika is built on): quorum queue behind a fanout exchange like msgkit's,
    persistent publishes with confirms pipelined per chunk, prefetch = max_in_flight, acks
    ``multiple`` for the contiguous prefix every ACK_BATCH messages or when idle."""

    def __init__(self, url: str, topic: str, group: str) -> None:
        self.url, self.exchange, self.queue = url, topic, f"{topic}.{group}"
        self.inbox: deque[Any] = deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        import aiormq

        self.aiormq = aiormq
        self.conn = await aiormq.connect(self.url)
        self.pub = await self.conn.channel()  # publisher confirms on
        await self.pub.exchange_declare(exchange=self.exchange, exchange_type="fanout", durable=True)
        await self.pub.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
        await self.pub.queue_bind(self.queue, self.exchange, routing_key="")
        self.props = aiormq.spec.Basic.Properties(delivery_mode=2, content_type="application/json")

    async def publish(self, bodies: list[bytes]) -> None:
        pub, exchange, props = self.pub, self.exchange, self.props
        await asyncio.gather(
            *(pub.basic_publish(b, exchange=exchange, routing_key="", properties=props) for b in bodies)
        )

    async def start(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        self.ch = await self.conn.channel(publisher_confirms=False)
        await self.ch.basic_qos(prefetch_count=max_in_flight)
        if slow:
            ch = self.ch

            async def handle(message: Any) -> None:
                await on_order(validate(message.body))
                await ch.basic_ack(message.delivery_tag)

            ok = await self.ch.basic_consume(self.queue, handle, no_ack=False)
        else:
            self.task = asyncio.create_task(self._run(on_order))
            ok = await self.ch.basic_consume(self.queue, self._receive, no_ack=False)
        self.tag = ok.consumer_tag

    async def _receive(self, message: Any) -> None:
        self.inbox.append(message)
        self.wakeup.set()

    async def _run(self, on_order: OnOrder) -> None:
        inbox, ch = self.inbox, self.ch
        unacked, last_tag = 0, 0
        while True:
            self.wakeup.clear()  # before the awaits below: a delivery arriving during them sets it again
            while inbox:
                message = inbox.popleft()
                await on_order(validate(message.body))
                last_tag = message.delivery_tag
                unacked += 1
                if unacked >= ACK_BATCH:
                    await ch.basic_ack(last_tag, multiple=True)
                    unacked = 0
            if unacked:  # idle: settle now, or prefetch stalls the broker
                await ch.basic_ack(last_tag, multiple=True)
                unacked = 0
            if not inbox:
                await self.wakeup.wait()

    async def stop(self) -> None:
        await self.ch.basic_cancel(self.tag)
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.ch.close()

    async def close(self) -> None:
        await self.conn.close()


class RawRedisBench:
    """redis-py asyncio on a stream and consumer group: XADD pipelined per chunk; XREADGROUP
    COUNT free slots, the previous batch's XACK in the same pipeline (one round trip a batch)."""

    def __init__(self, url: str, topic: str, group: str) -> None:
        self.url, self.stream, self.group = url, f"raw:{topic}", group
        self.task: asyncio.Task[None] | None = None
        self.running = False

    async def open(self) -> None:
        import redis.asyncio as redis

        self.client = redis.Redis.from_url(self.url)
        await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)

    async def publish(self, bodies: list[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for b in bodies:
            pipe.xadd(self.stream, {"body": b})
        await pipe.execute()

    async def start(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        self.running = True
        self.task = asyncio.create_task(self._run(on_order, max_in_flight, slow))

    async def _run(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        stream, group = self.stream, self.group
        done: list[bytes] = []
        while self.running:
            pipe = self.client.pipeline(transaction=False)
            if done:
                pipe.xack(stream, group, *done)
            pipe.xreadgroup(group, "raw", {stream: ">"}, count=max_in_flight, block=100)
            replies = await pipe.execute()
            done = []
            for _, entries in replies[-1] or ():
                if slow:
                    await asyncio.gather(*(on_order(validate(fields[b"body"])) for _, fields in entries))
                    done.extend(entry_id for entry_id, _ in entries)
                else:
                    for entry_id, fields in entries:
                        await on_order(validate(fields[b"body"]))
                        done.append(entry_id)
        if done:
            await self.client.xack(stream, group, *done)

    async def stop(self) -> None:
        self.running = False
        if self.task is not None:
            await self.task

    async def close(self) -> None:
        await self.client.aclose()


def kafka_bootstrap(url: str) -> str:
    return urlsplit(url).netloc.split("@")[-1]


class RawKafkaBench:
    """aiokafka: a 3-partition topic like msgkit's default, idempotent producer (acks=all) with
    every send of a chunk in flight at once; getmany up to the free slots, commit after handling
    every 1000 messages or 0.5 s (msgkit's defaults), and on stop."""

    def __init__(self, url: str, topic: str, group: str) -> None:
        self.bootstrap, self.topic, self.group = kafka_bootstrap(url), topic, group
        self.task: asyncio.Task[None] | None = None
        self.running = False

    async def open(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.topic, num_partitions=3, replication_factor=1)])
        finally:
            await admin.close()
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True, max_batch_size=262_144
        )
        await self.producer.start()

    async def publish(self, bodies: list[bytes]) -> None:
        send, topic = self.producer.send, self.topic
        await asyncio.gather(*[await send(topic, b) for b in bodies])

    async def start(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        from aiokafka import AIOKafkaConsumer

        self.consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self.consumer.start()
        self.running = True
        self.task = asyncio.create_task(self._run(on_order, max_in_flight, slow))

    async def _run(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        consumer, uncommitted, last_commit = self.consumer, 0, time.monotonic()
        while self.running:
            batches = await consumer.getmany(timeout_ms=100, max_records=max_in_flight)
            for records in batches.values():
                if slow:
                    await asyncio.gather(*(on_order(validate(r.value)) for r in records))
                else:
                    for record in records:
                        await on_order(validate(record.value))
                uncommitted += len(records)
            if uncommitted and (uncommitted >= 1000 or time.monotonic() - last_commit >= 0.5):
                await consumer.commit()
                uncommitted, last_commit = 0, time.monotonic()
        if uncommitted:
            await consumer.commit()

    async def stop(self) -> None:
        self.running = False
        if self.task is not None:
            await self.task
        await self.consumer.stop()

    async def close(self) -> None:
        await self.producer.stop()


class RawSQSBench:
    """aiobotocore: SendMessageBatch in tens, 50 calls in flight; max_in_flight/10 long pollers
    (at most 32), each deleting its batch with one DeleteMessageBatch after handling it."""

    def __init__(self, url: str, topic: str, group: str) -> None:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        scheme = "http" if query.get("secure", "true") == "false" else "https"
        self.endpoint = f"{scheme}://{parts.hostname}:{parts.port}" if parts.hostname else None
        self.region = query.get("region", "us-east-1")
        self.name = f"raw-{topic}"
        self.tasks: list[asyncio.Task[None]] = []
        self.running = False

    async def open(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        self._cm = get_session().create_client(
            "sqs",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id="x",
            aws_secret_access_key="x",
            config=AioConfig(max_pool_connections=64),
        )
        self.client = await self._cm.__aenter__()
        self.queue_url = (await self.client.create_queue(QueueName=self.name))["QueueUrl"]

    async def publish(self, bodies: list[bytes]) -> None:
        window = Window(50)

        async def send(chunk: list[bytes], first: int) -> None:
            entries = [{"Id": str(first + i), "MessageBody": b.decode()} for i, b in enumerate(chunk)]
            reply = await self.client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
            if reply.get("Failed"):
                raise RuntimeError(f"SendMessageBatch failed: {reply['Failed'][:3]}")

        for i in range(0, len(bodies), 10):
            await window.submit(send(bodies[i : i + 10], i))
        await window.drain()

    async def start(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        self.running = True
        pollers = max(1, min(max_in_flight // 10, 32))
        per_poll = min(10, max_in_flight)
        self.tasks = [asyncio.create_task(self._poll(on_order, per_poll, slow)) for _ in range(pollers)]

    async def _poll(self, on_order: OnOrder, per_poll: int, slow: bool) -> None:
        client, queue_url = self.client, self.queue_url
        while self.running:
            reply = await client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=per_poll, WaitTimeSeconds=1)
            messages = reply.get("Messages", ())
            if not messages:
                continue
            if slow:
                await asyncio.gather(*(on_order(validate(m["Body"])) for m in messages))
            else:
                for m in messages:
                    await on_order(validate(m["Body"]))
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
            reply = await client.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            if reply.get("Failed"):
                raise RuntimeError(f"DeleteMessageBatch failed: {reply['Failed'][:3]}")

    async def stop(self) -> None:
        self.running = False
        await asyncio.gather(*self.tasks)

    async def close(self) -> None:
        await self._cm.__aexit__(None, None, None)


RAW = {
    "memory": RawMemoryBench,
    "rabbitmq": RawRabbitMQBench,
    "redis": RawRedisBench,
    "kafka": RawKafkaBench,
    "sqs": RawSQSBench,
}

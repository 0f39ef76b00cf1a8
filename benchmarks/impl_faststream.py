"""FastStream (0.7) as its docs show it, given its best settings for this job: no per-message
logging (``logger=None``), ack after the handler (``AckPolicy.REJECT_ON_ERROR`` on RabbitMQ and
Redis, ``AckPolicy.ACK`` on Kafka), prefetch/``max_workers`` = max_in_flight, the handler taking
the validated model. Publishing uses its fastest documented path: RabbitMQ and Redis publishes of
a chunk in flight together (Redis in one pipeline), Kafka ``publish_batch`` in
batches of 50, all in flight together."""

from __future__ import annotations

import asyncio
from typing import Any

from benchmarks.common import OnOrder, Order
from benchmarks.raw_clients import kafka_bootstrap


class _FastStreamBench:
    broker: Any

    async def _subscribe(self, handle: Any, max_in_flight: int, slow: bool) -> None:
        raise NotImplementedError

    async def start(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        async def handle(order: Order) -> None:
            await on_order(order)

        await self._subscribe(handle, max_in_flight, slow)
        await self.broker.start()

    async def stop(self) -> None:
        await self.broker.stop()

    async def close(self) -> None:
        await self.broker.stop()


class FastStreamRabbitMQBench(_FastStreamBench):
    def __init__(self, url: str, topic: str, group: str) -> None:
        from faststream.rabbit import ExchangeType, QueueType, RabbitBroker, RabbitExchange, RabbitQueue

        self.broker = RabbitBroker(url, logger=None)
        self.exchange = RabbitExchange(topic, type=ExchangeType.FANOUT, durable=True)
        self.queue = RabbitQueue(f"{topic}.{group}", queue_type=QueueType.QUORUM, durable=True)

    async def open(self) -> None:
        await self.broker.connect()
        exchange = await self.broker.declare_exchange(self.exchange)
        queue = await self.broker.declare_queue(self.queue)
        await queue.bind(exchange)

    async def publish(self, bodies: list[bytes]) -> None:
        publish, exchange = self.broker.publish, self.exchange
        await asyncio.gather(*(publish(b, exchange=exchange, persist=True) for b in bodies))

    async def _subscribe(self, handle: Any, max_in_flight: int, slow: bool) -> None:
        from faststream import AckPolicy
        from faststream.rabbit import Channel

        subscriber = self.broker.subscriber(
            self.queue,
            self.exchange,
            channel=Channel(prefetch_count=max_in_flight),
            ack_policy=AckPolicy.REJECT_ON_ERROR,
        )
        subscriber(handle)


class FastStreamRedisBench(_FastStreamBench):
    def __init__(self, url: str, topic: str, group: str) -> None:
        from faststream.redis import RedisBroker

        self.broker = RedisBroker(url, logger=None)
        self.stream, self.group = f"fs:{topic}", group

    async def open(self) -> None:
        self.client = await self.broker.connect()  # the redis.asyncio.Redis it publishes with
        await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)

    async def publish(self, bodies: list[bytes]) -> None:
        publish, stream = self.broker.publish, self.stream
        async with self.client.pipeline(transaction=False) as pipe:
            for b in bodies:
                await publish(b, stream=stream, pipeline=pipe)
            await pipe.execute()

    async def _subscribe(self, handle: Any, max_in_flight: int, slow: bool) -> None:
        from faststream import AckPolicy
        from faststream.redis import StreamSub

        stream = StreamSub(
            self.stream, group=self.group, consumer="fs", max_records=max_in_flight, polling_interval=100
        )
        options: dict[str, Any] = {"max_workers": max_in_flight} if slow and max_in_flight > 1 else {}
        subscriber = self.broker.subscriber(stream=stream, ack_policy=AckPolicy.REJECT_ON_ERROR, **options)
        subscriber(handle)


class FastStreamKafkaBench(_FastStreamBench):
    def __init__(self, url: str, topic: str, group: str) -> None:
        from faststream.kafka import KafkaBroker

        self.bootstrap = kafka_bootstrap(url)
        self.broker = KafkaBroker(self.bootstrap, logger=None, acks="all", enable_idempotence=True)
        self.topic, self.group = topic, group

    async def open(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.topic, num_partitions=3, replication_factor=1)])
        finally:
            await admin.close()
        await self.broker.connect()

    async def publish(self, bodies: list[bytes]) -> None:
        # publish_batch sends one producer batch, which holds ~70 of these: chunks of 50 in flight together
        publish_batch, topic = self.broker.publish_batch, self.topic
        await asyncio.gather(*(publish_batch(*bodies[i : i + 50], topic=topic) for i in range(0, len(bodies), 50)))

    async def _subscribe(self, handle: Any, max_in_flight: int, slow: bool) -> None:
        from faststream import AckPolicy

        options: dict[str, Any] = {"max_workers": max_in_flight} if slow and max_in_flight > 1 else {}
        subscriber = self.broker.subscriber(
            self.topic,
            group_id=self.group,
            auto_offset_reset="earliest",
            ack_policy=AckPolicy.ACK,
            max_records=max_in_flight,
            **options,
        )
        subscriber(handle)


FASTSTREAM = {
    "rabbitmq": FastStreamRabbitMQBench,
    "redis": FastStreamRedisBench,
    "kafka": FastStreamKafkaBench,
}

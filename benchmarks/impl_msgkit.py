"""msgkit as a service would use it: send_batch, a consumer with the default settings (retry
policy and dead letters on) except max_in_flight, a handler taking the validated model."""

from __future__ import annotations

import msgkit
from benchmarks.common import OnOrder, Order


class MsgkitBench:
    def __init__(self, url: str, topic: str, group: str) -> None:
        self.broker = msgkit.Broker(url)
        self.topic = topic
        self.group = group
        self.consumer: msgkit.Consumer | None = None

    async def open(self) -> None:
        await self.broker.connect()
        await self.broker.declare(self.topic, self.group)

    async def publish(self, bodies: list[bytes]) -> None:
        await self.broker.send_batch(self.topic, bodies)

    async def start(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        async def handle(order: Order) -> None:
            await on_order(order)

        self.consumer = self.broker.consumer(self.topic, self.group, handle, max_in_flight=max_in_flight)
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

    async def close(self) -> None:
        await self.broker.close()

"""msgkit on Redis Streams: orders with a retry, a dead letter, and the group's dead-letter stream.

    scripts/brokers up redis && . .brokers/env && python examples/redis_streams.py

The URL comes from MSGKIT_URL, else MSGKIT_REDIS_URL, else redis://localhost:6379/0. Options go
in its query, e.g. redis://localhost:6379/0?visibility_timeout=10 (see docs/transports/redis.md).
"""

import asyncio
import os
import uuid

from pydantic import BaseModel

import msgkit


class Order(BaseModel):
    id: int
    total: float


async def main() -> None:
    url = os.environ.get("MSGKIT_URL") or os.environ.get("MSGKIT_REDIS_URL") or "redis://localhost:6379/0"
    topic = f"orders-{uuid.uuid4().hex[:6]}"  # a fresh stream, so the example can run again and again
    async with msgkit.Broker(url) as broker:
        print(f"on {broker.url}: {broker.capabilities}")
        await broker.declare(topic, "billing")  # stream + consumer group, kept until billing reads them
        await broker.send_batch(topic, [Order(id=i, total=9.5 * i) for i in range(1, 5)])

        billed: set[int] = set()
        dead: list[msgkit.Delivery] = []
        done = asyncio.Event()

        async def bill(order: Order, delivery: msgkit.Delivery) -> None:
            if order.id == 2 and delivery.attempt == 1:
                raise msgkit.RetryLater(0.5, "payment service busy")  # parked in Redis, not in memory
            if order.id == 4:
                raise msgkit.Reject("order 4 is fraudulent")  # straight to the dead letters
            print(f"billed order {order.id}: {order.total:.2f} (attempt {delivery.attempt})")
            billed.add(order.id)
            if billed == {1, 2, 3} and dead:
                done.set()

        async def inspect(delivery: msgkit.Delivery) -> None:
            print(f"dead letter {delivery.id}: {delivery.headers['msgkit-dlq-reason']}")
            dead.append(delivery)
            if billed == {1, 2, 3}:
                done.set()

        consumer = broker.consumer(topic, "billing", bill, max_in_flight=16)
        dead_letters = broker.dead_letter_consumer(topic, "billing", inspect)
        await consumer.start()
        await dead_letters.start()
        await asyncio.wait_for(done.wait(), timeout=30)
        await consumer.stop()
        await dead_letters.stop()
        await broker.delete(topic, "billing")  # the throwaway stream, its group and dead-letter stream


if __name__ == "__main__":
    asyncio.run(main())

"""msgkit on RabbitMQ: send pydantic models, handle them, retry with a delay, park a poison message.

Run it against a broker (e.g. after `scripts/brokers up rabbitmq`):

    MSGKIT_URL=amqp://guest:guest@127.0.0.1:5672/ python examples/rabbitmq.py

The URL comes from MSGKIT_URL, else MSGKIT_RABBITMQ_URL. It leaves the exchange "orders" and the
queues "orders:billing" and "orders:billing:dead-letters" behind, empty.
"""

import asyncio
import os

from pydantic import BaseModel

import msgkit


class Order(BaseModel):
    id: int
    total: float


async def main() -> None:
    url = os.environ.get("MSGKIT_URL") or os.environ.get("MSGKIT_RABBITMQ_URL") or "amqp://guest:guest@localhost/"
    topic = "orders"
    async with msgkit.Broker(url) as broker:
        print(f"on {broker.url}: {broker.capabilities}")
        await broker.declare(topic, "billing")  # exchange + quorum queue: messages are kept from now on
        await broker.send_batch(topic, [Order(id=i, total=9.5 * i) for i in range(1, 6)])  # one round trip

        billed: set[int] = set()
        done = asyncio.Event()

        async def bill(order: Order, delivery: msgkit.Delivery) -> None:
            if order.id == 3 and delivery.attempt == 1:
                raise msgkit.RetryLater(0.5, "payment service busy")  # back in 0.5 s, via a delay queue
            if order.id == 5:
                raise msgkit.Reject("order 5 is malformed")  # straight to the dead letters
            print(f"billed order {order.id}: {order.total:.2f} (attempt {delivery.attempt})")
            billed.add(order.id)
            if billed == {1, 2, 3, 4}:
                done.set()

        consumer = broker.consumer(topic, "billing", bill, max_in_flight=32)
        await consumer.start()
        await asyncio.wait_for(done.wait(), timeout=30)
        await consumer.stop()  # graceful: finishes and acks in-flight work

        dead_letters = await broker.dead_letters(topic, "billing")
        for letter in await dead_letters.peek():
            print(f"dead letter {letter.id}: {letter.reason!r} after {letter.attempts} attempt(s)")
        await dead_letters.purge()  # or dead_letters.replay() once the bug is fixed


if __name__ == "__main__":
    asyncio.run(main())

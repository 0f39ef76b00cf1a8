"""msgkit on Kafka: keyed orders in parallel lanes, a retry, a dead letter, and the dead-letter topic.

    scripts/brokers up kafka && . .brokers/env && python examples/kafka.py

The URL comes from MSGKIT_URL, else MSGKIT_KAFKA_URL, else kafka://localhost:9092. Options go in
its query, e.g. kafka://localhost:9092?partitions=6&retry=inline (see docs/transports/kafka.md).
"""

import asyncio
import os
import sys
import uuid

from pydantic import BaseModel

import msgkit

# This file is called kafka.py: run as a script, its folder comes first on sys.path. msgkit imports
# its Kafka client (aiokafka) only when the Broker is built; keep this folder off the path anyway.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]


class Order(BaseModel):
    id: int
    customer: str
    total: float


async def main() -> None:
    url = os.environ.get("MSGKIT_URL") or os.environ.get("MSGKIT_KAFKA_URL") or "kafka://localhost:9092"
    topic = f"orders-{uuid.uuid4().hex[:6]}"  # a fresh topic, so the example can run again and again
    async with msgkit.Broker(url) as broker:
        print(f"on {broker.url}: {broker.capabilities}")
        await broker.declare(topic, "billing")  # the topic, its retry topic and its dead-letter topic
        orders = [Order(id=i, customer=f"customer-{i % 3}", total=9.5 * i) for i in range(1, 10)]
        # the customer is the key: one customer's orders stay in one partition, in order
        await broker.send_batch(topic, [msgkit.Message.of(o, key=o.customer) for o in orders])

        billed: list[int] = []
        dead: list[msgkit.Delivery] = []
        done = asyncio.Event()

        def check() -> None:
            if len(billed) == 8 and dead:
                done.set()

        async def bill(order: Order, delivery: msgkit.Delivery) -> None:
            if order.id == 2 and delivery.attempt == 1:
                raise msgkit.RetryLater(0.5, "payment service busy")  # via the retry topic
            if order.id == 7:
                raise msgkit.Reject("order 7 is fraudulent")  # straight to the dead-letter topic
            print(f"billed order {order.id} of {delivery.key}: {order.total:.2f} (attempt {delivery.attempt})")
            billed.append(order.id)
            check()

        async def inspect(delivery: msgkit.Delivery) -> None:
            print(f"dead letter {delivery.id}: {delivery.headers['msgkit-dlq-reason']}")
            dead.append(delivery)
            check()

        # different customers run in parallel, one customer's orders one after another
        consumer = broker.consumer(topic, "billing", bill, max_in_flight=32, ordered_by_key=True)
        dead_letters = broker.dead_letter_consumer(topic, "billing", inspect)
        await consumer.start()
        await dead_letters.start()
        await asyncio.wait_for(done.wait(), timeout=60)
        await consumer.stop()  # graceful: running handlers finish, offsets are committed, the group is left
        await dead_letters.stop()
        await broker.delete(topic, "billing")  # the throwaway topic, its retry and dead-letter topics, the groups


if __name__ == "__main__":
    asyncio.run(main())

"""msgkit on SQS: orders through a queue, a delayed retry, a dead letter, and the dead-letter queue.

    scripts/brokers up sqs && . .brokers/env && python examples/sqs.py

The URL comes from MSGKIT_URL, else MSGKIT_SQS_URL, else the local ElasticMQ
(sqs://127.0.0.1:9324?region=us-east-1&secure=false). On AWS use e.g. sqs://?region=eu-west-1
with credentials from the usual AWS chain; add &fifo=true for FIFO queues, where the key (here the
customer) is the MessageGroupId and a customer's orders arrive in order (see docs/transports/sqs.md).
"""

import asyncio
import os
import uuid

from pydantic import BaseModel

import msgkit


class Order(BaseModel):
    id: int
    customer: str
    total: float


async def main() -> None:
    url = os.environ.get("MSGKIT_URL") or os.environ.get("MSGKIT_SQS_URL")
    url = url or "sqs://127.0.0.1:9324?region=us-east-1&secure=false"
    topic = f"orders-{uuid.uuid4().hex[:6]}"  # a fresh queue, so the example can run again and again
    async with msgkit.Broker(url) as broker:
        print(f"on {broker.url}: {broker.capabilities}")
        await broker.declare(topic, "billing")  # the queue, and billing's dead-letter queue
        orders = [Order(id=i, customer=f"customer-{i % 3}", total=9.5 * i) for i in range(1, 10)]
        # one SendMessageBatch; on a FIFO queue the key (customer) is the MessageGroupId
        await broker.send_batch(topic, [msgkit.Message.of(o, key=o.customer) for o in orders])

        billed: list[int] = []
        dead: list[msgkit.Delivery] = []
        done = asyncio.Event()

        def check() -> None:
            if len(billed) == 8 and dead:
                done.set()

        async def bill(order: Order, delivery: msgkit.Delivery) -> None:
            if order.id == 2 and delivery.attempt == 1:
                raise msgkit.RetryLater(1, "payment service busy")  # ChangeMessageVisibility(1 s)
            if order.id == 7:
                raise msgkit.Reject("order 7 is fraudulent")  # straight to the dead-letter queue
            print(f"billed order {order.id} of {delivery.key}: {order.total:.2f} (attempt {delivery.attempt})")
            billed.append(order.id)
            check()

        async def inspect(delivery: msgkit.Delivery) -> None:
            print(f"dead letter {delivery.id}: {delivery.headers['msgkit-dlq-reason']}")
            dead.append(delivery)
            check()

        consumer = broker.consumer(topic, "billing", bill, max_in_flight=32, ordered_by_key=True)
        dead_letters = broker.dead_letter_consumer(topic, "billing", inspect)
        await consumer.start()
        await dead_letters.start()
        await asyncio.wait_for(done.wait(), timeout=60)
        await consumer.stop()  # graceful: running handlers finish, their messages are deleted
        await dead_letters.stop()
        await broker.delete(topic, "billing")  # the throwaway queue and its dead-letter queue


if __name__ == "__main__":
    asyncio.run(main())

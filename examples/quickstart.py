"""msgkit in about 20 lines: send pydantic models and handle them, on any broker.

Runs on the embedded memory:// broker by default; set MSGKIT_URL to use a real one.
"""

import asyncio

from pydantic import BaseModel

import msgkit


class Order(BaseModel):
    id: int
    total: float


async def main() -> None:
    async with msgkit.Broker() as broker:  # URL from MSGKIT_URL, else memory://
        await broker.declare("orders", "billing")  # keep messages until billing consumes
        await broker.send_batch("orders", [Order(id=i, total=9.5 * i) for i in range(1, 4)])

        handled = asyncio.Event()

        async def bill(order: Order, delivery: msgkit.Delivery) -> None:
            print(f"billing order {order.id}: {order.total:.2f} (attempt {delivery.attempt})")
            if order.id == 3:
                handled.set()

        consumer = broker.consumer("orders", "billing", bill, max_in_flight=16)
        await consumer.start()
        await asyncio.wait_for(handled.wait(), timeout=10)
        await consumer.stop()  # graceful: finishes and acks in-flight work


if __name__ == "__main__":
    asyncio.run(main())

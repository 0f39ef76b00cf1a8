"""Swapping brokers is a configuration change: this one script runs unchanged on every broker.

The broker comes from the URL in MSGKIT_URL (memory:// when unset). The code never names a
broker; where brokers differ it asks ``broker.capabilities`` instead of checking the scheme:

    python examples/swap_brokers.py                                            # memory://
    MSGKIT_URL=amqp://guest:guest@127.0.0.1:5672/ python examples/swap_brokers.py
    MSGKIT_URL=redis://127.0.0.1:6379/0 python examples/swap_brokers.py
    MSGKIT_URL=kafka://127.0.0.1:9092 python examples/swap_brokers.py
    MSGKIT_URL="sqs://127.0.0.1:9324?region=us-east-1&secure=false" python examples/swap_brokers.py

It sends ten orders and bills them; where the transport fans out (every group gets every message)
a second group, shipping, gets them too. It exits 1 if an order went missing.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable

from pydantic import BaseModel

import msgkit

ORDERS = 10


class Order(BaseModel):
    id: int
    customer: str


def tracker(seen: set[int], done: asyncio.Event) -> Callable[[Order], Awaitable[None]]:
    """A handler that records each order id and sets ``done`` once all of them arrived."""

    async def handle(order: Order) -> None:
        seen.add(order.id)
        if len(seen) == ORDERS:
            done.set()

    return handle


async def main() -> int:
    topic = f"swap-{uuid.uuid4().hex[:8]}"  # a fresh topic: runs never see each other's messages
    async with msgkit.Broker() as broker:  # the URL from MSGKIT_URL, else memory://
        caps = broker.capabilities
        print(f"broker {broker.url}: fan_out={caps.fan_out} ordered={caps.ordered} native_delay={caps.native_delay}")
        groups = ["billing", "shipping"] if caps.fan_out else ["billing"]
        for group in groups:
            await broker.declare(topic, group)  # messages are kept for each group from now on
        orders = [Order(id=n, customer=f"customer-{n % 3}") for n in range(1, ORDERS + 1)]
        await broker.send_batch(topic, [msgkit.Message.of(o, key=o.customer) for o in orders])

        seen: dict[str, set[int]] = {group: set() for group in groups}
        done = {group: asyncio.Event() for group in groups}
        consumers = [broker.consumer(topic, g, tracker(seen[g], done[g]), max_in_flight=16) for g in groups]
        for consumer in consumers:
            await consumer.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in done.values())), timeout=60)
        except TimeoutError:
            pass  # reported below
        for consumer in consumers:
            await consumer.stop()
        for group in groups:
            await broker.delete(topic, group)  # the throwaway topic goes with its last group

    scheme = broker.url.split(":", 1)[0]
    for group in groups:
        print(f"swap: {len(seen[group])} of {ORDERS} orders handled by {group} on {scheme}")
    if not caps.fan_out:
        print(f"swap: {scheme} does not fan out (one group per queue), so only billing consumed")
    return 0 if all(len(s) == ORDERS for s in seen.values()) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""Retries, dead letters and replay: a failing order is retried with backoff, then parked with the
reason; a poison message is parked at once; after the "fix" the order is replayed and billed.

    python examples/retries_dead_letters.py                 # memory://
    MSGKIT_URL=redis://127.0.0.1:6379/0 python examples/retries_dead_letters.py

Runs on any broker (the URL comes from MSGKIT_URL, else memory://). What happens:

1. Orders 1 to 3 are sent, plus a body that is not an order at all (a poison message).
2. Order 3 fails: the payment service is down. The retry policy redelivers it after 0.2 s, then
   0.4 s (broker-side delays), and after its 3rd attempt moves it to the group's dead letters.
3. The poison message fails validation: no retry fixes bad data, so it is dead-lettered at once.
4. ``broker.dead_letters(...)`` lists both with their reasons (``msgkit dlq list`` does the same).
5. The payment service is back: order 3 is replayed (same message id, attempts from 1) and billed;
   the poison message is purged.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

from pydantic import BaseModel

import msgkit

GROUP = "billing"
MAX_ATTEMPTS = 3


class Order(BaseModel):
    id: int
    total: float


class PaymentService:
    """Stands in for a remote service that is down until ``up`` is set."""

    def __init__(self) -> None:
        self.up = False
        self.billed: dict[int, int] = {}  # order id -> the attempt that billed it
        self.exhausted = asyncio.Event()  # order 3 failed its last attempt
        self.changed = asyncio.Event()

    async def bill(self, order: Order, delivery: msgkit.Delivery) -> None:
        if order.id == 3 and not self.up:
            print(f"order 3: attempt {delivery.attempt} fails, the payment service is down")
            if delivery.attempt >= MAX_ATTEMPTS:
                self.exhausted.set()
            raise ConnectionError("payment service unavailable")
        print(f"order {order.id} billed: {order.total:.2f} (attempt {delivery.attempt})")
        self.billed[order.id] = delivery.attempt
        self.changed.set()


RETRY = msgkit.RetryPolicy(
    max_attempts=MAX_ATTEMPTS, initial_delay=0.2, multiplier=2, jitter=0, retry_on=(ConnectionError,)
)


async def billed(service: PaymentService, ids: set[int]) -> None:
    """Wait until every order in ``ids`` is billed."""
    while not ids <= service.billed.keys():
        service.changed.clear()
        await service.changed.wait()


async def parked(dead: msgkit.DeadLetters, count: int, timeout: float = 60) -> list[msgkit.DeadLetterInfo]:
    """Look at the dead letters until ``count`` are there (storing them is asynchronous on some brokers)."""
    deadline = time.monotonic() + timeout
    while len(letters := await dead.peek()) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"expected {count} dead letters, found {len(letters)} after {timeout:.0f} s")
        await asyncio.sleep(0.2)
    return letters


async def main() -> int:
    topic = f"payments-{uuid.uuid4().hex[:8]}"  # a fresh topic: runs never see each other's messages
    service = PaymentService()
    async with msgkit.Broker() as broker:  # MSGKIT_URL, else memory://
        print(f"on {broker.url}")
        await broker.declare(topic, GROUP)
        await broker.send_batch(topic, [Order(id=n, total=12.5 * n) for n in (1, 2, 3)])
        poison_id = await broker.send(topic, {"id": "four", "total": "a lot"})

        consumer = broker.consumer(topic, GROUP, service.bill, retry=RETRY, max_in_flight=8)
        await consumer.start()
        async with asyncio.timeout(60):
            await billed(service, {1, 2})
            await service.exhausted.wait()
        await consumer.stop()  # graceful: settles order 3's last outcome (to the dead letters)

        dead = await broker.dead_letters(topic, GROUP)
        letters = await parked(dead, 2)
        order_3 = next(letter for letter in letters if letter.id != poison_id)
        for letter in letters:
            print(f"dead letter {letter.id}: {letter.error_type} after {letter.attempts} attempt(s): {letter.reason}")

        service.up = True  # the fix is deployed: replay what failed, drop what can never succeed
        print(f"replayed {await dead.replay([order_3.id])}; purged {await dead.purge([poison_id])}")
        consumer = broker.consumer(topic, GROUP, service.bill, retry=RETRY, max_in_flight=8)
        await consumer.start()
        async with asyncio.timeout(60):
            await billed(service, {3})
        await consumer.stop()
        left = await dead.peek()
        await broker.delete(topic, GROUP)  # the throwaway topic and group, dead letters included
    print(f"order 3 billed after replay (attempt {service.billed[3]}); {len(left)} dead letter(s) left")
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

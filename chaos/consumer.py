"""A consumer process: ``python -m chaos.consumer BROKER_URL DB_URL TOPIC GROUP RUN [options]``.

Each message's effect is one ``chaos_effects`` row written in the inbox's transaction. A share
of handler calls fail at random *after* writing the row (the inbox must roll it back). A token
bucket before the inbox caps this process's rate, so the orchestrator knows the consumers'
capacity. Deliveries the inbox acks without running the handler are counted in
``chaos_suppressed``. SIGTERM stops it gracefully; the orchestrator also SIGKILLs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import os
import random
import time

from pydantic import BaseModel

import msgkit
from chaos import db as chaos_db
from msgkit.outbox import Inbox


class Order(BaseModel):
    run: str
    n: int


class InjectedFailure(Exception):
    """A handler failure the suite injected on purpose."""


class RateLimit:
    """Middleware that lets at most ``rate`` messages per second through (a token bucket of one)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    async def __call__(self, delivery: msgkit.Delivery, call_next: msgkit.CallNext) -> msgkit.Outcome | None:
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)
        return await call_next(delivery)


_handled: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("chaos_handled")


async def consume(args: argparse.Namespace) -> None:
    engine = chaos_db.engine(args.db, pool_size=args.max_in_flight + 2, max_overflow=5)
    inbox = Inbox(engine)
    rng = random.Random()

    async def count_suppressed(delivery: msgkit.Delivery, call_next: msgkit.CallNext) -> msgkit.Outcome | None:
        handled = [False]
        _handled.set(handled)
        outcome = await call_next(delivery)
        if not handled[0] and (outcome is None or isinstance(outcome, msgkit.Ack)):
            async with engine.begin() as conn:
                await conn.execute(chaos_db.suppressed.insert().values(run=args.run, message_id=delivery.id))
        return outcome

    async def handle(order: Order, delivery: msgkit.Delivery) -> None:
        _handled.get()[0] = True
        await inbox.session().execute(
            chaos_db.effects.insert().values(
                run=args.run, message_id=delivery.id, n=order.n, pid=os.getpid(), at=time.time()
            )
        )
        if rng.random() < args.failure_share:
            raise InjectedFailure(f"injected failure of {delivery.id} (attempt {delivery.attempt})")

    retry = msgkit.RetryPolicy(initial_delay=0.2, max_delay=2.0, max_attempts=50, max_age=3600)
    async with msgkit.Broker(args.url) as broker:
        broker.consumer(
            args.topic,
            args.group,
            handle,
            middleware=[RateLimit(args.rate), count_suppressed, inbox],
            max_in_flight=args.max_in_flight,
            retry=retry,
        )
        print("ready", flush=True)
        await broker.run()
    await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("url", "db", "topic", "group", "run"):
        parser.add_argument(name)
    parser.add_argument("--rate", type=float, default=150.0)
    parser.add_argument("--failure-share", type=float, default=0.05)
    parser.add_argument("--max-in-flight", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format=f"consumer {os.getpid()} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("msgkit.retry").setLevel(logging.ERROR)  # injected failures: 5% of calls
    asyncio.run(consume(args))


if __name__ == "__main__":
    main()

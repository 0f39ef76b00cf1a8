"""A producer process: ``python -m chaos.producer BROKER_URL DB_URL TOPIC RUN PHASE COUNT RATE SEED``.

Sends the phase's messages at ``RATE`` per second: those the plan puts through the outbox are
added to ``msgkit_outbox`` (one transaction per tick) and published by an in-process relay; the
others are sent directly with ``send_batch``, retried until the broker stored them (a retry after
an unclear failure may duplicate; the consumers' inbox absorbs that). Prints ``sent N`` as it
goes and ``done N`` once every message is stored by the broker (outbox rows: relayed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncEngine

import msgkit
from chaos import db as chaos_db
from chaos.plan import Plan
from msgkit.outbox import Outbox, OutboxRelay

TICK = 0.05
MAX_CHUNK = 500
#: How long one send keeps being retried while the broker is down (seconds).
SEND_DEADLINE = 180.0

logger = logging.getLogger("chaos.producer")


class Progress:
    def __init__(self) -> None:
        self.sent = 0

    def add(self, count: int) -> None:
        self.sent += count
        print(f"sent {self.sent}", flush=True)


async def paced(numbers: list[int], rate: float, share: float, start: float) -> AsyncIterator[list[int]]:
    """Yield chunks of ``numbers`` so that they go out at ``rate * share`` per second from ``start``
    (a ``time.monotonic()``): message n of the whole phase is due about ``n / rate`` seconds in."""
    done = 0
    while done < len(numbers):
        due = min(len(numbers), int((time.monotonic() - start) * rate * share) + 1)
        if due > done:
            chunk = numbers[done : min(due, done + MAX_CHUNK)]
            done += len(chunk)
            yield chunk
        else:
            await asyncio.sleep(TICK)


async def send_direct(
    broker: msgkit.Broker, args: argparse.Namespace, plan: Plan, numbers: list[int], progress: Progress, start: float
) -> None:
    share = len(numbers) / max(plan.count, 1)
    async for chunk in paced(numbers, args.rate, share, start):
        messages = [
            msgkit.Message.of(plan.body(n, args.padding), id=plan.message_id(n), key=f"k{n % 16}") for n in chunk
        ]
        deadline = time.monotonic() + SEND_DEADLINE
        while True:
            try:
                await broker.send_batch(args.topic, messages)
                break
            except msgkit.MsgkitError as exc:
                if time.monotonic() > deadline:
                    raise
                logger.info("send failed (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(0.2)
        progress.add(len(chunk))


async def add_to_outbox(
    engine: AsyncEngine, args: argparse.Namespace, plan: Plan, numbers: list[int], progress: Progress, start: float
) -> None:
    outbox = Outbox()
    share = len(numbers) / max(plan.count, 1)
    async for chunk in paced(numbers, args.rate, share, start):
        async with engine.begin() as conn:
            for n in chunk:
                await outbox.add(
                    conn, args.topic, plan.body(n, args.padding), key=f"k{n % 16}", message_id=plan.message_id(n)
                )
        progress.add(len(chunk))


async def produce(args: argparse.Namespace) -> None:
    plan = Plan(args.run, args.phase, args.count, args.seed, args.poison_share, args.outbox_share)
    engine = chaos_db.engine(args.db)
    progress = Progress()
    outbox_numbers = sorted(plan.via_outbox)
    direct_numbers = [n for n in range(plan.count) if n not in plan.via_outbox]
    async with msgkit.Broker(args.url) as broker:
        relay = OutboxRelay(engine, broker, max_backoff=2.0, retention=0)
        await relay.start()
        try:
            start = time.monotonic()
            print(f"start {time.time()}", flush=True)
            await asyncio.gather(
                send_direct(broker, args, plan, direct_numbers, progress, start),
                add_to_outbox(engine, args, plan, outbox_numbers, progress, start),
            )
            deadline = time.monotonic() + SEND_DEADLINE
            while await chaos_db.unsent_outbox_rows(engine, args.topic):
                if time.monotonic() > deadline:
                    raise TimeoutError("the relay did not publish the outbox in time")
                await asyncio.sleep(0.2)
        finally:
            await relay.stop()
    await engine.dispose()
    print(f"done {progress.sent}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("url", "db", "topic", "run", "phase"):
        parser.add_argument(name)
    parser.add_argument("count", type=int)
    parser.add_argument("rate", type=float)
    parser.add_argument("seed", type=int)
    parser.add_argument("--poison-share", type=float, default=0.01)
    parser.add_argument("--outbox-share", type=float, default=0.5)
    parser.add_argument("--padding", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format=f"producer {os.getpid()} %(levelname)s %(name)s: %(message)s")
    asyncio.run(produce(args))


if __name__ == "__main__":
    main()

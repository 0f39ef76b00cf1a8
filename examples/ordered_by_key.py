"""Per-key ordered processing: one account's events run one after another, in the order they were
sent, while different accounts run in parallel.

    python examples/ordered_by_key.py                       # memory://
    MSGKIT_URL=kafka://127.0.0.1:9092 python examples/ordered_by_key.py

``ordered_by_key=True`` gives each key a lane: a key's next delivery starts only when the one
before it is done, and up to ``max_in_flight`` deliveries of different keys run at once. That
keeps the broker's order, so it needs a transport whose ``capabilities.ordered`` is true (memory,
RabbitMQ, Redis Streams, Kafka, SQS FIFO queues: ``sqs://...&fifo=true``); on others the example
says so and exits 1. It checks every account's events arrived in order and exits 1 if not.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections import defaultdict

from pydantic import BaseModel

import msgkit

ACCOUNTS = 6
EVENTS_PER_ACCOUNT = 8


class BalanceChanged(BaseModel):
    account: str
    seq: int  # the event's position in its account's history
    delta: int


class Ledger:
    """Applies balance changes and watches order and parallelism."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = defaultdict(list)
        self.running: set[str] = set()
        self.most_in_parallel = 0
        self.overlaps_within_a_key = 0
        self.done = asyncio.Event()

    async def apply(self, event: BalanceChanged) -> None:
        if event.account in self.running:
            self.overlaps_within_a_key += 1  # never happens with ordered_by_key=True
        self.running.add(event.account)
        self.most_in_parallel = max(self.most_in_parallel, len(self.running))
        try:
            await asyncio.sleep(random.uniform(0.001, 0.02))  # stands in for a database write
            self.seen[event.account].append(event.seq)
        finally:
            self.running.discard(event.account)
        if sum(len(seqs) for seqs in self.seen.values()) == ACCOUNTS * EVENTS_PER_ACCOUNT:
            self.done.set()


async def main() -> int:
    topic = f"ledger-{uuid.uuid4().hex[:8]}"  # a fresh topic: runs never see each other's messages
    async with msgkit.Broker() as broker:  # MSGKIT_URL, else memory://
        print(f"on {broker.url}: ordered={broker.capabilities.ordered}")
        if not broker.capabilities.ordered:
            print("this transport does not keep order (for SQS use a FIFO queue: add &fifo=true)")
            return 1
        await broker.declare(topic, "ledger")
        # interleave the accounts, as a busy producer would: a1#1, a2#1, ..., a1#2, a2#2, ...
        events = [
            BalanceChanged(account=f"account-{a}", seq=s, delta=random.randint(-50, 100))
            for s in range(1, EVENTS_PER_ACCOUNT + 1)
            for a in range(1, ACCOUNTS + 1)
        ]
        await broker.send_batch(topic, [msgkit.Message.of(e, key=e.account) for e in events])

        ledger = Ledger()
        consumer = broker.consumer(topic, "ledger", ledger.apply, max_in_flight=16, ordered_by_key=True)
        await consumer.start()
        try:
            await asyncio.wait_for(ledger.done.wait(), timeout=60)
        except TimeoutError:
            print(f"timed out: {sum(map(len, ledger.seen.values()))} of {len(events)} events applied")
        await consumer.stop()
        await broker.delete(topic, "ledger")  # the throwaway topic and group, with whatever is left in them

    in_order = [account for account, seqs in sorted(ledger.seen.items()) if seqs == sorted(seqs)]
    for account, seqs in sorted(ledger.seen.items()):
        print(f"{account}: events {seqs}")
    print(
        f"per-key order kept for {len(in_order)} of {ACCOUNTS} accounts; "
        f"up to {ledger.most_in_parallel} accounts in parallel; "
        f"{ledger.overlaps_within_a_key} overlaps within an account"
    )
    complete = all(len(ledger.seen[f"account-{a}"]) == EVENTS_PER_ACCOUNT for a in range(1, ACCOUNTS + 1))
    return 0 if complete and len(in_order) == ACCOUNTS and not ledger.overlaps_within_a_key else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""What every implementation shares: the message, the bodies, the tracker that counts every
message, and the memory sampler. An implementation (msgkit, raw client, FastStream) is a
:class:`Bench`: it publishes bodies and consumes them into ``on_order``; the workloads in
``benchmarks.child`` drive it the same way for all three.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from pydantic import BaseModel

#: Ack/commit batching every implementation's consumer uses (outcomes or seconds, whichever first).
ACK_BATCH = 100
ACK_INTERVAL = 0.05
#: Messages per publish call (one batch, one window of confirms).
PUBLISH_CHUNK = 1000


class Order(BaseModel):
    """The message body, validated by every consumer: ~170 bytes of JSON."""

    order_id: int
    customer: str
    sku: str
    quantity: int
    price: float
    currency: str
    note: str
    sent_at: float


def body(order_id: int, sent_at: float = 0.0) -> bytes:
    """The JSON body of order ``order_id`` (what ``Order(...).model_dump_json()`` gives)."""
    return (
        f'{{"order_id":{order_id},"customer":"customer-0042","sku":"SKU-12345-XL","quantity":3,'
        f'"price":19.99,"currency":"EUR","note":"leave it at the door, please","sent_at":{sent_at!r}}}'
    ).encode()


OnOrder = Callable[[Order], Awaitable[None]]


class Bench(Protocol):
    """One implementation on one broker, on fresh names (``topic``, ``group``) of its own."""

    async def open(self) -> None:
        """Connect and declare the topic and the group's subscription (so publishes are kept)."""

    async def publish(self, bodies: list[bytes]) -> None:
        """Publish ``bodies`` in order; return once the broker has stored (confirmed) all of them."""

    async def start(self, on_order: OnOrder, max_in_flight: int, slow: bool) -> None:
        """Consume the group: validate each body into an Order, await ``on_order``, then ack (at
        least once), with at most ``max_in_flight`` messages unacked. ``slow``: on_order waits."""

    async def stop(self) -> None:
        """Stop consuming, settling what was handled."""

    async def close(self) -> None:
        """Disconnect (names are deleted by ``benchmarks.cleanup`` afterwards)."""


class Tracker:
    """Counts orders 0..total-1 as they are handled; ``done`` is set when each was seen once."""

    def __init__(self, total: int, *, delay: float = 0.0, measure_below: int | None = None) -> None:
        self.seen = bytearray(total)
        self.remaining = total
        self.duplicates = 0
        self.unknown = 0
        self.latencies: list[float] = []
        self.delay = delay
        self.measure_below = total if measure_below is None else measure_below
        self.done = asyncio.Event()
        self.first_at = 0.0
        self.last_at = 0.0

    async def on_order(self, order: Order) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)  # stands for awaited I/O (a database call, an HTTP request)
        self.mark(order)

    def mark(self, order: Order) -> None:
        i = order.order_id
        if not 0 <= i < len(self.seen):
            self.unknown += 1
            return
        if self.seen[i]:
            self.duplicates += 1
            return
        self.seen[i] = 1
        if order.sent_at and i < self.measure_below:
            self.latencies.append(time.time() - order.sent_at)
        if not self.first_at:
            self.first_at = time.perf_counter()
        self.remaining -= 1
        if self.remaining == 0:
            self.last_at = time.perf_counter()
            self.done.set()

    async def wait(self, timeout: float) -> None:
        """Wait until every order was seen; raise TimeoutError naming how many are missing."""
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self.remaining} of {len(self.seen)} messages not handled after {timeout:.0f}s "
                f"({self.duplicates} duplicates, {self.unknown} unknown)"
            ) from None


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


class RssSampler:
    """Samples RSS every ``interval`` seconds in a thread (the event loop may be busy): start, peak."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __enter__(self) -> RssSampler:
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())


class Window:
    """Runs coroutines as tasks, at most ``size`` at once: the raw clients' concurrency for slow handlers."""

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)
        self._tasks: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None

    async def submit(self, work: Awaitable[None]) -> None:
        await self._slots.acquire()
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks)
        if self.error is not None:
            raise self.error

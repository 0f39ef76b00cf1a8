"""What the contract tests share: unique names, waiting with deadlines, a recording handler, a run.

Nothing here sleeps to wait for something: :func:`eventually` polls a predicate against a
deadline and fails with a message that says what did not happen.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

import msgkit
from msgkit import Broker, Capabilities, Consumer, Delivery
from msgkit.names import check_name

#: Seconds to wait for something that should happen soon (generous: shared CI brokers are slow).
WAIT = 30.0
#: Seconds added to a bound a capability declares before a late event counts as a failure.
MARGIN = 1.5

#: Consumer options every contract consumer gets unless a test overrides them: settle quickly and
#: stop quickly, so that a failing test does not hang in teardown.
CONSUMER_DEFAULTS: dict[str, Any] = {"settle_interval": 0.01, "stop_timeout": 5.0}
#: Seconds the deletions at the end of a run may take (a broker a failed test left down must not hang it).
CLEANUP_TIMEOUT = 60.0


def unique(prefix: str = "ct") -> str:
    """A fresh topic or group name, so tests can share a broker and run in parallel."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def eventually(
    predicate: Callable[[], bool],
    timeout: float = WAIT,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.005,
) -> None:
    """Return once ``predicate()`` is true; fail the test if it is still false after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"not true after {timeout:.1f}s: {text}")
        await asyncio.sleep(interval)


async def quiet_period(capabilities: Capabilities, cap: float = 10.0) -> None:
    """Wait long enough that a delivery lost by a consumer would have come back (to assert absence).

    That is ``consumer_loss_redelivery`` plus half a second, at most ``cap`` seconds. Absence can
    only be shown by waiting; this is the one place the suite waits for nothing in particular.
    """
    await asyncio.sleep(min(capabilities.consumer_loss_redelivery, cap) + 0.5)


def require(capability: bool, name: str) -> None:
    """Skip the test unless the transport declares ``capability``."""
    __tracebackhide__ = True  # report the skip at the test, not here
    if not capability:
        pytest.skip(f"the transport does not declare Capabilities.{name}")


class Received:
    """A handler that records every delivery it gets, with the time it got it."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.times: list[float] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.record(delivery)

    def record(self, delivery: Delivery) -> None:
        """Note ``delivery`` (call this from a custom handler)."""
        self.deliveries.append(delivery)
        self.times.append(time.monotonic())

    @property
    def ids(self) -> list[str]:
        """Message ids in arrival order, duplicates included."""
        return [d.message.id for d in self.deliveries]

    def by_id(self) -> dict[str, Delivery]:
        """The last delivery of each message id."""
        return {d.message.id: d for d in self.deliveries}

    def duplicates(self) -> list[str]:
        """Ids that arrived more than once."""
        return [i for i, n in Counter(self.ids).items() if n > 1]

    async def wait_for(self, ids: Collection[str], timeout: float = WAIT) -> None:
        """Wait until every id in ``ids`` has arrived."""
        wanted = set(ids)

        def missing() -> str:
            lost = wanted - set(self.ids)
            return f"{len(lost)} of {len(wanted)} messages did not arrive (e.g. {sorted(lost)[:3]})"

        await eventually(lambda: wanted <= set(self.ids), timeout, missing)


class TrackingBroker(Broker):
    """A Broker that notes what it declares, so that a contract run can delete it afterwards."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        #: (topic, group) pairs declared, in order; group None for a topic declared alone.
        self.declared: dict[tuple[str, str | None], None] = {}

    async def declare(self, topic: str, group: str | None = None) -> None:
        try:
            await super().declare(topic, group)
        finally:  # noted even if it failed half way: a part may exist
            if _valid(topic) and (group is None or _valid(group)):
                self.declared[(topic, group)] = None


def _valid(name: str) -> bool:
    try:
        check_name("name", name)
    except (TypeError, ValueError):
        return False
    return True


class ContractRun:
    """One test's broker, fresh names, and the consumers it started.

    At the end the consumers are stopped and every (topic, group) the run handed out, declared or
    consumed is deleted (:meth:`msgkit.Broker.delete`), so a contract run leaves nothing behind
    on the broker; a transport that cannot delete leaves them.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._consumers: list[Consumer] = []
        self._used: dict[tuple[str, str | None], None] = {}

    @property
    def capabilities(self) -> Capabilities:
        return self.broker.capabilities

    def names(self) -> tuple[str, str]:
        """A fresh (topic, group), deleted when the run ends."""
        names = unique("ct"), unique("cg")
        self.track(*names)
        return names

    def track(self, topic: str, group: str | None = None) -> None:
        """Delete (topic, group) when the run ends (with no group: the topic, if no group uses it)."""
        self._used[(topic, group)] = None

    def consumer(self, topic: str, group: str, handler: Any, **options: Any) -> Consumer:
        """Build a consumer with :data:`CONSUMER_DEFAULTS` (overridable); stopped when the run ends."""
        consumer = self.broker.consumer(topic, group, handler, **{**CONSUMER_DEFAULTS, **options})
        self._consumers.append(consumer)
        self.track(topic, group)
        return consumer

    async def start(self, topic: str, group: str, handler: Any, **options: Any) -> Consumer:
        """Build and start a consumer."""
        consumer = self.consumer(topic, group, handler, **options)
        await consumer.start()
        return consumer

    async def dead_letters(self, topic: str, group: str) -> Received:
        """Start a consumer of (topic, group)'s dead letters; return what it records."""
        received = Received()
        consumer = self.broker.dead_letter_consumer(topic, group, received, **CONSUMER_DEFAULTS)
        self._consumers.append(consumer)
        self.track(topic, group)
        await consumer.start()
        return received

    async def send_all(self, topic: str, bodies: Sequence[bytes], **options: Any) -> list[str]:
        """Send each body with ``broker.send``; return the ids."""
        return [await self.broker.send(topic, body, **options) for body in bodies]

    async def close(self) -> None:
        """Stop this run's consumers (briefly: handlers blocked by a failed test are cancelled),
        delete what the run used, close. A failed deletion is a warning, never an error."""
        await asyncio.gather(*(c.stop(timeout=2.0) for c in self._consumers), return_exceptions=True)
        try:
            await self._delete_used()
        finally:
            await self.broker.close()

    async def _delete_used(self) -> None:
        used = dict(self._used)
        if isinstance(self.broker, TrackingBroker):
            used.update(self.broker.declared)
        pairs = [(t, g) for t, g in used if g is not None]
        with_group = {t for t, _ in pairs}
        pairs += [(t, unique("cg")) for t, g in used if g is None and t not in with_group]  # the topic alone
        if not pairs:
            return
        try:
            await self.broker.connect()
        except msgkit.ClosedError:
            return  # the test closed the broker itself
        failures: list[str] = []
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                for topic, group in pairs:
                    try:
                        await self.broker.delete(topic, group)
                    except msgkit.NotSupportedError:
                        return
                    except Exception as exc:  # cleanup must not hide or replace the test's own outcome
                        failures.append(f"{topic}/{group}: {type(exc).__name__}: {exc}")
        except TimeoutError:
            failures.append(f"not done within {CLEANUP_TIMEOUT:g}s")
        if failures:
            warnings.warn(
                f"the contract run could not delete {len(failures)} of {len(pairs)} groups: {failures[0]}",
                stacklevel=1,
            )


@asynccontextmanager
async def contract_run(url: str) -> AsyncIterator[ContractRun]:
    """Connect a broker for one test; afterwards stop its consumers, delete what the test
    declared or consumed (see :class:`ContractRun`) and close the broker."""
    broker = TrackingBroker(url)
    await broker.connect()
    run = ContractRun(broker)
    try:
        yield run
    finally:
        await run.close()

"""The in-memory transport: a real broker inside the process, for demos, tests and the quickstart.

``memory://`` (or ``memory://NAME`` for a separate, named broker) gives topics with an
append-only log, groups that each read every message (fan-out) with competing consumers inside a
group, per-key order, redelivery with attempt counts, delayed redelivery, dead letters, and a
visibility timeout after which the deliveries of a consumer that vanished without settling go
to another consumer. Brokers live as long as the process; every Transport with the same URL name
shares one. It runs on one event loop at a time and is not thread-safe.

Options (URL query): ``visibility_timeout`` (seconds, default 30), ``max_message_size`` (bytes,
default 1 MiB), ``history`` (messages kept per topic for groups created later, default 100000).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field

from msgkit.config import TransportSettings, settings_from_url, split_url
from msgkit.errors import ClosedError, ConfigurationError
from msgkit.message import Ack, DeadLetter, Delivery, Message, Outcome, dead_letter_message
from msgkit.transports.base import Capabilities, Subscription, Transport

DEAD_LETTER_GROUP = "dead-letters"


class MemorySettings(TransportSettings):
    """Options of ``memory://`` URLs."""

    visibility_timeout: float = Field(30.0, gt=0, le=86_400)
    max_message_size: int = Field(1_048_576, ge=1024, le=256 * 1_048_576)
    history: int = Field(100_000, ge=0)


class _Owner:
    """Who holds a lease: a token the subscription keeps, so leases do not keep it alive."""

    __slots__ = ("__weakref__",)


class _Entry:
    """A message as a group holds it: how often delivered, and under which lease now."""

    __slots__ = ("message", "deliveries", "owner")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.deliveries = 0
        self.owner: _Owner | None = None


@dataclass(slots=True)
class MemoryGroupStats:
    """A group's counts, as the broker sees them."""

    unread: int
    ready: int
    leased: int
    delayed: int
    dead: int


class _Topic:
    __slots__ = ("name", "log", "base", "groups")

    def __init__(self, name: str) -> None:
        self.name = name
        self.log: list[Message] = []  # a list: O(1) reads at any offset; trimmed in bulk
        self.base = 0  # offset of log[0]
        self.groups: dict[str, _Group] = {}

    @property
    def end(self) -> int:
        return self.base + len(self.log)

    def append(self, messages: Sequence[Message], history: int) -> None:
        self.log.extend(messages)
        if len(self.log) > history + 1024:
            trim_to = self.end - history
            if self.groups:
                trim_to = min(trim_to, min(g.cursor for g in self.groups.values()))
            if trim_to > self.base:
                del self.log[: trim_to - self.base]
                self.base = trim_to
        for group in self.groups.values():
            group.wake(len(messages))


class _Group:
    __slots__ = ("topic", "name", "cursor", "ready", "delayed", "leases", "waiters", "dead", "orphaned", "_seq")

    def __init__(self, topic: _Topic, name: str, dead: _Topic | None) -> None:
        self.topic = topic
        self.name = name
        self.cursor = topic.base
        self.ready: deque[_Entry] = deque()
        self.delayed: list[tuple[float, int, _Entry]] = []
        self.leases: dict[int, _Entry] = {}
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.dead = dead
        self.orphaned: list[tuple[_Owner, float]] = []  # owners gone without close(), with their timeout
        self._seq = itertools.count()

    def wake(self, count: int) -> None:
        waiters = self.waiters
        while waiters and count > 0:
            waiter = waiters.popleft()
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)
                count -= 1

    def delay(self, entry: _Entry, seconds: float) -> None:
        heapq.heappush(self.delayed, (time.monotonic() + seconds, next(self._seq), entry))
        self.wake(len(self.waiters))  # they recompute how long to sleep

    def next_due(self) -> float | None:
        return self.delayed[0][0] if self.delayed else None

    def expire(self, owner: _Owner, visibility_timeout: float) -> None:
        """The owner is gone without settling: its leases come back after the visibility timeout."""
        for lease in [lease for lease, entry in self.leases.items() if entry.owner is owner]:
            entry = self.leases.pop(lease)
            entry.owner = None
            self.delay(entry, visibility_timeout)

    def take(self, max_count: int, owner: _Owner, leases: itertools.count[int]) -> list[Delivery]:
        while self.orphaned:  # appended by a garbage-collected subscription's finalizer
            gone, timeout = self.orphaned.pop()
            self.expire(gone, timeout)
        delayed = self.delayed
        if delayed:
            now = time.monotonic()
            while delayed and delayed[0][0] <= now:
                self.ready.append(heapq.heappop(delayed)[2])
        out: list[Delivery] = []
        topic_name, group_name, lease_map = self.topic.name, self.name, self.leases
        ready = self.ready
        while ready and len(out) < max_count:
            entry = ready.popleft()
            entry.deliveries += 1
            entry.owner = owner
            lease = next(leases)
            lease_map[lease] = entry
            out.append(Delivery(entry.message, topic_name, group_name, entry.deliveries, lease))
        want = max_count - len(out)
        if want > 0:
            topic = self.topic
            start = self.cursor - topic.base
            stop = min(start + want, len(topic.log))
            if stop > start:
                for message in topic.log[start:stop]:
                    entry = _Entry(message)
                    entry.deliveries = 1
                    entry.owner = owner
                    lease = next(leases)
                    lease_map[lease] = entry
                    out.append(Delivery(message, topic_name, group_name, 1, lease))
                self.cursor += stop - start
        return out


class _Namespace:
    def __init__(self) -> None:
        self.topics: dict[str, _Topic] = {}
        self.dead: dict[tuple[str, str], _Topic] = {}
        self.leases = itertools.count(1)

    def topic(self, name: str) -> _Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = _Topic(name)
        return topic

    def dead_topic(self, topic: str, group: str) -> _Topic:
        key = (topic, group)
        dead = self.dead.get(key)
        if dead is None:
            dead = self.dead[key] = _Topic(f"{topic}.{group}.dead-letters")
            dead.groups[DEAD_LETTER_GROUP] = _Group(dead, DEAD_LETTER_GROUP, None)
        return dead

    def group(self, topic: str, group: str) -> _Group:
        t = self.topic(topic)
        g = t.groups.get(group)
        if g is None:
            g = t.groups[group] = _Group(t, group, self.dead_topic(topic, group))
        return g


_namespaces: dict[str, _Namespace] = {}


class MemorySubscription(Subscription):
    """A consumer attached to one group of an in-memory topic."""

    def __init__(self, transport: MemoryTransport, group: _Group, leases: itertools.count[int]) -> None:
        self._transport = transport
        self._group = group
        self._leases = leases
        self._closed = False
        self._owner = _Owner()
        # a subscription dropped without close() is a crashed consumer: its leases expire
        self._finalizer = weakref.finalize(
            self, group.orphaned.append, (self._owner, transport.settings.visibility_timeout)
        )

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        group = self._group
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._closed:
                raise ClosedError("subscription is closed")
            batch = group.take(max_count, self._owner, self._leases)
            if batch:
                return batch
            now = loop.time()
            wait = deadline - now
            if wait <= 0:
                return batch
            due = group.next_due()
            if due is not None:
                wait = min(wait, max(due - time.monotonic(), 0.0))
            waiter: asyncio.Future[None] = loop.create_future()
            group.waiters.append(waiter)
            timer = loop.call_later(wait, _set_if_pending, waiter)
            try:
                await waiter
            finally:
                timer.cancel()

    async def settle(self, settlements: Sequence[tuple[Delivery, Outcome]]) -> None:
        group = self._group
        leases = group.leases
        dead_messages: list[Message] = []
        redelivered = 0
        for delivery, outcome in settlements:
            entry = leases.pop(delivery.receipt, None)
            if entry is None or entry.owner is not self._owner:
                continue  # the lease expired and the message went to someone else
            entry.owner = None
            if isinstance(outcome, Ack):
                continue
            if isinstance(outcome, DeadLetter):
                if group.dead is not None:
                    dead_messages.append(dead_letter_message(delivery, outcome))
                    continue
                delay = 0.0  # dead letters of dead letters stay where they are
            else:
                delay = outcome.delay
                if outcome.headers:  # memory can rewrite headers on redelivery
                    m = entry.message
                    entry.message = Message(m.body, m.id, m.key, {**m.headers, **outcome.headers}, m.timestamp)
            if delay <= 0:
                group.ready.append(entry)
                redelivered += 1
            else:
                group.delay(entry, delay)
        if dead_messages:
            assert group.dead is not None
            group.dead.append(dead_messages, self._transport.settings.history)
        if redelivered:
            group.wake(redelivered)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        group = self._group
        released = 0
        for delivery in reversed(deliveries):
            entry = group.leases.pop(delivery.receipt, None)
            if entry is None or entry.owner is not self._owner:
                continue
            entry.owner = None
            entry.deliveries -= 1  # a release is not an attempt
            group.ready.appendleft(entry)
            released += 1
        if released:
            group.wake(released)

    def lag(self) -> int:
        """Messages of the group not delivered yet: unread, ready again, or delayed."""
        group = self._group
        return group.topic.end - group.cursor + len(group.ready) + len(group.delayed)

    async def close(self) -> None:
        """Detach; deliveries still leased come back after the visibility timeout."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        group = self._group
        group.expire(self._owner, self._transport.settings.visibility_timeout)
        self._transport._subscriptions.discard(self)
        group.wake(len(group.waiters))


def _forget(group: _Group | None) -> None:
    """Drop what a deleted group holds and wake its waiting fetches (they then find nothing)."""
    if group is None:
        return
    group.ready.clear()
    group.delayed.clear()
    group.leases.clear()
    group.cursor = group.topic.end
    group.wake(len(group.waiters))


def _set_if_pending(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class MemoryTransport(Transport):
    """The ``memory://`` transport. See the module docstring for what it models."""

    schemes = ("memory",)

    def __init__(self, name: str = "", settings: MemorySettings | None = None) -> None:
        self.name = name
        self.settings = settings or MemorySettings()
        self._namespace = _namespaces.setdefault(name, _Namespace())
        self._closed = False
        self._subscriptions: weakref.WeakSet[MemorySubscription] = weakref.WeakSet()
        self._capabilities = Capabilities(
            fan_out=True,
            replay_for_new_group=True,
            ordered=True,
            native_delay=True,
            delay_tolerance=0.1,
            max_message_size=self.settings.max_message_size,
            consumer_loss_redelivery=self.settings.visibility_timeout,
            persistent=False,
        )

    @classmethod
    def from_url(cls, url: str, settings: TransportSettings | None = None) -> MemoryTransport:
        parts = split_url(url)
        if parts.scheme.lower() != "memory":
            raise ConfigurationError(f"MemoryTransport serves memory:// URLs, not {parts.scheme}://")
        if parts.path not in ("", "/"):
            raise ConfigurationError(f"memory:// URLs take a name, not a path: memory://NAME (got path {parts.path!r})")
        if parts.username or parts.password or parts.port:
            raise ConfigurationError("memory:// URLs take no user, password or port: memory://NAME?options")
        return cls(parts.hostname or "", settings_from_url(MemorySettings, url, settings))

    def __repr__(self) -> str:
        return f"MemoryTransport(name={self.name!r})"

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"memory://{self.name} transport is closed")

    async def connect(self) -> None:
        self._check_open()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()

    async def declare(self, topic: str, group: str | None = None) -> None:
        self._check_open()
        if group is None:
            self._namespace.topic(topic)
        else:
            self._namespace.group(topic, group)

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        self._check_open()
        self._namespace.topic(topic).append(messages, self.settings.history)

    async def subscribe(self, topic: str, group: str, *, prefetch: int) -> MemorySubscription:
        self._check_open()
        return self._attach(self._namespace.group(topic, group))

    async def subscribe_dead_letters(self, topic: str, group: str, *, prefetch: int) -> MemorySubscription:
        self._check_open()
        self._namespace.group(topic, group)
        return self._attach(self._namespace.dead_topic(topic, group).groups[DEAD_LETTER_GROUP])

    async def delete(self, topic: str, group: str) -> None:
        """Forget the group (unread, pending, delayed and dead messages), then the topic and its
        history when no group of it is left. A later ``declare`` makes a fresh, empty group."""
        self._check_open()
        namespace = self._namespace
        dead = namespace.dead.pop((topic, group), None)
        if dead is not None:
            _forget(dead.groups.pop(DEAD_LETTER_GROUP, None))
        found = namespace.topics.get(topic)
        if found is None:
            return
        _forget(found.groups.pop(group, None))
        if not found.groups:
            del namespace.topics[topic]

    def _attach(self, group: _Group) -> MemorySubscription:
        subscription = MemorySubscription(self, group, self._namespace.leases)
        self._subscriptions.add(subscription)
        return subscription

    def stats(self, topic: str, group: str) -> MemoryGroupStats:
        """What the broker holds for (topic, group): for tests and debugging."""
        g = self._namespace.group(topic, group)
        d = self._namespace.dead_topic(topic, group).groups[DEAD_LETTER_GROUP]
        return MemoryGroupStats(
            unread=g.topic.end - g.cursor,
            ready=len(g.ready),
            leased=len(g.leases),
            delayed=len(g.delayed),
            dead=d.topic.end - d.cursor + len(d.ready) + len(d.leases) + len(d.delayed),
        )

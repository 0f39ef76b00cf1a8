"""Dead-letter tooling: list (peek), show, replay and purge the dead letters of a (topic, group).

Works on every transport through the SPI: dead letters are read with
``Transport.subscribe_dead_letters``; listing gives them back with ``release`` (not counted as a
delivery), replaying sends each to its original topic (same id, key, body and headers, minus the
dead-letter headers, so attempts start again at 1) before removing it from the dead letters.
A crash between the two replays a message twice, never zero times.

Replaying goes to the topic, so every group of the topic receives the message again, with its
original id: idempotent consumers (see msgkit's idempotency middleware) recognise it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

from msgkit.message import (
    ACK,
    DLQ_ATTEMPTS,
    DLQ_ERROR_TYPE,
    DLQ_FIRST_FAILED_AT,
    DLQ_GROUP,
    DLQ_HOST,
    DLQ_LAST_FAILED_AT,
    DLQ_REASON,
    DLQ_TOPIC,
    FIRST_FAILED_AT,
    Delivery,
    Message,
    Outcome,
)
from msgkit.names import check_name
from msgkit.transports.base import Subscription, Transport

_BATCH = 100
#: Dead letters one look may hold at once (leased, unsettled): the broker's credit for the
#: tooling. A peek, or a replay or purge of chosen ids, sees at most this many; a replay or purge
#: of all settles as it goes and has no such limit.
SCAN_LIMIT = 50_000
#: Once dead letters are flowing, a fetch that waits this long for more means there are no more.
_NEXT_FETCH_TIMEOUT = 0.25
_DROPPED_ON_REPLAY = frozenset(
    {
        DLQ_REASON,
        DLQ_ERROR_TYPE,
        DLQ_ATTEMPTS,
        DLQ_TOPIC,
        DLQ_GROUP,
        DLQ_FIRST_FAILED_AT,
        DLQ_LAST_FAILED_AT,
        DLQ_HOST,
        FIRST_FAILED_AT,
    }
)

#: Called with (done, total or None) as a long replay or purge goes on.
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """One dead letter as the tooling shows it."""

    id: str
    reason: str
    error_type: str
    attempts: int | None
    topic: str
    group: str
    first_failed_at: float | None
    last_failed_at: float | None
    host: str
    key: str | None
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, delivery: Delivery, topic: str, group: str) -> DeadLetterInfo:
        h = delivery.message.headers
        return cls(
            id=delivery.message.id,
            reason=h.get(DLQ_REASON, ""),
            error_type=h.get(DLQ_ERROR_TYPE, ""),
            attempts=_int(h.get(DLQ_ATTEMPTS)),
            topic=h.get(DLQ_TOPIC, topic),
            group=h.get(DLQ_GROUP, group),
            first_failed_at=_float(h.get(DLQ_FIRST_FAILED_AT)),
            last_failed_at=_float(h.get(DLQ_LAST_FAILED_AT)),
            host=h.get(DLQ_HOST, ""),
            key=delivery.message.key,
            body=delivery.message.body,
            headers=dict(h),
        )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class DeadLetters:
    """The dead letters of one (topic, group). Get one with :meth:`msgkit.Broker.dead_letters`."""

    def __init__(self, transport: Transport, topic: str, group: str, wait: float = 2.0) -> None:
        """``wait``: how long the first fetch waits for dead letters before taking "none" for an
        answer (brokers such as Kafka take a moment to start delivering)."""
        if wait <= 0:
            raise ValueError(f"wait must be > 0 seconds, got {wait!r}")
        self._wait = wait
        self._transport = transport
        self.topic = check_name("topic", topic)
        self.group = check_name("group", group)

    async def _open(self) -> Subscription:
        return await self._transport.subscribe_dead_letters(self.topic, self.group, prefetch=SCAN_LIMIT)

    async def _fetch_all(self, sub: Subscription, limit: int) -> list[Delivery]:
        """Lease dead letters until none are left (or ``limit``); the caller settles or releases them."""
        held: list[Delivery] = []
        while len(held) < limit:
            want = min(_BATCH, limit - len(held))
            batch = await sub.fetch(want, self._wait if not held else _NEXT_FETCH_TIMEOUT)
            if not batch:
                break
            held.extend(batch)
        return held

    async def peek(self, limit: int | None = 100) -> list[DeadLetterInfo]:
        """The dead letters (the first ``limit``; None for all, up to :data:`SCAN_LIMIT`), oldest
        first, left in place."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 (or None for all), got {limit}")
        limit = SCAN_LIMIT if limit is None else min(limit, SCAN_LIMIT)
        sub = await self._open()
        try:
            held = await self._fetch_all(sub, limit)
            await sub.release(held)
        finally:
            await sub.close()
        return [DeadLetterInfo.of(d, self.topic, self.group) for d in held]

    async def show(self, message_id: str) -> DeadLetterInfo | None:
        """The dead letter with ``message_id``, or None; left in place."""
        for info in await self.peek(limit=None):
            if info.id == message_id:
                return info
        return None

    async def replay(self, ids: Collection[str] | None = None, progress: Progress | None = None) -> list[str]:
        """Send the dead letters with ``ids`` (None: all) back to their original topic, with the same
        id and attempts starting again, and remove them from the dead letters. Returns the ids
        replayed; ids not found are ignored (compare to see them)."""

        def replayed_message(delivery: Delivery) -> Message:
            m = delivery.message
            headers = {k: v for k, v in m.headers.items() if k not in _DROPPED_ON_REPLAY}
            return Message(m.body, m.id, m.key, headers, m.timestamp)

        async def act(batch: Sequence[Delivery]) -> None:
            by_topic: dict[str, list[Message]] = {}
            for delivery in batch:
                topic = delivery.message.headers.get(DLQ_TOPIC) or self.topic
                by_topic.setdefault(topic, []).append(replayed_message(delivery))
            for topic, messages in by_topic.items():
                await self._transport.publish(topic, messages)

        return await self._drain(ids, act, progress)

    async def purge(self, ids: Collection[str] | None = None, progress: Progress | None = None) -> list[str]:
        """Delete the dead letters with ``ids`` (None: all) for good. Returns the ids deleted."""

        async def act(batch: Sequence[Delivery]) -> None:
            return None  # settling them as acked deletes them

        return await self._drain(ids, act, progress)

    async def _drain(
        self,
        ids: Collection[str] | None,
        act: Callable[[Sequence[Delivery]], Awaitable[None]],
        progress: Progress | None,
    ) -> list[str]:
        wanted = None if ids is None else set(ids)
        done: list[str] = []
        done_ids: set[str] = set()
        keep: list[Delivery] = []  # leased until the end, so each is fetched once
        sub = await self._open()
        try:
            timeout = self._wait
            while True:
                batch = await sub.fetch(_BATCH, timeout)
                timeout = _NEXT_FETCH_TIMEOUT
                if not batch:
                    break
                chosen: list[Delivery] = []
                for d in batch:
                    # a replayed message that failed again is back already: leave it for next time
                    if d.message.id not in done_ids and (wanted is None or d.message.id in wanted):
                        chosen.append(d)
                    else:
                        keep.append(d)
                if chosen:
                    await act(chosen)
                    settlements: list[tuple[Delivery, Outcome]] = [(d, ACK) for d in chosen]
                    await sub.settle(settlements)
                    done.extend(d.message.id for d in chosen)
                    done_ids.update(d.message.id for d in chosen)
                    if progress is not None:
                        progress(len(done), None if wanted is None else len(wanted))
                if wanted is not None and (len(done) >= len(wanted) or len(keep) >= SCAN_LIMIT):
                    break
            await sub.release(keep)
        finally:
            await sub.close()
        return done

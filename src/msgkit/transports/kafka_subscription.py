"""The consuming side of the Kafka transport: one subscription is one consumer-group member.

A subscription fetches with ``getmany`` sized by the engine's free slots, tracks every fetched
offset per partition (:class:`~msgkit.transports.kafka_offsets.PartitionOffsets`), and commits
only below the lowest unfinished one. Records wait in the subscription (not in the engine) while
they are delayed, blocked behind their key (``retry=inline``) or during a rebalance; partitions
are paused while the engine is full or too much waits here, and resumed as room frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
import zlib
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka import errors as kafka_errors
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor  # type: ignore[import-untyped]

from msgkit.errors import BrokerUnavailableError, ClosedError, PublishError
from msgkit.message import Ack, DeadLetter, Delivery, Message, Outcome, Retry, dead_letter_message
from msgkit.transports.base import Subscription
from msgkit.transports.kafka_offsets import PartitionOffsets
from msgkit.transports.kafka_protocol import (
    ATTEMPT_HEADER,
    DEAD_LETTER_PARTITIONS,
    NOT_BEFORE_HEADER,
    Assignor,
    from_record,
    translate,
    with_headers,
)

if TYPE_CHECKING:
    from msgkit.transports.kafka import KafkaTransport

logger = logging.getLogger("msgkit.kafka")

_READY, _HANDED, _HELD, _BLOCKED, _HANDING_OFF, _DONE = range(6)


class _Partition:
    """A partition a subscription owns: its offsets, counts and (with ``retry=inline``) key lanes."""

    __slots__ = ("tp", "offsets", "alive", "loading", "parked", "handed", "buffered", "lanes")

    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self.offsets = PartitionOffsets()
        self.alive = True
        self.loading = True  # waiting for the committed offset; records wait in ``parked``
        self.parked: list[Any] = []
        self.handed = 0  # entries the engine holds
        self.buffered = 0  # entries waiting here: ready, held or blocked behind their key
        self.lanes: dict[str, deque[_Entry]] = {}


class _Entry:
    """A fetched record until it is finished; the receipt of its deliveries.

    ``partition`` and ``offset`` (ints) are documented for telemetry, which records them on spans.
    """

    __slots__ = ("part", "offset", "message", "attempt", "state")

    def __init__(self, part: _Partition, offset: int, message: Message, attempt: int) -> None:
        self.part = part
        self.offset = offset
        self.message = message
        self.attempt = attempt
        self.state = _READY

    @property
    def partition(self) -> int:
        partition: int = self.part.tp.partition
        return partition


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, subscription: KafkaSubscription) -> None:
        self._subscription = subscription

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._subscription._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._subscription._on_assigned(set(assigned))


class KafkaSubscription(Subscription):
    """One Kafka consumer (one group member) feeding the engine. See the module docstring."""

    def __init__(
        self,
        transport: KafkaTransport,
        topic: str,
        group: str,
        kafka_group: str,
        prefetch: int,
        *,
        retry_topic: str | None,
        dead_topic: str | None,
    ) -> None:
        settings = transport.settings
        self._transport = transport
        self._settings = settings
        self._topic = topic
        self._group = group
        self._kafka_group = kafka_group
        self._retry_topic = retry_topic
        self._dead_topic = dead_topic
        self._lanes = retry_topic is None and dead_topic is not None  # retry=inline on a group
        self._prefetch = max(prefetch, 1)
        self._buffer_limit = max(2 * self._prefetch, 100)
        self._parts: dict[Any, _Partition] = {}
        self._early: dict[Any, list[Any]] = {}
        self._ready: deque[_Entry] = deque()
        self._held: list[tuple[float, int, _Entry]] = []
        self._seq = itertools.count()
        self._handed = 0
        self._phase: Literal["assigned", "revoking", "joining"] = "joining"
        self._drained: asyncio.Future[None] | None = None
        self._assigned = asyncio.Event()
        self._closed = False
        self._poll_task: asyncio.Task[Any] | None = None
        self._poll_error: BaseException | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._last_poll = time.monotonic()
        self._finished = 0
        self._last_committed: dict[Any, tuple[int | None, str]] = {}
        self._commit_lock = asyncio.Lock()
        self._commit_wakeup = asyncio.Event()
        self._commit_timer: asyncio.TimerHandle | None = None
        self._commit_failing_since: float | None = None
        self._coordinator_lost_since: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._consumer = AIOKafkaConsumer(
            **transport._client_options(),
            group_id=kafka_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=int(settings.session_timeout * 1000),
            heartbeat_interval_ms=int(settings.heartbeat_interval * 1000),
            rebalance_timeout_ms=int((settings.session_timeout + settings.revoke_timeout) * 1000),
            max_poll_interval_ms=int(settings.max_poll_interval * 1000),
            max_partition_fetch_bytes=max(1_048_576, settings.max_message_size + 65_536),
            partition_assignment_strategy=(Assignor(self._ownership), RoundRobinPartitionAssignor),
        )

    def _ownership(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """The partitions this member owns, and those with work in flight (for the assignment)."""
        parts = self._parts
        owned = [(tp.topic, tp.partition) for tp in parts]
        busy = [(tp.topic, tp.partition) for tp, part in parts.items() if part.handed]
        return owned, busy

    def __repr__(self) -> str:
        return f"KafkaSubscription(topic={self._topic!r}, group={self._group!r}, kafka_group={self._kafka_group!r})"

    async def _start(self) -> None:
        topics = [self._topic] if self._retry_topic is None else [self._topic, self._retry_topic]
        self._consumer.subscribe(topics, listener=_Listener(self))
        try:
            async with asyncio.timeout(self._settings.connect_timeout + self._settings.revoke_timeout):
                await self._consumer.start()
        except BaseException as exc:
            await self._consumer.stop()
            if isinstance(exc, TimeoutError):
                raise BrokerUnavailableError(
                    f"joining Kafka group {self._kafka_group!r} did not finish in time at {self._transport.url}"
                ) from None
            if isinstance(exc, kafka_errors.KafkaError):
                raise translate(exc, f"subscribing to {self._topic!r} as {self._kafka_group!r}") from exc
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._commit_loop(), name=f"msgkit-kafka-commit-{self._kafka_group}"),
            loop.create_task(self._keepalive_loop(), name=f"msgkit-kafka-keepalive-{self._kafka_group}"),
        ]

    # ------------------------------------------------------------------ fetching

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._raise_if_broken()
        while True:
            if self._closed:
                raise ClosedError("subscription is closed")
            error, self._poll_error = self._poll_error, None
            if error is not None:
                raise error
            batch = self._take(max_count) if max_count > 0 else []
            if batch:
                return batch
            wait = deadline - loop.time()
            if wait <= 0:
                return batch
            if self._held and self._phase == "assigned":  # wake when the next delayed record is due
                wait = min(wait, max(self._held[0][0] - time.time(), 0.0))
            self._update_pauses(full=False)
            self._start_poll(math.ceil(wait * 1000), max(max_count, 1))
            # a poll that returns, a settle, a release or a rebalance may make a record ready
            wakeup = self._wakeup
            if wakeup is None or wakeup.done():
                wakeup = self._wakeup = loop.create_future()
            await asyncio.wait((wakeup,), timeout=wait)

    def _start_poll(self, timeout_ms: int, max_records: int) -> None:
        """Run one ``getmany`` in the background unless one runs: a fetch that stops waiting (or is
        cancelled) leaves it running, and its records are taken in when it returns."""
        if self._poll_task is None and not self._closed:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll(timeout_ms, max_records))
            self._poll_task.add_done_callback(self._polled)

    def _polled(self, task: asyncio.Task[Any]) -> None:
        self._poll_task = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._poll_error = error
        else:
            self._receive(task.result())
        self._wake()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _poll(self, timeout_ms: int, max_records: int) -> Any:
        try:
            return await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._closed:
                raise ClosedError("subscription is closed") from None
            raise translate(exc, f"fetching from {self._topic!r} as {self._kafka_group!r}") from exc
        finally:
            self._last_poll = time.monotonic()

    def _take(self, max_count: int) -> list[Delivery]:
        if self._phase != "assigned":
            return []  # a rebalance is under way: start nothing
        ready, held = self._ready, self._held
        if held and held[0][0] <= time.time():
            now = time.time()
            due: list[_Entry] = []
            while held and held[0][0] <= now:
                entry = heapq.heappop(held)[2]
                if entry.state == _HELD:
                    entry.state = _READY
                    due.append(entry)
            ready.extendleft(reversed(due))
        out: list[Delivery] = []
        topic, group = self._topic, self._group
        while ready and len(out) < max_count:
            entry = ready.popleft()
            part = entry.part
            if entry.state != _READY or not part.alive:
                continue
            entry.state = _HANDED
            part.handed += 1
            part.buffered -= 1
            out.append(Delivery(entry.message, topic, group, entry.attempt, entry))
        if out:
            self._handed += len(out)
            if self._handed >= self._prefetch:
                self._update_pauses(full=True)  # the engine is full: fetch nothing until it settles
        return out

    def _receive(self, records: Any) -> None:
        for tp, batch in records.items():
            part = self._parts.get(tp)
            if part is None:  # assigned a moment before our callback ran: keep for it
                if tp in self._consumer.assignment():
                    self._early.setdefault(tp, []).extend(batch)
            elif part.loading:
                part.parked.extend(batch)
            elif part.alive:
                self._accept(part, batch)

    def _accept(self, part: _Partition, records: Sequence[Any]) -> None:
        offsets = part.offsets
        now = time.time()
        lanes = part.lanes if self._lanes else None
        ready = self._ready
        for record in records:
            known = offsets.accept(record.offset)
            if known is None:
                continue
            message, attempt, not_before = from_record(record)
            entry = _Entry(part, record.offset, message, max(attempt, known))
            part.buffered += 1
            if lanes is not None and message.key is not None:
                lane = lanes.get(message.key)
                if lane is not None:
                    entry.state = _BLOCKED
                    lane.append(entry)
                    continue
                lanes[message.key] = deque()
            if not_before > now:
                entry.state = _HELD
                heapq.heappush(self._held, (not_before, next(self._seq), entry))
            else:
                ready.append(entry)

    def _update_pauses(self, *, full: bool) -> None:
        consumer = self._consumer
        assignment = consumer.assignment()
        if full:
            wanted = set(assignment)
        else:
            limit, parts = self._buffer_limit, self._parts
            wanted = {tp for tp in assignment if (p := parts.get(tp)) is not None and p.buffered >= limit}
        paused = consumer.paused()
        if wanted != paused:
            if wanted - paused:
                consumer.pause(*(wanted - paused))
            if paused - wanted:
                consumer.resume(*(paused - wanted))

    async def _keepalive_loop(self) -> None:
        """Poll now and then while the engine is full, so Kafka does not think we hang."""
        interval = min(self._settings.max_poll_interval / 4, 30.0)
        while not self._closed:
            await asyncio.sleep(interval)
            if self._poll_task is None and time.monotonic() - self._last_poll >= interval:
                self._update_pauses(full=True)  # nothing comes back while paused; the poll is what counts
                self._start_poll(0, 1)

    # ------------------------------------------------------------------ settling

    async def settle(self, settlements: Sequence[tuple[Delivery, Outcome]]) -> None:
        republish: list[tuple[_Entry, Delivery, Outcome]] = []
        now = time.time()
        for delivery, outcome in settlements:
            entry = delivery.receipt
            if type(entry) is not _Entry or entry.state != _HANDED:
                continue
            if not entry.part.alive:
                self._drop(entry)
            elif type(outcome) is Ack:
                self._unhand(entry)
                self._finish(entry)
            elif type(outcome) is Retry and self._retry_topic is None:
                self._unhand(entry)
                if outcome.headers:  # kept in memory only: a restart redelivers the stored record
                    entry.message = with_headers(entry.message, outcome.headers)
                self._hold(entry, now + outcome.delay, entry.attempt + 1)
            elif type(outcome) is DeadLetter and self._dead_topic is None:
                self._unhand(entry)  # dead letters of dead letters stay where they are
                self._hold(entry, now, entry.attempt + 1)
            else:
                republish.append((entry, delivery, outcome))
        if republish:
            await self._republish(republish)
        self._check_drained()

    async def _republish(self, items: list[tuple[_Entry, Delivery, Outcome]]) -> None:
        """Store retries in the retry topic and dead letters in the dead-letter topic, then finish
        the originals; an original whose copy was not stored is redelivered from here instead."""
        records: list[tuple[str, Message, list[tuple[str, bytes]], int | None]] = []
        now = time.time()
        for entry, delivery, outcome in items:
            if type(outcome) is DeadLetter:
                assert self._dead_topic is not None
                records.append((self._dead_topic, dead_letter_message(delivery, outcome), [], None))
            else:
                assert self._retry_topic is not None
                assert type(outcome) is Retry
                extra = [(ATTEMPT_HEADER, str(entry.attempt + 1).encode())]
                if outcome.delay > 0:
                    extra.append((NOT_BEFORE_HEADER, f"{now + outcome.delay:.3f}".encode()))
                message = with_headers(entry.message, outcome.headers) if outcome.headers else entry.message
                records.append((self._retry_topic, message, extra, None))
        errors: list[BaseException | None]
        try:
            if self._dead_topic is not None and any(type(o) is DeadLetter for _, _, o in items):
                await self._transport._ensure_topics([self._dead_topic], partitions=DEAD_LETTER_PARTITIONS)
            errors = await self._transport._send(records)
        except Exception as exc:
            errors = [exc] * len(records)
        failed = 0
        for (entry, _, outcome), error in zip(items, errors, strict=True):
            self._unhand(entry)
            if not entry.part.alive:
                entry.state = _DONE
            elif error is None:
                self._finish(entry)
            else:
                failed += 1
                delay = outcome.delay if type(outcome) is Retry else 1.0
                self._hold(entry, time.time() + max(delay, 1.0), entry.attempt + 1)
        if failed:
            first = next(e for e in errors if e is not None)
            raise PublishError(
                f"{failed} retried or dead-lettered message(s) of {self._topic!r}/{self._group!r} could not be "
                f"stored ({type(first).__name__}: {first}); they are redelivered from this consumer"
            )

    def _unhand(self, entry: _Entry) -> None:
        entry.part.handed -= 1
        self._handed -= 1

    def _drop(self, entry: _Entry) -> None:
        """The partition moved to another member, which redelivers this record."""
        self._unhand(entry)
        entry.state = _DONE

    def _finish(self, entry: _Entry) -> None:
        entry.state = _DONE
        part = entry.part
        if part.offsets.finish(entry.offset):
            self._finished += 1
            self._schedule_commit()
        key = entry.message.key
        if self._lanes and key is not None:
            lane = part.lanes.get(key)
            if lane:
                follower = lane.popleft()
                follower.state = _READY
                self._ready.append(follower)
                self._wake()
            elif lane is not None:
                del part.lanes[key]

    def _schedule_commit(self) -> None:
        """Commit after ``commit_batch`` finished records or ``commit_interval`` seconds."""
        if self._finished >= self._settings.commit_batch:
            self._commit_wakeup.set()
        elif self._commit_timer is None:
            loop = asyncio.get_running_loop()
            self._commit_timer = loop.call_later(self._settings.commit_interval, self._commit_wakeup.set)

    def _hold(self, entry: _Entry, due: float, attempt: int) -> None:
        entry.attempt = attempt
        entry.state = _HELD
        entry.part.buffered += 1
        entry.part.offsets.set_attempts(entry.offset, attempt)
        self._schedule_commit()  # the attempt count travels in the commit metadata
        heapq.heappush(self._held, (due, next(self._seq), entry))
        self._wake()

    def _check_drained(self) -> None:
        drained = self._drained
        if drained is not None and self._handed <= 0 and not drained.done():
            drained.set_result(None)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        entries = sorted(
            (d.receipt for d in deliveries if type(d.receipt) is _Entry and d.receipt.state == _HANDED),
            key=lambda e: (e.part.tp, e.offset),
        )
        back = []
        for entry in entries:
            if not entry.part.alive:
                self._drop(entry)
                continue
            self._unhand(entry)
            entry.state = _READY
            entry.part.buffered += 1
            back.append(entry)
        self._ready.extendleft(reversed(back))  # first again, in their order
        self._check_drained()
        self._wake()
        if back and self._retry_topic is not None:
            await self._hand_off(back)

    async def _hand_off(self, entries: list[_Entry]) -> None:
        """Copy released records to retry-topic partitions another member owns, if there is one, so
        that member gets them at once (same attempt: a release is not an attempt)."""
        assert self._retry_topic is not None
        if self._phase != "assigned" and not self._closed:  # a rebalance decides who is there
            limit = self._settings.revoke_timeout + self._settings.session_timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._assigned.wait(), limit)
        if self._phase != "assigned" or self._closed:
            return
        numbers = self._consumer.partitions_for_topic(self._retry_topic) or set()
        mine = {tp.partition for tp in self._consumer.assignment() if tp.topic == self._retry_topic}
        targets = sorted(set(numbers) - mine)
        entries = [e for e in entries if e.state == _READY and e.part.alive]  # not taken again meanwhile
        if not targets or not entries:
            return
        records = []
        for entry in entries:
            entry.state = _HANDING_OFF
            key = entry.message.key
            spread = zlib.crc32(key.encode()) if key is not None else entry.offset
            extra = [(ATTEMPT_HEADER, str(entry.attempt).encode())]
            records.append((self._retry_topic, entry.message, extra, targets[spread % len(targets)]))
        errors: list[BaseException | None]
        try:
            errors = await self._transport._send(records)
        except Exception as exc:
            errors = [exc] * len(records)
        back = []
        for entry, error in zip(entries, errors, strict=True):
            entry.part.buffered -= 1
            if not entry.part.alive:
                entry.state = _DONE
            elif error is None:
                self._finish(entry)
            else:
                entry.state = _READY
                entry.part.buffered += 1
                back.append(entry)
        logger.debug("handed %d released record(s) of %s to another member", len(entries) - len(back), self)
        if back:
            self._ready.extendleft(reversed(back))
            self._wake()

    # ------------------------------------------------------------------ committing

    async def _commit_loop(self) -> None:
        while not self._closed:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            if self._commit_timer is not None:
                self._commit_timer.cancel()
                self._commit_timer = None
            if self._closed:
                return
            await self._commit()

    async def _commit(self) -> None:
        """Commit, per partition, the lowest unfinished offset (and what is done above it)."""
        async with self._commit_lock:
            if self._phase == "joining":
                return  # between revocation and assignment nothing can be committed
            self._finished = 0
            offsets = {}
            for tp, part in self._parts.items():
                if not part.alive or part.loading:
                    continue
                state = part.offsets.commit()
                if state is not None and state != self._last_committed.get(tp):
                    offsets[tp] = state
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
            except (kafka_errors.CommitFailedError, kafka_errors.IllegalStateError) as exc:
                logger.info("commit of %s skipped during a rebalance: %s", self._kafka_group, exc)
                return
            except kafka_errors.KafkaError as exc:
                now = time.monotonic()
                if self._commit_failing_since is None:
                    self._commit_failing_since = now
                logger.warning("commit of %s failed (%s: %s); retrying", self._kafka_group, type(exc).__name__, exc)
                if not self._closed and self._commit_timer is None:
                    self._commit_timer = asyncio.get_running_loop().call_later(1.0, self._commit_wakeup.set)
                return
            self._commit_failing_since = None
            self._last_committed.update(offsets)

    def _raise_if_broken(self) -> None:
        """Surface an outage longer than ``connect_timeout`` (the clients retry on their own meanwhile)."""
        now, bound = time.monotonic(), self._settings.connect_timeout
        since = self._commit_failing_since
        if since is not None and now - since > bound:
            raise BrokerUnavailableError(
                f"commits of {self._kafka_group!r} have failed for {now - since:.0f}s at "
                f"{self._transport.url}; finished records will be redelivered if this consumer stops now"
            )
        coordinator = getattr(self._consumer, "_coordinator", None)
        if getattr(coordinator, "coordinator_id", 0) is None:  # aiokafka knows no group coordinator
            if self._coordinator_lost_since is None:
                self._coordinator_lost_since = now
            elif now - self._coordinator_lost_since > bound:
                raise BrokerUnavailableError(
                    f"the Kafka group coordinator of {self._kafka_group!r} at {self._transport.url} has been "
                    f"unreachable for {now - self._coordinator_lost_since:.0f}s; still retrying"
                )
        else:
            self._coordinator_lost_since = None

    # ------------------------------------------------------------------ rebalancing

    async def _on_revoked(self, revoked: set[Any]) -> None:
        if not revoked:
            return
        self._phase = "revoking"
        self._assigned.clear()
        self._early.clear()
        if self._handed > 0 and not self._closed:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), self._settings.revoke_timeout)
            except TimeoutError:
                logger.info(
                    "rebalance of %s: %d deliveries still in flight after %.1fs; their partitions stay here",
                    self._kafka_group,
                    self._handed,
                    self._settings.revoke_timeout,
                )
            finally:
                self._drained = None
        await self._commit()
        self._phase = "joining"

    async def _on_assigned(self, assigned: set[Any]) -> None:
        parts = self._parts
        for tp in [tp for tp in parts if tp not in assigned]:
            parts.pop(tp).alive = False  # its unfinished records go to the new owner
            self._last_committed.pop(tp, None)
        new = [tp for tp in assigned if tp not in parts]
        for tp, part in parts.items():  # kept: carry on after the last record we have
            if part.offsets.high is not None:
                self._consumer.seek(tp, part.offsets.high)
        for tp in new:
            parts[tp] = _Partition(tp)
        self._phase = "assigned"
        if new:
            committed = await self._transport._committed(self._kafka_group, new)
            for tp in new:
                loaded = parts.get(tp)
                if loaded is None or not loaded.alive:
                    continue
                offset, metadata = committed.get(tp, (None, ""))
                loaded.offsets = PartitionOffsets(offset, metadata)
                loaded.loading = False
                self._last_committed[tp] = (offset, metadata)
                records = self._early.pop(tp, []) + loaded.parked
                loaded.parked = []
                self._accept(loaded, records)
        self._early.clear()
        self._update_pauses(full=self._handed >= self._prefetch)
        self._commit_wakeup.set()
        self._assigned.set()
        self._wake()

    # ------------------------------------------------------------------ closing

    def lag(self) -> int | None:
        """Records of the topic's assigned partitions past what this member fetched, from the
        high watermarks of the last fetch responses (no round trip); None before the first."""
        total, known = 0, False
        consumer = self._consumer
        for tp, part in self._parts.items():
            if tp.topic != self._topic or part.offsets.high is None:
                continue
            highwater = consumer.highwater(tp)
            if highwater is not None:
                total += max(highwater - part.offsets.high, 0)
                known = True
        return total if known else None

    async def close(self) -> None:
        """Commit what is finished and leave the group; unsettled records go to the next owner."""
        if self._closed:
            return
        self._closed = True
        self._transport._subscriptions.discard(self)
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)
        self._assigned.set()  # nobody waits for a rebalance any more
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        tasks = [*self._tasks, *([self._poll_task] if self._poll_task is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._wake()
        if self._phase == "assigned":
            try:
                async with asyncio.timeout(min(self._settings.publish_timeout, 5.0)):
                    await self._commit()
            except Exception as exc:
                logger.warning(
                    "final commit of %s failed (%s: %s); records it finished may be delivered again",
                    self._kafka_group,
                    type(exc).__name__,
                    exc,
                )
        stopping = asyncio.ensure_future(self._consumer.stop())
        done, _ = await asyncio.wait({stopping}, timeout=self._settings.session_timeout)
        if not done:
            logger.warning("leaving Kafka group %s is slow; finishing in the background", self._kafka_group)
            self._transport._background.add(stopping)
            stopping.add_done_callback(self._transport._background.discard)
        elif not stopping.cancelled() and stopping.exception() is not None:
            logger.warning("leaving Kafka group %s failed: %s", self._kafka_group, stopping.exception())

"""Offset bookkeeping for the Kafka transport: pure logic, no I/O, no client library.

Kafka keeps one committed offset per (group, partition): "every record below this one is done".
msgkit hands records of one partition to handlers that run in parallel and finish in any order,
so :class:`PartitionOffsets` tracks which fetched offsets are still unfinished and commits only
the lowest of them (never past unfinished work: a crash redelivers, never skips).

Completions beyond that point are not lost either: they travel in the commit's metadata string
(the idea of Confluent's Parallel Consumer), as "everything in [committed, high) is done except
these offsets", together with the attempt counts of unfinished records. The next owner of the
partition reads it back and skips what was done, so a rebalance or restart duplicates only the
work that was in flight. Metadata that does not parse (a foreign client's) is ignored.

:func:`assign` is the group assignment msgkit's consumers use: partitions with work in flight
stay with their owner, the rest stay put up to a fair share, and every topic is spread evenly.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

#: Kafka's default ``offset.metadata.max.bytes`` is 4096; stay well below it.
MAX_METADATA = 3000
_PREFIX = "msgkit1"


@dataclass(frozen=True, slots=True)
class Resume:
    """What a commit's metadata says about the records above the committed offset."""

    high: int  # every offset in [committed, high) is done, except those in ``redo``
    redo: dict[int, int] = field(default_factory=dict)  # unfinished offset -> attempts made so far


def encode_metadata(committed: int, high: int, unfinished: Sequence[tuple[int, int]], limit: int = MAX_METADATA) -> str:
    """The metadata string for a commit at ``committed``.

    ``unfinished`` is the sorted ``(offset, attempts)`` of unfinished records in
    ``[committed, high)``; ``attempts`` is 0 when only the record itself knows its count. If the
    text would exceed ``limit`` it is cut short by lowering ``high`` to the first offset left out,
    which only ever claims less: what is not claimed done is redelivered.
    """
    # groups of (delta from the previous offset, attempts, count, first offset); equal deltas
    # without attempts collapse into one "delta*count" item
    groups: list[list[int]] = []
    previous = committed
    for offset, attempts in unfinished:
        delta = offset - previous
        previous = offset
        last = groups[-1] if groups else None
        if attempts <= 0 and last is not None and last[1] <= 0 and last[0] == delta:
            last[2] += 1
        else:
            groups.append([delta, attempts, 1, offset])
    items: list[str] = []
    size = len(_PREFIX) + 2 + len(str(high - committed))
    for delta, attempts, count, first in groups:
        item = f"{delta}.{attempts}" if attempts > 0 else (str(delta) if count == 1 else f"{delta}*{count}")
        size += len(item) + 1
        if size > limit:
            high = first  # claim less: from here on nothing is said to be done
            break
        items.append(item)
    if high <= committed:
        return ""
    return f"{_PREFIX};{high - committed};{','.join(items)}"


def decode_metadata(committed: int, text: str) -> Resume | None:
    """Read back :func:`encode_metadata`'s text; None for empty or foreign metadata."""
    if not text.startswith(_PREFIX + ";"):
        return None
    try:
        _, span, items = text.split(";", 2)
        high = committed + int(span)
        redo: dict[int, int] = {}
        offset = committed
        for item in filter(None, items.split(",")):
            if "*" in item:
                delta_text, count_text = item.split("*", 1)
                delta, count = int(delta_text), int(count_text)
                for _ in range(count):
                    offset += delta
                    redo[offset] = 0
            elif "." in item:
                delta_text, attempts_text = item.split(".", 1)
                offset += int(delta_text)
                redo[offset] = int(attempts_text)
            else:
                offset += int(item)
                redo[offset] = 0
        if high < committed or any(not committed <= o < high for o in redo):
            return None
    except ValueError:
        return None
    return Resume(high, redo)


class PartitionOffsets:
    """One consumer's knowledge of one partition: which fetched offsets are unfinished.

    Offsets are fetched in increasing order. Every offset below :attr:`high` is known: either
    unfinished (handed out, waiting, or released) or done. Offsets that never arrive (gaps left
    by compaction or transaction markers) count as done. Not thread-safe; one event loop.
    """

    __slots__ = ("committed", "high", "_unfinished", "_heap", "_attempts", "_resume")

    def __init__(self, committed: int | None = None, metadata: str = "") -> None:
        #: The committed offset this tracker started from (None: the group had none).
        self.committed = committed
        #: The next offset expected from the broker; None until the first record arrives.
        self.high: int | None = None
        self._unfinished: set[int] = set()
        self._heap: list[int] = []
        self._attempts: dict[int, int] = {}
        self._resume = decode_metadata(committed, metadata) if committed is not None and metadata else None

    @property
    def unfinished(self) -> int:
        """How many fetched records are not finished."""
        return len(self._unfinished)

    def accept(self, offset: int) -> int | None:
        """Note a fetched record. Return the attempts it already had (0 if unknown), or None
        when it must not be handed out again (already fetched, or done before a rebalance)."""
        high = self.high
        if high is None:
            committed = self.committed
            if committed is None or offset < committed:  # no commit yet, or the log was reset
                self._resume = None
                high = offset
            else:
                high = committed
        elif offset < high:
            return None  # fetched again (a seek, a kept partition): we already have it
        self.high = offset + 1
        resume = self._resume
        attempts = 0
        if resume is not None:
            if offset < resume.high:
                if offset not in resume.redo:
                    return None  # done before the last rebalance or restart
                attempts = resume.redo.pop(offset)
            else:
                self._resume = None
        self._unfinished.add(offset)
        heapq.heappush(self._heap, offset)
        if attempts:
            self._attempts[offset] = attempts
        return attempts

    def set_attempts(self, offset: int, attempts: int) -> None:
        """Remember that the unfinished record at ``offset`` was tried ``attempts`` times."""
        if offset in self._unfinished:
            self._attempts[offset] = attempts

    def finish(self, offset: int) -> bool:
        """Mark ``offset`` done; False if it was not unfinished here."""
        try:
            self._unfinished.remove(offset)
        except KeyError:
            return False
        self._attempts.pop(offset, None)
        return True

    def commit_point(self) -> int | None:
        """The offset to commit: the lowest unfinished one, else :attr:`high` (None: nothing yet)."""
        heap = self._heap
        unfinished = self._unfinished
        while heap and heap[0] not in unfinished:
            heapq.heappop(heap)
        if heap:
            return heap[0]
        high = self.high
        resume = self._resume
        if resume is not None:  # what the previous owner finished can be committed unseen
            start = self.committed if high is None else high
            assert start is not None
            return min((o for o in resume.redo if o >= start), default=max(resume.high, start))
        return self.committed if high is None else high

    def commit(self) -> tuple[int, str] | None:
        """``(offset, metadata)`` to commit now, or None when there is nothing to commit."""
        point = self.commit_point()
        if point is None:
            return None
        high = point if self.high is None else self.high
        attempts = self._attempts
        entries = [(o, attempts.get(o, 0)) for o in sorted(self._unfinished)]
        resume = self._resume
        if resume is not None and resume.high > high:
            # records the previous owner finished are not fetched again yet: keep its claim alive
            entries += sorted((o, a) for o, a in resume.redo.items() if o >= high)
            high = resume.high
        return point, encode_metadata(point, high, [(o, a) for o, a in entries if o >= point])


# ---------------------------------------------------------------------------------- assignment


@dataclass(frozen=True, slots=True)
class Member:
    """A group member as the assignment sees it: its topics, what it owns, where work runs."""

    topics: frozenset[str]
    owned: frozenset[tuple[str, int]] = frozenset()
    busy: frozenset[tuple[str, int]] = frozenset()


def encode_member(owned: Iterable[tuple[str, int]], busy: Iterable[tuple[str, int]]) -> bytes:
    """A member's user data in the join request: the partitions it owns and those with work in flight."""
    return json.dumps({"v": 1, "owned": sorted(owned), "busy": sorted(busy)}, separators=(",", ":")).encode()


def decode_member(topics: Iterable[str], user_data: bytes | None) -> Member:
    """Read :func:`encode_member`'s user data; anything unreadable counts as owning nothing."""
    owned: frozenset[tuple[str, int]] = frozenset()
    busy: frozenset[tuple[str, int]] = frozenset()
    if user_data:
        try:
            data = json.loads(user_data)
            owned = frozenset((str(t), int(p)) for t, p in data.get("owned", ()))
            busy = frozenset((str(t), int(p)) for t, p in data.get("busy", ()))
        except (ValueError, TypeError, AttributeError):
            pass
    return Member(frozenset(topics), owned, busy & owned)


def assign(partitions: Mapping[str, Sequence[int]], members: Mapping[str, Member]) -> dict[str, list[tuple[str, int]]]:
    """Assign each topic's partitions to the members subscribed to it.

    1. A partition with work in flight stays with its owner (moving it would run that work twice).
    2. Other partitions stay with their owner while it holds less than its fair share of the topic.
    3. The rest go to whoever holds the fewest of that topic (then the fewest overall, then by id).
    """
    result: dict[str, list[tuple[str, int]]] = {member_id: [] for member_id in members}
    totals = dict.fromkeys(members, 0)
    for topic in sorted(partitions):
        subscribers = sorted(m for m, info in members.items() if topic in info.topics)
        if not subscribers:
            continue
        numbers = sorted(partitions[topic])
        share = -(-len(numbers) // len(subscribers))  # ceil
        counts = dict.fromkeys(subscribers, 0)
        owner: dict[int, str] = {}
        wishes = [(m, p, True) for m in subscribers for t, p in sorted(members[m].busy) if t == topic]
        wishes += [(m, p, False) for m in subscribers for t, p in sorted(members[m].owned) if t == topic]
        for member_id, number, busy in wishes:
            if number in owner or number not in numbers or (not busy and counts[member_id] >= share):
                continue
            owner[number] = member_id
            counts[member_id] += 1
        for number in numbers:
            if number not in owner:
                owner[number] = min(subscribers, key=lambda m: (counts[m], totals[m] + counts[m], m))
                counts[owner[number]] += 1
        for number, member_id in sorted(owner.items()):
            result[member_id].append((topic, number))
        for member_id, count in counts.items():
            totals[member_id] += count
    return result

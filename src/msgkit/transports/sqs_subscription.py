"""The consuming side of ``sqs://``, and what both sides share: queue names, the wire format, the
planning of batches and a process's memory of receives (see :mod:`msgkit.transports.sqs`).

Wire format: the body is the SQS message body when it is text SQS accepts (UTF-8 without the
characters XML forbids), else base64; one String message attribute, ``msgkit``, holds a compact
JSON object with the msgkit id, key, timestamp, headers and the body's encoding, so any number
of headers fits in SQS's limit of 10 attributes. Messages without that attribute (sent by other
SQS clients) arrive with the SQS MessageId as id and their String attributes as headers.

A subscription keeps up to ``max_pollers`` long-polling ReceiveMessage calls going (one while the
queue is idle), never asking for more messages than the engine has free slots; everything received
and not yet settled is leased, and a heartbeat extends its visibility timeout in batches until it
is settled, released or the subscription closes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from msgkit.errors import BrokerUnavailableError, ClosedError, MsgkitError
from msgkit.message import (
    DLQ_ATTEMPTS,
    DLQ_ERROR_TYPE,
    DLQ_GROUP,
    DLQ_REASON,
    DLQ_TOPIC,
    Ack,
    Delivery,
    Message,
    Outcome,
    Retry,
    dead_letter_message,
)
from msgkit.transports.base import Subscription

if TYPE_CHECKING:
    from msgkit.transports.sqs import SQSTransport

logger = logging.getLogger("msgkit.sqs")

#: The message attribute that carries msgkit's id, key, timestamp, headers and body encoding.
META_ATTRIBUTE = "msgkit"
#: Group of the deliveries of a dead-letter subscription (as on every transport).
DEAD_LETTER_GROUP = "dead-letters"
#: SQS's cap on a message's invisibility, counted from its receive.
MAX_VISIBILITY = 43_200
#: SQS's cap on entries per batch call.
BATCH = 10
#: Concurrent lanes of a FIFO publish (each keeps its MessageGroupIds in order).
FIFO_LANES = 8

_FIXED_ATTRIBUTE_BYTES = len(META_ATTRIBUTE) + len("String")
#: Characters SQS refuses in bodies and attribute values (it allows only what XML 1.0 allows).
_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
#: What SQS accepts as a MessageGroupId or MessageDeduplicationId: 1-128 printable ASCII characters.
_FIFO_ID = re.compile(r"[!-~]{1,128}")
_PLAIN_QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SYSTEM_ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp", "MessageGroupId"]
_REASON_HEADERS = (DLQ_REASON, DLQ_ERROR_TYPE, DLQ_ATTEMPTS, DLQ_TOPIC, DLQ_GROUP)  # with msgkit: 6 of 10
_GONE_HANDLE_CODES = frozenset({"ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidParameterValue"})


# ---------------------------------------------------------------------------------------------- names


def topic_queue_name(topic: str, fifo: bool) -> str:
    """The queue of ``topic``: the topic name itself when SQS allows it, else a readable form plus a hash.

    SQS queue names are 1-80 of ``[A-Za-z0-9_-]`` (FIFO ones end in ``.fifo``); topic names may also
    hold ``.`` and be 200 long, so those become ``<name with . as _, cut>-<10 hex of sha256(topic)>``.
    """
    end = ".fifo" if fifo else ""
    if _PLAIN_QUEUE_NAME.fullmatch(topic) and len(topic) + len(end) <= 80:
        return topic + end
    return _hashed_name(topic, topic, end)


def dead_letter_queue_name(topic: str, group: str, fifo: bool) -> str:
    """The dead-letter queue of (topic, group): ``<topic>-<group>-<hash>-dlq`` (cut to fit, ``.fifo`` on FIFO)."""
    return _hashed_name(f"{topic}-{group}", f"{topic}\0{group}", "-dlq" + (".fifo" if fifo else ""))


def _hashed_name(readable: str, identity: str, end: str) -> str:
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    room = 80 - len(end) - len(digest) - 1
    return f"{readable.replace('.', '_')[:room]}-{digest}{end}"


def fifo_id(value: str) -> str:
    """``value`` as a MessageGroupId / MessageDeduplicationId: itself if SQS accepts it, else a sha256 hex."""
    if _FIFO_ID.fullmatch(value):
        return value
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def guaranteed_size(limit: int) -> int:
    """The largest :meth:`Message.size` that fits a queue limit of ``limit`` encoded bytes in any case
    msgkit can foresee: a binary body grows by a third in base64, and 1 KiB is kept for the attribute's
    JSON (names, quotes and separators of id, key, timestamp and a few dozen headers)."""
    return (limit - 1024) * 3 // 4


# ---------------------------------------------------------------------------------------------- wire format


def encode(message: Message, fifo: bool, *, unique_dedup: bool = False) -> tuple[dict[str, Any], int]:
    """A SendMessageBatch entry (without ``Id``) for ``message``, and its size as SQS counts it.

    On FIFO queues the key (or, without a key, the id) is the MessageGroupId and the id the
    MessageDeduplicationId; ``unique_dedup`` uses a fresh one instead (dead letters: the same
    message may be dead-lettered twice within SQS's 5-minute deduplication window).
    """
    body = message.body
    meta: dict[str, Any] = {"i": message.id, "t": message.timestamp}
    if message.key is not None:
        meta["k"] = message.key
    if message.headers:
        meta["h"] = message.headers if type(message.headers) is dict else dict(message.headers)
    if not body:
        text, body_size = "-", 1  # SQS refuses empty bodies
        meta["e"] = "empty"
    else:
        try:
            text = body.decode()
            legal = _ILLEGAL.search(text) is None
        except UnicodeDecodeError:
            legal = False
        if legal:
            body_size = len(body)
        else:
            text = base64.b64encode(body).decode("ascii")
            body_size = len(text)
            meta["e"] = "base64"
    value = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))
    if _ILLEGAL.search(value):  # lone surrogates, U+FFFE...: escape everything beyond ASCII
        value = json.dumps(meta, separators=(",", ":"))
    entry: dict[str, Any] = {
        "MessageBody": text,
        "MessageAttributes": {META_ATTRIBUTE: {"DataType": "String", "StringValue": value}},
    }
    if fifo:
        entry["MessageGroupId"] = fifo_id(message.key if message.key is not None else message.id)
        entry["MessageDeduplicationId"] = uuid.uuid4().hex if unique_dedup else fifo_id(message.id)
    return entry, body_size + _FIXED_ATTRIBUTE_BYTES + len(value.encode())


def add_reason_attributes(entry: dict[str, Any], message: Message) -> int:
    """Copy a dead letter's reason headers into native message attributes too (``msgkit-dlq-reason``,
    ...), for the AWS console and other tools; returns the bytes they add."""
    attributes = entry["MessageAttributes"]
    added = 0
    for name in _REASON_HEADERS:
        value = _ILLEGAL.sub("\ufffd", message.headers.get(name, ""))
        if value:
            attributes[name] = {"DataType": "String", "StringValue": value}
            added += len(name) + len("String") + len(value.encode())
    return added


def decode(raw: dict[str, Any]) -> Message:
    """The msgkit Message of a received SQS message (see the module docstring for foreign ones)."""
    text: str = raw["Body"]
    attributes: dict[str, Any] = raw.get("MessageAttributes") or {}
    meta_attribute = attributes.get(META_ATTRIBUTE)
    if meta_attribute is not None:
        try:
            meta = json.loads(meta_attribute["StringValue"])
            encoding = meta.get("e")
            if encoding == "empty":
                body = b""
            elif encoding == "base64":
                body = base64.b64decode(text)
            else:
                body = text.encode()
            return Message(body, meta["i"], meta.get("k"), meta.get("h") or {}, float(meta.get("t", 0.0)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.debug("SQS message %s has a malformed msgkit attribute (%s); read as foreign", raw["MessageId"], exc)
    system: dict[str, str] = raw.get("Attributes") or {}
    headers = {name: a["StringValue"] for name, a in attributes.items() if "StringValue" in a}
    sent = system.get("SentTimestamp")
    return Message(
        text.encode(),
        raw["MessageId"],
        system.get("MessageGroupId"),
        headers,
        int(sent) / 1000 if sent else time.time(),
    )


def plan_batches(entries: list[dict[str, Any]], sizes: list[int], byte_limit: int) -> list[list[list[int]]]:
    """Entry indexes in lanes of batches of at most ten entries and ``byte_limit`` bytes (one entry
    at least). Lanes go out concurrently, a lane's batches one after another: on FIFO queues all
    entries of a MessageGroupId fall in one lane (their order holds), elsewhere a batch is a lane."""
    fifo = bool(entries) and "MessageGroupId" in entries[0]
    lanes: dict[int, list[int]] = {}
    for index, entry in enumerate(entries):
        lanes.setdefault(hash(entry["MessageGroupId"]) % FIFO_LANES if fifo else 0, []).append(index)
    planned: list[list[list[int]]] = []
    for indexes in lanes.values():
        batches: list[list[int]] = [[]]
        used = 0
        for index in indexes:
            if batches[-1] and (len(batches[-1]) == BATCH or used + sizes[index] > byte_limit):
                batches.append([])
                used = 0
            batches[-1].append(index)
            used += sizes[index]
        if fifo:
            planned.append(batches)
        else:
            planned.extend([batch] for batch in batches)
    return planned


class ReceiveMemory:
    """What a process remembers about receives, where SQS keeps no such record.

    * Receives it gave back unhandled (releases, a stopping consumer): SQS counts them in
      ApproximateReceiveCount, so they are taken off the attempt whenever the message comes back
      to this process, until it is deleted.
    * Messages it read from a FIFO dead-letter queue: sent to a topic again (a replay), they get a
      new MessageDeduplicationId, else SQS would drop them as duplicates within 5 minutes.

    Both forget their oldest entries past ``limit``.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.unhandled: dict[str, int] = {}  # SQS MessageId -> receives given back
        self.dead_letters: dict[str, None] = {}  # msgkit ids, newest last
        self._limit = limit

    def note_unhandled(self, leases: Sequence[Lease]) -> None:
        counts = self.unhandled
        for lease in leases:
            counts[lease.message_id] = counts.pop(lease.message_id, 0) + 1
        self._trim(counts)

    def attempt(self, message_id: str, receives: int) -> int:
        return max(1, receives - self.unhandled.get(message_id, 0))

    def deleted(self, leases: Sequence[Lease]) -> None:
        for lease in leases:
            self.unhandled.pop(lease.message_id, None)

    def note_dead_letter(self, message_id: str) -> None:
        self.dead_letters.pop(message_id, None)
        self.dead_letters[message_id] = None
        self._trim(self.dead_letters)

    def _trim(self, entries: dict[str, Any]) -> None:
        if len(entries) > self._limit:
            for key in list(itertools.islice(entries, len(entries) - self._limit // 2)):
                del entries[key]


# ---------------------------------------------------------------------------------------------- queues


@dataclass(slots=True)
class QueueInfo:
    """An SQS queue as the transport knows it (its URL is updated if the queue is re-created)."""

    name: str
    url: str
    fifo: bool
    max_size: int
    arn: str
    dead_letter: bool
    redrive_target: str | None = None  # the ARN of the RedrivePolicy's dead-letter queue, if any
    owner_known: bool = False  # the group tag was read (or cannot be)
    owner: str | None = None  # the group that consumes this topic queue


# ---------------------------------------------------------------------------------------------- subscription


class Lease:
    """A received message not settled yet: its receipt handle, and when its visibility was last set."""

    __slots__ = ("handle", "message_id", "received", "extended", "lost")

    def __init__(self, handle: str, message_id: str, now: float) -> None:
        self.handle = handle
        self.message_id = message_id  # SQS's MessageId (stable across receives)
        self.received = now
        self.extended = now
        self.lost = False  # SQS refused to extend it: no more heartbeats (an ack may still work)


class SQSSubscription(Subscription):
    """A consumer of one queue: a topic queue (a group's subscription) or a dead-letter queue."""

    def __init__(
        self,
        transport: SQSTransport,
        queue: QueueInfo,
        topic: str,
        group: str,
        prefetch: int,
        *,
        dead: QueueInfo | None,
        source: tuple[str, str] | None = None,
    ) -> None:
        self._transport = transport
        self._queue = queue
        self._topic = topic
        self._group = group
        self._dead = dead  # where DeadLetter outcomes go; None when this reads dead letters
        self._source = source  # (topic, group) whose dead letters this reads
        settings = transport.settings
        self._visibility = settings.visibility_timeout
        self._wait = settings.wait_time
        self._max_pollers = max(1, min(settings.max_pollers, math.ceil(prefetch / BATCH)))
        self._buffer: deque[Delivery] = deque()
        self._leases: dict[str, Lease] = {}  # receipt handle -> lease: received and not settled
        self._demand = 0  # free slots of the engine not yet filled
        self._requested = 0  # messages asked for by receive calls under way
        self._polling = 0  # receive loops running
        self._width = 1  # receive loops allowed now: all while receives come back full, else one
        self._heartbeat: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self._visibility_lock = asyncio.Lock()  # a heartbeat never overwrites a Retry's or release's timeout
        self._failure: BaseException | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"SQSSubscription(queue={self._queue.name!r}, group={self._group!r})"

    # ------------------------------------------------------------------ fetching

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        if self._closed:
            raise ClosedError(f"subscription to SQS queue {self._queue.name} is closed")
        buffer = self._buffer
        if not buffer:
            self._demand = max_count
            self._spawn()
            if self._failure is None:
                try:
                    async with asyncio.timeout(timeout):
                        while not buffer and not self._closed and self._failure is None:
                            self._arrived.clear()
                            await self._arrived.wait()
                except TimeoutError:
                    pass
                except asyncio.CancelledError:  # the consumer stops: hand back what nobody will take
                    self._demand = 0
                    self._give_back([d.receipt for d in buffer])
                    buffer.clear()
                    raise
            if self._closed:
                raise ClosedError(f"subscription to SQS queue {self._queue.name} is closed")
            if not buffer and self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
        count = min(max_count, len(buffer))
        out = [buffer.popleft() for _ in range(count)]
        self._demand = max_count - count
        if self._demand > 0:
            self._spawn()  # keep receiving for the slots still free while the engine works
        return out

    def _spawn(self) -> None:
        wanted = self._demand - len(self._buffer)
        target = min(self._width, math.ceil(wanted / BATCH)) if wanted > 0 else 0
        loop = asyncio.get_running_loop()
        while self._polling < target:
            self._polling += 1
            task = loop.create_task(self._poll(), name=f"msgkit-sqs-poll-{self._queue.name}")
            self._transport.track(task, poller=True)

    async def _poll(self) -> None:
        """One long-polling receiver; it stops when the engine has no free slot left to fill."""
        try:
            await self._receive_while_wanted()
        finally:
            self._polling -= 1  # at once: a done task lingers in sets until its callbacks run

    async def _receive_while_wanted(self) -> None:
        backoff = 0.1
        while not self._closed:
            want = min(BATCH, self._demand - len(self._buffer) - self._requested)
            if want <= 0 or self._polling > self._width:
                return
            self._requested += want
            try:
                raw = await self._transport.receive(self._queue, want, self._wait, self._visibility, _SYSTEM_ATTRIBUTES)
            except ClosedError:
                return
            except MsgkitError as exc:  # a long outage, or a refusal: fetch() raises it, polling goes on
                self._failure = exc
                self._arrived.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                self._requested -= want
            backoff = 0.1
            self._failure = None
            if raw:
                self._add(raw)
            # One long poll while the queue is idle, all of them once a receive brings all it asked for:
            # fewer requests, and fewer polls left waiting on the server when the consumer stops.
            if len(raw) == want and self._width < self._max_pollers:
                self._width = self._max_pollers
                self._spawn()
            elif not raw:
                self._width = 1

    def _add(self, raw: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        leases, buffer = self._leases, self._buffer
        room = max(0, self._demand - len(buffer))
        if len(raw) > room:  # the consumer stopped fetching (or asks for fewer) since the receive began
            self._give_back([Lease(item["ReceiptHandle"], item["MessageId"], now) for item in raw[room:]])
            raw = raw[:room]
            if not raw:
                return
        topic, group, source = self._topic, self._group, self._source
        memory = self._transport.memory
        for item in raw:
            lease = Lease(item["ReceiptHandle"], item["MessageId"], now)
            leases[lease.handle] = lease
            message = decode(item)
            if source is not None:
                if DLQ_REASON not in message.headers:
                    message = self._redriven(message, source)
                if self._queue.fifo:
                    memory.note_dead_letter(message.id)
            receives = int((item.get("Attributes") or {}).get("ApproximateReceiveCount", 1))
            attempt = memory.attempt(lease.message_id, receives)
            buffer.append(Delivery(message, topic, group, attempt, lease))
        self._arrived.set()
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(
                self._beat(), name=f"msgkit-sqs-heartbeat-{self._queue.name}"
            )

    @staticmethod
    def _redriven(message: Message, source: tuple[str, str]) -> Message:
        """A message SQS moved here by a RedrivePolicy: say so in the headers msgkit's dead letters carry."""
        headers = {
            **message.headers,
            DLQ_REASON: "moved by the queue's SQS RedrivePolicy (maxReceiveCount reached)",
            DLQ_TOPIC: source[0],
            DLQ_GROUP: source[1],
        }
        return Message(message.body, message.id, message.key, headers, message.timestamp)

    def _give_back(self, leases: list[Lease]) -> None:
        """Release received messages that no fetch will return, in the background (no one waits)."""
        for lease in leases:
            self._leases.pop(lease.handle, None)
        self._transport.memory.note_unhandled(leases)
        if leases:
            task = asyncio.get_running_loop().create_task(self._release_now([(lease, 0) for lease in leases]))
            self._transport.track(task, poller=False)

    async def _release_now(self, entries: list[tuple[Lease, int]]) -> None:
        try:
            async with asyncio.timeout(5.0), self._visibility_lock:
                await self._change_visibility(entries, "releasing unhandled messages", retry=False)
        except (TimeoutError, MsgkitError) as exc:
            logger.warning(
                "could not release %d unhandled messages of SQS queue %s (%s); they come back after the "
                "visibility timeout",
                len(entries),
                self._queue.name,
                exc,
            )

    # ------------------------------------------------------------------ heartbeat

    async def _beat(self) -> None:
        """Extend the visibility of every lease older than a quarter of the timeout, every quarter."""
        step = self._visibility / 4
        leases = self._leases
        while leases and not self._closed:
            await asyncio.sleep(step)
            now = time.monotonic()
            due = [lease for lease in leases.values() if now - lease.extended >= step and not lease.lost]
            if due:
                await self._extend(due, now)

    async def _extend(self, due: list[Lease], now: float) -> None:
        entries: list[tuple[Lease, int]] = []
        for lease in due:
            room = MAX_VISIBILITY - math.ceil(now - lease.received) - 5
            if room > 0:  # past SQS's 12 h cap the message is let go when its timeout runs out
                entries.append((lease, min(self._visibility, room)))
        async with self._visibility_lock:
            entries = [(lease, seconds) for lease, seconds in entries if lease.handle in self._leases]
            failures = await self._change_visibility(entries, "extending visibility", retry=False)
        gone = 0
        for lease, _ in entries:
            code = failures.get(lease.handle)
            if code is None:
                lease.extended = now
            elif code in _GONE_HANDLE_CODES:
                lease.lost = True
                gone += 1
        if gone:
            logger.warning(
                "%d messages of SQS queue %s were no longer ours when their visibility was extended "
                "(held past the visibility timeout?); they may be handled twice",
                gone,
                self._queue.name,
            )

    # ------------------------------------------------------------------ settling

    async def settle(self, settlements: Sequence[tuple[Delivery, Outcome]]) -> None:
        leases = self._leases
        deletes: list[Lease] = []
        delays: list[tuple[Lease, int]] = []
        dead: list[tuple[Lease, Message]] = []
        now = time.monotonic()
        for delivery, outcome in settlements:
            lease: Lease = delivery.receipt
            if leases.pop(lease.handle, None) is None:
                continue  # the subscription closed, or the lease was lost: SQS redelivers it
            if isinstance(outcome, Ack):
                deletes.append(lease)
            elif isinstance(outcome, Retry):
                delays.append((lease, _delay_seconds(outcome.delay, now - lease.received)))
            elif self._dead is not None:
                dead.append((lease, dead_letter_message(delivery, outcome)))
            else:
                delays.append((lease, 0))  # a dead letter of a dead letter stays where it is
        problems: list[str] = []
        if dead:
            deletes += await self._store_dead_letters(dead, problems)
        self._transport.memory.deleted(deletes)
        await asyncio.gather(self._delete(deletes, problems), self._redeliver(delays, problems))
        if problems:
            raise MsgkitError(f"settling on SQS queue {self._queue.name}: {'; '.join(problems)}")

    async def _store_dead_letters(self, dead: list[tuple[Lease, Message]], problems: list[str]) -> list[Lease]:
        """Send the dead letters to the dead-letter queue; return the leases whose letter is stored."""
        assert self._dead is not None
        failed = dict(await self._transport.send_dead_letters(self._dead, [m for _, m in dead]))
        if failed:
            problems.append(
                f"{len(failed)} dead letters not stored in {self._dead.name} (left for redelivery): "
                f"{next(iter(failed.values()))}"
            )
        return [lease for lease, message in dead if message.id not in failed]

    async def _delete(self, leases: list[Lease], problems: list[str]) -> None:
        if not leases:
            return
        transport, queue = self._transport, self._queue
        chunks = [leases[i : i + BATCH] for i in range(0, len(leases), BATCH)]

        async def delete(chunk: list[Lease]) -> list[dict[str, Any]]:
            entries = [{"Id": str(n), "ReceiptHandle": lease.handle} for n, lease in enumerate(chunk)]
            response = await transport.call_queue(queue, "acknowledging", "delete_message_batch", Entries=entries)
            failed: list[dict[str, Any]] = response.get("Failed") or []
            return failed

        results = await asyncio.gather(*(delete(c) for c in chunks), return_exceptions=True)
        _collect(results, chunks, "acknowledged", problems)

    async def _redeliver(self, delays: list[tuple[Lease, int]], problems: list[str]) -> None:
        if not delays:
            return
        async with self._visibility_lock:
            failures = await self._change_visibility(delays, "changing visibility", retry=True, problems=problems)
        refused = [code for code in failures.values() if code != "error" and code not in _GONE_HANDLE_CODES]
        if refused:  # (errors are in problems already; expired handles mean SQS redelivers anyway)
            problems.append(f"{len(refused)} messages not made visible again ({refused[0]})")

    async def _change_visibility(
        self,
        entries: list[tuple[Lease, int]],
        what: str,
        *,
        retry: bool,
        problems: list[str] | None = None,
    ) -> dict[str, str]:
        """ChangeMessageVisibilityBatch in tens, concurrently; returns {receipt handle: error code}."""
        if not entries:
            return {}
        transport, queue = self._transport, self._queue
        chunks = [entries[i : i + BATCH] for i in range(0, len(entries), BATCH)]

        async def change(chunk: list[tuple[Lease, int]]) -> list[dict[str, Any]]:
            batch = [
                {"Id": str(n), "ReceiptHandle": lease.handle, "VisibilityTimeout": seconds}
                for n, (lease, seconds) in enumerate(chunk)
            ]
            call = partial(transport.call_queue, queue, what, "change_message_visibility_batch", retry=retry)
            response = await call(Entries=batch)
            failed: list[dict[str, Any]] = response.get("Failed") or []
            return failed

        results = await asyncio.gather(*(change(c) for c in chunks), return_exceptions=True)
        failures: dict[str, str] = {}
        for chunk, result in zip(chunks, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if problems is not None:
                    problems.append(str(result))
                else:  # an outage is logged once by the transport
                    level = logging.DEBUG if isinstance(result, BrokerUnavailableError) else logging.WARNING
                    logger.log(
                        level, "%s of %d messages on SQS queue %s failed: %s", what, len(chunk), queue.name, result
                    )
                failures.update((lease.handle, "error") for lease, _ in chunk)
                continue
            for failure in result:
                failures[chunk[int(failure["Id"])][0].handle] = failure.get("Code", "")
        return failures

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Make the deliveries visible at once. SQS counts every receive; the transport takes released
        receives off the count when this process receives the message again (not in other processes)."""
        leases = self._leases
        released = [(d.receipt, 0) for d in deliveries if leases.pop(d.receipt.handle, None) is not None]
        self._transport.memory.note_unhandled([lease for lease, _ in released])
        problems: list[str] = []
        await self._redeliver(released, problems)
        if problems:
            raise MsgkitError(f"releasing on SQS queue {self._queue.name}: {'; '.join(problems)}")

    async def close(self) -> None:
        """Stop receiving and heart-beating. What the engine still holds comes back after the visibility
        timeout, as after a lost consumer; what was received but never handed out is released at once.

        Receive calls under way are not cancelled: the server would still hand messages to a long
        poll whose client went away, and they would stay invisible for the visibility timeout. They
        finish in the background (until the transport closes) and release what they get at once.
        """
        if self._closed:
            return
        self._closed = True
        self._demand = 0
        self._arrived.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        unhandled = [(d.receipt, 0) for d in self._buffer]
        self._transport.memory.note_unhandled([lease for lease, _ in unhandled])
        self._buffer.clear()
        self._leases.clear()
        self._transport.forget(self)
        if unhandled and self._transport.connected:
            await self._release_now(unhandled)


def _delay_seconds(delay: float, held: float) -> int:
    """SQS's whole-second visibility for a Retry(delay): rounded up, within 12 h of the receive."""
    seconds = math.ceil(delay) if delay > 0 else 0
    return max(0, min(seconds, MAX_VISIBILITY - math.ceil(held) - 5))


def _collect(results: list[Any], chunks: list[list[Lease]], what: str, problems: list[str]) -> None:
    """Note what a batch call's results say: errors as problems; expired receipt handles in one warning."""
    expired = refused = 0
    first = ""
    for chunk, result in zip(chunks, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, BaseException):
            problems.append(f"{len(chunk)} messages not {what}: {result}")
            continue
        for failure in result:
            code = failure.get("Code", "")
            if code in _GONE_HANDLE_CODES:
                expired += 1
            else:
                refused += 1
                first = first or f"{code}: {failure.get('Message', '')}"
    if refused:
        problems.append(f"{refused} messages not {what}: {first}")
    if expired:
        logger.warning(
            "%d messages could not be %s: their receipt handles had expired (held past the visibility "
            "timeout); SQS redelivers them",
            expired,
            what,
        )

"""Redis Streams mechanics of the ``redis://`` transport: key names, the stream-entry codec, the
Lua scripts, and :class:`RedisSubscription` (one consumer of a consumer group).

The transport itself (URL, connections, outages, publishing) is :mod:`msgkit.transports.redis`.
Every group-level key of a topic shares the topic's hash tag (``{topic}``), so the scripts that
touch a stream and its group's keys together stay valid on a Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rex

from msgkit.errors import ClosedError, MsgkitError, PublishError
from msgkit.message import Ack, DeadLetter, Delivery, Message, Outcome, dead_letter_message
from msgkit.transports.base import Subscription

if TYPE_CHECKING:
    from msgkit.transports.redis import RedisTransport

logger = logging.getLogger("msgkit.redis")

T = TypeVar("T")

#: Every consumer name msgkit creates starts with this; only such names are ever forgotten.
CONSUMER_PREFIX = "msgkit-"
#: Most entries one poll, one XADD pipeline or one lease renewal handles.
MAX_BATCH = 1000

#: Errors that mean "the server is not reachable right now": retried until reconnect_timeout.
TRANSIENT_ERRORS = (rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, OSError)
#: Errors that mean "these credentials may not do this": configuration, never retried.
DENIED_ERRORS = (
    rex.AuthenticationError,
    rex.AuthorizationError,
    rex.NoPermissionError,
    rex.AuthenticationWrongNumberOfArgsError,
)

_HOST = socket.gethostname().replace(" ", "_")[:40]


def raw(response: Any, **options: Any) -> Any:
    """A response callback that keeps the server's reply as is."""
    return response


def command(client: aioredis.Redis, *args: Any) -> Awaitable[Any]:
    """``client.execute_command`` (typed)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, rex.ResponseError) and "NOGROUP" in str(exc)


# Field names of a stream entry. Header ``name`` is stored as field ``h:name``.
F_ID = b"i"
F_BODY = b"b"
F_KEY = b"k"
F_TIME = b"t"
F_HEADER = b"h:"


def stream_key(prefix: str, topic: str) -> str:
    """The stream that holds ``topic``'s messages."""
    return f"{prefix}{{{topic}}}"


def dead_letter_key(prefix: str, topic: str, group: str) -> str:
    """The stream that holds the dead letters of (``topic``, ``group``)."""
    return f"{prefix}{{{topic}}}:{group}:dlq"


def delayed_key(stream: str, group: str) -> str:
    """The sorted set of a group's entries waiting for redelivery (score: due time in ms)."""
    return f"{stream}:{group}:delayed"


def headers_key(stream: str, group: str) -> str:
    """The hash of headers rewritten by ``Retry(headers=...)``, by entry id."""
    return f"{stream}:{group}:headers"


def encode_fields(message: Message) -> list[Any]:
    """XADD field/value arguments for ``message``: binary body, one field per header."""
    fields: list[Any] = [F_ID, message.id, F_BODY, message.body, F_TIME, message.timestamp]
    if message.key is not None:
        fields += (F_KEY, message.key)
    for name, value in message.headers.items():
        fields += (F_HEADER + name.encode(), value)
    return fields


def decode_entry(entry_id: bytes, fields: Sequence[bytes], headers_json: bytes | None) -> Message:
    """The Message stored in one stream entry (fields as a flat name/value list).

    Entries written by other tools decode too: a missing id becomes the entry id, fields msgkit
    does not know become headers.
    """
    body = b""
    message_id: str | None = None
    key: str | None = None
    timestamp: float | None = None
    headers: dict[str, str] = {}
    it = iter(fields)
    for name, value in zip(it, it, strict=True):
        if name == F_BODY:
            body = value
        elif name == F_ID:
            message_id = value.decode(errors="replace")
        elif name == F_KEY:
            key = value.decode(errors="replace")
        elif name == F_TIME:
            try:
                timestamp = float(value)
            except ValueError:
                timestamp = None
        elif name[:2] == F_HEADER:
            headers[name[2:].decode(errors="replace")] = value.decode(errors="replace")
        else:
            headers[name.decode(errors="replace")] = value.decode(errors="replace")
    if headers_json is not None:
        headers = json.loads(headers_json)
    if message_id is None:
        message_id = entry_id.decode()
    if timestamp is None:
        timestamp = int(entry_id.partition(b"-")[0]) / 1000
    return Message(body, message_id, key, headers, timestamp)


def encode_headers(headers: Mapping[str, str]) -> str:
    return json.dumps(dict(headers), ensure_ascii=False, separators=(",", ":"))


_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: Take up to ARGV[3] entries for consumer ARGV[2] of group ARGV[1], in this order: entries of
#: lost consumers idle for ARGV[4] ms or more (0: skip), due delayed entries, new entries.
#: KEYS: stream, delayed zset, headers hash.
#: Returns {{id, fields, attempt, headers-or-false, ...} of redeliveries, {{id, fields}, ...} of new
#: entries (attempt 1), {lost ids}, ms until the next due entry or -1}.
POLL = (
    _NOW
    + """
local stream, delayed, hkey = KEYS[1], KEYS[2], KEYS[3]
local group, consumer = ARGV[1], ARGV[2]
local want = tonumber(ARGV[3])
local claim_idle = tonumber(ARGV[4])
local out, lost, n = {}, {}, 0
local function add(entry, attempt)
  out[#out + 1] = entry[1]
  out[#out + 1] = entry[2]
  out[#out + 1] = attempt
  out[#out + 1] = false
  n = n + 1
end
if claim_idle > 0 then
  local pending = redis.call('XPENDING', stream, group, 'IDLE', claim_idle, '-', '+', want)
  if #pending > 0 then
    local args, counts = {'XCLAIM', stream, group, consumer, claim_idle}, {}
    for _, p in ipairs(pending) do
      args[#args + 1] = p[1]
      counts[p[1]] = p[4]
    end
    for _, e in ipairs(redis.call(unpack(args))) do
      add(e, counts[e[1]] + 1)
      counts[e[1]] = nil
    end
    for id, _ in pairs(counts) do lost[#lost + 1] = id end
  end
end
if n < want then
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, want - n)) do
    local sep = string.find(member, ':', 1, true)
    local id, attempt = string.sub(member, 1, sep - 1), tonumber(string.sub(member, sep + 1))
    local claimed = redis.pcall('XCLAIM', stream, group, consumer, 0, id, 'FORCE', 'RETRYCOUNT', attempt)
    if type(claimed) == 'table' and claimed.err then return claimed end
    redis.call('ZREM', delayed, member)
    if #claimed > 0 then add(claimed[1], attempt) else lost[#lost + 1] = id end
  end
end
local fresh = {}
if n < want then
  local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want - n, 'STREAMS', stream, '>')
  if read then fresh = read[1][2] end
end
if redis.call('EXISTS', hkey) == 1 then
  for i = 1, #out, 4 do
    local h = redis.call('HGET', hkey, out[i])
    if h then out[i + 3] = h end
  end
  if #lost > 0 then redis.call('HDEL', hkey, unpack(lost)) end
end
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
local next_due = -1
if #first > 0 then next_due = math.max(tonumber(first[2]) - now, 0) end
return {out, fresh, lost, next_due}
"""
)

#: Move entries that consumer ARGV[2] of group ARGV[1] still owns to the delayed set and ack them.
#: ARGV[3...] in fours: entry id, attempt of the redelivery, when ('+MS': after a delay of MS
#: milliseconds, '=SCORE': that due time), headers JSON to deliver with ('': unchanged).
#: KEYS: stream, delayed zset, headers hash.
#: Returns how many were parked.
PARK = (
    _NOW
    + """
local stream, delayed, hkey = KEYS[1], KEYS[2], KEYS[3]
local group, consumer = ARGV[1], ARGV[2]
local parked = 0
for i = 3, #ARGV, 4 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p > 0 and p[1][2] == consumer then
    local when = ARGV[i + 2]
    local score = tonumber(string.sub(when, 2))
    if string.sub(when, 1, 1) == '+' then score = now + score end
    redis.call('ZADD', delayed, score, id .. ':' .. ARGV[i + 1])
    if ARGV[i + 3] ~= '' then redis.call('HSET', hkey, id, ARGV[i + 3]) end
    redis.call('XACK', stream, group, id)
    parked = parked + 1
  end
end
return parked
"""
)

#: Reset the idle time of the entries in ARGV[3...] that consumer ARGV[2] of group ARGV[1] still
#: owns (a lease renewal; the delivery count is unchanged). KEYS: stream. Returns the count.
RENEW = """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local args = {'XCLAIM', stream, group, consumer, 0}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == consumer then args[#args + 1] = ARGV[i] end
end
if #args == 5 then return 0 end
args[#args + 1] = 'JUSTID'
return #redis.call(unpack(args))
"""

#: Delete consumers of group ARGV[1] that own no pending entry: the one named ARGV[4] if given,
#: else those whose name starts with ARGV[3] and that were idle for ARGV[2] ms. KEYS: stream.
#: Returns the number deleted.
FORGET_CONSUMERS = """
local stream, group = KEYS[1], ARGV[1]
local min_idle, prefix, only = tonumber(ARGV[2]), ARGV[3], ARGV[4]
local deleted = 0
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
  local info = {}
  for i = 1, #fields, 2 do info[fields[i]] = fields[i + 1] end
  local name = info['name']
  local match
  if only ~= '' then
    match = name == only
  else
    match = string.sub(name, 1, #prefix) == prefix and info['idle'] >= min_idle
  end
  if match and info['pending'] == 0 then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, name)
    deleted = deleted + 1
  end
end
return deleted
"""


class RedisSubscription(Subscription):
    """One consumer (unique name) of a consumer group, with its own connection for blocking reads."""

    def __init__(
        self,
        transport: RedisTransport,
        stream: str,
        group: str,
        topic_name: str,
        dead_stream: str | None,
    ) -> None:
        self._transport = transport
        self._stream = stream
        self._group = group
        self._topic_name = topic_name
        self._dead_stream = dead_stream  # None: this reads dead letters; acks delete them
        self._keys = [stream, delayed_key(stream, group), headers_key(stream, group)]
        self.consumer = f"{CONSUMER_PREFIX}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        settings = transport.settings
        self._claim_idle_ms = max(int(settings.visibility_timeout * 1000), 1)
        self._claim_interval = transport.claim_interval
        self._last_claim = -math.inf
        self._reader = transport._new_reader()
        self._reader_id: int | None = None  # CLIENT ID of the reader connection; -1: no UNBLOCK
        self._blocking = False
        self._wake = False
        self._held: set[bytes] = set()  # entry ids fetched and not settled (stash included)
        self._rewritten: set[bytes] = set()  # held entries with Retry(headers=...) applied
        self._stash: deque[Delivery] = deque()  # fetched from Redis, not yet returned by fetch()
        self._step_task: asyncio.Task[None] | None = None
        self._backoff = 0.01
        self._closed = False
        self._maintainer = asyncio.get_running_loop().create_task(
            self._maintain(), name=f"msgkit-redis-lease-{stream}-{group}"
        )

    def __repr__(self) -> str:
        return f"RedisSubscription(stream={self._stream!r}, group={self._group!r}, consumer={self.consumer!r})"

    # ------------------------------------------------------------------ fetching

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._closed:
                raise ClosedError(f"subscription {self.consumer} of {self._stream}/{self._group} is closed")
            task = self._step_task
            if task is None:
                if self._stash:
                    return self._unstash(max_count)
                wait = max(deadline - loop.time(), 0.0)
                task = self._step_task = loop.create_task(self._step(min(max_count, MAX_BATCH), wait))
                task.add_done_callback(_retrieve)
            try:
                await asyncio.shield(task)  # cancelling fetch leaves the step running: it stashes
            finally:
                if task.done() and self._step_task is task:
                    self._step_task = None
            if self._stash:
                return self._unstash(max_count)
            if loop.time() >= deadline:
                return []

    def _unstash(self, max_count: int) -> list[Delivery]:
        stash = self._stash
        return [stash.popleft() for _ in range(min(max_count, len(stash)))]

    async def _step(self, count: int, wait: float) -> None:
        """One poll and, if it found nothing, one blocking read; results go to the stash."""
        transport = self._transport
        try:
            claim_idle = 0
            now = time.monotonic()
            if now - self._last_claim >= self._claim_interval:
                claim_idle, self._last_claim = self._claim_idle_ms, now
            self._wake = False
            again, fresh, lost, next_due = await transport._scripts["poll"](
                self._keys, [self._group, self.consumer, count, claim_idle], client=transport._client
            )
            if lost:
                self._report_lost(lost)
            for i in range(0, len(again), 4):
                self._add(again[i], again[i + 1], again[i + 2], again[i + 3])
            for entry_id, fields in fresh:
                self._add(entry_id, fields, 1, None)
            if not again and not fresh:
                block = min(wait, transport.settings.block)
                if next_due >= 0:
                    block = min(block, next_due / 1000)
                if block >= 0.001 and not self._wake and not self._closed:
                    await self._read_blocking(count, int(block * 1000))
        except DENIED_ERRORS as exc:
            raise transport._error(exc, "fetch") from exc
        except TRANSIENT_ERRORS as exc:
            self._reader_id = None
            transport._note_outage("fetch", exc)
            await asyncio.sleep(min(self._backoff, wait))
            self._backoff = min(self._backoff * 2, 1.0)
            return
        except rex.ResponseError as exc:
            if not is_nogroup(exc):
                raise transport._error(exc, f"fetching from {self._stream}/{self._group}") from exc
            await self._ensure_group()
        self._backoff = 0.01
        transport._note_recovered()

    async def _read_blocking(self, count: int, block_ms: int) -> None:
        reader = self._reader
        if self._reader_id is None:
            try:
                self._reader_id = int(await command(reader, "CLIENT", "ID"))
            except rex.NoPermissionError:
                self._reader_id = -1
        self._blocking = True
        try:
            reply = await command(
                reader,
                "XREADGROUP", "GROUP", self._group, self.consumer, "COUNT", count,
                "BLOCK", block_ms, "STREAMS", self._stream, ">",
            )  # fmt: skip
        finally:
            self._blocking = False
        if reply:
            for entry_id, fields in reply[0][1]:
                self._add(entry_id, fields, 1, None)

    def _add(self, entry_id: bytes, fields: list[bytes], attempt: int, headers: bytes | None) -> None:
        message = decode_entry(entry_id, fields, headers)
        self._held.add(entry_id)
        if headers is not None:
            self._rewritten.add(entry_id)
        self._stash.append(Delivery(message, self._topic_name, self._group, int(attempt), entry_id))

    def _report_lost(self, lost: list[bytes]) -> None:
        logger.warning(
            "%d entries of %s/%s were deleted or trimmed from the stream while pending or delayed; they cannot "
            "be redelivered (e.g. %s)",
            len(lost),
            self._stream,
            self._group,
            b", ".join(lost[:3]).decode(),
        )

    async def _wake_reader(self) -> None:
        """Make our own blocked read return, so it polls the delayed set again at once."""
        self._wake = True
        reader_id = self._reader_id
        try:
            for _ in range(5):  # the read may be sent but not yet blocked in the server: try again
                if not self._blocking or reader_id is None or reader_id <= 0:
                    return
                if await command(self._transport._client, "CLIENT", "UNBLOCK", reader_id):
                    return
                await asyncio.sleep(0.002)
        except rex.NoPermissionError:
            self._reader_id = -1
        except (rex.RedisError, OSError) as exc:
            logger.debug("CLIENT UNBLOCK failed: %s", exc)

    # ------------------------------------------------------------------ settling

    async def settle(self, settlements: Sequence[tuple[Delivery, Outcome]]) -> None:
        entry_ids = [delivery.receipt for delivery, _ in settlements]
        rewritten = self._rewritten.intersection(entry_ids) if self._rewritten else set()
        self._forget(entry_ids)  # they leave our hands now: a redelivery may come back before we return
        acks: list[bytes] = []
        dead: list[tuple[bytes, Message]] = []
        parks: list[Any] = []
        for delivery, outcome in settlements:
            entry_id = delivery.receipt
            if isinstance(outcome, Ack):
                acks.append(entry_id)
            elif isinstance(outcome, DeadLetter):
                if self._dead_stream is not None:
                    dead.append((entry_id, dead_letter_message(delivery, outcome)))
                else:  # a dead letter of a dead letter stays where it is, ready again
                    parks += (entry_id, delivery.attempt + 1, "+0", "")
            else:
                headers = encode_headers({**delivery.message.headers, **outcome.headers}) if outcome.headers else ""
                parks += (entry_id, delivery.attempt + 1, f"+{max(round(outcome.delay * 1000), 0)}", headers)
        failed: list[tuple[str, str]] = []
        if dead:
            failed = await self._call("dead-lettering", partial(self._store_dead, dead))
            not_stored = {message_id for message_id, _ in failed}
            acks += [entry_id for entry_id, message in dead if message.id not in not_stored]
        if acks:
            await self._call("acking", partial(self._ack, acks, [i for i in acks if i in rewritten]))
        if parks:
            await self._call("scheduling redelivery", partial(self._park, parks))
            await self._wake_reader()
        if failed:
            raise PublishError(
                f"{len(failed)} dead letter(s) could not be stored in {self._dead_stream}; the originals stay "
                f"pending and come back after the visibility timeout: {failed[0][1]}",
                failed,
            )

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        self._forget([delivery.receipt for delivery in deliveries])
        parks: list[Any] = []
        for delivery in deliveries:
            entry_id: bytes = delivery.receipt
            millis, _, seq = entry_id.partition(b"-")
            # first in line, in stream order: the entry's own time, a score below every due time
            # (seq/4096 is exact in a double next to a millisecond timestamp)
            parks += (entry_id, delivery.attempt, f"={int(millis) + min(int(seq or 0), 4095) / 4096!r}", "")
        if parks:
            await self._call("releasing", partial(self._park, parks))
            await self._wake_reader()

    def _forget(self, entry_ids: Sequence[bytes]) -> None:
        self._held.difference_update(entry_ids)
        if self._rewritten:
            self._rewritten.difference_update(entry_ids)

    async def _store_dead(self, dead: list[tuple[bytes, Message]]) -> list[tuple[str, str]]:
        assert self._dead_stream is not None
        pipe = self._transport._client.pipeline(transaction=False)
        for _, message in dead:
            pipe.execute_command("XADD", self._dead_stream, "*", *encode_fields(message))
        results = await pipe.execute(raise_on_error=False)
        return [(m.id, str(r)) for (_, m), r in zip(dead, results, strict=True) if isinstance(r, Exception)]

    async def _ack(self, acks: list[bytes], rewritten: list[bytes]) -> None:
        client = self._transport._client
        if self._dead_stream is not None and not rewritten:
            await command(client, "XACK", self._stream, self._group, *acks)
            return
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("XACK", self._stream, self._group, *acks)
        if self._dead_stream is None:
            pipe.execute_command("XDEL", self._stream, *acks)
        if rewritten:
            pipe.execute_command("HDEL", self._keys[2], *rewritten)
        await pipe.execute()

    async def _park(self, parks: list[Any]) -> None:
        for start in range(0, len(parks), 4 * MAX_BATCH):
            await self._transport._scripts["park"](
                self._keys, [self._group, self.consumer, *parks[start : start + 4 * MAX_BATCH]]
            )

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` through the outage retry; recreate a lost group (NOGROUP) once."""
        transport = self._transport
        try:
            return await transport._retrying(what, op)
        except rex.ResponseError as exc:
            if not is_nogroup(exc):
                raise transport._error(exc, f"{what} on {self._stream}/{self._group}") from exc
        await self._ensure_group()
        try:
            return await transport._retrying(what, op)
        except rex.ResponseError as exc:
            raise transport._error(exc, f"{what} on {self._stream}/{self._group}") from exc

    async def _ensure_group(self) -> None:
        logger.warning(
            "consumer group %s of %s is missing (lost in a restart?); recreating it", self._group, self._stream
        )
        await self._transport._ensure_group(self._stream, self._group)

    # ------------------------------------------------------------------ leases and cleanup

    async def _maintain(self) -> None:
        """Renew the leases of held entries; forget consumers of this group that died."""
        transport = self._transport
        timeout = transport.settings.visibility_timeout
        next_forget = time.monotonic() + timeout
        while True:
            await asyncio.sleep(timeout / 3)
            try:
                held = list(self._held)
                for start in range(0, len(held), MAX_BATCH):
                    await transport._scripts["renew"](
                        self._keys[:1], [self._group, self.consumer, *held[start : start + MAX_BATCH]]
                    )
                if time.monotonic() >= next_forget:
                    next_forget = time.monotonic() + timeout
                    await self._forget_consumers(self._claim_idle_ms, "")
            except (rex.RedisError, OSError) as exc:
                logger.debug("lease renewal on %s/%s failed: %s", self._stream, self._group, exc)

    async def _forget_consumers(self, min_idle_ms: int, only: str) -> int:
        deleted: int = await self._transport._scripts["forget"](
            self._keys[:1], [self._group, min_idle_ms, CONSUMER_PREFIX, only]
        )
        if deleted and not only:
            logger.info("forgot %d dead consumer(s) of %s/%s", deleted, self._stream, self._group)
        return deleted

    async def close(self) -> None:
        """Detach. What was fetched but never returned is released; what the engine holds
        unsettled stays pending and reaches another consumer after the visibility timeout."""
        if self._closed:
            return
        self._closed = True
        self._transport._subscriptions.discard(self)
        self._maintainer.cancel()
        grace = self._transport.settings.block + 2.0
        try:
            task = self._step_task
            if task is not None:
                await self._wake_reader()
                await asyncio.wait({task}, timeout=grace)
            stashed = list(self._stash)
            self._stash.clear()
            if stashed:
                await asyncio.wait_for(self.release(stashed), grace)
            if not self._held:
                await asyncio.wait_for(self._forget_consumers(0, self.consumer), grace)
        except (TimeoutError, MsgkitError, rex.RedisError, OSError) as exc:
            logger.warning("closing consumer %s of %s/%s: %s", self.consumer, self._stream, self._group, exc)
        finally:
            if self._step_task is not None:
                self._step_task.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
            await self._reader.aclose()
            await self._reader.connection_pool.aclose()


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("a fetch step failed after its fetch() was cancelled: %r", task.exception())

"""Internals of the RabbitMQ transport: the wire format, names, the connection that comes back,
and the publishing side (confirms in a window, copies that settle deliveries, declarations).

Kept apart from :mod:`msgkit.transports.rabbitmq` so that module reads as the mapping of the SPI
onto RabbitMQ. Nothing here is public API.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import logging
import math
import os
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.abc
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from msgkit.errors import BrokerUnavailableError, ClosedError, ConfigurationError, MsgkitError
from msgkit.message import Delivery, Message, new_message_id

logger = logging.getLogger("msgkit.rabbitmq")

# ---------------------------------------------------------------------------- the wire format

#: Headers msgkit writes besides the message's own; read back and removed on delivery.
KEY_HEADER: Final = "msgkit-key"
TIMESTAMP_HEADER: Final = "msgkit-ts"  # the exact send time; the AMQP timestamp has whole seconds
ATTEMPTS_HEADER: Final = "msgkit-attempts"  # deliveries before this copy was published (retry, release)
LONG_ID_HEADER: Final = "msgkit-id"  # ids longer than the 255-byte message_id property

#: Headers RabbitMQ adds (quorum delivery count, dead-lettering history): not the message's own.
_BROKER_HEADERS = (
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)
_MAX_SHORT_STRING = 255
#: Header bytes beyond which a message's header frame could exceed RabbitMQ's frame_max (128 KiB).
MAX_HEADER_BYTES: Final = 120_000

_UTC = datetime.UTC


def encode(message: Message, attempts: int = 0) -> Basic.Properties:
    """The AMQP properties of ``message``: persistent, id, timestamp, headers (key and ts added).

    ``attempts`` (deliveries already made) travels in a header when the message is republished
    for a retry or a release, so ``Delivery.attempt`` keeps counting across the new copy.
    """
    headers: dict[str, Any] = dict(message.headers)
    timestamp = message.timestamp
    headers[TIMESTAMP_HEADER] = f"{timestamp:.6f}"
    if message.key is not None:
        headers[KEY_HEADER] = message.key
    if attempts:
        headers[ATTEMPTS_HEADER] = str(attempts)
    message_id: str | None = message.id
    if len(message.id) > _MAX_SHORT_STRING // 4 and len(message.id.encode()) > _MAX_SHORT_STRING:
        headers[LONG_ID_HEADER] = message.id
        message_id = None  # aiormq fills in a random one: it maps returns by message_id
    return Basic.Properties(
        delivery_mode=2,
        message_id=message_id,
        timestamp=datetime.datetime.fromtimestamp(int(timestamp), _UTC),
        headers=headers,
    )


#: AMQP field names are short strings, and pamqp silently truncates them beyond 128 bytes.
MAX_HEADER_NAME: Final = 128


def header_problem(message: Message) -> str | None:
    """Why ``message``'s headers cannot travel over AMQP, or None: a name longer than 128 bytes
    ("name"), or more id, key and header bytes than one frame holds ("size")."""
    chars = len(message.id) + (len(message.key) if message.key else 0)
    for name, value in message.headers.items():
        if len(name) > MAX_HEADER_NAME // 4 and len(name.encode()) > MAX_HEADER_NAME:
            return "name"
        chars += len(name) + len(value) + 6
    if chars * 4 < MAX_HEADER_BYTES:
        return None
    size = len(message.id.encode()) + (len(message.key.encode()) if message.key else 0)
    for name, value in message.headers.items():
        size += len(name.encode()) + len(value.encode()) + 6
    return "size" if size > MAX_HEADER_BYTES else None


def decode(raw: DeliveredMessage, topic: str, group: str, receipt: tuple[int, int]) -> Delivery:
    """The Delivery of a message received from RabbitMQ: msgkit's headers taken out again."""
    props = raw.header.properties
    headers: dict[str, Any] = props.headers or {}
    prior = headers.pop(ATTEMPTS_HEADER, None)
    redelivered = headers.pop("x-delivery-count", None)
    attempt = 1
    if prior is not None:
        attempt += _int(prior)
    if redelivered is not None:
        attempt += _int(redelivered)
    key = headers.pop(KEY_HEADER, None)
    stamp = headers.pop(TIMESTAMP_HEADER, None)
    message_id = headers.pop(LONG_ID_HEADER, None) or props.message_id or new_message_id()
    if "x-death" in headers:
        for name in _BROKER_HEADERS:
            headers.pop(name, None)
    for value in headers.values():
        if type(value) is not str:
            headers = {str(k): _text(v) for k, v in headers.items()}
            break
    if stamp is not None:
        timestamp = _float(stamp)
    elif props.timestamp is not None:
        timestamp = props.timestamp.timestamp()
    else:
        timestamp = time.time()  # sent by a tool that gave none: "now" rather than 1970 (age limits)
    message = Message(raw.body, str(message_id), None if key is None else _text(key), headers, timestamp)
    return Delivery(message, topic, group, attempt, receipt)


def _int(value: Any) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    return str(value)


# ---------------------------------------------------------------------------- topology

#: Longest base name (topic:group); the suffixes of the other queues still fit in 255 bytes.
_MAX_BASE = 200
#: Delays are capped at a week (RabbitMQ's TTL and expiry arguments are 32-bit milliseconds).
MAX_DELAY_MS: Final = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class GroupNames:
    """Where a (topic, group) lives: the topic's exchange, the group's queue, its dead letters."""

    exchange: str
    queue: str
    dead_letters: str

    def delay_queue(self, ms: int, epoch: int | None = None) -> str:
        """The queue that holds this group's messages for ``ms`` milliseconds, then hands them back.

        Named after the current :data:`DELAY_QUEUE_EPOCH` too (see :func:`delay_queue_arguments`).
        """
        if epoch is None:
            epoch = int(time.time() // DELAY_QUEUE_EPOCH)
        return f"{self.queue}:delay-{ms}ms-e{epoch}"


def group_names(topic: str, group: str) -> GroupNames:
    """Names of a group's objects. ``:`` is not allowed in msgkit names, so they never collide."""
    base = f"{topic}:{group}"
    if len(base) > _MAX_BASE:  # names are ASCII (msgkit.names), so characters are bytes
        digest = hashlib.sha256(base.encode()).hexdigest()[:16]
        base = f"{base[: _MAX_BASE - 17]}~{digest}"
    return GroupNames(exchange=topic, queue=base, dead_letters=f"{base}:dead-letters")


#: Arguments of a group's queue and of its dead letters (quorum: replicated, delivery counts).
QUEUE_ARGUMENTS: Final[Mapping[str, Any]] = {"x-queue-type": "quorum"}


def delay_tier_ms(seconds: float) -> int:
    """The delay queue for ``seconds``: rounded up to 10 ms below 1 s, 100 ms below 10 s, 1 s above.

    So a redelivery is late by less than 10% of its delay and never more than one second, while
    the number of delay queues stays small (they expire when unused).
    """
    ms = math.ceil(seconds * 1000)
    step = 10 if ms < 1_000 else 100 if ms < 10_000 else 1_000
    return min(max(step, -(-ms // step) * step), MAX_DELAY_MS)


#: A delay queue takes messages for this many seconds (its epoch, part of its name), then the
#: next epoch's queue does.
DELAY_QUEUE_EPOCH = 86_400
#: A delay queue deletes itself this long after its epoch ended plus twice its delay (milliseconds).
DELAY_QUEUE_EXPIRY_MARGIN_MS = 600_000
_DELAY_QUEUE_NAME = re.compile(r":delay-(\d+)ms-e\d+$")


def delay_queue_arguments(ms: int, target_queue: str) -> dict[str, Any]:
    """A delay queue: messages expire after ``ms`` and are dead-lettered back to ``target_queue``.

    A quorum queue with at-least-once dead-lettering (which needs ``reject-publish``): RabbitMQ
    keeps an expired message until the group's queue confirmed it. A classic queue dead-letters
    at most once, and at a broker restart it expires its messages before the group's quorum
    queue has a leader, so every delayed redelivery waiting across a restart was dropped (found
    by the fault-injection suite; tests/integration/test_rabbitmq_regressions.py).

    RabbitMQ 3.10 does not renew a quorum queue's expiry when it is declared again, so ``x-expires``
    counts from the queue's creation. Each queue therefore takes messages for one epoch only (the
    epoch is in its name) and expires once its epoch ended and its messages left: at least an
    epoch plus twice the delay plus a margin (for clock skew and restarts) after its creation.
    """
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": target_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-expires": DELAY_QUEUE_EPOCH * 1000 + 2 * ms + DELAY_QUEUE_EXPIRY_MARGIN_MS,
    }


def delay_of(queue: str) -> int:
    """The delay (ms) of a delay queue, from its name."""
    match = _DELAY_QUEUE_NAME.search(queue)
    if match is None:
        raise ValueError(f"{queue!r} is not a delay queue")
    return int(match.group(1))


async def declare_exchange(channel: aiormq.abc.AbstractChannel, topic: str) -> None:
    """Declare a topic's exchange: durable, fanout (every bound group queue gets every message)."""
    try:
        await channel.exchange_declare(exchange=topic, exchange_type="fanout", durable=True)
    except CONNECTION_ERRORS:
        raise
    except Exception as exc:
        raise declare_error(exc, f"exchange {topic!r} (fanout, durable)") from None


async def declare_queue(channel: aiormq.abc.AbstractChannel, name: str, arguments: Mapping[str, Any]) -> None:
    """Declare a durable queue with ``arguments``; a mismatch is a ConfigurationError naming both."""
    try:
        await channel.queue_declare(queue=name, durable=True, arguments=dict(arguments))
    except CONNECTION_ERRORS:
        raise
    except Exception as exc:
        raise declare_error(exc, f"queue {name!r}", arguments) from None


async def declare_group(channel: aiormq.abc.AbstractChannel, names: GroupNames) -> None:
    """Declare a group's topology, idempotently: exchange, queue bound to it, dead-letter queue."""
    await declare_exchange(channel, names.exchange)
    await declare_queue(channel, names.queue, QUEUE_ARGUMENTS)
    try:
        await channel.queue_bind(queue=names.queue, exchange=names.exchange, routing_key="")
    except CONNECTION_ERRORS:
        raise
    except Exception as exc:
        raise declare_error(exc, f"the binding of queue {names.queue!r} to exchange {names.exchange!r}") from None
    await declare_queue(channel, names.dead_letters, QUEUE_ARGUMENTS)


async def delete_queues(channel: aiormq.abc.AbstractChannel, queues: Sequence[str]) -> None:
    """Delete ``queues`` with the messages in them (RabbitMQ deletes a missing queue without error)."""
    for queue in queues:
        try:
            await channel.queue_delete(queue=queue)
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:
            raise delete_error(exc, f"queue {queue!r}") from None


async def delete_unused_exchange(channel: aiormq.abc.AbstractChannel, topic: str) -> bool:
    """Delete a topic's exchange unless a queue is still bound to it; True if it is gone.

    ``if_unused`` makes the check and the deletion one step on the broker. A refusal closes the
    channel (the caller's topology channel reopens on its next use).
    """
    try:
        await channel.exchange_delete(exchange=topic, if_unused=True)
    except aiormq.exceptions.ChannelPreconditionFailed:
        return False  # other groups are bound to it: the topic stays
    except CONNECTION_ERRORS:
        raise
    except Exception as exc:
        raise delete_error(exc, f"exchange {topic!r}") from None
    return True


def delete_error(exc: BaseException, what: str) -> MsgkitError:
    """The msgkit error for a failed deletion of ``what``."""
    if isinstance(exc, MsgkitError):
        return exc
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return ConfigurationError(
            f"RabbitMQ refused to delete {what}: {reply_text(exc)} (check the user's configure permission)"
        )
    return BrokerUnavailableError(f"RabbitMQ failed to delete {what}: {reply_text(exc)}")


# ---------------------------------------------------------------------------- errors

#: Errors that mean "the connection or channel went away": retried after reconnecting. msgkit's
#: BrokerUnavailableError is a ConnectionError too: callers let MsgkitError through first.
CONNECTION_ERRORS: Final = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def reply_text(exc: BaseException) -> str:
    """The broker's reply text of a channel or connection error, without the library's wrapping."""
    if exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    if len(exc.args) >= 2 and isinstance(exc.args[1], str):  # ChannelClosed(code, text)
        return exc.args[1]
    return f"{type(exc).__name__}: {exc}"


def declare_error(exc: BaseException, what: str, arguments: Mapping[str, Any] | None = None) -> MsgkitError:
    """The msgkit error for a failed declaration of ``what`` (e.g. ``queue 'orders:billing'``)."""
    if isinstance(exc, MsgkitError):
        return exc
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        wanted = f" msgkit declares it with arguments {dict(arguments)!r}." if arguments else ""
        return ConfigurationError(
            f"RabbitMQ refused to declare {what}: {reply_text(exc)}.{wanted} It exists with other settings "
            f"(made by another tool or an older version): delete it, or use another name"
        )
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return ConfigurationError(
            f"RabbitMQ refused access to {what}: {reply_text(exc)} (check the user's permissions on the vhost)"
        )
    return BrokerUnavailableError(f"RabbitMQ failed to declare {what}: {reply_text(exc)}")


# ---------------------------------------------------------------------------- the connection


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect; ``url`` is for messages and has no secrets."""

    url: str
    host: str
    port: int
    login: str
    password: str
    vhost: str
    tls: bool
    ssl_context: ssl.SSLContext | None
    heartbeat: int
    name: str

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r})"


class Link:
    """One AMQP connection that comes back after it is lost.

    A lost connection is re-established in the background at once, with exponential backoff and
    jitter (0.1 s doubling to 3 s). Callers wait for it with :meth:`get`; an outage longer than
    ``reconnect_timeout`` makes :meth:`get` raise BrokerUnavailableError (and each later call
    makes one more attempt first). A refused login or vhost is a ConfigurationError at once.
    Channels are the callers' business; :attr:`generation` changes with every new connection.
    """

    def __init__(self, endpoint: Endpoint, role: str, connect_timeout: float, reconnect_timeout: float) -> None:
        self._endpoint = endpoint
        self._role = role
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = reconnect_timeout
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._amqp: aiormq.abc.AbstractConnection | None = None
        self._connecting: asyncio.Task[aiormq.abc.AbstractConnection] | None = None
        self._down_since: float | None = None
        self._closed = False
        self._closers: set[asyncio.Task[None]] = set()
        self.generation = 0

    def __repr__(self) -> str:
        return f"Link({self._role}, {self._endpoint.url!r}, generation={self.generation})"

    @property
    def url(self) -> str:
        """The broker's URL, without secrets."""
        return self._endpoint.url

    @property
    def connected(self) -> bool:
        return self._amqp is not None and not self._amqp.is_closed

    async def get(self, timeout: float | None = None) -> aiormq.abc.AbstractConnection:
        """The live connection, reconnecting if needed.

        Raise TimeoutError if ``timeout`` passes first (the reconnecting goes on), ClosedError
        after :meth:`close`, BrokerUnavailableError once the outage outlasts the bound.
        """
        amqp = self._amqp
        if amqp is not None and not amqp.is_closed:
            return amqp
        if self._closed:
            raise ClosedError(f"the RabbitMQ {self._role} connection to {self._endpoint.url} is closed")
        task = self._reconnect()
        try:
            async with asyncio.timeout(None if timeout is None else max(timeout, 0.0)):
                return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._closed:  # close() stopped the reconnecting, not our caller
                raise ClosedError(f"the RabbitMQ {self._role} connection to {self._endpoint.url} is closed") from None
            raise

    async def first_connect(self) -> None:
        """Connect for the first time, retrying for up to ``connect_timeout``."""
        if self.connected:
            return
        if self._closed:
            raise ClosedError(f"the RabbitMQ {self._role} connection to {self._endpoint.url} is closed")
        await asyncio.shield(self._reconnect(self._connect_timeout))

    def _reconnect(self, limit: float | None = None) -> asyncio.Task[aiormq.abc.AbstractConnection]:
        task = self._connecting
        if task is None or task.done():
            loop = asyncio.get_running_loop()
            if self._down_since is None:
                self._down_since = loop.time()
            limit = self._reconnect_timeout if limit is None else limit
            name = f"msgkit-rabbitmq-{self._role}-connect"
            task = self._connecting = loop.create_task(self._connect_loop(limit), name=name)
            task.add_done_callback(_consume_result)
        return task

    async def _connect_loop(self, limit: float) -> aiormq.abc.AbstractConnection:
        loop = asyncio.get_running_loop()
        assert self._down_since is not None
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            elapsed = loop.time() - self._down_since
            try:
                connection = await self._open(max(min(self._connect_timeout, limit - elapsed), 1.0))
            except MsgkitError:
                raise
            except Exception as exc:
                elapsed = loop.time() - self._down_since
                if self._closed:
                    raise ClosedError(f"the RabbitMQ {self._role} connection was closed") from None
                if elapsed >= limit:
                    logger.error(
                        "RabbitMQ at %s unreachable for %.0fs (%s connection, %d attempts): %s",
                        self._endpoint.url,
                        elapsed,
                        self._role,
                        attempt,
                        reply_text(exc),
                    )
                    raise BrokerUnavailableError(
                        f"RabbitMQ at {self._endpoint.url} unreachable for {elapsed:.0f}s: {reply_text(exc)}"
                    ) from None
                logger.log(
                    logging.WARNING if attempt == 1 else logging.DEBUG,
                    "connecting to RabbitMQ at %s failed (%s connection, attempt %d): %s; retrying for up to %.0fs",
                    self._endpoint.url,
                    self._role,
                    attempt,
                    reply_text(exc),
                    limit - elapsed,
                )
                await asyncio.sleep(min(backoff * random.uniform(0.8, 1.2), limit - elapsed))
                backoff = min(backoff * 2, 3.0)
                continue
            if self._closed:
                await _close_quietly(connection)
                raise ClosedError(f"the RabbitMQ {self._role} connection was closed")
            amqp = _underlay(connection)
            if self.generation:
                logger.info(
                    "reconnected to RabbitMQ at %s (%s connection) after %.1fs",
                    self._endpoint.url,
                    self._role,
                    loop.time() - self._down_since,
                )
            self._connection, self._amqp = connection, amqp
            self._down_since = None
            self.generation += 1
            amqp.closing.add_done_callback(functools.partial(self._on_lost, amqp))
            return amqp

    async def _open(self, timeout: float) -> aio_pika.abc.AbstractConnection:
        e = self._endpoint
        try:
            return await aio_pika.connect(
                host=e.host,
                port=e.port,
                login=e.login,
                password=e.password,
                virtualhost=e.vhost,
                ssl=e.tls,
                ssl_context=e.ssl_context,
                timeout=timeout,
                client_properties={"connection_name": f"{e.name} {self._role}"},
                heartbeat=e.heartbeat,
            )
        except (aiormq.exceptions.AuthenticationError, aiormq.exceptions.ProbableAuthenticationError) as exc:
            raise ConfigurationError(
                f"RabbitMQ at {e.url} refused the login of user {e.login!r}: {reply_text(exc)}"
            ) from None
        except aiormq.exceptions.InvalidFrameError as exc:
            if "Connection.Close" not in str(exc):
                raise
            raise ConfigurationError(
                f"RabbitMQ at {e.url} refused to open virtual host {e.vhost!r} for user {e.login!r} "
                "(does the vhost exist, and may the user use it?)"
            ) from None
        except (aiormq.exceptions.AMQPConnectionError, ssl.SSLError) as exc:
            cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
            if not isinstance(cause, ssl.SSLCertVerificationError):
                raise  # other TLS and socket errors may pass (a broker restarting): retried
            raise ConfigurationError(
                f"TLS handshake with RabbitMQ at {e.url} failed: {cause.verify_message or cause} "
                "(set cafile to the CA that signed the server certificate; the host name must match it)"
            ) from None

    def _on_lost(self, amqp: aiormq.abc.AbstractConnection, closing: asyncio.Future[Any]) -> None:
        reason = "closed" if closing.cancelled() else reply_text(closing.exception() or ConnectionError("closed"))
        if self._closed or amqp is not self._amqp:
            return  # closed on purpose, or an old connection that was replaced already
        logger.warning(
            "lost the RabbitMQ %s connection to %s (%s); reconnecting", self._role, self._endpoint.url, reason
        )
        self._amqp = None
        old, self._connection = self._connection, None
        if old is not None:
            closer = asyncio.get_running_loop().create_task(_close_quietly(old))
            self._closers.add(closer)
            closer.add_done_callback(self._closers.discard)
        self._reconnect()

    async def close(self) -> None:
        """Close the connection and stop reconnecting. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._connecting = self._connecting, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        connection, self._connection, self._amqp = self._connection, None, None
        if connection is not None:
            await _close_quietly(connection)


def _underlay(connection: aio_pika.abc.AbstractConnection) -> aiormq.abc.AbstractConnection:
    transport = connection.transport
    if transport is None:  # pragma: no cover - aio-pika sets it when connect() returns
        raise BrokerUnavailableError("aio-pika returned a connection without a transport")
    return transport.connection


def _consume_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # read here; callers that stopped waiting get it on their next try


async def _close_quietly(connection: aio_pika.abc.AbstractConnection) -> None:
    try:
        async with asyncio.timeout(5.0):
            await connection.close()
    except Exception as exc:  # closing a dead connection may fail in many ways; it is gone either way
        logger.debug("closing a RabbitMQ connection failed: %r", exc)


# ---------------------------------------------------------------------------- publishing

#: What :meth:`Publisher.send` publishes: (routing key, body, properties, message id).
Entry: TypeAlias = tuple[str, bytes, Basic.Properties, str]
#: A delay queue is declared again when its last declaration is older than this, in seconds. Its
#: expiry (twice its delay plus a margin) therefore never comes while a message it holds waits.
REDECLARE_DELAY_QUEUE = 30.0


class Publisher:
    """The publishing side: its connection, a confirm channel, a topology channel, what is declared.

    Everything that writes to RabbitMQ goes through here: sends, the copies that settle a
    delivery (retries, delays, dead letters, releases), and declarations.
    """

    def __init__(self, link: Link, reconnect_timeout: float, operation_timeout: float, window: int) -> None:
        self.link = link
        self._reconnect_timeout = reconnect_timeout
        self._timeout = operation_timeout
        self._window = window
        self._confirm_channel: aiormq.abc.AbstractChannel | None = None
        self._topology_channel: aiormq.abc.AbstractChannel | None = None
        self._generation = 0
        self._lock = asyncio.Lock()
        self._exchanges: set[str] = set()  # declared on the current connection
        self._delay_queues: dict[str, float] = {}  # name -> when last declared (loop time)
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        await self.link.close()

    async def channel(self, *, confirms: bool, timeout: float | None = None) -> aiormq.abc.AbstractChannel:
        """The confirm channel (or the topology channel), reopened when lost."""
        channel = self._confirm_channel if confirms else self._topology_channel
        if channel is not None and not channel.is_closed:
            return channel
        async with asyncio.timeout(timeout), self._lock:  # the wait for the lock counts too
            channel = self._confirm_channel if confirms else self._topology_channel
            if channel is not None and not channel.is_closed:
                return channel
            if self.closed:
                raise ClosedError("the RabbitMQ transport is closed")
            connection = await self.link.get()
            if self.link.generation != self._generation:
                self._generation = self.link.generation
                self._exchanges.clear()
            channel = await open_channel(connection, confirms, self._timeout)
            if confirms:
                self._confirm_channel = channel
            else:
                self._topology_channel = channel
            return channel

    async def declare(self, declaration: Callable[[aiormq.abc.AbstractChannel], Awaitable[None]]) -> None:
        """Run a declaration on the topology channel, again after reconnecting if the line drops.

        A refused declaration closes only the topology channel, never the confirm channel.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_timeout
        while True:
            try:
                channel = await self.channel(confirms=False)
                async with asyncio.timeout(self._timeout):
                    await declaration(channel)
                return
            except MsgkitError:
                raise
            except CONNECTION_ERRORS as exc:
                if loop.time() >= deadline:
                    raise BrokerUnavailableError(
                        f"RabbitMQ at {self.link.url} kept dropping a declaration: {reply_text(exc)}"
                    ) from None
                await asyncio.sleep(0.1)

    async def declare_group(self, names: GroupNames) -> None:
        await self.declare(functools.partial(declare_group, names=names))
        self._exchanges.add(names.exchange)

    async def ensure_exchange(self, topic: str) -> None:
        if topic not in self._exchanges:
            await self.declare(functools.partial(declare_exchange, topic=topic))
            self._exchanges.add(topic)

    async def delete_group(self, names: GroupNames) -> None:
        """Delete a group's queue, its dead letters and the delay queues declared through this
        publisher, then the topic's exchange if no other queue is bound to it."""
        prefix = f"{names.queue}:delay-"
        delay_queues = [queue for queue in self._delay_queues if queue.startswith(prefix)]
        queues = [names.queue, names.dead_letters, *delay_queues]
        await self.declare(functools.partial(delete_queues, queues=queues))
        for queue in delay_queues:
            del self._delay_queues[queue]

        async def delete_exchange(channel: aiormq.abc.AbstractChannel) -> None:
            if not await delete_unused_exchange(channel, names.exchange):
                logger.debug("exchange %r is still bound to other groups: kept", names.exchange)

        await self.declare(delete_exchange)
        self._exchanges.discard(names.exchange)  # declared again on next use, gone or not

    async def ensure_delay_queue(self, names: GroupNames, ms: int, queue: str | None = None) -> str:
        """The delay queue for ``ms`` of a group (this epoch's, or ``queue``), declared if it was
        not declared lately."""
        queue = queue or names.delay_queue(ms)
        now = asyncio.get_running_loop().time()
        if now - self._delay_queues.get(queue, -REDECLARE_DELAY_QUEUE) >= REDECLARE_DELAY_QUEUE:
            arguments = delay_queue_arguments(ms, names.queue)
            await self.declare(functools.partial(declare_queue, name=queue, arguments=arguments))
            self._delay_queues[queue] = now
        return queue

    async def send(self, exchange: str, entries: Sequence[Entry], timeout: float | None = None) -> dict[int, str]:
        """Publish ``entries`` to ``exchange`` with confirms; return {index: reason} of those not stored.

        Up to ``window`` confirms are awaited at once. Unconfirmed messages (lost channel or
        connection, a nack) are published again on a new channel until ``timeout`` (default
        ``reconnect_timeout``) passes: duplicates are possible, losses are not. When a channel
        error closes the channel mid-window, the messages it took down are retried one by one, so
        that only the one that caused it fails. Raise BrokerUnavailableError if the broker stays
        away and nothing of the call was confirmed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._reconnect_timeout if timeout is None else timeout)
        failed: dict[int, str] = {}
        pending = list(range(len(entries)))
        suspects: set[int] = set()
        confirmed = 0
        backoff = 0.05
        while pending:
            retry: list[int] = []
            try:
                if exchange:
                    await self.ensure_exchange(exchange)
                wait = None if timeout is None else deadline - loop.time()
                channel = await self.channel(confirms=True, timeout=wait)
            except BrokerUnavailableError as exc:
                if not confirmed:
                    raise
                failed.update((i, str(exc)) for i in pending)
                break
            except MsgkitError:
                raise
            except CONNECTION_ERRORS as exc:
                retry, why = pending, reply_text(exc)
            else:
                why = ""
                clean = [i for i in pending if i not in suspects]
                for start in range(0, len(clean), self._window):
                    chunk = clean[start : start + self._window]
                    try:
                        async with asyncio.timeout(max(deadline - loop.time(), self._timeout)):
                            results = await asyncio.gather(
                                *(publish(channel, exchange, entries[i]) for i in chunk), return_exceptions=True
                            )
                    except TimeoutError:  # e.g. a connection blocked by a broker alarm for too long
                        results = [TimeoutError("no confirm from RabbitMQ in time")] * len(chunk)
                    confirmed += _sort(exchange, entries, chunk, results, retry, suspects, failed, alone=False)
                if suspects:
                    self._exchanges.discard(exchange)  # a channel error may mean it was deleted: declare again
                for i in (i for i in pending if i in suspects):  # one at a time: find the culprit
                    channel = await self.channel(confirms=True)
                    result = await asyncio.gather(publish(channel, exchange, entries[i]), return_exceptions=True)
                    confirmed += _sort(exchange, entries, [i], result, retry, suspects, failed, alone=True)
            if not retry:
                break
            if loop.time() >= deadline:
                why = why or "not confirmed by RabbitMQ"
                failed.update((i, f"{why} (gave up after reconnect_timeout)") for i in retry)
                break
            logger.debug("republishing %d unconfirmed messages to %r", len(retry), exchange)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
            pending = retry
        return failed

    async def store(self, entries: Sequence[Entry], names: GroupNames, timeout: float | None = None) -> set[int]:
        """Publish copies straight to a group's queues (retries, releases, dead letters).

        Return the indexes of the entries that were not stored within ``timeout`` (default
        ``reconnect_timeout``): the caller requeues those.
        """
        try:
            failed = await self.send("", entries, timeout)
            expired = [i for i in failed if entries[i][0].startswith(f"{names.queue}:delay-")]
            if expired:  # a delay queue expired between our declaration and the publish: declare, resend
                for queue in {entries[i][0] for i in expired}:
                    self._delay_queues.pop(queue, None)
                    await self.ensure_delay_queue(names, delay_of(queue), queue)
                again = await self.send("", [entries[i] for i in expired], timeout)
                failed = {i: why for i, why in failed.items() if i not in expired}
                failed.update((expired[n], why) for n, why in again.items())
        except (BrokerUnavailableError, ConfigurationError, ClosedError) as exc:
            failed = dict.fromkeys(range(len(entries)), str(exc))
        if failed:
            i, why = next(iter(failed.items()))
            logger.warning(
                "could not store %d message(s) in RabbitMQ queues (e.g. %s in %r: %s); requeueing the originals",
                len(failed),
                entries[i][3],
                entries[i][0],
                why,
            )
        return set(failed)


def _sort(
    exchange: str,
    entries: Sequence[Entry],
    chunk: Sequence[int],
    results: Sequence[object],
    retry: list[int],
    suspects: set[int],
    failed: dict[int, str],
    *,
    alone: bool,
) -> int:
    """File each publish result as confirmed, to retry, or failed; return how many were confirmed."""
    confirmed = 0
    for i, result in zip(chunk, results, strict=True):
        if not isinstance(result, BaseException):
            confirmed += 1
        elif isinstance(result, aiormq.exceptions.PublishError):  # basic.return: nowhere to go
            failed[i] = (
                f"no queue is bound to topic {exchange!r}: declare a group first (broker.declare(topic, group))"
                if exchange
                else f"queue {entries[i][0]!r} does not exist"
            )
        elif isinstance(result, (aiormq.exceptions.DeliveryError, asyncio.CancelledError, *CONNECTION_ERRORS)):
            retry.append(i)  # a nack, or the channel or connection went away: publish again
        elif isinstance(result, aiormq.exceptions.AMQPChannelError) and not alone:
            suspects.add(i)
            retry.append(i)
        else:
            failed[i] = reply_text(result)
    return confirmed


async def publish(channel: aiormq.abc.AbstractChannel, exchange: str, entry: Entry) -> object:
    """One mandatory publish; returns once confirmed (raises on a return, a nack or a lost channel)."""
    routing_key, body, properties, _ = entry
    return await channel.basic_publish(
        body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=True
    )


async def open_channel(
    connection: aiormq.abc.AbstractConnection, confirms: bool, timeout: float
) -> aiormq.abc.AbstractChannel:
    """A new channel (in confirm mode, raising on returns, if ``confirms``)."""
    try:
        async with asyncio.timeout(timeout):
            return await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
    except RuntimeError as exc:  # aiormq: "connection closed"
        if isinstance(exc, CONNECTION_ERRORS) or connection.is_closed:
            raise ConnectionError(f"connection closed while opening a channel: {exc}") from None
        raise


async def close_channel(channel: aiormq.abc.AbstractChannel) -> None:
    if channel.is_closed:
        return
    try:
        async with asyncio.timeout(5.0):
            await channel.close()
    except Exception as exc:  # a channel that cannot close cleanly is gone anyway
        logger.debug("closing channel %s failed: %r", channel, exc)


def ssl_context(
    cafile: str | None, certfile: str | None, keyfile: str | None, *, verify: bool, shown: str
) -> ssl.SSLContext:
    """The TLS context of an amqps:// URL (``shown``, redacted, is for error messages)."""
    for name, path in (("cafile", cafile), ("certfile", certfile), ("keyfile", keyfile)):
        if path is not None and not os.path.isfile(path):
            raise ConfigurationError(f"{name} {path!r} of {shown!r} is not a readable file")
    if keyfile and not certfile:
        raise ConfigurationError(f"keyfile without certfile in {shown!r}: give the client certificate too")
    try:
        context = ssl.create_default_context(cafile=cafile)
        if certfile:
            context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the TLS files of {shown!r}: {exc}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context

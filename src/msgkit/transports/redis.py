"""The Redis Streams transport: ``redis://`` and ``rediss://`` (TLS), with redis-py's asyncio client.

A topic is a stream, a msgkit group is a consumer group on it (created at id 0, so a late group
reads the retained history), and each subscription is a consumer with a unique name. Deliveries
wait in the group's pending entries list (PEL) until settled:

* **ack** is one XACK for the whole batch;
* **Retry(delay)** and **release** move the entry to a per-group sorted set of due times and ack
  it, atomically (Lua); any consumer's next poll claims due entries back with ``XCLAIM FORCE
  RETRYCOUNT``, so the delivery count stays the attempt number and no one busy-waits;
* **DeadLetter** stores the message in the group's dead-letter stream, then acks;
* a consumer that vanishes leaves its entries pending; live consumers claim entries idle for
  ``visibility_timeout`` and forget dead consumer names. Live subscriptions renew the idle time
  of what they hold, so a slow handler does not lose its message.

Options, keys and capabilities: docs/transports/redis.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import unquote

import redis.asyncio as aioredis
from pydantic import Field, field_validator, model_validator
from redis import exceptions as rex
from redis.asyncio.connection import BlockingConnectionPool, Connection, ConnectionPool, SSLConnection
from redis.asyncio.retry import Retry as ClientRetry
from redis.backoff import NoBackoff

from msgkit.config import TransportSettings, redact_url, settings_from_url, split_url
from msgkit.errors import (
    BrokerUnavailableError,
    ClosedError,
    ConfigurationError,
    MsgkitError,
    PublishError,
)
from msgkit.message import Message
from msgkit.names import check_name
from msgkit.transports import redis_streams as rs
from msgkit.transports._outage import OutageClock
from msgkit.transports.base import Capabilities, Transport
from msgkit.transports.redis_streams import (
    DENIED_ERRORS,
    MAX_BATCH,
    TRANSIENT_ERRORS,
    RedisSubscription,
    command,
    raw,
)

logger = logging.getLogger("msgkit.redis")

T = TypeVar("T")

#: Consumer group of a dead-letter stream.
DEAD_LETTER_GROUP = "dead-letters"


def parse_trim(spec: str) -> dict[str, tuple[str, int]]:
    """``"orders:maxlen:100000,audit:age:86400,*:maxlen:1000000"`` -> {topic: (kind, value)}."""
    rules: dict[str, tuple[str, int]] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        topic, _, rest = item.partition(":")
        kind, _, value = rest.partition(":")
        if topic != "*":
            check_name("topic", topic)
        if kind not in ("maxlen", "age") or not value.isdigit() or int(value) <= 0:
            raise ValueError(f"trim rule {item!r}: expected TOPIC:maxlen:COUNT or TOPIC:age:SECONDS (TOPIC may be *)")
        rules[topic] = (kind, int(value))
    return rules


class RedisSettings(TransportSettings):
    """Options of ``redis://`` and ``rediss://`` URLs (see docs/transports/redis.md)."""

    visibility_timeout: float = Field(30.0, gt=0, le=86_400)
    block: float = Field(0.5, ge=0.01, le=5.0)
    max_message_size: int = Field(1_048_576, ge=1024, le=512 * 1_048_576)
    prefix: str = Field("msgkit:", max_length=100, pattern=r"^[^{}\s]*$")
    trim: str = ""
    reconnect_timeout: float = Field(30.0, gt=0, le=3600)
    connect_timeout: float = Field(5.0, gt=0, le=300)
    socket_timeout: float = Field(10.0, gt=0, le=300)
    max_connections: int = Field(50, ge=2, le=10_000)
    client_name: str = Field("msgkit", min_length=1, max_length=100, pattern=r"^[!-~]+$")
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True

    @field_validator("trim")
    @classmethod
    def _check_trim(cls, value: str) -> str:
        parse_trim(value)
        return value

    @model_validator(mode="after")
    def _check_timeouts(self) -> RedisSettings:
        if self.socket_timeout < self.block + 1:
            raise ValueError(f"socket_timeout ({self.socket_timeout}s) must exceed block ({self.block}s) by 1s or more")
        return self


@dataclass(frozen=True, slots=True)
class RedisGroupStats:
    """What Redis holds for a (topic, group): for tests and debugging."""

    length: int
    pending: int
    delayed: int
    dead: int
    consumers: tuple[str, ...]


class RedisTransport(Transport):
    """The ``redis://`` / ``rediss://`` transport. See the module docstring and docs/transports/redis.md."""

    schemes = ("redis", "rediss")

    def __init__(self, url: str, settings: RedisSettings | None = None) -> None:
        self.settings = settings_from_url(RedisSettings, url, settings)
        self._url = redact_url(url)
        parts = split_url(url)
        scheme = parts.scheme.lower()
        if scheme not in self.schemes:
            raise ConfigurationError(f"RedisTransport serves redis:// and rediss:// URLs, not {scheme}://")
        host = parts.hostname or "localhost"
        if any(c in host for c in " /\\?#@") or not host.strip("[]"):
            raise ConfigurationError(f"invalid host {host!r} in {self._url!r}")
        db_text = parts.path.strip("/") or "0"
        if not db_text.isdigit():
            raise ConfigurationError(f"the path of {self._url!r} must be a database number like /0, not {parts.path!r}")
        tls = scheme == "rediss"
        s = self.settings
        if not tls and (s.tls_ca_file or s.tls_cert_file or s.tls_key_file or not s.tls_verify):
            raise ConfigurationError(f"tls_* options need a rediss:// URL ({self._url!r})")
        kwargs: dict[str, Any] = {
            "host": host,
            "port": parts.port or 6379,
            "db": int(db_text),
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "socket_timeout": s.socket_timeout,
            "socket_connect_timeout": s.connect_timeout,
            "retry": ClientRetry(NoBackoff(), 0),  # outages are retried (and logged) here, with a bound
            "protocol": 2,
            "client_name": s.client_name,
        }
        if tls:
            kwargs.update(
                ssl_ca_certs=s.tls_ca_file,
                ssl_certfile=s.tls_cert_file,
                ssl_keyfile=s.tls_key_file,
                ssl_cert_reqs="required" if s.tls_verify else "none",
                ssl_check_hostname=s.tls_verify,
            )
        self._connection_class: type[Connection] = SSLConnection if tls else Connection
        self._connection_kwargs = kwargs
        self._trim = parse_trim(s.trim)
        # how often a consumer looks for entries of lost consumers: each look scans the group PEL
        self.claim_interval = min(s.visibility_timeout / 4, 1.0)
        self._client: aioredis.Redis = None  # type: ignore[assignment]  # set by connect()
        self._pool: BlockingConnectionPool | None = None
        self._scripts: dict[str, Any] = {}
        self._subscriptions: set[RedisSubscription] = set()
        self._closing = False
        self._closed = False
        self._outage = OutageClock(f"redis at {self._url}", self.settings.reconnect_timeout, logger)
        self._capabilities = self._make_capabilities(persistent=False)

    @classmethod
    def from_url(cls, url: str, settings: TransportSettings | None = None) -> RedisTransport:
        if settings is not None and not isinstance(settings, RedisSettings):
            raise ConfigurationError(f"redis:// takes RedisSettings, not {type(settings).__name__}")
        return cls(url, settings)

    def __repr__(self) -> str:
        return f"RedisTransport({self._url!r})"

    def _make_capabilities(self, *, persistent: bool) -> Capabilities:
        s = self.settings
        return Capabilities(
            fan_out=True,
            replay_for_new_group=True,
            ordered=True,
            native_delay=True,
            delay_tolerance=s.block + 0.25,
            max_message_size=s.max_message_size,
            consumer_loss_redelivery=s.visibility_timeout + self.claim_interval,
            persistent=persistent,
        )

    @property
    def capabilities(self) -> Capabilities:
        """``persistent`` is known after connect(): True when the server has AOF on."""
        return self._capabilities

    # ------------------------------------------------------------------ connection

    def _new_client(self, pool: ConnectionPool) -> aioredis.Redis:
        client = aioredis.Redis(connection_pool=pool, single_connection_client=isinstance(pool, _ReaderPool))
        for name in ("XREADGROUP", "XPENDING", "XCLAIM"):
            client.set_response_callback(name, raw)
        return client

    def _new_reader(self) -> aioredis.Redis:
        pool = _ReaderPool(connection_class=self._connection_class, max_connections=1, **self._connection_kwargs)
        return self._new_client(pool)

    async def connect(self) -> None:
        self._check_open()
        if self._pool is not None:
            return
        s = self.settings
        self._pool = BlockingConnectionPool(
            connection_class=self._connection_class,
            max_connections=s.max_connections,
            timeout=s.connect_timeout,
            **self._connection_kwargs,
        )
        self._client = self._new_client(self._pool)
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (
                ("poll", rs.POLL),
                ("park", rs.PARK),
                ("renew", rs.RENEW),
                ("forget", rs.FORGET_CONSUMERS),
            )
        }
        try:
            await self._client.ping()
            try:
                info = await self._client.info("persistence")
                self._capabilities = self._make_capabilities(persistent=int(info.get("aof_enabled", 0)) == 1)
            except rex.NoPermissionError:
                logger.info(
                    "INFO is not allowed for this user: cannot tell whether %s persists; assuming not", self._url
                )
        except (*TRANSIENT_ERRORS, *DENIED_ERRORS) as exc:
            pool, self._pool = self._pool, None
            await pool.aclose()
            if isinstance(exc, DENIED_ERRORS):
                raise self._error(exc, "connect") from exc
            raise BrokerUnavailableError(f"cannot reach redis at {self._url}: {exc}") from exc

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True  # subscriptions still release what they fetched, then it closes
        for subscription in list(self._subscriptions):
            await subscription.close()
        self._closed = True
        if self._pool is not None:
            await self._client.aclose()
            await self._pool.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"transport {self._url} is closed")

    def _require_client(self) -> aioredis.Redis:
        self._check_open()
        if self._pool is None:
            raise ClosedError(f"transport {self._url} is not connected: call connect() first")
        return self._client

    # ------------------------------------------------------------------ errors and outages

    def _error(self, exc: BaseException, what: str) -> MsgkitError:
        text = str(exc).split(" script: ")[0]  # drop the script sha and line from Lua errors
        if isinstance(exc, DENIED_ERRORS) or text.startswith("WRONGTYPE"):
            return ConfigurationError(f"redis at {self._url} refused {what}: {text}")
        return MsgkitError(f"redis at {self._url}: {what} failed: {text}")

    def _note_outage(self, what: str, exc: BaseException) -> None:
        self._outage.failed(what, exc)

    def _note_recovered(self) -> None:
        self._outage.recovered()

    @property
    def _down_since(self) -> float | None:
        return self._outage.down_since

    async def _retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op``, retrying connection failures with backoff until ``reconnect_timeout``."""
        delay = 0.01
        while True:
            self._require_client()
            try:
                result = await op()
            except DENIED_ERRORS as exc:
                raise self._error(exc, what) from exc
            except TRANSIENT_ERRORS as exc:
                self._note_outage(what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self._note_recovered()
            return result

    # ------------------------------------------------------------------ topology and publishing

    async def _ensure_group(self, stream: str, group: str) -> None:
        async def create() -> None:
            try:
                await command(self._client, "XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
            except rex.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        try:
            await self._retrying(f"creating group {group} on {stream}", create)
        except rex.ResponseError as exc:
            raise self._error(exc, f"creating group {group} on {stream}") from exc

    async def declare(self, topic: str, group: str | None = None) -> None:
        self._require_client()
        stream = rs.stream_key(self.settings.prefix, topic)
        if group is not None:
            await self._ensure_group(stream, group)
            return

        async def create_stream() -> None:  # a stream cannot be created empty except through a group
            pipe = self._client.pipeline(transaction=False)
            pipe.execute_command("XGROUP", "CREATE", stream, "msgkit-declare", "$", "MKSTREAM")
            pipe.execute_command("XGROUP", "DESTROY", stream, "msgkit-declare")
            await pipe.execute(raise_on_error=False)

        await self._retrying(f"creating stream {stream}", create_stream)

    async def delete(self, topic: str, group: str) -> None:
        """Destroy the consumer group (its pending entries go with it), delete the group's
        delayed-redelivery set, rewritten headers and dead-letter stream, then the stream itself
        if XINFO GROUPS shows no group left, all in one script (atomic on the server).

        Readers without a consumer group (plain XREAD) are invisible to that check: a stream
        they read is deleted with its last group.
        """
        self._require_client()
        prefix = self.settings.prefix
        stream = rs.stream_key(prefix, topic)
        dead = rs.dead_letter_key(prefix, topic, group)
        keys = (
            stream,
            dead,
            rs.delayed_key(stream, group),
            rs.headers_key(stream, group),
            rs.delayed_key(dead, DEAD_LETTER_GROUP),
            rs.headers_key(dead, DEAD_LETTER_GROUP),
        )

        async def run() -> None:
            await command(self._client, "EVAL", _DELETE_GROUP, len(keys), *keys, group)

        try:
            await self._retrying(f"deleting group {group} of {stream}", run)
        except rex.ResponseError as exc:
            raise self._error(exc, f"deleting group {group} of {stream}") from exc

    def _trim_args(self, topic: str) -> tuple[Any, ...]:
        rule = self._trim.get(topic) or self._trim.get("*")
        if rule is None:
            return ()
        kind, value = rule
        if kind == "maxlen":
            return ("MAXLEN", "~", value)
        return ("MINID", "~", int((time.time() - value) * 1000))

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        self._require_client()
        stream = rs.stream_key(self.settings.prefix, topic)
        failed: list[tuple[str, str]] = []
        for start in range(0, len(messages), MAX_BATCH):
            chunk = messages[start : start + MAX_BATCH]
            try:
                failed += await self._retrying(f"publishing to {stream}", partial(self._xadd, stream, topic, chunk))
            except BrokerUnavailableError as exc:
                failed += [(m.id, str(exc)) for m in messages[start:]]
                raise PublishError(
                    f"{len(failed)} of {len(messages)} messages not stored on {topic!r}: {exc}", failed
                ) from exc
        if failed:
            raise PublishError(
                f"{len(failed)} of {len(messages)} messages not stored on {topic!r}: {failed[0][1]}", failed
            )

    async def _xadd(self, stream: str, topic: str, chunk: Sequence[Message]) -> list[tuple[str, str]]:
        trim = self._trim_args(topic)
        if len(chunk) == 1:
            try:
                await command(self._client, "XADD", stream, *trim, "*", *rs.encode_fields(chunk[0]))
            except rex.ResponseError as exc:
                if isinstance(exc, DENIED_ERRORS):
                    raise
                return [(chunk[0].id, str(exc))]
            return []
        pipe = self._client.pipeline(transaction=False)
        for message in chunk:
            pipe.execute_command("XADD", stream, *trim, "*", *rs.encode_fields(message))
        results = await pipe.execute(raise_on_error=False)
        return [(m.id, str(r)) for m, r in zip(chunk, results, strict=True) if isinstance(r, Exception)]

    # ------------------------------------------------------------------ consuming

    async def subscribe(self, topic: str, group: str, *, prefetch: int) -> RedisSubscription:
        self._require_client()
        stream = rs.stream_key(self.settings.prefix, topic)
        await self._ensure_group(stream, group)
        return self._attach(stream, group, topic, rs.dead_letter_key(self.settings.prefix, topic, group))

    async def subscribe_dead_letters(self, topic: str, group: str, *, prefetch: int) -> RedisSubscription:
        self._require_client()
        prefix = self.settings.prefix
        await self._ensure_group(rs.stream_key(prefix, topic), group)
        dead_stream = rs.dead_letter_key(prefix, topic, group)
        await self._ensure_group(dead_stream, DEAD_LETTER_GROUP)
        return self._attach(dead_stream, DEAD_LETTER_GROUP, f"{topic}.{group}.dead-letters", None)

    def _attach(self, stream: str, group: str, topic_name: str, dead_stream: str | None) -> RedisSubscription:
        subscription = RedisSubscription(self, stream, group, topic_name, dead_stream)
        self._subscriptions.add(subscription)
        return subscription

    async def stats(self, topic: str, group: str) -> RedisGroupStats:
        """Stream length, pending, delayed and dead-letter counts and consumer names of (topic, group)."""
        client = self._require_client()
        stream = rs.stream_key(self.settings.prefix, topic)
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("XLEN", stream)
        pipe.execute_command("XPENDING", stream, group)
        pipe.execute_command("ZCARD", rs.delayed_key(stream, group))
        pipe.execute_command("XLEN", rs.dead_letter_key(self.settings.prefix, topic, group))
        pipe.execute_command("XINFO", "CONSUMERS", stream, group)
        length, pending, delayed, dead, consumers = await pipe.execute(raise_on_error=False)
        names = (
            ()
            if isinstance(consumers, Exception)
            else tuple(dict(zip(c[::2], c[1::2], strict=True))[b"name"].decode() for c in consumers)
        )
        return RedisGroupStats(
            length=length,
            pending=0 if isinstance(pending, Exception) else int(pending[0]),
            delayed=delayed,
            dead=dead,
            consumers=names,
        )


#: KEYS[1] the stream, KEYS[2..] the group's own keys; ARGV[1] the group. Returns 1 if the
#: stream was deleted too (no group left on it).
_DELETE_GROUP = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
end
redis.call('DEL', unpack(KEYS, 2))
if redis.call('EXISTS', KEYS[1]) == 1 and #redis.call('XINFO', 'GROUPS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class _ReaderPool(ConnectionPool):
    """The one-connection pool of a subscription's blocking reads."""

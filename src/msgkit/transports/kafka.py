"""The Kafka transport (aiokafka): ``kafka://host:port[,host:port...]?options``.

How msgkit maps onto Kafka (docs/transports/kafka.md has the whole story):

* A msgkit topic is a Kafka topic, created on declare (or first send) with ``partitions``
  partitions. A message's key is the record key (so one key stays in one partition, in order),
  its body the record value, its id and headers record headers, its timestamp the record's.
* A msgkit group of a topic is the consumer group ``TOPIC:GROUP``. Its consumers read the topic
  and, with ``retry=topics`` (the default), the group's retry topic ``TOPIC.GROUP.retry``; dead
  letters go to ``TOPIC.GROUP.dlq``, read by the group ``TOPIC.GROUP.dlq:dead-letters``.
* Kafka has no per-message ack. Each subscription tracks the offsets it fetched
  (:mod:`msgkit.transports.kafka_offsets`) and commits, per partition, only the lowest offset
  that is not finished, in batches (every ``commit_batch`` finished records or
  ``commit_interval`` seconds). Finished records above it travel in the commit metadata, so a
  crash or rebalance redelivers only work that was in flight, and never skips any.
* ``Retry``: with ``retry=topics`` the record is republished to the retry topic with its next
  attempt number and a not-before time in headers, and the original is finished (non-blocking;
  key order is not kept for retried records). With ``retry=inline`` the consumer holds the record
  in its key's lane until the delay passes and hands it out again (keeps key order, holds the lane).
* Rebalances: on revocation a subscription stops handing out records, waits up to
  ``revoke_timeout`` for work in flight, commits, then lets go. Partitions that still have work
  in flight stay with their owner (msgkit's own assignment strategy), so that work never runs twice.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.codec import has_gzip, has_lz4, has_snappy, has_zstd  # type: ignore[import-untyped]
from aiokafka.helpers import create_ssl_context  # type: ignore[import-untyped]
from aiokafka.protocol.offset import OffsetRequest  # type: ignore[import-untyped]
from pydantic import Field, SecretStr

from msgkit.config import TransportSettings, redact_url, settings_from_url
from msgkit.errors import BrokerUnavailableError, ClosedError, ConfigurationError, PublishError
from msgkit.message import Message
from msgkit.transports import kafka_admin
from msgkit.transports.base import Capabilities, Transport
from msgkit.transports.kafka_protocol import DEAD_LETTER_PARTITIONS, to_record, translate
from msgkit.transports.kafka_subscription import KafkaSubscription

logger = logging.getLogger("msgkit.kafka")

DEAD_LETTER_GROUP = "dead-letters"
_MAX_TOPIC = 249
_COMPRESSION = {"gzip": has_gzip, "snappy": has_snappy, "lz4": has_lz4, "zstd": has_zstd}
_TOPIC_EXISTS = 36
#: Errors after which aiokafka's idempotent producer never sends again.
_PRODUCER_BROKEN = (
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.InvalidProducerIdMapping,
    kafka_errors.UnknownProducerId,
    kafka_errors.ProducerFenced,
)


class KafkaSettings(TransportSettings):
    """Options of ``kafka://`` URLs (times in seconds). See docs/transports/kafka.md."""

    # topics
    partitions: int = Field(3, ge=1, le=10_000)
    replication_factor: int | None = Field(None, ge=1, le=32)  # None: min(3, brokers in the cluster)
    create_topics: bool = True
    # producing
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    linger: float = Field(0.0, ge=0, le=60)
    batch_size: int = Field(262_144, ge=1024, le=64 * 1_048_576)
    max_message_size: int = Field(1_000_000, ge=1024, le=100 * 1_048_576)
    publish_timeout: float = Field(30.0, gt=0, le=3600)
    # consuming
    retry: Literal["topics", "inline"] = "topics"
    session_timeout: float = Field(10.0, ge=1, le=3600)
    heartbeat_interval: float = Field(1.0, gt=0, le=600)
    revoke_timeout: float = Field(5.0, ge=0, le=3600)
    max_poll_interval: float = Field(300.0, ge=1, le=86_400)
    commit_interval: float = Field(0.5, gt=0, le=60)
    commit_batch: int = Field(1000, ge=1)
    # connection and security
    connect_timeout: float = Field(30.0, gt=0, le=3600)
    client_id: str = "msgkit"
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_key_password: SecretStr | None = None
    tls_verify: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    username: str | None = None
    password: SecretStr | None = None


def _parse_hosts(netloc: str, url: str) -> list[str]:
    hosts: list[str] = []
    for item in netloc.split(","):
        item = item.strip()
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        if not host:
            raise ConfigurationError(f"kafka:// URL {redact_url(url)!r} names no host in {item!r}")
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ConfigurationError(f"bad port {port_text!r} in kafka:// URL {redact_url(url)!r}")
            port = int(port_text)
        else:
            port = 9092
        hosts.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return hosts


def _topic_name(*parts: str) -> str:
    name = ".".join(parts)
    if len(name) <= _MAX_TOPIC:
        return name
    return f"{name[: _MAX_TOPIC - 9]}-{zlib.crc32(name.encode()):08x}"  # too long: shorten, keep unique


def retry_topic(topic: str, group: str) -> str:
    """The Kafka topic that holds (topic, group)'s retries with ``retry=topics``."""
    return _topic_name(topic, group, "retry")


def dead_letter_topic(topic: str, group: str) -> str:
    """The Kafka topic that holds (topic, group)'s dead letters."""
    return _topic_name(topic, group, "dlq")


def group_id(topic: str, group: str) -> str:
    """The Kafka consumer group of msgkit's (topic, group)."""
    return f"{topic}:{group}"


class KafkaTransport(Transport):
    """The ``kafka://`` transport. See the module docstring and docs/transports/kafka.md."""

    schemes = ("kafka",)

    def __init__(self, bootstrap: Sequence[str], settings: KafkaSettings | None = None, *, url: str = "") -> None:
        self.settings = settings or KafkaSettings()
        self.bootstrap = list(bootstrap)
        self.url = redact_url(url) if url else f"kafka://{','.join(self.bootstrap)}"
        s = self.settings
        if s.compression != "none" and not _COMPRESSION[s.compression]():
            raise ConfigurationError(
                f"compression={s.compression} needs its codec package (e.g. pip install aiokafka[{s.compression}])"
            )
        if s.heartbeat_interval >= s.session_timeout:
            raise ConfigurationError("heartbeat_interval must be shorter than session_timeout")
        if (s.username is None) != (s.password is None):
            raise ConfigurationError("kafka:// SASL needs both a user name and a password")
        if s.sasl_mechanism is not None and s.username is None:
            raise ConfigurationError(f"sasl_mechanism={s.sasl_mechanism} needs a user name and password")
        if (s.tls_cert_file is None) != (s.tls_key_file is None):
            raise ConfigurationError("tls_cert_file and tls_key_file go together")
        uses_tls_files = s.tls_ca_file or s.tls_cert_file or s.tls_key_password or not s.tls_verify
        if uses_tls_files and not s.tls:
            raise ConfigurationError("tls_* options need tls=true")
        self._ssl: ssl.SSLContext | None = None
        self._producer: Any = None
        self._admin: Any = None
        self._state: Literal["new", "connected", "closed"] = "new"
        self._connect_lock = asyncio.Lock()
        self._closing: asyncio.Future[None] | None = None
        self._known_topics: set[str] = set()
        self._replication: int | None = s.replication_factor
        self._subscriptions: set[KafkaSubscription] = set()
        self._background: set[asyncio.Future[Any]] = set()
        self._capabilities = Capabilities(
            fan_out=True,
            replay_for_new_group=True,
            ordered=True,
            native_delay=False,
            delay_tolerance=1.0,
            max_message_size=s.max_message_size,
            consumer_loss_redelivery=s.session_timeout + s.heartbeat_interval + s.revoke_timeout,
            persistent=True,
        )

    @classmethod
    def from_url(cls, url: str, settings: TransportSettings | None = None) -> KafkaTransport:
        if not isinstance(url, str) or "://" not in url:
            raise ConfigurationError(f"malformed broker URL {redact_url(str(url))!r}: expected 'kafka://host:port'")
        parts = urlsplit(url)
        if parts.scheme.lower() != "kafka":
            raise ConfigurationError(f"KafkaTransport serves kafka:// URLs, not {parts.scheme}://")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigurationError(f"kafka:// URLs take no path: kafka://host:port?options (got {redact_url(url)!r})")
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        if not hostinfo:
            raise ConfigurationError(f"kafka:// URL {redact_url(url)!r} names no broker: kafka://host:port")
        hosts = _parse_hosts(hostinfo, url)
        options_url = urlunsplit(("kafka", "host", "", parts.query, ""))
        parsed = settings_from_url(KafkaSettings, options_url, settings)
        if userinfo:
            user, has_password, password = userinfo.partition(":")
            if parsed.username is not None or parsed.password is not None:
                raise ConfigurationError("give kafka:// credentials in the URL or as options, not both")
            secret = SecretStr(unquote(password)) if has_password else None
            parsed = parsed.model_copy(update={"username": unquote(user), "password": secret})
        return cls(hosts, parsed, url=url)

    def __repr__(self) -> str:
        return f"KafkaTransport({self.url!r})"

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # ------------------------------------------------------------------ connection

    def _client_options(self) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "client_id": s.client_id}
        sasl = s.username is not None
        if s.tls:
            options["ssl_context"] = self._ssl_context()
        options["security_protocol"] = {
            (False, False): "PLAINTEXT",
            (True, False): "SSL",
            (False, True): "SASL_PLAINTEXT",
            (True, True): "SASL_SSL",
        }[(s.tls, sasl)]
        if sasl:
            assert s.password is not None
            options["sasl_mechanism"] = s.sasl_mechanism or "PLAIN"
            options["sasl_plain_username"] = s.username
            options["sasl_plain_password"] = s.password.get_secret_value()
        return options

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            s = self.settings
            try:
                context = create_ssl_context(
                    cafile=s.tls_ca_file,
                    certfile=s.tls_cert_file,
                    keyfile=s.tls_key_file,
                    password=s.tls_key_password.get_secret_value() if s.tls_key_password else None,
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(f"cannot load the TLS files of {self.url}: {exc}") from None
            if not s.tls_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._ssl = context
        return self._ssl

    def _check_open(self) -> None:
        if self._state == "closed":
            raise ClosedError(f"Kafka transport {self.url} is closed")

    async def connect(self) -> None:
        self._check_open()
        if self._producer is not None:
            return
        async with self._connect_lock:
            self._check_open()
            if self._producer is not None:
                return
            s = self.settings
            deadline = time.monotonic() + s.connect_timeout
            delay = 0.2
            while True:
                admin = AIOKafkaAdminClient(**self._client_options(), request_timeout_ms=30_000)
                producer = self._new_producer()
                try:
                    await admin.start()
                    await producer.start()
                except (kafka_errors.KafkaError, OSError) as exc:
                    await asyncio.gather(producer.stop(), admin.close(), return_exceptions=True)
                    if isinstance(translate(exc, ""), ConfigurationError):
                        raise translate(exc, f"connecting to {self.url}") from exc
                    if time.monotonic() + delay > deadline:
                        raise BrokerUnavailableError(
                            f"cannot reach Kafka at {self.url} within {s.connect_timeout:.0f}s: {exc}"
                        ) from exc
                    logger.warning("Kafka at %s is unreachable (%s); retrying in %.1fs", self.url, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                break
            self._admin, self._producer = admin, producer
            self._state = "connected"

    def _new_producer(self) -> Any:
        s = self.settings
        return AIOKafkaProducer(
            **self._client_options(),
            acks="all",
            enable_idempotence=True,
            compression_type=None if s.compression == "none" else s.compression,
            linger_ms=int(s.linger * 1000),
            max_batch_size=s.batch_size,
            max_request_size=max(1_048_576, s.max_message_size + 65_536),
            request_timeout_ms=int(s.publish_timeout * 1000),
        )

    async def _renew_producer(self, broken: Any, error: BaseException) -> None:
        """Replace a producer whose idempotence state broke (its sender stops for good on e.g.
        OutOfOrderSequenceNumber after a broker lost producer state): a new one gets a new id."""
        async with self._connect_lock:
            if self._producer is not broken or self._state == "closed":
                return
            logger.warning("the Kafka producer of %s failed for good (%s); starting a new one", self.url, error)
            producer = self._new_producer()
            try:
                await producer.start()
            except (kafka_errors.KafkaError, OSError) as exc:
                await asyncio.gather(producer.stop(), return_exceptions=True)
                logger.warning("starting a new Kafka producer failed (%s); retrying with the next send", exc)
                return
            self._producer = producer
        stopping = asyncio.ensure_future(broken.stop())
        self._background.add(stopping)
        stopping.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        self._state = "closed"
        try:
            await asyncio.gather(*(s.close() for s in list(self._subscriptions)), return_exceptions=True)
            if self._producer is not None:
                await asyncio.gather(self._producer.stop(), return_exceptions=True)
            if self._admin is not None:
                await asyncio.gather(self._admin.close(), return_exceptions=True)
            if self._background:  # old producers and slow group leaves, bounded
                await asyncio.wait(set(self._background), timeout=self.settings.session_timeout)
        finally:
            self._closing.set_result(None)

    async def _ready(self) -> None:
        if self._state != "connected":
            await self.connect()

    # ------------------------------------------------------------------ topics

    async def declare(self, topic: str, group: str | None = None) -> None:
        await self._ready()
        names = [topic]
        if group is not None and self.settings.retry == "topics":
            names.append(retry_topic(topic, group))
        await self._ensure_topics(names)  # the dead-letter topic comes with the first dead letter

    async def delete(self, topic: str, group: str) -> None:
        """Delete the consumer groups of the group and of its dead letters (their offsets), the
        group's retry and dead-letter topics, then the topic itself unless another group uses it.

        "Uses" means: another msgkit group's retry or dead-letter topic exists, or any other
        consumer group has committed offsets on the topic (see :mod:`msgkit.transports.kafka_admin`;
        with too many groups to check cheaply, or when the check fails, the topic is kept). A
        msgkit group declared with ``retry=inline`` and never consumed leaves no trace on Kafka,
        so it does not keep the topic. Returns once the deleted topics are no longer listed.
        With ``auto.create.topics.enable`` on, a client elsewhere that still asks for a deleted
        topic's metadata creates it again: msgkit creates its topics itself and needs no auto-creation.
        """
        self._check_open()
        await self._ready()
        own = group_id(topic, group)
        dead = dead_letter_topic(topic, group)
        own_topics = [retry_topic(topic, group), dead]
        wait = self.settings.session_timeout + 5.0  # members of a consumer stopped a moment ago leave
        await kafka_admin.delete_groups(self._admin, [own, group_id(dead, DEAD_LETTER_GROUP)], wait)
        reason = await kafka_admin.topic_in_use(self._admin, topic, own, own_topics)
        doomed = own_topics if reason else [*own_topics, topic]
        if reason:
            logger.info("keeping Kafka topic %r after deleting group %r: %s", topic, group, reason)
        await kafka_admin.delete_topics(self._admin, doomed, wait)
        self._known_topics.difference_update(doomed)
        tracked = getattr(getattr(self._producer, "client", None), "_topics", None)
        if isinstance(tracked, set):  # else the producer's metadata refresh would ask for them again
            tracked.difference_update(doomed)

    async def _ensure_topics(self, names: Iterable[str], partitions: int | None = None) -> None:
        """Create the topics that do not exist yet (with ``partitions``, default the option)."""
        missing = [n for n in dict.fromkeys(names) if n not in self._known_topics]
        if not missing or not self.settings.create_topics:
            return
        await self._ready()
        count = self.settings.partitions if partitions is None else partitions
        try:
            if self._replication is None:
                cluster = await self._admin.describe_cluster()
                self._replication = max(1, min(3, len(cluster.get("brokers", ()))))
            response = await self._admin.create_topics([NewTopic(n, count, self._replication) for n in missing])
        except kafka_errors.KafkaError as exc:
            raise translate(exc, f"creating topics {missing}") from exc
        created = []
        for name, code, text in response.topic_errors:
            if code not in (0, _TOPIC_EXISTS):
                error = kafka_errors.for_code(code)(text)
                raise translate(error, f"creating topic {name!r}")
            if code == 0:
                created.append(name)
        if created:
            await self._wait_for_leaders(created)
        self._known_topics.update(missing)

    async def _wait_for_leaders(self, topics: list[str], timeout: float = 10.0) -> None:
        """Wait until new topics' partition leaders answer (best effort): a topic is in the metadata a
        moment before its leaders serve it, and the clients would log errors and retry meanwhile."""
        deadline = time.monotonic() + timeout
        pending = set(topics)
        while pending and time.monotonic() < deadline:
            try:
                by_leader: dict[int, dict[str, list[tuple[int, int]]]] = {}
                for described in await self._admin.describe_topics(sorted(pending)):
                    for p in described["partitions"] or [{"leader": -1, "partition": 0}]:
                        by_leader.setdefault(p["leader"], {}).setdefault(described["topic"], []).append(
                            (p["partition"], -1)
                        )
                answered = set(pending)
                for leader, data in by_leader.items():
                    if leader < 0:
                        answered -= set(data)
                        continue
                    # ListOffsets to the leader: NotLeaderForPartition until it serves the partition
                    response = await self._admin._client.send(leader, OffsetRequest(-1, 0, list(data.items())))
                    for topic, partitions in response.topics:
                        if any(p[1] != 0 for p in partitions):
                            answered.discard(topic)
                pending -= answered
            except kafka_errors.KafkaError as exc:
                logger.debug("waiting for the leaders of %s: %s", sorted(pending), exc)
            if pending:
                await asyncio.sleep(0.02)

    async def _committed(self, kafka_group: str, tps: list[Any]) -> dict[Any, tuple[int | None, str]]:
        """The group's committed offsets and metadata for ``tps`` (empty on failure: safe, only slower)."""
        try:
            found = await self._admin.list_consumer_group_offsets(kafka_group, partitions=tps)
        except Exception as exc:
            logger.warning("reading committed offsets of %s failed (%s); more redeliveries possible", kafka_group, exc)
            return {}
        return {tp: (None if meta.offset < 0 else meta.offset, meta.metadata or "") for tp, meta in found.items()}

    # ------------------------------------------------------------------ publishing

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        self._check_open()
        await self._ready()
        await self._ensure_topics([topic])
        errors = await self._send([(topic, m, [], None) for m in messages])
        failed = [(m.id, f"{type(e).__name__}: {e}") for m, e in zip(messages, errors, strict=True) if e is not None]
        if failed:
            self._check_open()
            raise PublishError(
                f"{len(failed)} of {len(messages)} message(s) to {topic!r} were not stored at {self.url}: "
                f"{failed[0][1]}",
                failed,
            )

    async def _send(
        self, records: Sequence[tuple[str, Message, list[tuple[str, bytes]], int | None]]
    ) -> list[BaseException | None]:
        """Send every record first, then await them together; one error (or None) per record."""
        await self._ready()
        producer = self._producer
        errors: list[BaseException | None] = [None] * len(records)
        futures: list[asyncio.Future[Any]] = []
        try:
            for topic, message, extra, partition in records:
                futures.append(await producer.send(topic, partition=partition, **to_record(message, extra)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            for i in range(len(futures), len(records)):
                errors[i] = exc
        if futures:
            _, pending = await asyncio.wait(futures, timeout=self.settings.publish_timeout)
            for i, future in enumerate(futures):
                if future in pending:
                    errors[i] = TimeoutError(f"not acknowledged within {self.settings.publish_timeout:.0f}s")
                elif future.exception() is not None:
                    errors[i] = future.exception()
        fatal = next((e for e in errors if isinstance(e, _PRODUCER_BROKEN)), None)
        if fatal is not None:
            await self._renew_producer(producer, fatal)
        return errors

    # ------------------------------------------------------------------ subscribing

    async def subscribe(self, topic: str, group: str, *, prefetch: int) -> KafkaSubscription:
        self._check_open()
        await self._ready()
        retry = retry_topic(topic, group) if self.settings.retry == "topics" else None
        dead = dead_letter_topic(topic, group)
        await self._ensure_topics([topic, *([retry] if retry else [])])
        subscription = KafkaSubscription(
            self, topic, group, group_id(topic, group), prefetch, retry_topic=retry, dead_topic=dead
        )
        return await self._attach(subscription)

    async def subscribe_dead_letters(self, topic: str, group: str, *, prefetch: int) -> KafkaSubscription:
        self._check_open()
        await self._ready()
        dead = dead_letter_topic(topic, group)
        await self._ensure_topics([dead], partitions=DEAD_LETTER_PARTITIONS)
        reader = group_id(dead, DEAD_LETTER_GROUP)
        subscription = KafkaSubscription(
            self, dead, DEAD_LETTER_GROUP, reader, prefetch, retry_topic=None, dead_topic=None
        )
        return await self._attach(subscription)

    async def _attach(self, subscription: KafkaSubscription) -> KafkaSubscription:
        self._subscriptions.add(subscription)
        try:
            await subscription._start()
        except BaseException:
            self._subscriptions.discard(subscription)
            raise
        if self._state == "closed":
            await subscription.close()
            raise ClosedError(f"Kafka transport {self.url} is closed")
        return subscription

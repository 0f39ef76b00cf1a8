"""The amqp:// transport against a real RabbitMQ: what the contract suite does not cover.

Topology and its errors, confirms in a window, unroutable sends, batched (``multiple``) acks,
attempts across retries, delays, releases and lost consumers, dead letters, foreign messages,
dropped connections (through a TCP proxy that can cut them), bounded outages, broker restarts,
URL options, TLS settings and redaction, and the example.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiormq
import pytest
import pytest_asyncio
from pamqp.commands import Basic

import msgkit
from msgkit import ACK, Delivery, Message, Retry
from msgkit.message import DLQ_GROUP, DLQ_REASON, DLQ_TOPIC, dead_letter
from msgkit.testing.contract.helpers import Received, eventually
from msgkit.testing.fixtures import skip_or_fail
from msgkit.transports import _rabbitmq as rabbitmq_internals
from msgkit.transports import rabbitmq as rabbitmq_module
from msgkit.transports._rabbitmq import delay_tier_ms, group_names
from msgkit.transports.rabbitmq import RabbitMQSubscription, RabbitMQTransport

pytestmark = pytest.mark.asyncio

WAIT = 30.0
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rabbitmq.py"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def with_options(url: str, **options: object) -> str:
    """``url`` with query ``options`` set."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update({name: str(value) for name, value in options.items()})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def with_address(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


#: (topic, group) pairs made by the running test, deleted from the broker after it.
_CREATED: list[tuple[str, str]] = []


def names() -> tuple[str, str]:
    topic, group = f"rt-{uuid.uuid4().hex[:10]}", f"rg-{uuid.uuid4().hex[:8]}"
    _CREATED.append((topic, group))
    return topic, group


@pytest_asyncio.fixture(autouse=True)
async def _delete_what_the_test_declared(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Quorum queues cost the broker memory: do not leave one behind per test run."""
    _CREATED.clear()
    yield
    created = list(_CREATED)
    _CREATED.clear()
    if not created or "msgkit_rabbitmq_url" not in request.fixturenames:
        return
    async with raw_channel(request.getfixturevalue("msgkit_rabbitmq_url")) as channel:
        for topic, group in created:
            names = group_names(topic, group)
            for queue in (names.queue, names.dead_letters, names.delay_queue(200), names.delay_queue(300)):
                await channel.queue_delete(queue)
            await channel.exchange_delete(topic)


@asynccontextmanager
async def connected(url: str, **options: object) -> AsyncIterator[RabbitMQTransport]:
    transport = RabbitMQTransport.from_url(with_options(url, **options))
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.close()


@asynccontextmanager
async def raw_channel(url: str) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A plain aiormq channel to the same broker, to look at and meddle with what msgkit made."""
    connection = await aiormq.connect(urlunsplit(urlsplit(url)._replace(query="")))
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``, by a passive declaration."""
    async with raw_channel(url) as channel:
        ok = await channel.queue_declare(queue, passive=True)
        assert ok.message_count is not None
        assert ok.consumer_count is not None
        return ok.message_count, ok.consumer_count


async def fetch_n(subscription: Any, count: int, timeout: float = WAIT) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += await subscription.fetch(count - len(got), timeout=0.5)
    assert len(got) == count, f"fetched {len(got)} of {count}"
    return got


class Proxy:
    """A TCP proxy in front of the broker that can cut every connection and refuse new ones."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.target = (host, port)
        self.tls = tls
        self.accepting = True
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every proxied connection at once, as a network failure would (no AMQP close)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer), return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


@asynccontextmanager
async def proxied(url: str, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[Proxy, str]]:
    """A proxy to the broker of ``url`` and the URL through it (amqps:// to localhost with ``tls``)."""
    parts = urlsplit(url)
    async with Proxy(parts.hostname or "127.0.0.1", parts.port or 5672, tls) as proxy:
        through = with_address(url, "localhost" if tls else "127.0.0.1", proxy.port)
        yield proxy, through.replace("amqp://", "amqps://", 1) if tls else through


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A CA, a server certificate for localhost (not for 127.0.0.1), and a client certificate, by openssl."""
    if shutil.which("openssl") is None:
        skip_or_fail("openssl is not installed")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=msgkit test CA",
    )
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    for name in ("server", "client"):
        subject = "/CN=localhost" if name == "server" else "/CN=msgkit-client"
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject
        )
        openssl(
            *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"),
            *("-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext"),
        )
    return tmp_path


# ---------------------------------------------------------------------------- URL and options


async def test_url_gives_credentials_vhost_port_and_options() -> None:
    transport = RabbitMQTransport.from_url("amqp://app:p%40ss%3Aw0rd@broker.example:5673/prod%2Feu?heartbeat=15")
    endpoint = transport._endpoint
    assert (endpoint.host, endpoint.port, endpoint.login, endpoint.password) == (
        "broker.example",
        5673,
        "app",
        "p@ss:w0rd",
    )
    assert endpoint.vhost == "prod/eu"
    assert endpoint.heartbeat == 15
    assert not endpoint.tls
    assert endpoint.ssl_context is None
    assert "p@ss" not in repr(transport)
    assert "p%40ss" not in repr(transport)
    assert "***" in repr(transport)

    defaults = RabbitMQTransport.from_url("amqp://rabbit")._endpoint
    assert (defaults.port, defaults.login, defaults.password, defaults.vhost) == (5672, "guest", "guest", "/")
    assert RabbitMQTransport.from_url("amqp://rabbit/%2F")._endpoint.vhost == "/"
    assert RabbitMQTransport.from_url("amqp://")._endpoint.host == "localhost"
    caps = RabbitMQTransport.from_url("amqp://rabbit?max_message_size=2048").capabilities
    assert caps.max_message_size == 2048
    assert caps.fan_out
    assert caps.native_delay
    assert not caps.replay_for_new_group


async def test_amqps_builds_a_verifying_tls_context_and_options_can_relax_it() -> None:
    secure = RabbitMQTransport.from_url(f"amqps://rabbit?cafile={CA_BUNDLE}")._endpoint
    assert secure.tls
    assert secure.port == 5671
    assert secure.ssl_context is not None
    assert secure.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert secure.ssl_context.check_hostname
    relaxed = RabbitMQTransport.from_url("amqps://rabbit:5999?verify=false")._endpoint
    assert relaxed.ssl_context is not None
    assert relaxed.ssl_context.verify_mode == ssl.CERT_NONE
    assert relaxed.port == 5999


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("amqp://u:topsecret@rabbit?colour=blue", "unknown option"),
        ("amqp://u:topsecret@rabbit?heartbeat=-1", "heartbeat"),
        ("amqp://u:topsecret@rabbit:99999", "malformed"),
        ("amqp://u:topsecret@rabbit:0", "port 0"),
        ("amqp://u:topsecret@rab bit", "invalid host"),
        ("amqp://u:topsecret@rabbit/a/b", "one segment"),
        ("amqp://u:topsecret@rabbit?verify=false", "amqps:// URLs only"),
        ("amqps://u:topsecret@rabbit?cafile=/nonexistent/ca.pem", "not a readable file"),
        (f"amqps://u:topsecret@rabbit?keyfile={CA_BUNDLE}", "keyfile without certfile"),
        (f"amqps://u:topsecret@rabbit?certfile={CA_BUNDLE}", "cannot load the TLS files"),
        ("redis://u:topsecret@rabbit", "amqp:// and amqps://"),
    ],
)
async def test_bad_urls_are_configuration_errors_without_the_password(url: str, match: str) -> None:
    with pytest.raises(msgkit.ConfigurationError, match=match) as info:
        RabbitMQTransport.from_url(url)
    assert "topsecret" not in str(info.value)


async def test_the_registry_serves_both_schemes() -> None:
    for url in ("amqp://rabbit", "amqps://rabbit"):
        assert isinstance(msgkit.Broker(url).transport, RabbitMQTransport)


async def test_settings_object_instead_of_the_query() -> None:
    settings = rabbitmq_module.RabbitMQSettings(publish_window=10, heartbeat=5)
    transport = msgkit.Broker("amqp://rabbit", settings=settings).transport
    assert isinstance(transport, RabbitMQTransport)
    assert transport.settings.publish_window == 10
    assert transport._endpoint.heartbeat == 5


async def test_delay_tiers_round_up_by_less_than_ten_percent_and_one_second() -> None:
    assert [delay_tier_ms(s) for s in (0.0001, 0.25, 0.999, 1.25, 1.251, 9.99, 10.2, 1234.5)] == [
        10,
        250,
        1000,
        1300,
        1300,
        10000,
        11000,
        1235000,
    ]
    for seconds in (0.013, 0.5, 1.01, 3.33, 9.95, 10.001, 99.9, 3600.4):
        late = delay_tier_ms(seconds) / 1000 - seconds
        assert 0 <= late < min(1.0, seconds * 0.1 + 0.01), seconds
    assert delay_tier_ms(30 * 24 * 3600) == 7 * 24 * 3600 * 1000  # capped at a week


async def test_group_names_cannot_collide_and_fit_rabbitmq_limits() -> None:
    assert group_names("a.b", "c").queue != group_names("a", "b.c").queue
    long = group_names("t" * 200, "g" * 200)
    assert len(long.queue) <= 200
    assert len(long.delay_queue(7 * 24 * 3600 * 1000)) <= 255
    assert long.queue != group_names("t" * 200, "g" * 199 + "h").queue


# ---------------------------------------------------------------------------- topology and publishing


async def test_declare_is_idempotent_and_makes_a_quorum_queue_bound_to_a_fanout_exchange(
    msgkit_rabbitmq_url: str,
) -> None:
    topic, group = names()
    async with connected(msgkit_rabbitmq_url) as transport:
        await transport.declare(topic, group)
        await transport.declare(topic, group)
        await transport.declare(topic)
        await transport.publish(topic, [Message(b"kept for the group")])
    queue = f"{topic}:{group}"
    assert await queue_counts(msgkit_rabbitmq_url, queue) == (1, 0)
    assert await queue_counts(msgkit_rabbitmq_url, f"{queue}:dead-letters") == (0, 0)
    async with raw_channel(msgkit_rabbitmq_url) as channel:
        await channel.exchange_declare(topic, exchange_type="fanout", durable=True, passive=True)
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-queue-type"):
            await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "classic"})


async def test_a_queue_declared_differently_is_a_clear_configuration_error(msgkit_rabbitmq_url: str) -> None:
    topic, group = names()
    queue = f"{topic}:{group}"
    async with raw_channel(msgkit_rabbitmq_url) as channel:
        await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "classic"})
    try:
        async with connected(msgkit_rabbitmq_url) as transport:
            with pytest.raises(msgkit.ConfigurationError, match=f"queue '{queue}'.*x-queue-type") as info:
                await transport.declare(topic, group)
            assert "delete it" in str(info.value)
            with pytest.raises(msgkit.ConfigurationError, match="x-queue-type"):
                await transport.subscribe(topic, group, prefetch=5)
            other_topic, other_group = names()
            await transport.declare(other_topic, other_group)  # the transport still works
    finally:
        async with raw_channel(msgkit_rabbitmq_url) as channel:
            await channel.queue_delete(queue)


async def test_a_message_no_queue_is_bound_to_is_an_error_the_caller_sees(msgkit_rabbitmq_url: str) -> None:
    topic, group = names()
    async with connected(msgkit_rabbitmq_url) as transport:
        lonely = [Message(b"nobody listens"), Message(b"nobody at all")]
        with pytest.raises(msgkit.PublishError, match="declare a group") as info:
            await transport.publish(topic, lonely)
        assert [message_id for message_id, _ in info.value.failed] == [m.id for m in lonely]
        await transport.declare(topic)  # the exchange alone does not keep messages either
        with pytest.raises(msgkit.PublishError):
            await transport.publish(topic, lonely[:1])
        await transport.declare(topic, group)
        await transport.publish(topic, lonely)
    assert await queue_counts(msgkit_rabbitmq_url, f"{topic}:{group}") == (2, 0)


async def test_a_batch_is_published_with_a_window_of_outstanding_confirms(
    msgkit_rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    outstanding = peak = calls = 0
    original = rabbitmq_internals.publish

    async def counting(*args: Any) -> object:
        nonlocal outstanding, peak, calls
        calls += 1
        outstanding += 1
        peak = max(peak, outstanding)
        try:
            return await original(*args)
        finally:
            outstanding -= 1

    monkeypatch.setattr(rabbitmq_internals, "publish", counting)
    topic, group = names()
    async with connected(msgkit_rabbitmq_url) as transport:
        await transport.declare(topic, group)
        await transport.publish(topic, [Message(f"m{i}".encode()) for i in range(500)])
        assert (calls, peak) == (500, 500), "every message of the batch should await its confirm at once"
    async with connected(msgkit_rabbitmq_url, publish_window=64) as transport:
        peak = calls = 0
        await transport.publish(topic, [Message(f"w{i}".encode()) for i in range(300)])
        assert calls == 300
        assert peak == 64
    assert (await queue_counts(msgkit_rabbitmq_url, f"{topic}:{group}"))[0] == 800


async def test_ids_longer_than_the_amqp_property_foreign_messages_and_huge_headers(msgkit_rabbitmq_url: str) -> None:
    topic, group = names()
    long_id = "id-" + "é" * 200  # 403 bytes: more than message_id's 255
    async with connected(msgkit_rabbitmq_url) as transport:
        await transport.declare(topic, group)
        await transport.publish(topic, [Message(b"long id", id=long_id, key="k", headers={"a": "b"})])
        async with raw_channel(msgkit_rabbitmq_url) as channel:  # a producer that is not msgkit
            foreign = {"n": 7, "f": 1.5, "yes": True, "raw": bytearray(b"\xffab"), "s": "x", "none": None}
            properties = Basic.Properties(message_id="foreign-1", headers=foreign)
            await channel.basic_publish(b"foreign", exchange=topic, properties=properties)
        with pytest.raises(msgkit.MessageTooLargeError, match="frame"):
            await transport.publish(topic, [Message(b"x", headers={f"h{i}": "v" * 1000 for i in range(200)})])
        named = [Message(b"fine"), Message(b"x", headers={"ä" * 65: "130 bytes of name"})]
        with pytest.raises(msgkit.PublishError, match="longer than 128 bytes") as info:
            await transport.publish(topic, named)
        assert [i for i, _ in info.value.failed] == [m.id for m in named], "nothing of the batch was sent"
        subscription = await transport.subscribe(topic, group, prefetch=10)
        first, second = await fetch_n(subscription, 2)
        assert (first.id, first.key, dict(first.headers), first.attempt) == (long_id, "k", {"a": "b"}, 1)
        assert second.id == "foreign-1"
        assert second.key is None
        assert second.attempt == 1
        assert dict(second.headers) == {
            "n": "7",
            "f": "1.5",
            "yes": "True",
            "raw": "\ufffdab",
            "s": "x",
            "none": "None",
        }
        await subscription.settle([(first, ACK), (second, ACK)])


# ---------------------------------------------------------------------------- consuming and settling


async def test_acks_of_a_contiguous_prefix_go_out_as_one_multiple_ack(msgkit_rabbitmq_url: str) -> None:
    topic, group = names()
    async with connected(msgkit_rabbitmq_url) as transport:
        await transport.declare(topic, group)
        await transport.publish(topic, [Message(f"m{i}".encode()) for i in range(50)])
        subscription = await transport.subscribe(topic, group, prefetch=50)
        deliveries = await fetch_n(subscription, 50)
        channel = subscription._channel
        assert channel is not None
        acks: list[tuple[int, bool]] = []
        original = channel.basic_ack

        def recording(delivery_tag: int, multiple: bool = False, wait: bool = True) -> Any:
            acks.append((delivery_tag, multiple))
            return original(delivery_tag, multiple=multiple, wait=wait)

        channel.basic_ack = recording  # type: ignore[method-assign]
        tags = [d.receipt[1] for d in deliveries]
        await subscription.settle([(d, ACK) for d in deliveries[1:10]])  # a gap at the front: no multiple
        assert acks == [(tag, False) for tag in tags[1:10]]
        acks.clear()
        await subscription.settle([(d, ACK) for d in [deliveries[0], *deliveries[10:]]])  # now contiguous
        assert acks == [(tags[-1], True)]
        await subscription.close()
    assert await queue_counts(msgkit_rabbitmq_url, f"{topic}:{group}") == (0, 0)


async def test_attempts_count_retries_delays_and_lost_consumers_but_not_releases(msgkit_rabbitmq_url: str) -> None:
    topic, group = names()
    async with connected(msgkit_rabbitmq_url) as transport:
        await transport.declare(topic, group)
        await transport.publish(topic, [Message(b"work", key="k1", headers={"origin": "test ✓"})])
        subscription = await transport.subscribe(topic, group, prefetch=10)
        [first] = await fetch_n(subscription, 1)
        assert first.attempt == 1

        await subscription.settle([(first, Retry(0, "again", {"msgkit-first-failed-at": "123.000"}))])
        [second] = await fetch_n(subscription, 1)
        assert (second.id, second.key, second.attempt) == (first.id, "k1", 2)
        assert dict(second.headers) == {"origin": "test ✓", "msgkit-first-failed-at": "123.000"}

        await subscription.settle([(second, Retry(0, "same headers", {"msgkit-first-failed-at": "123.000"}))])
        [requeued] = await fetch_n(subscription, 1)  # a plain requeue: the quorum queue counts it
        assert requeued.attempt == 3
        assert dict(requeued.headers) == dict(second.headers)

        retried_at = time.monotonic()
        await subscription.settle([(requeued, Retry(0.3))])
        [third] = await fetch_n(subscription, 1)
        waited = time.monotonic() - retried_at
        assert third.attempt == 4
        assert 0.3 <= waited < 0.3 + 1.5, f"waited {waited:.3f}s"
        assert dict(third.headers) == dict(second.headers)
        assert await queue_counts(msgkit_rabbitmq_url, group_names(topic, group).delay_queue(300)) == (0, 0)

        await subscription.release([third])
        [fourth] = await fetch_n(subscription, 1)
        assert fourth.attempt == 4, "a release must not count as an attempt"

        await subscription.close()  # like a consumer that died: the delivery counts
        again = await transport.subscribe(topic, group, prefetch=10)
        [fifth] = await fetch_n(again, 1)
        assert fifth.attempt == 5
        await again.settle([(fifth, ACK)])
        await again.close()


async def test_a_delay_queue_in_use_outlives_its_expiry_and_loses_nothing(
    msgkit_rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shrink the expiry (to 2 x 200 ms + 1 s) and the re-declaration interval, then keep one message
    # going round through the delay queue for longer than that: declarations must keep it alive.
    # (A quorum queue, whose expiry a declaration does not renew on RabbitMQ 3.10, loses it here.)
    monkeypatch.setattr(rabbitmq_internals, "DELAY_QUEUE_EXPIRY_MARGIN_MS", 1000)
    monkeypatch.setattr(rabbitmq_internals, "REDECLARE_DELAY_QUEUE", 0.4)
    topic, group = names()
    async with connected(msgkit_rabbitmq_url) as transport:
        await transport.declare(topic, group)
        await transport.publish(topic, [Message(b"round and round")])
        subscription = await transport.subscribe(topic, group, prefetch=5)
        deadline = time.monotonic() + 8.0
        rounds = 0
        while time.monotonic() < deadline:
            [delivery] = await fetch_n(subscription, 1, timeout=5.0)
            assert delivery.attempt == rounds + 1
            await subscription.settle([(delivery, Retry(0.2))])
            rounds += 1
            await asyncio.sleep(0.3)
        [last] = await fetch_n(subscription, 1, timeout=5.0)
        await subscription.settle([(last, ACK)])
        await subscription.close()
    assert rounds >= 10


async def test_close_gives_back_what_was_received_and_not_fetched_uncounted(msgkit_rabbitmq_url: str) -> None:
    topic, group = names()
    async with connected(msgkit_rabbitmq_url) as transport:
        await transport.declare(topic, group)
        ids = [m.id for m in [Message(b"x") for _ in range(10)]]
        await transport.publish(topic, [Message(b"x", id=i) for i in ids])
        subscription = await transport.subscribe(topic, group, prefetch=10)
        [taken] = await fetch_n(subscription, 1)
        await eventually(lambda: len(subscription._buffer) == 9, what="the broker pushes the prefetch")
        await subscription.close()
        again = await transport.subscribe(topic, group, prefetch=10)
        attempts = {d.id: d.attempt for d in await fetch_n(again, 10)}
        assert attempts == {i: 2 if i == taken.id else 1 for i in ids}
        await again.close()


async def test_dead_letters_keep_the_message_and_stay_put_when_they_fail_again(msgkit_rabbitmq_url: str) -> None:
    topic, group = names()
    async with connected(msgkit_rabbitmq_url) as transport:
        await transport.declare(topic, group)
        message = Message(b"poison", key="k", headers={"h": "v"})
        await transport.publish(topic, [message])
        subscription = await transport.subscribe(topic, group, prefetch=5)
        [delivery] = await fetch_n(subscription, 1)
        await subscription.settle([(delivery, dead_letter(delivery, "bad data ✗", ValueError("x")))])
        assert await queue_counts(msgkit_rabbitmq_url, f"{topic}:{group}") == (0, 1)

        letters = await transport.subscribe_dead_letters(topic, group, prefetch=5)
        [letter] = await fetch_n(letters, 1)
        assert (letter.id, letter.body, letter.key, letter.attempt) == (message.id, b"poison", "k", 1)
        assert letter.headers["h"] == "v"
        assert letter.headers[DLQ_REASON] == "bad data ✗"
        assert (letter.headers[DLQ_TOPIC], letter.headers[DLQ_GROUP]) == (topic, group)
        await letters.settle([(letter, Retry(0))])  # a dead letter that fails again stays a dead letter
        [again] = await fetch_n(letters, 1)
        assert again.id == message.id
        await letters.settle([(again, ACK)])
        await letters.close()
        await subscription.close()
    assert await queue_counts(msgkit_rabbitmq_url, f"{topic}:{group}:dead-letters") == (0, 0)


async def test_a_consumer_whose_queue_is_deleted_declares_it_again(msgkit_rabbitmq_url: str) -> None:
    topic, group = names()
    async with connected(msgkit_rabbitmq_url) as transport:
        subscription = await transport.subscribe(topic, group, prefetch=5)
        async with raw_channel(msgkit_rabbitmq_url) as channel:
            await channel.queue_delete(f"{topic}:{group}")
        assert await subscription.fetch(5, timeout=0.5) == ()
        await transport.publish(topic, [Message(b"after the delete")])
        [delivery] = await fetch_n(subscription, 1)
        assert delivery.body == b"after the delete"
        await subscription.close()


# ---------------------------------------------------------------------------- TLS


async def test_amqps_verifies_the_server_and_presents_a_client_certificate(
    msgkit_rabbitmq_url: str, certificates: Path
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(certificates / "server.crt", certificates / "server.key")
    ca, topic, group = str(certificates / "ca.crt"), *names()
    async with proxied(msgkit_rabbitmq_url, tls=server) as (proxy, url):  # amqps://...@localhost:PORT
        async with connected(url, cafile=ca) as transport:
            await transport.declare(topic, group)
            await transport.publish(topic, [Message(b"over TLS")])
            subscription = await transport.subscribe(topic, group, prefetch=5)
            [delivery] = await fetch_n(subscription, 1)
            assert delivery.body == b"over TLS"
            await subscription.settle([(delivery, ACK)])
        with pytest.raises(msgkit.ConfigurationError, match="TLS handshake"):  # the system CAs do not know ours
            await RabbitMQTransport.from_url(url).connect()
        with pytest.raises(msgkit.ConfigurationError, match="TLS handshake"):  # the name does not match
            await RabbitMQTransport.from_url(
                with_options(with_address(url, "127.0.0.1", proxy.port), cafile=ca)
            ).connect()
        async with connected(url, verify="false") as transport:  # for tests only: anything goes
            await transport.declare(topic, group)

        server.verify_mode = ssl.CERT_REQUIRED  # from now on the server wants a client certificate
        server.load_verify_locations(ca)
        client = {"certfile": certificates / "client.crt", "keyfile": certificates / "client.key"}
        async with connected(url, cafile=ca, **client) as transport:
            await transport.publish(topic, [Message(b"mutual TLS")])
        with pytest.raises(msgkit.MsgkitError):
            await RabbitMQTransport.from_url(with_options(url, cafile=ca, connect_timeout=2)).connect()
    assert await queue_counts(msgkit_rabbitmq_url, f"{topic}:{group}") == (1, 0)


# ---------------------------------------------------------------------------- failures and recovery


async def test_a_dropped_connection_drops_stale_receipts_and_everything_resumes(msgkit_rabbitmq_url: str) -> None:
    topic, group = names()
    async with proxied(msgkit_rabbitmq_url) as (proxy, url), connected(url, reconnect_timeout=30) as transport:
        await transport.declare(topic, group)
        sent = [Message(f"m{i}".encode()) for i in range(5)]
        await transport.publish(topic, sent)
        subscription = await transport.subscribe(topic, group, prefetch=10)
        old = await fetch_n(subscription, 5)

        proxy.cut()
        again = await fetch_n(subscription, 5)
        assert sorted(d.id for d in again) == sorted(m.id for m in sent)
        assert {d.attempt for d in again} == {2}, "the broker requeued them with the lost connection"
        assert {d.receipt[1] for d in again} == {d.receipt[1] for d in old}, "the new channel reuses the tags"
        await subscription.settle([(d, ACK) for d in old])  # stale: dropped, must not ack the new ones
        await subscription.settle([(d, Retry(0)) for d in again])
        third = await fetch_n(subscription, 5)
        assert {d.attempt for d in third} == {3}
        await transport.publish(topic, [Message(b"after the drop")])
        [late] = await fetch_n(subscription, 1)
        await subscription.settle([(d, ACK) for d in [*third, late]])
        assert proxy.connections >= 4  # publish and consume connections, twice
        await subscription.close()
    assert await queue_counts(msgkit_rabbitmq_url, f"{topic}:{group}") == (0, 0)


async def test_an_outage_beyond_the_bound_surfaces_and_the_next_call_recovers(
    msgkit_rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic, group = names()
    async with proxied(msgkit_rabbitmq_url) as (proxy, url), connected(url, reconnect_timeout=1.5) as transport:
        await transport.declare(topic, group)
        proxy.accepting = False
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(msgkit.BrokerUnavailableError, match="unreachable"):
            await transport.publish(topic, [Message(b"during the outage")])
        assert time.monotonic() - started < 10
        assert any("lost the RabbitMQ publish connection" in r.getMessage() for r in caplog.records)
        proxy.accepting = True
        await transport.publish(topic, [Message(b"after the outage")])
    assert (await queue_counts(msgkit_rabbitmq_url, f"{topic}:{group}"))[0] == 1


async def test_consumers_and_producers_come_back_after_a_broker_restart(msgkit_rabbitmq_url: str) -> None:
    command = os.environ.get("MSGKIT_RABBITMQ_RESTART_COMMAND")
    if not command:
        pytest.skip("MSGKIT_RABBITMQ_RESTART_COMMAND is not set (. .brokers/env)")
    topic, group = names()
    async with msgkit.Broker(msgkit_rabbitmq_url) as broker:
        await broker.declare(topic, group)
        received = Received()
        consumer = broker.consumer(topic, group, received, max_in_flight=20, settle_interval=0.01)
        await consumer.start()
        before = await broker.send_batch(topic, [f"before {i}".encode() for i in range(20)])
        await received.wait_for(before)
        process = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode(errors="replace")
        after = await broker.send_batch(topic, [f"after {i}".encode() for i in range(20)])  # retried until back
        await received.wait_for(after, timeout=60)

        async def one_consumer() -> bool:
            return (await queue_counts(msgkit_rabbitmq_url, f"{topic}:{group}"))[1] == 1

        deadline = time.monotonic() + WAIT
        while not await one_consumer():
            assert time.monotonic() < deadline, "the consumer did not come back on the queue"
            await asyncio.sleep(0.2)
        await consumer.stop()


async def test_refused_logins_and_unreachable_brokers_never_show_the_password(
    msgkit_rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    parts = urlsplit(msgkit_rabbitmq_url)
    netloc = f"{parts.username or 'guest'}:wr0ng-s3cret@{parts.hostname}:{parts.port or 5672}"
    wrong = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    with pytest.raises(msgkit.ConfigurationError, match="refused the login") as refused:
        await RabbitMQTransport.from_url(wrong).connect()
    bad_vhost = urlunsplit(parts._replace(path="/no-such-vhost", query=""))
    with pytest.raises(msgkit.ConfigurationError, match="virtual host 'no-such-vhost'"):
        await RabbitMQTransport.from_url(bad_vhost).connect()

    unreachable = with_options(with_address(wrong, "127.0.0.1", closed_port()), connect_timeout=1)
    transport = RabbitMQTransport.from_url(unreachable)
    with pytest.raises(msgkit.BrokerUnavailableError) as down:
        await transport.connect()
    await transport.close()
    with pytest.raises(msgkit.ClosedError):
        await transport.publish("t", [Message(b"x")])
    tls_on_plain = with_options(urlunsplit(parts._replace(scheme="amqps", query="")), verify="false", connect_timeout=2)
    with pytest.raises(msgkit.MsgkitError) as tls:
        await RabbitMQTransport.from_url(tls_on_plain).connect()
    texts = [str(refused.value), str(down.value), str(tls.value), repr(transport)]
    texts += [record.getMessage() for record in caplog.records]
    assert not [text for text in texts if "wr0ng-s3cret" in text]


def closed_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_closing_twice_and_using_a_closed_transport(msgkit_rabbitmq_url: str) -> None:
    transport = RabbitMQTransport.from_url(msgkit_rabbitmq_url)
    await transport.connect()
    topic, group = names()
    subscription = await transport.subscribe(topic, group, prefetch=5)
    fetching = asyncio.create_task(subscription.fetch(5, timeout=WAIT))
    await asyncio.sleep(0.05)
    await asyncio.gather(transport.close(), transport.close())
    with pytest.raises(msgkit.ClosedError):
        await fetching
    for call in (transport.publish(topic, [Message(b"x")]), transport.declare(topic), transport.connect()):
        with pytest.raises(msgkit.ClosedError):
            await call
    assert isinstance(subscription, RabbitMQSubscription)


async def test_the_example_runs(msgkit_rabbitmq_url: str) -> None:
    env = {**os.environ, "MSGKIT_URL": msgkit_rabbitmq_url}
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dead letter" in result.stdout

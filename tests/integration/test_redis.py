"""The redis:// transport against a real Redis: what the contract suite does not cover.

Batching (round trips), attempts from the pending list, the delayed set, dead-letter streams,
crash recovery of a killed consumer process, dropped connections, broker restarts (with and
without persistence), bounded outages, trimming, ACL users, TLS, options and redaction.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection

import msgkit
from msgkit import Delivery, Message
from msgkit.message import DLQ_REASON, dead_letter
from msgkit.testing.contract.helpers import Received, eventually
from msgkit.testing.fixtures import skip_or_fail
from msgkit.transports.redis import RedisTransport
from msgkit.transports.redis_streams import stream_key

pytestmark = pytest.mark.asyncio

WAIT = 30.0
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "redis_streams.py"


def with_options(url: str, **options: object) -> str:
    """``url`` with query ``options`` set (overriding the same names already in it)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update({name: str(value) for name, value in options.items()})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


#: (topic, group) pairs made by the running test, deleted from the broker after it.
_CREATED: list[tuple[str, str]] = []


def names() -> tuple[str, str]:
    topic, group = f"rt-{uuid.uuid4().hex[:10]}", f"rg-{uuid.uuid4().hex[:8]}"
    _CREATED.append((topic, group))
    return topic, group


@pytest_asyncio.fixture(autouse=True)
async def _delete_what_the_test_declared(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Streams, groups and dead letters of each test go afterwards (Broker.delete)."""
    _CREATED.clear()
    yield
    created, _CREATED[:] = list(_CREATED), []
    if created and "msgkit_redis_url" in request.fixturenames:
        async with msgkit.Broker(request.getfixturevalue("msgkit_redis_url")) as broker:
            for topic, group in created:
                await broker.delete(topic, group)


@asynccontextmanager
async def connected(url: str, **options: object) -> AsyncIterator[RedisTransport]:
    transport = RedisTransport.from_url(with_options(url, **options))
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.close()


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[aioredis.Redis]:
    transport = RedisTransport.from_url(url)  # the same host, credentials and TLS, as a plain client
    client = aioredis.Redis(**transport._connection_kwargs, ssl=transport._connection_class is SSLConnection)
    try:
        yield client
    finally:
        await client.aclose()


async def fetch_n(subscription: Any, count: int, timeout: float = WAIT) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += await subscription.fetch(count - len(got), timeout=0.5)
    assert len(got) == count, f"fetched {len(got)} of {count}"
    return got


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    """Return once ``await check()`` is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, f"not true after {timeout:.1f}s: {what}"
        await asyncio.sleep(0.02)


class RoundTrips:
    """Records each round trip the transport's shared client makes: one command, or one pipeline."""

    def __init__(self, transport: RedisTransport) -> None:
        self.trips: list[list[str]] = []
        client = transport._client
        execute_command, pipeline = client.execute_command, client.pipeline

        async def recording_execute(*args: Any, **options: Any) -> Any:
            self.trips.append([str(args[0])])
            return await execute_command(*args, **options)

        def recording_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = pipeline(*args, **kwargs)
            execute = pipe.execute

            async def recording_pipe_execute(*a: Any, **kw: Any) -> Any:
                self.trips.append([str(c[0][0]) for c in pipe.command_stack])
                return await execute(*a, **kw)

            pipe.execute = recording_pipe_execute  # type: ignore[method-assign]
            return pipe

        client.execute_command = recording_execute  # type: ignore[method-assign]
        client.pipeline = recording_pipeline  # type: ignore[method-assign]

    def clear(self) -> None:
        self.trips.clear()


# ---------------------------------------------------------------- batching


async def test_a_batch_is_published_in_pipelines_and_read_and_acked_in_one_round_trip_each(
    msgkit_redis_url: str,
) -> None:
    async with connected(msgkit_redis_url) as transport:
        topic, group = names()
        await transport.declare(topic, group)
        subscription = await transport.subscribe(topic, group, prefetch=500)
        trips = RoundTrips(transport)
        await transport.publish(topic, [Message(f"m{i}".encode()) for i in range(2500)])
        assert [len(t) for t in trips.trips] == [1000, 1000, 500], "2500 messages: three pipelines of XADD"
        assert {c for t in trips.trips for c in t} == {"XADD"}

        trips.clear()
        batch = await subscription.fetch(500, timeout=1.0)
        assert len(batch) == 500
        assert [t[0] for t in trips.trips] == ["EVALSHA"], "500 deliveries: one poll"
        trips.clear()
        await subscription.settle([(d, msgkit.ACK) for d in batch])
        assert trips.trips == [["XACK"]], "500 acks: one XACK"
        assert (await transport.stats(topic, group)).pending == 0
        await subscription.close()


# ---------------------------------------------------------------- attempts, redelivery, dead letters


async def test_attempts_are_the_pending_entries_delivery_counts_across_consumers(msgkit_redis_url: str) -> None:
    async with connected(msgkit_redis_url) as transport:
        topic, group = names()
        await transport.declare(topic, group)
        await transport.publish(topic, [Message(b"x", id="the-id")])
        first = await transport.subscribe(topic, group, prefetch=1)
        second = await transport.subscribe(topic, group, prefetch=1)
        async with raw_client(msgkit_redis_url) as client:
            for expected in (1, 2, 3):
                subscription = first if expected % 2 else second
                (delivery,) = await fetch_n(subscription, 1)
                assert (delivery.id, delivery.attempt) == ("the-id", expected)
                pending = await client.xpending_range(stream_key("msgkit:", topic), group, "-", "+", 10)
                assert [p["times_delivered"] for p in pending] == [expected]
                await subscription.settle([(delivery, msgkit.Retry(0))])
            (delivery,) = await fetch_n(first, 1)
            await first.release([delivery])  # a release is not an attempt
            (delivery,) = await fetch_n(second, 1, timeout=2.0)
            assert delivery.attempt == 4
            await second.settle([(delivery, msgkit.ACK)])
        stats = await transport.stats(topic, group)
        assert (stats.pending, stats.delayed) == (0, 0)
        await first.close()
        await second.close()


async def test_retry_zero_comes_back_at_once_and_a_delay_waits_in_the_delayed_set(msgkit_redis_url: str) -> None:
    async with msgkit.Broker(msgkit_redis_url) as broker:
        transport = broker.transport
        assert isinstance(transport, RedisTransport)
        topic, group = names()
        await broker.declare(topic, group)
        seen: dict[bytes, list[tuple[int, float, dict[str, str]]]] = {b"now": [], b"later": []}

        async def handler(delivery: Delivery) -> msgkit.Retry | None:
            seen[delivery.body].append((delivery.attempt, time.monotonic(), dict(delivery.headers)))
            if delivery.attempt > 1:
                return None
            delay = 0.0 if delivery.body == b"now" else 1.0
            return msgkit.Retry(delay, headers={"msgkit-first-failed-at": "123.5"})

        consumer = broker.consumer(topic, group, handler, settle_interval=0.01)
        await consumer.start()
        await broker.send(topic, b"now", headers={"origin": "ü"})
        await broker.send(topic, b"later")
        await eventually(lambda: len(seen[b"later"]) >= 1 and len(seen[b"now"]) >= 2, WAIT, lambda: str(seen))

        async def parked() -> bool:
            stats = await transport.stats(topic, group)
            return (stats.pending, stats.delayed) == (0, 1)

        # before the delayed redelivery is due, it waits in the sorted set, not in the PEL
        await until(parked, "the delayed message is not (only) in the delayed set", timeout=0.8)
        await eventually(lambda: len(seen[b"later"]) >= 2, WAIT, lambda: str(seen))
        await consumer.stop()

        (a1, t1, _), (a2, t2, headers) = seen[b"now"]
        assert (a1, a2) == (1, 2)
        assert t2 - t1 < 0.3, f"Retry(0) came back after {t2 - t1:.2f}s"
        assert headers == {"origin": "ü", "msgkit-first-failed-at": "123.5"}, "Retry(headers=...) was not applied"
        (_, l1, _), (_, l2, _) = seen[b"later"]
        assert 1.0 <= l2 - l1 <= 1.0 + transport.capabilities.delay_tolerance + 0.5
        stats = await transport.stats(topic, group)
        assert (stats.pending, stats.delayed) == (0, 0)
        async with raw_client(msgkit_redis_url) as client:
            headers_key = f"{stream_key('msgkit:', topic)}:{group}:headers"
            assert not await client.exists(headers_key), "rewritten headers leak"


async def test_dead_letters_go_to_the_groups_stream_with_reasons_and_acking_them_deletes_them(
    msgkit_redis_url: str,
) -> None:
    async with connected(msgkit_redis_url) as transport:
        topic, group = names()
        await transport.declare(topic, group)
        await transport.publish(topic, [Message(b"\x00\xffbad", key="k", headers={"h": "v"}), Message(b"good")])
        subscription = await transport.subscribe(topic, group, prefetch=2)
        bad, good = await fetch_n(subscription, 2)
        await subscription.settle([(bad, dead_letter(bad, "broken ✗", ValueError())), (good, msgkit.ACK)])
        stats = await transport.stats(topic, group)
        assert (stats.pending, stats.dead) == (0, 1)

        dead = await transport.subscribe_dead_letters(topic, group, prefetch=10)
        (letter,) = await fetch_n(dead, 1)
        assert (letter.id, letter.body, letter.key) == (bad.id, b"\x00\xffbad", "k")
        assert letter.headers["h"] == "v"
        assert letter.headers[DLQ_REASON] == "broken ✗"
        await dead.settle([(letter, msgkit.ACK)])
        assert (await transport.stats(topic, group)).dead == 0, "an acked dead letter is deleted"
        await subscription.close()
        await dead.close()


async def test_a_cancelled_fetch_loses_nothing_and_close_releases_what_it_read(msgkit_redis_url: str) -> None:
    async with connected(msgkit_redis_url, block=5) as transport:
        topic, group = names()
        await transport.declare(topic, group)
        first = await transport.subscribe(topic, group, prefetch=10)
        fetching = asyncio.create_task(first.fetch(10, timeout=10))
        await eventually(lambda: first._blocking, WAIT, "the first subscription never blocked in XREADGROUP")
        fetching.cancel()
        await transport.publish(topic, [Message(b"caught by a cancelled read", id="caught")])
        await first.close()  # waits for the read, then releases what it got

        second = await transport.subscribe(topic, group, prefetch=10)
        started = time.monotonic()
        (delivery,) = await fetch_n(second, 1, timeout=5)
        assert (delivery.id, delivery.attempt) == ("caught", 1), "a release is not an attempt"
        assert time.monotonic() - started < 2, "released at once, not after the visibility timeout"
        await second.settle([(delivery, msgkit.ACK)])
        await second.close()


async def test_dead_letter_tooling_peeks_replays_and_purges_on_redis(msgkit_redis_url: str) -> None:
    async with msgkit.Broker(msgkit_redis_url) as broker:
        transport = broker.transport
        assert isinstance(transport, RedisTransport)
        topic, group = names()
        await broker.declare(topic, group)
        ids = await broker.send_batch(topic, [b"a", b"b", b"c"])
        subscription = await transport.subscribe(topic, group, prefetch=10)
        got = await fetch_n(subscription, 3)
        await subscription.settle([(d, dead_letter(d, "no")) for d in got])

        tool = await broker.dead_letters(topic, group, wait=0.5)
        assert [info.id for info in await tool.peek()] == ids
        assert [info.id for info in await tool.peek()] == ids, "peeking must leave the dead letters in place"
        assert await tool.replay([ids[0]]) == [ids[0]]
        assert sorted(await tool.purge()) == sorted(ids[1:])
        assert await tool.peek() == []
        (replayed,) = await fetch_n(subscription, 1)
        assert (replayed.id, replayed.attempt, replayed.body) == (ids[0], 1, b"a")
        await subscription.settle([(replayed, msgkit.ACK)])
        stats = await transport.stats(topic, group)
        assert (stats.pending, stats.delayed, stats.dead) == (0, 0, 0)
        await subscription.close()


# ---------------------------------------------------------------- consumer loss


CRASHING_CONSUMER = """
import asyncio, os, sys
from msgkit.transports.redis import RedisTransport

async def main():
    transport = RedisTransport.from_url(sys.argv[1])
    await transport.connect()
    subscription = await transport.subscribe(sys.argv[2], sys.argv[3], prefetch=10)
    got = []
    while len(got) < int(sys.argv[4]):
        got += await subscription.fetch(10, timeout=1.0)
    print(subscription.consumer, flush=True)
    os._exit(0)  # a crash: nothing settled, nothing closed

asyncio.run(main())
"""


async def test_a_crashed_consumers_batch_is_claimed_by_a_live_one_and_its_name_forgotten(
    msgkit_redis_url: str,
) -> None:
    url = with_options(msgkit_redis_url, visibility_timeout=1)
    async with connected(url) as transport:
        topic, group = names()
        await transport.declare(topic, group)
        messages = [Message(f"m{i}".encode()) for i in range(5)]
        ids = [m.id for m in messages]
        await transport.publish(topic, messages)
        crashed = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CRASHING_CONSUMER, url, topic, group, "5", stdout=asyncio.subprocess.PIPE
        )
        output, _ = await asyncio.wait_for(crashed.communicate(), WAIT)
        dead_name = output.decode().strip()
        assert crashed.returncode == 0
        assert dead_name.startswith("msgkit-")
        assert dead_name in (await transport.stats(topic, group)).consumers

        live = await transport.subscribe(topic, group, prefetch=10)
        started = time.monotonic()
        got = await fetch_n(live, 5)
        waited = time.monotonic() - started
        assert sorted(d.id for d in got) == sorted(ids)
        assert {d.attempt for d in got} == {2}, "a claimed entry counts as a new attempt"
        assert waited <= transport.capabilities.consumer_loss_redelivery + 1.5, f"claimed after {waited:.1f}s"
        await live.settle([(d, msgkit.ACK) for d in got])

        async def consumers() -> tuple[str, ...]:
            return (await transport.stats(topic, group)).consumers

        async def forgotten() -> bool:
            return dead_name not in await consumers()

        await until(forgotten, "the dead consumer's name was not cleaned up")
        assert live.consumer in await consumers()
        await live.close()
        assert await consumers() == (), "a consumer that closed with nothing pending removes its own name"


async def test_a_consumer_whose_connections_drop_mid_batch_finishes_and_acks_it(msgkit_redis_url: str) -> None:
    client_name = f"msgkit-test-{uuid.uuid4().hex[:8]}"
    async with msgkit.Broker(with_options(msgkit_redis_url, client_name=client_name)) as broker:
        transport = broker.transport
        assert isinstance(transport, RedisTransport)
        topic, group = names()
        await broker.declare(topic, group)
        gate = asyncio.Event()
        received = Received()

        async def handler(delivery: Delivery) -> None:
            received.record(delivery)
            await gate.wait()

        await broker.consumer(topic, group, handler, max_in_flight=20, settle_interval=0.01).start()
        ids = await broker.send_batch(topic, [f"m{i}".encode() for i in range(20)])
        await received.wait_for(ids)
        async with raw_client(msgkit_redis_url) as client:
            mine = [c for c in await client.client_list() if c.get("name") == client_name]
            assert len(mine) >= 2, "expected the shared and the reader connection"
            for c in mine:
                await client.client_kill_filter(_id=c["id"])
        gate.set()
        await eventually(lambda: transport._down_since is None, WAIT, "the transport did not recover")

        async def acked() -> bool:
            return (await transport.stats(topic, group)).pending == 0

        await until(acked, "the batch was not acked after the connections came back")
        more = await broker.send_batch(topic, [b"after 1", b"after 2"])
        await received.wait_for(more)
        assert not received.duplicates()


# ---------------------------------------------------------------- restarts and outages


def restart_command() -> str:
    command = os.environ.get("MSGKIT_REDIS_RESTART_COMMAND", "")
    if not command:
        skip_or_fail("no MSGKIT_REDIS_RESTART_COMMAND (source .brokers/env)")
    return command


async def run_shell(command: str) -> None:
    process = await asyncio.create_subprocess_shell(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    assert await asyncio.wait_for(process.wait(), 120) == 0, f"{command!r} failed"


@pytest.mark.timeout(180)
async def test_after_a_restart_pending_entries_survive_and_clients_reconnect_on_their_own(
    msgkit_redis_url: str,
) -> None:
    command = restart_command()
    async with msgkit.Broker(msgkit_redis_url) as broker:
        transport = broker.transport
        assert isinstance(transport, RedisTransport)
        assert transport.capabilities.persistent, "the suite's Redis must run with AOF on"
        topic, group = names()
        await broker.declare(topic, group)
        held_ids = await broker.send_batch(topic, [f"held {i}".encode() for i in range(5)])
        subscription = await transport.subscribe(topic, group, prefetch=5)
        held = await fetch_n(subscription, 5)
        received = Received()
        await broker.consumer(topic, names()[1], received).start()

        await run_shell(command)
        after = [await broker.send(topic, f"after {i}".encode()) for i in range(10)]  # no retry loop here
        await subscription.settle([(d, msgkit.ACK) for d in held])  # acks of pre-restart deliveries
        await received.wait_for([*held_ids, *after])
        assert (await transport.stats(topic, group)).pending == 0
        newer = await fetch_n(subscription, 10)  # the group's subscription now gets the new ones only
        assert sorted(d.id for d in newer) == sorted(after), "acked entries came back"
        await subscription.settle([(d, msgkit.ACK) for d in newer])
        await subscription.close()


@contextmanager
def scratch_redis(*extra: str) -> Iterator[tuple[int, Path]]:
    """A throwaway redis-server without persistence on a free port: (port, its directory)."""
    binary = shutil.which("redis-server")
    if binary is None:
        skip_or_fail("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = Path(tempfile.mkdtemp(prefix="msgkit-redis-"))
    args = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
    args += ["--port", "0", "--tls-port", str(port), *extra] if extra else ["--port", str(port)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert process.poll() is None, f"redis-server {args} exited with {process.returncode}"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        yield port, directory
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(60)
async def test_a_restart_without_persistence_loses_data_but_not_the_consumer(msgkit_redis_url: str) -> None:
    with scratch_redis() as (port, _):
        url = f"redis://127.0.0.1:{port}/0"
        async with msgkit.Broker(url) as broker:
            assert not broker.capabilities.persistent, "no AOF: not persistent"
            topic, group = names()
            received = Received()
            await broker.consumer(topic, group, received).start()
            before = await broker.send(topic, b"before")
            await received.wait_for([before])
            async with raw_client(url) as client:
                await client.flushall()  # what a restart without persistence leaves: nothing
            after = await broker.send(topic, b"after")
            await received.wait_for([after])  # NOGROUP -> the group is recreated at 0


@pytest.mark.timeout(60)
async def test_an_outage_beyond_reconnect_timeout_surfaces_as_errors(msgkit_redis_url: str) -> None:
    with scratch_redis() as (port, _):
        url = f"redis://:pa55w0rd-{uuid.uuid4().hex[:4]}@127.0.0.1:{port}/0?reconnect_timeout=1"
        transport = RedisTransport.from_url(url)
        async with raw_client(f"redis://127.0.0.1:{port}/0") as client:
            await client.config_set("requirepass", transport._connection_kwargs["password"])
        await transport.connect()
        topic, group = names()
        subscription = await transport.subscribe(topic, group, prefetch=1)
        await transport.publish(topic, [Message(b"ok")])
        async with raw_client(url) as client:
            await client.shutdown(nosave=True)
        started = time.monotonic()
        with pytest.raises(msgkit.PublishError) as failed:
            await transport.publish(topic, [Message(b"lost", id="lost-id")])
        assert 1.0 <= time.monotonic() - started < 5.0
        assert failed.value.failed[0][0] == "lost-id"
        with pytest.raises(msgkit.BrokerUnavailableError) as unavailable:
            await subscription.fetch(1, timeout=0.2)  # the outage began over a second ago
        for text in (str(failed.value), str(unavailable.value), repr(transport)):
            assert "pa55w0rd" not in text
            assert "***" in text
        await transport.close()


async def test_connecting_to_nothing_fails_fast_and_clearly() -> None:
    transport = RedisTransport.from_url("redis://user:s3cret@127.0.0.1:1/0?connect_timeout=1")
    with pytest.raises(msgkit.BrokerUnavailableError, match="cannot reach redis") as failed:
        await transport.connect()
    assert "s3cret" not in str(failed.value)
    await transport.close()
    await transport.close()  # idempotent


# ---------------------------------------------------------------- trimming


async def test_trimming_is_per_topic_and_off_by_default(msgkit_redis_url: str) -> None:
    (trimmed, group), untrimmed = names(), names()[0]
    async with connected(msgkit_redis_url, trim=f"{trimmed}:maxlen:100") as transport:
        for topic in (trimmed, untrimmed):
            await transport.publish(topic, [Message(b"x") for _ in range(1000)])
        assert 100 <= (await transport.stats(trimmed, group)).length < 1000
        assert (await transport.stats(untrimmed, group)).length == 1000
    async with connected(msgkit_redis_url, trim="*:age:3600") as transport:
        await transport.publish(untrimmed, [Message(b"x")])
        assert (await transport.stats(untrimmed, group)).length == 1001, "recent entries are kept"


# ---------------------------------------------------------------- security


async def test_an_acl_user_from_the_url_works_and_a_wrong_password_is_a_clear_error(msgkit_redis_url: str) -> None:
    user, password = f"msgkit-{uuid.uuid4().hex[:6]}", f"pw-{uuid.uuid4().hex}"
    parts = urlsplit(msgkit_redis_url)
    host = f"{parts.hostname}:{parts.port or 6379}"
    async with raw_client(msgkit_redis_url) as admin:
        await admin.acl_setuser(  # what docs/transports/redis.md says a user needs
            user,
            enabled=True,
            passwords=[f"+{password}"],
            keys=["msgkit:*"],
            categories=["+@stream", "+@sortedset", "+@hash", "+@scripting", "+@connection"],
            commands=["+ping", "+info", "+exists", "+time", "+client|unblock"],
        )
        try:
            url = f"redis://{user}:{password}@{host}{parts.path}"
            async with msgkit.Broker(url) as broker:
                topic, group = names()
                received = Received()
                await broker.consumer(topic, group, received).start()
                sent = await broker.send(topic, b"as an ACL user")
                await received.wait_for([sent])
                assert password not in repr(broker)
                assert password not in broker.url

            wrong = RedisTransport.from_url(f"redis://{user}:wrong-{password}@{host}{parts.path}")
            with pytest.raises(msgkit.ConfigurationError) as refused:
                await wrong.connect()
            assert password not in str(refused.value)
            assert "***" in str(refused.value)
        finally:
            await admin.acl_deluser(user)


@pytest.mark.timeout(60)
async def test_rediss_connects_with_tls_and_verifies_the_server(tmp_path: Path, msgkit_redis_url: str) -> None:
    if shutil.which("openssl") is None:
        skip_or_fail("openssl is not installed")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=x")
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "san.ext",
    )  # fmt: skip
    tls = ["--tls-cert-file", str(tmp_path / "server.crt"), "--tls-key-file", str(tmp_path / "server.key")]
    tls += ["--tls-ca-cert-file", str(tmp_path / "ca.crt"), "--tls-auth-clients", "no"]
    with scratch_redis(*tls) as (port, _):
        url = f"rediss://127.0.0.1:{port}/0?tls_ca_file={tmp_path / 'ca.crt'}"
        async with msgkit.Broker(url) as broker:
            topic, group = names()
            received = Received()
            await broker.consumer(topic, group, received).start()
            sent = await broker.send(topic, b"over TLS")
            await received.wait_for([sent])

        unverified = RedisTransport.from_url(f"rediss://127.0.0.1:{port}/0?connect_timeout=2")
        with pytest.raises(msgkit.BrokerUnavailableError, match=r"(?i)certificate"):
            await unverified.connect()
        async with connected(f"rediss://127.0.0.1:{port}/0", tls_verify="false") as transport:
            await transport.publish("t", [Message(b"unverified but encrypted")])
        with pytest.raises(msgkit.BrokerUnavailableError):
            await RedisTransport.from_url(f"redis://127.0.0.1:{port}/0?connect_timeout=2").connect()


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://h/0?visibility=3", "unknown option"),
        ("redis://h/0?visibility_timeout=0", "visibility_timeout"),
        ("redis://h/zero", "database number"),
        ("redis://h:99999/0", "malformed"),
        ("redis://h/0?tls_ca_file=/x", "rediss://"),
        ("redis://h/0?trim=orders:maxlen:x", "trim rule"),
        ("redis://h/0?trim=bad/topic:age:5", "invalid topic name"),
        ("redis://h/0?block=5&socket_timeout=5", "socket_timeout"),
        ("redis://h/0?prefix=a{b}", "prefix"),
        ("redis://h/0?client_name=a%20b", "client_name"),
    ],
)
async def test_bad_urls_are_configuration_errors_that_hide_secrets(url: str, complaint: str) -> None:
    url = url.replace("redis://h", "redis://u:t0p-secret@h")
    with pytest.raises(msgkit.ConfigurationError, match=complaint) as refused:
        RedisTransport.from_url(url)
    assert "t0p-secret" not in str(refused.value)


async def test_url_parts_and_options_reach_the_client() -> None:
    transport = RedisTransport.from_url(
        "rediss://us%40er:p%3Ass@[::1]:6380/3?tls_ca_file=/ca.pem&tls_verify=false&visibility_timeout=2&block=0.2"
    )
    kwargs = transport._connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("::1", 6380, 3)
    assert (kwargs["username"], kwargs["password"]) == ("us@er", "p:ss")
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"], kwargs["ssl_check_hostname"]) == ("/ca.pem", "none", False)
    assert "p%3Ass" not in repr(transport)
    assert "p:ss" not in repr(transport)
    capabilities = transport.capabilities
    assert capabilities.consumer_loss_redelivery == 2.5
    assert capabilities.delay_tolerance == pytest.approx(0.45)
    assert not capabilities.persistent, "unknown until connected"
    defaults = RedisTransport.from_url("redis://").settings
    assert (defaults.visibility_timeout, defaults.block, defaults.max_message_size) == (30.0, 0.5, 1_048_576)


@pytest.mark.timeout(60)
async def test_the_example_runs_against_redis(msgkit_redis_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        env={**os.environ, "MSGKIT_URL": msgkit_redis_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 50)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "billed order 2: 19.00 (attempt 2)" in text, text
    assert "order 4 is fraudulent" in text, text

"""The Kafka transport against a real broker: what the contract suite does not cover.

Offsets (never committed past unfinished work, only in-flight work comes back), batching,
pausing while the engine is full, both retry modes, rebalances under load with consumers joining
and leaving, recovery after a broker restart, error mapping, and URL / security options.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]

import msgkit
from msgkit import Delivery, Message
from msgkit.transports.kafka import KafkaSettings, KafkaTransport, dead_letter_topic, group_id, retry_topic
from msgkit.transports.kafka_protocol import ATTEMPT_HEADER, NOT_BEFORE_HEADER
from msgkit.transports.kafka_subscription import KafkaSubscription

WAIT = 60.0


#: Names handed out to the running test ("t": topics, others: groups), deleted from the broker after it.
_CREATED: dict[str, list[str]] = defaultdict(list)


def _unique(prefix: str) -> str:
    name = f"kt-{prefix}-{uuid.uuid4().hex[:10]}"
    _CREATED["topics" if prefix == "t" else "groups"].append(name)
    return name


@pytest_asyncio.fixture(autouse=True)
async def _delete_what_the_test_made(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Each test's topics, with the retry and dead-letter topics and offsets of its groups, go afterwards."""
    _CREATED.clear()
    yield
    made = tuple(_CREATED["topics"])
    _CREATED.clear()
    if not made or "msgkit_kafka_url" not in request.fixturenames:
        return
    async with msgkit.Broker(request.getfixturevalue("msgkit_kafka_url")) as broker:
        admin = broker.transport._admin  # type: ignore[attr-defined]
        listed = {t for t in await admin.list_topics() if t.startswith(made)}  # with retry topics used as topics
        group_ids = [g[0] for g in await admin.list_consumer_groups()]
        for topic in sorted(listed.union(made), key=len, reverse=True):  # retry topics first
            groups = [gid.partition(":")[2] for gid in group_ids if gid.startswith(f"{topic}:")]
            for group in groups or ["none"]:  # the topic goes with the last of its groups
                await broker.delete(topic, group)


async def eventually(predicate: Any, timeout: float = WAIT, what: Any = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout:.0f}s: {what() if callable(what) else what}")
        await asyncio.sleep(0.01)


def _url(base: str, **options: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"{base}{'&' if '?' in base else '?'}{query}" if query else base


class Topics:
    """Fresh topic names for one test; every Kafka topic msgkit made for them is deleted afterwards."""

    def __init__(self) -> None:
        self.names: list[tuple[str, str | None]] = []

    def new(self, group: str | None = "g") -> tuple[str, str]:
        topic = _unique("t")
        self.names.append((topic, group))
        return topic, group or "g"

    def kafka_topics(self) -> list[str]:
        out = []
        for topic, group in self.names:
            out.append(topic)
            if group is not None:
                out += [retry_topic(topic, group), dead_letter_topic(topic, group)]
        return out


@pytest_asyncio.fixture
async def topics(msgkit_kafka_url: str) -> AsyncIterator[Topics]:
    made = Topics()
    yield made
    transport = KafkaTransport.from_url(msgkit_kafka_url)
    admin = AIOKafkaAdminClient(bootstrap_servers=transport.bootstrap)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        doomed = [t for t in made.kafka_topics() if t in existing]
        if doomed:
            await admin.delete_topics(doomed)
    except Exception as exc:  # cleanup only: a broker that went away must not fail the test
        logging.getLogger(__name__).warning("could not delete test topics: %s", exc)
    finally:
        await admin.close()


@pytest_asyncio.fixture
async def transport(msgkit_kafka_url: str) -> AsyncIterator[KafkaTransport]:
    t = KafkaTransport.from_url(_url(msgkit_kafka_url, partitions=1, commit_interval=0.05))
    await t.connect()
    yield t
    await t.close()


async def _fetch(subscription: KafkaSubscription, count: int, timeout: float = WAIT) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += await subscription.fetch(count - len(got), 1.0)
    return got


async def _committed(transport: KafkaTransport, topic: str, group: str, partition: int = 0) -> tuple[int, str]:
    found = await transport._committed(group_id(topic, group), [TopicPartition(topic, partition)])
    offset, metadata = found.get(TopicPartition(topic, partition), (None, ""))
    return (-1 if offset is None else offset), metadata


async def _wait_for_commit(transport: KafkaTransport, topic: str, group: str, done: Any) -> tuple[int, str]:
    """Poll the group's committed offset of partition 0 until ``done(state)``; return the state."""
    deadline = time.monotonic() + WAIT
    while True:
        state = await _committed(transport, topic, group)
        if done(state) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.05)  # polling the broker: there is no event to wait on


# ---------------------------------------------------------------------------------- offsets


@pytest.mark.asyncio
async def test_commits_never_pass_unfinished_work_and_only_that_work_comes_back(
    transport: KafkaTransport, topics: Topics
) -> None:
    topic, group = topics.new()
    await transport.declare(topic, group)
    await transport.publish(topic, [Message(f"m{i}".encode(), key="k") for i in range(10)])

    first = await transport.subscribe(topic, group, prefetch=10)
    got = await _fetch(first, 10)
    assert [d.body for d in got] == [f"m{i}".encode() for i in range(10)]
    unfinished = {2, 6}
    await first.settle([(d, msgkit.ACK) for i, d in enumerate(got) if i not in unfinished])

    async def committed() -> tuple[int, str]:
        return await _committed(transport, topic, group)

    state = await _wait_for_commit(transport, topic, group, lambda state: state[0] >= 2)
    assert state[0] == 2, f"committed {state}: must stop at the lowest unfinished offset"
    await first.close()  # like a crash: offsets 2 and 6 were never settled

    second = await transport.subscribe(topic, group, prefetch=10)
    again = await _fetch(second, 2)
    assert sorted(d.body for d in again) == [b"m2", b"m6"], "only the unfinished records may come back"
    assert list(await second.fetch(10, 1.0)) == [], "a record finished before the handover came back"
    await second.settle([(d, msgkit.ACK) for d in again])
    await eventually(lambda: False, 0) if False else None
    await second.close()
    assert (await committed())[0] == 10


@pytest.mark.asyncio
async def test_partitions_pause_while_the_engine_is_full_and_resume_as_slots_free(
    transport: KafkaTransport, topics: Topics
) -> None:
    topic, group = topics.new()
    await transport.declare(topic, group)
    await transport.publish(topic, [Message(f"m{i}".encode()) for i in range(20)])
    subscription = await transport.subscribe(topic, group, prefetch=5)
    try:
        consumer = subscription._consumer
        batch = await _fetch(subscription, 5)
        assert len(batch) == 5
        assert consumer.paused() == consumer.assignment(), "a full engine must pause every partition"
        await subscription.settle([(d, msgkit.ACK) for d in batch])
        more = await _fetch(subscription, 5)
        assert [d.body for d in more] == [f"m{i}".encode() for i in range(5, 10)]
        assert len(more) == 5, "the subscription handed out more than the engine asked for"
    finally:
        await subscription.close()


@pytest.mark.asyncio
async def test_a_release_is_fetched_again_without_counting_an_attempt(
    transport: KafkaTransport, topics: Topics
) -> None:
    topic, group = topics.new()
    await transport.declare(topic, group)
    await transport.publish(topic, [Message(f"m{i}".encode()) for i in range(4)])
    subscription = await transport.subscribe(topic, group, prefetch=10)
    try:
        got = await _fetch(subscription, 4)
        await subscription.settle([(got[0], msgkit.ACK)])
        await subscription.release(got[1:])
        again = await _fetch(subscription, 3)
        assert [(d.body, d.attempt) for d in again] == [(b"m1", 1), (b"m2", 1), (b"m3", 1)]
    finally:
        await subscription.close()


# ---------------------------------------------------------------------------------- producing


@pytest.mark.asyncio
async def test_a_batch_is_sent_in_few_produce_requests(transport: KafkaTransport, topics: Topics) -> None:
    topic, _ = topics.new(group=None)
    await transport.declare(topic)
    client = transport._producer.client
    original = client.send
    produce_requests = 0

    async def counting_send(node_id: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal produce_requests
        if type(request).__name__.startswith("ProduceRequest"):
            produce_requests += 1
        return await original(node_id, request, *args, **kwargs)

    client.send = counting_send
    try:
        await transport.publish(topic, [Message(b"x" * 100, key=f"k{i}") for i in range(2000)])
    finally:
        client.send = original
    assert produce_requests <= 5, f"2000 messages took {produce_requests} produce requests: not batched"


@pytest.mark.asyncio
async def test_a_message_the_broker_refuses_is_a_publish_error_naming_it(msgkit_kafka_url: str, topics: Topics) -> None:
    topic, _ = topics.new(group=None)
    # msgkit lets it through (limit raised), the broker (message.max.bytes ~1 MiB) does not
    transport = KafkaTransport.from_url(_url(msgkit_kafka_url, max_message_size=3_000_000, publish_timeout=20))
    await transport.connect()
    try:
        await transport.declare(topic)
        small, big = Message(b"fits"), Message(b"x" * 2_000_000)
        with pytest.raises(msgkit.PublishError) as caught:
            await transport.publish(topic, [small, big])
        assert [message_id for message_id, _ in caught.value.failed] == [big.id]
    finally:
        await transport.close()


@pytest.mark.asyncio
async def test_a_producer_broken_for_good_is_replaced(transport: KafkaTransport, topics: Topics) -> None:
    """After e.g. OutOfOrderSequenceNumber (seen once when a restarted broker lost producer state)
    aiokafka's idempotent producer fails every later send; the transport starts a new one."""
    from aiokafka.errors import OutOfOrderSequenceNumber  # type: ignore[import-untyped]

    topic, _ = topics.new(group=None)
    await transport.declare(topic)
    broken = transport._producer
    broken._message_accumulator.fail_all(OutOfOrderSequenceNumber())  # what its dying sender does
    with pytest.raises(msgkit.PublishError, match="OutOfOrderSequenceNumber"):
        await transport.publish(topic, [Message(b"lost in the broken producer")])
    assert transport._producer is not broken
    await transport.publish(topic, [Message(b"sent by the new producer")])


@pytest.mark.asyncio
async def test_declare_creates_the_topic_and_its_retry_topic_and_dead_letters_come_later(
    msgkit_kafka_url: str, topics: Topics
) -> None:
    topic, group = topics.new()
    transport = KafkaTransport.from_url(_url(msgkit_kafka_url, partitions=2))
    await transport.connect()
    names = [topic, retry_topic(topic, group), dead_letter_topic(topic, group)]

    async def partitions() -> dict[str, int]:
        described = await transport._admin.describe_topics(names)
        return {d["topic"]: len(d["partitions"]) for d in described if d["error_code"] == 0}

    try:
        await transport.declare(topic, group)
        assert await partitions() == {topic: 2, f"{topic}.{group}.retry": 2}
        reader = await transport.subscribe_dead_letters(topic, group, prefetch=10)
        await reader.close()
        assert await partitions() == {topic: 2, f"{topic}.{group}.retry": 2, f"{topic}.{group}.dlq": 1}
    finally:
        await transport.close()


# ---------------------------------------------------------------------------------- retries


@pytest.mark.asyncio
async def test_retry_topics_carry_the_attempt_and_the_not_before_time(msgkit_kafka_url: str, topics: Topics) -> None:
    topic, group = topics.new()
    async with msgkit.Broker(_url(msgkit_kafka_url, partitions=1)) as broker:
        await broker.declare(topic, group)
        seen: list[tuple[int, float]] = []

        async def handler(delivery: Delivery) -> msgkit.Retry | None:
            seen.append((delivery.attempt, time.time()))
            return msgkit.Retry(delay=0.5, headers={"why": "later"}) if delivery.attempt < 3 else None

        sent = time.time()
        await broker.send(topic, b"again", key="k")
        await broker.consumer(topic, group, handler, settle_interval=0.01).start()
        await eventually(lambda: len(seen) >= 3, what=lambda: f"attempts {seen}")
        assert [a for a, _ in seen] == [1, 2, 3]
        assert seen[1][1] - seen[0][1] >= 0.49, seen
        assert seen[2][1] - seen[1][1] >= 0.49, seen
        assert seen[0][1] >= sent

        reader = await broker.transport.subscribe(retry_topic(topic, group), "inspect", prefetch=10)
        try:
            records = await _fetch(reader, 2)
        finally:
            await reader.close()
        assert [d.message.headers["why"] for d in records] == ["later", "later"]
        assert [d.attempt for d in records] == [2, 3]
        assert all(ATTEMPT_HEADER not in d.headers and NOT_BEFORE_HEADER not in d.headers for d in records)


@pytest.mark.asyncio
async def test_inline_retries_hold_the_key_lane_and_keep_key_order(msgkit_kafka_url: str, topics: Topics) -> None:
    topic, group = topics.new()
    async with msgkit.Broker(_url(msgkit_kafka_url, partitions=1, retry="inline")) as broker:
        await broker.declare(topic, group)
        handled: dict[str, list[tuple[int, int]]] = defaultdict(list)

        async def handler(body: bytes, delivery: Delivery) -> msgkit.Retry | None:
            key, _, seq = body.decode().partition(":")
            handled[key].append((int(seq), delivery.attempt))
            if seq == "0" and delivery.attempt < 3:
                return msgkit.Retry(delay=0.2)
            return None

        messages = [Message(f"{key}:{seq}".encode(), key=key) for seq in range(5) for key in ("a", "b")]
        await broker.send_batch(topic, messages)
        await broker.consumer(topic, group, handler, max_in_flight=10, settle_interval=0.01).start()
        await eventually(lambda: sum(map(len, handled.values())) >= 14, what=lambda: dict(handled))
        for key in ("a", "b"):
            expected = [(0, 1), (0, 2), (0, 3), (1, 1), (2, 1), (3, 1), (4, 1)]
            assert handled[key] == expected, f"key {key}: {handled[key]}"


@pytest.mark.asyncio
async def test_inline_attempts_survive_a_handover_in_the_commit_metadata(msgkit_kafka_url: str, topics: Topics) -> None:
    topic, group = topics.new()
    url = _url(msgkit_kafka_url, partitions=1, retry="inline", commit_interval=0.05)
    transport = KafkaTransport.from_url(url)
    await transport.connect()
    try:
        await transport.declare(topic, group)
        await transport.publish(topic, [Message(b"flaky", key="k"), Message(b"after", key="k")])
        first = await transport.subscribe(topic, group, prefetch=10)
        (delivery,) = await _fetch(first, 1)
        await first.settle([(delivery, msgkit.Retry(delay=60))])  # held for a minute in its lane
        state = await _wait_for_commit(transport, topic, group, lambda state: "msgkit1" in state[1])
        assert state[0] == 0
        assert "msgkit1" in state[1], "the attempt count was not committed while the record waited"
        await first.close()

        second = await transport.subscribe(topic, group, prefetch=10)
        try:
            got = await _fetch(second, 1)
            assert [(d.body, d.attempt) for d in got] == [(b"flaky", 2)], "the attempt count was lost"
        finally:
            await second.close()
    finally:
        await transport.close()


# ---------------------------------------------------------------------------------- rebalances


@pytest.mark.timeout(240)
@pytest.mark.asyncio
@pytest.mark.parametrize("retry", ["topics", "inline"])
async def test_consumers_joining_and_leaving_under_load_lose_nothing(
    msgkit_kafka_url: str, topics: Topics, retry: str
) -> None:
    """Four group members come and go while a producer sends; every message arrives, and only
    work that was in flight when a member left may arrive twice (here: none, members stop gracefully).
    With ``retry=inline`` key order also holds across the handovers (with ``retry=topics`` a stopping
    member hands its unstarted messages to another member through the retry topic, out of order)."""
    topic, group = topics.new()
    url = _url(msgkit_kafka_url, partitions=6, revoke_timeout=5, retry=retry)
    in_flight = 8
    async with msgkit.Broker(url) as broker:
        await broker.declare(topic, group)
        received: Counter[str] = Counter()
        by_member: dict[str, int] = Counter()
        order: dict[str, list[int]] = defaultdict(list)
        rng = random.Random(5)

        def handler_for(member: str) -> Any:
            async def handle(body: bytes, delivery: Delivery) -> None:
                await asyncio.sleep(rng.uniform(0, 0.004))
                received[delivery.message.id] += 1
                by_member[member] += 1
                key, _, seq = body.decode().partition(":")
                order[key].append(int(seq))

            return handle

        sent: list[str] = []
        producing = True

        async def produce() -> None:
            seq = 0
            while producing:
                batch = [Message(f"k{k}:{seq}".encode(), key=f"k{k}") for k in range(12)]
                sent.extend(await broker.send_batch(topic, batch))
                seq += 1
                await asyncio.sleep(0.01)

        def member(name: str) -> msgkit.Consumer:
            return broker.consumer(
                topic, group, handler_for(name), max_in_flight=in_flight, ordered_by_key=True, settle_interval=0.01
            )

        async def progress(count: int = 300) -> None:
            goal = len(received) + count
            await eventually(lambda: len(received) >= goal, what=lambda: f"stalled at {len(received)} received")

        producer = asyncio.create_task(produce())
        try:
            a = member("a")
            await a.start()
            await progress()
            b = member("b")
            await b.start()  # joins: a rebalance under load
            await progress()
            c = member("c")
            await c.start()
            await progress()
            await a.stop()  # leaves gracefully
            await progress()
            d = member("d")
            await d.start()
            await progress()
            await b.stop()
            await progress()
        finally:
            producing = False
            await producer
        await eventually(lambda: set(sent) <= set(received), what=lambda: f"{len(set(sent) - set(received))} lost")
        for consumer in (c, d):
            await consumer.stop()

    duplicates = {i: n for i, n in received.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} messages were handled twice though every member left gracefully"
    assert all(by_member[m] > 0 for m in "abcd"), f"some member got no work: {dict(by_member)}"
    if retry == "inline":
        for key, seqs in order.items():
            assert seqs == sorted(seqs), f"key {key} was handled out of order across rebalances"


@pytest.mark.timeout(180)
@pytest.mark.asyncio
async def test_a_member_that_vanishes_under_load_costs_only_its_in_flight_work(
    msgkit_kafka_url: str, topics: Topics
) -> None:
    topic, group = topics.new()
    async with msgkit.Broker(_url(msgkit_kafka_url, partitions=4)) as broker:
        await broker.declare(topic, group)
        ids = await broker.send_batch(topic, [Message(f"m{i}".encode(), key=f"k{i % 16}") for i in range(2000)])
        received: Counter[str] = Counter()
        transport = broker.transport

        # a member that fetches, finishes some, and vanishes without settling the rest
        lost = await transport.subscribe(topic, group, prefetch=50)
        taken = await _fetch(lost, 50)
        await lost.settle([(d, msgkit.ACK) for d in taken[:30]])
        for d in taken[:30]:
            received[d.id] += 1
        await asyncio.sleep(0.3)  # let it commit what it finished
        await lost.close()

        async def handler(delivery: Delivery) -> None:
            received[delivery.id] += 1

        await broker.consumer(topic, group, handler, max_in_flight=64).start()
        await eventually(lambda: set(ids) <= set(received), what=lambda: f"{len(set(ids) - set(received))} lost")
        await asyncio.sleep(1.0)
        twice = [i for i, n in received.items() if n > 1]
        assert not twice, f"{len(twice)} messages finished before the member vanished came back"


# ---------------------------------------------------------------------------------- restarts


@pytest.mark.timeout(300)
@pytest.mark.asyncio
async def test_a_broker_restart_loses_no_message_and_no_commit(msgkit_kafka_url: str, topics: Topics) -> None:
    command = os.environ.get("MSGKIT_KAFKA_RESTART_COMMAND")
    if not command:
        pytest.skip("MSGKIT_KAFKA_RESTART_COMMAND is not set")
    topic, group = topics.new()
    async with msgkit.Broker(_url(msgkit_kafka_url, partitions=2, commit_interval=0.05)) as broker:
        await broker.declare(topic, group)
        before: Counter[str] = Counter()

        async def handler(delivery: Delivery) -> None:
            before[delivery.id] += 1

        await broker.consumer(topic, group, handler, max_in_flight=32).start()
        old = await broker.send_batch(topic, [Message(f"old {i}".encode(), key=f"k{i}") for i in range(300)])
        await eventually(lambda: set(old) <= set(before), what="messages sent before the restart")
        await asyncio.sleep(0.5)  # commits go out

        # a second group whose consumer is told to report an outage after one second
        watch_transport = KafkaTransport.from_url(_url(msgkit_kafka_url, connect_timeout=1, commit_interval=0.05))
        await watch_transport.connect()
        watch = await watch_transport.subscribe(topic, "watch", prefetch=500)
        watched: set[str] = set()
        outage: list[BaseException] = []
        restarting = True

        async def watch_loop() -> None:
            while restarting or not set(old) <= watched:
                try:
                    batch = await watch.fetch(500, 0.2)
                except msgkit.BrokerUnavailableError as exc:
                    outage.append(exc)
                    await asyncio.sleep(0.2)
                    continue
                watched.update(d.id for d in batch)
                await watch.settle([(d, msgkit.ACK) for d in batch])

        watcher = asyncio.create_task(watch_loop())
        process = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode(errors="replace")
        restarting = False
        try:
            await asyncio.wait_for(watcher, WAIT)
        finally:
            await watch_transport.close()
        assert outage, "an outage longer than connect_timeout was not reported by fetch"
        assert "unreachable" in str(outage[0])

        new: list[str] = []
        deadline = time.monotonic() + 90
        while len(new) < 300:  # the producer recovers; a send that fails is sent again
            try:
                new += await broker.send_batch(topic, [Message(f"new {i}".encode()) for i in range(len(new), 300)])
            except msgkit.MsgkitError:
                assert time.monotonic() < deadline, "the producer did not recover"
                await asyncio.sleep(0.5)
        await eventually(lambda: set(new) <= set(before), what="messages sent after the restart")
        # the group coordinator reloads after a restart and takes commits once it is back: wait for
        # them, so that what comes back below can only be a lost commit, not a late one
        kafka = broker.transport
        assert isinstance(kafka, KafkaTransport)
        deadline = time.monotonic() + WAIT
        while sum([(await _committed(kafka, topic, group, p))[0] for p in (0, 1)]) < 600:
            assert time.monotonic() < deadline, "the finished messages were never committed"
            await asyncio.sleep(0.1)
        for running in broker.consumers:
            await running.stop()

        after: Counter[str] = Counter()

        async def late(delivery: Delivery) -> None:
            after[delivery.id] += 1

        sentinel = await broker.send(topic, b"sentinel")
        await broker.consumer(topic, group, late).start()
        await eventually(lambda: sentinel in after)
        assert set(after) == {sentinel}, f"{len(after) - 1} finished messages came back after the restart"


# ---------------------------------------------------------------------------------- URLs and security


def test_urls_name_brokers_options_and_credentials() -> None:
    t = KafkaTransport.from_url("kafka://alice:s%40cret@h1,h2:9093,[::1]:9094?partitions=6&retry=inline")
    assert t.bootstrap == ["h1:9092", "h2:9093", "[::1]:9094"]
    assert (t.settings.partitions, t.settings.retry, t.settings.username) == (6, "inline", "alice")
    assert t.settings.password is not None
    assert t.settings.password.get_secret_value() == "s@cret"
    options = t._client_options()
    assert (options["security_protocol"], options["sasl_mechanism"]) == ("SASL_PLAINTEXT", "PLAIN")
    assert "s@cret" not in repr(t)
    assert "s%40cret" not in repr(t)
    assert "s@cret" not in repr(t.settings)

    scram = KafkaTransport.from_url("kafka://bob:pw@h?sasl_mechanism=SCRAM-SHA-512&tls=true&tls_verify=false")
    options = scram._client_options()
    assert (options["security_protocol"], options["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert options["ssl_context"].check_hostname is False

    tls = KafkaTransport.from_url("kafka://h:9093?tls=true")
    assert tls._client_options()["security_protocol"] == "SSL"
    assert tls._client_options()["ssl_context"].check_hostname is True

    from_settings = KafkaTransport.from_url(
        "kafka://carol:pw@h", KafkaSettings(partitions=2, sasl_mechanism="SCRAM-SHA-256")
    )
    assert from_settings._client_options()["sasl_mechanism"] == "SCRAM-SHA-256"
    assert from_settings.settings.partitions == 2


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("kafka://", "names no broker"),
        ("kafka://h:99999", "bad port"),
        ("kafka://h:x", "bad port"),
        ("kafka://h/path", "no path"),
        ("kafka://h?nope=1", "unknown option"),
        ("kafka://h?partitions=0", "invalid option"),
        ("kafka://h?retry=sometimes", "invalid option"),
        ("kafka://u@h", "needs both"),
        ("kafka://u:p@h?username=v", "not both"),
        ("kafka://h?sasl_mechanism=PLAIN", "needs a user name"),
        ("kafka://h?tls_ca_file=/x.pem", "need tls=true"),
        ("kafka://h?tls_cert_file=/c.pem&tls=true", "go together"),
        ("kafka://h?heartbeat_interval=20&session_timeout=10", "shorter than session_timeout"),
        ("amqp://h", "kafka:// URLs"),
    ],
)
def test_bad_urls_are_clear_configuration_errors(url: str, complaint: str) -> None:
    with pytest.raises(msgkit.ConfigurationError, match=complaint):
        KafkaTransport.from_url(url)


def test_secrets_never_show_in_errors() -> None:
    with pytest.raises(msgkit.ConfigurationError) as caught:
        KafkaTransport.from_url("kafka://u:topsecret@h?tls_key_password=alsosecret&bogus=1")
    assert "topsecret" not in str(caught.value)
    assert "alsosecret" not in str(caught.value)
    with pytest.raises(msgkit.ConfigurationError) as caught:
        KafkaTransport.from_url("kafka://u:topsecret@h?tls=true&tls_ca_file=/nonexistent/ca.pem")._client_options()
    assert "topsecret" not in str(caught.value)


@pytest.mark.asyncio
async def test_settings_the_broker_refuses_are_configuration_errors(msgkit_kafka_url: str, topics: Topics) -> None:
    topic, group = topics.new()
    # the broker's group.min.session.timeout.ms is 6 s by default
    transport = KafkaTransport.from_url(_url(msgkit_kafka_url, session_timeout=2, heartbeat_interval=0.5))
    await transport.connect()
    try:
        with pytest.raises(msgkit.ConfigurationError, match="InvalidSessionTimeout"):
            await transport.subscribe(topic, group, prefetch=10)
    finally:
        await transport.close()


@pytest.mark.asyncio
async def test_an_unreachable_broker_is_broker_unavailable_within_the_connect_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = KafkaTransport.from_url("kafka://user:hunter2@127.0.0.1:1?connect_timeout=1.5")
    started = time.monotonic()
    with pytest.raises(msgkit.BrokerUnavailableError) as caught:
        await transport.connect()
    assert time.monotonic() - started < 10
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in caplog.text
    await transport.close()


@pytest.mark.asyncio
async def test_sasl_against_a_plaintext_listener_fails_without_showing_the_password(
    msgkit_kafka_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    transport = KafkaTransport.from_url(
        msgkit_kafka_url.replace("kafka://", "kafka://user:hunter2@") + "?connect_timeout=2"
    )
    with pytest.raises((msgkit.BrokerUnavailableError, msgkit.ConfigurationError)) as caught:
        await transport.connect()
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in caplog.text
    await transport.close()


def test_capabilities_are_declared_from_the_settings() -> None:
    caps = KafkaTransport.from_url("kafka://h?max_message_size=500000&session_timeout=6&revoke_timeout=2").capabilities
    assert (caps.fan_out, caps.replay_for_new_group, caps.ordered, caps.persistent) == (True, True, True, True)
    assert caps.native_delay is False
    assert caps.max_message_size == 500_000
    assert caps.consumer_loss_redelivery == 6 + 1 + 2


@pytest.mark.asyncio
async def test_lag_comes_from_the_fetch_responses_high_watermarks(transport: KafkaTransport, topics: Topics) -> None:
    topic, group = topics.new()
    await transport.declare(topic, group)
    await transport.publish(topic, [Message(b"m%d" % i) for i in range(300)])
    subscription = await transport.subscribe(topic, group, prefetch=10)
    try:
        assert subscription.lag() is None  # nothing fetched: unknown, not zero
        first = await _fetch(subscription, 10)
        lag = subscription.lag()
        # fetched records include what the subscription buffered beyond the 10 handed out
        assert lag is not None
        assert 0 < lag <= 290
        await subscription.settle([(d, msgkit.ACK) for d in first])
        rest = await _fetch(subscription, 290)
        await subscription.settle([(d, msgkit.ACK) for d in rest])
        assert len(first) + len(rest) == 300
        assert subscription.lag() == 0
    finally:
        await subscription.close()

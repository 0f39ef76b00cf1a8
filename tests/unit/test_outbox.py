"""The transactional outbox on SQLite and memory://: add in a transaction, relay, order, failures,
cleanup, the single-relay lock, the CLI, and that `import msgkit` stays free of SQLAlchemy."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import ValidationError
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import msgkit
from msgkit.cli import main
from msgkit.outbox import Outbox, OutboxRelay, RelaySettings, create_schema, engine_from_url, schema_sql
from msgkit.outbox.schema import outbox_table, relay_lock_table
from msgkit.transports.memory import MemoryTransport

from .conftest import eventually
from .test_outbox_kill import REPO


@pytest_asyncio.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = engine_from_url(f"sqlite:///{tmp_path / 'service.db'}")
    await create_schema(engine)
    yield engine
    await engine.dispose()


async def _collect(broker: msgkit.Broker, topic: str, into: list[msgkit.Delivery]) -> msgkit.Consumer:
    async def handle(delivery: msgkit.Delivery) -> None:
        into.append(delivery)

    await broker.declare(topic, "g")
    consumer = broker.consumer(topic, "g", handle)
    await consumer.start()
    return consumer


async def _add(engine: AsyncEngine, items: Sequence[tuple[str, str | None, object]]) -> list[str]:
    """Add (topic, key, body) items in one transaction; return their ids."""
    outbox = Outbox()
    async with async_sessionmaker(engine)() as session, session.begin():
        return [await outbox.add(session, topic, body, key=key) for topic, key, body in items]


@pytest.mark.asyncio
async def test_committed_messages_are_published_as_added_and_rolled_back_ones_never(
    engine: AsyncEngine, broker: msgkit.Broker
) -> None:
    sessions = async_sessionmaker(engine)
    outbox = Outbox()
    got: list[msgkit.Delivery] = []
    consumer = await _collect(broker, "orders", got)
    async with sessions() as session, session.begin():
        await session.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))
    before = time.time()
    async with sessions() as session, session.begin():
        await session.execute(text("INSERT INTO orders (id) VALUES (1)"))
        kept = await outbox.add(
            session, "orders", {"id": 1}, key="order-1", headers={"traceparent": "00-4bf92f-00f067-01"}
        )

    async def failing_transaction() -> None:
        async with sessions() as session, session.begin():
            await session.execute(text("INSERT INTO orders (id) VALUES (2)"))
            await outbox.add(session, "orders", {"id": 2}, key="order-2")
            raise RuntimeError("the business transaction fails")

    with pytest.raises(RuntimeError):
        await failing_transaction()
    relay = OutboxRelay(engine, broker, poll_interval=0.05)
    assert await relay.pending() == 1
    await relay.start()
    await eventually(lambda: len(got) == 1, what="the committed message")
    await relay.stop()
    await consumer.stop()
    (delivery,) = got
    assert delivery.id == kept
    assert delivery.body == b'{"id":1}'
    assert delivery.key == "order-1"
    assert delivery.headers == {"traceparent": "00-4bf92f-00f067-01"}
    assert before <= delivery.message.timestamp <= time.time()  # when it was added, not relayed
    assert await relay.pending() == 0
    async with sessions() as session:
        assert (await session.execute(text("SELECT id FROM orders"))).scalars().all() == [1]


@pytest.mark.asyncio
async def test_add_checks_its_arguments_and_keeps_a_given_id(engine: AsyncEngine) -> None:
    outbox = Outbox()
    async with async_sessionmaker(engine)() as session, session.begin():
        with pytest.raises(ValueError, match="invalid topic name"):
            await outbox.add(session, "no spaces", b"x")
        with pytest.raises(TypeError, match="headers must map str to str"):
            await outbox.add(session, "t", b"x", headers={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="key must be a string"):
            await outbox.add(session, "t", b"x", key=7)  # type: ignore[arg-type]
        assert await outbox.add(session, "t", b"\x00raw", message_id="my-id") == "my-id"
        conn = await session.connection()
        row = (await conn.execute(select(outbox_table))).one()
    assert (row.message_id, row.topic, row.body, row.headers, row.sent_at) == ("my-id", "t", b"\x00raw", {}, None)


@pytest.mark.asyncio
async def test_each_key_keeps_its_order_over_many_batches_and_topics(
    engine: AsyncEngine, broker: msgkit.Broker
) -> None:
    topics, keys = ("a", "b", "c"), ("k0", "k1", "k2", "k3", "k4")
    got: dict[str, list[msgkit.Delivery]] = {t: [] for t in topics}
    consumers = [await _collect(broker, t, got[t]) for t in topics]
    items = [(topics[n % 3], keys[n % 5], {"n": n}) for n in range(400)]
    for start in range(0, 400, 50):
        await _add(engine, items[start : start + 50])
    async with OutboxRelay(engine, broker, batch_size=7, poll_interval=0.05) as relay:
        await eventually(lambda: sum(len(d) for d in got.values()) == 400, what="every message")
    assert relay.published == 400
    for c in consumers:
        await c.stop()
    for topic in topics:
        ids = [d.id for d in got[topic]]
        assert len(ids) == len(set(ids))  # no duplicates in the normal case
        for key in keys:
            ns = [int(d.body.decode().split(":")[1].rstrip("}")) for d in got[topic] if d.key == key]
            assert ns == sorted(ns)
            assert ns == [n for t, k, body in items if t == topic and k == key for n in [body["n"]]]  # type: ignore[index]


@pytest.mark.asyncio
async def test_a_commit_wakes_an_in_process_relay_without_waiting_for_the_poll(
    engine: AsyncEngine, broker: msgkit.Broker
) -> None:
    got: list[msgkit.Delivery] = []
    consumer = await _collect(broker, "t", got)
    async with OutboxRelay(engine, broker, poll_interval=60):
        await asyncio.sleep(0.2)  # the relay has looked and is asleep for a minute
        started = time.monotonic()
        await _add(engine, [("t", None, b"wake up")])
        await eventually(lambda: len(got) == 1, timeout=2, what="the message")
    assert time.monotonic() - started < 1.0
    await consumer.stop()


class FlakyTransport(MemoryTransport):
    """memory:// whose publishes to ``failing_topic`` fail ``failures`` times, then work.

    With ``partial`` a failing publish stores the first half and raises PublishError for the rest.
    """

    def __init__(self, name: str, failing_topic: str, failures: int, partial: bool = False) -> None:
        super().__init__(name)
        self.failing_topic, self.failures, self.partial = failing_topic, failures, partial
        self.calls: list[tuple[str, int]] = []

    async def publish(self, topic: str, messages: Sequence[msgkit.Message]) -> None:
        self.calls.append((topic, len(messages)))
        if topic == self.failing_topic and self.failures > 0:
            self.failures -= 1
            if not self.partial:
                raise msgkit.BrokerUnavailableError("broker down")
            half = len(messages) // 2
            await super().publish(topic, messages[:half])
            raise msgkit.PublishError("rejected", [(m.id, "rejected") for m in messages[half:]])
        await super().publish(topic, messages)


@pytest.mark.asyncio
@pytest.mark.parametrize("partial", [False, True], ids=["down", "partial"])
async def test_publish_failures_stop_the_batch_and_are_retried_with_backoff_losing_nothing(
    engine: AsyncEngine, memory_url: str, partial: bool
) -> None:
    name = memory_url.split("://")[1].split("?")[0]
    transport = FlakyTransport(name, "b", failures=3, partial=partial)
    async with msgkit.Broker(transport=transport) as broker:
        got: dict[str, list[msgkit.Delivery]] = {"a": [], "b": []}
        consumers = [await _collect(broker, t, got[t]) for t in got]
        items = [("a" if n % 3 else "b", f"k{n % 4}", {"n": n}) for n in range(60)]
        await _add(engine, items)
        started = time.monotonic()
        async with OutboxRelay(engine, broker, batch_size=20, poll_interval=0.05) as relay:
            await eventually(lambda: len(got["a"]) + len(got["b"]) == 60, what="every message")
        elapsed = time.monotonic() - started
        for c in consumers:
            await c.stop()
    assert relay.published == 60
    for topic, deliveries in got.items():
        ids = [d.id for d in deliveries]
        assert len(ids) == len(set(ids)), "a stored message was published again"
        expected = [body for t, _, body in items if t == topic]
        assert len(deliveries) == len(expected)
        if not partial:  # a partial failure stores later messages before earlier ones: the broker's order
            assert [d.body for d in deliveries] == [msgkit.Message.of(b).body for b in expected]
    assert elapsed >= 0.1 + 0.2 * 0.8  # backed off after the failures (0.1 s, 0.2 s, ...)
    if not partial:  # the batch starts with a "b" row: its failure stopped the batch, "a" waited
        assert [topic for topic, _ in transport.calls[:5]] == ["b", "b", "b", "b", "a"]


@pytest.mark.asyncio
async def test_sent_rows_are_kept_for_the_retention_then_deleted(engine: AsyncEngine, broker: msgkit.Broker) -> None:
    await _add(engine, [("t", None, b"1"), ("t", None, b"2")])
    relay = OutboxRelay(engine, broker, retention=0.2)
    assert await relay.relay_once() == 2
    async with engine.connect() as conn:
        sent = (await conn.execute(select(outbox_table.c.sent_at))).scalars().all()
    assert len(sent) == 2
    assert all(s is not None for s in sent)
    assert await relay.cleanup() == 0
    await asyncio.sleep(0.25)
    assert await relay.cleanup() == 2
    await relay.close()  # drops the SQLite publishing lock
    await _add(engine, [("t", None, b"3")])
    assert await OutboxRelay(engine, broker, retention=0).relay_once() == 1
    async with engine.connect() as conn:
        assert (await conn.execute(select(outbox_table.c.seq))).all() == []  # deleted as sent


@pytest.mark.asyncio
async def test_a_second_sqlite_relay_stands_by_until_the_first_stops(
    engine: AsyncEngine, broker: msgkit.Broker
) -> None:
    got: list[msgkit.Delivery] = []
    consumer = await _collect(broker, "t", got)
    first = OutboxRelay(engine, broker, poll_interval=0.05)
    second = OutboxRelay(engine, broker, poll_interval=0.05)
    await first.start()
    await eventually(lambda: first.holds_lock, what="the first relay's lock")
    await second.start()
    await _add(engine, [("t", "k", {"n": n}) for n in range(30)])
    await eventually(lambda: len(got) == 30 and first.published == 30, what="the first batch")
    assert (first.published, second.published, second.holds_lock) == (30, 0, False)
    await first.stop()  # drops the lock: the second takes over at its next look
    await _add(engine, [("t", "k", {"n": n}) for n in range(30, 40)])
    await eventually(lambda: len(got) == 40 and second.published == 10, what="the second batch")
    assert (first.published, second.published, second.holds_lock) == (30, 10, True)
    await second.stop()
    await consumer.stop()
    assert [d.body for d in got] == [msgkit.Message.of({"n": n}).body for n in range(40)]


@pytest.mark.asyncio
async def test_a_dead_relays_lock_is_taken_over_when_its_lease_ends(engine: AsyncEngine, broker: msgkit.Broker) -> None:
    async with engine.begin() as conn:
        lock = {"name": "relay", "holder": "a-relay-that-died", "expires_at": time.time() + 0.3}
        await conn.execute(insert(relay_lock_table).values(**lock))
    await _add(engine, [("t", None, b"x")])
    relay = OutboxRelay(engine, broker)
    assert await relay.relay_once() == 0
    assert not relay.holds_lock
    await asyncio.sleep(0.35)
    assert await relay.relay_once() == 1
    assert relay.holds_lock


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="lock_lease"):
        RelaySettings(publish_timeout=30, lock_lease=10)
    with pytest.raises(ValidationError, match="batch_size"):
        RelaySettings(batch_size=0)
    with pytest.raises(TypeError, match="not both"):
        OutboxRelay("sqlite:///x.db", "memory://", RelaySettings(), batch_size=3)


@pytest.mark.asyncio
async def test_create_schema_is_idempotent(engine: AsyncEngine) -> None:
    await create_schema(engine)
    await _add(engine, [("t", None, b"kept")])
    await create_schema(engine)
    assert await OutboxRelay(engine, "memory://").pending() == 1


def test_cli_create_schema_creates_the_tables_and_prints_the_ddl(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'cli.db'}"
    out, err = io.StringIO(), io.StringIO()
    assert main(["outbox", "create-schema", db_url], out, err) == 0, err.getvalue()
    assert main(["outbox", "create-schema", db_url], out, err) == 0, err.getvalue()
    import sqlite3

    with sqlite3.connect(tmp_path / "cli.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"msgkit_outbox", "msgkit_outbox_lock", "msgkit_inbox", "msgkit_dedup"} <= tables
    out = io.StringIO()
    assert main(["outbox", "create-schema", "postgresql://u:p@nowhere.invalid/db", "--print"], out, err) == 0
    assert "BIGSERIAL" in out.getvalue()
    assert "CREATE TRIGGER msgkit_outbox_notify" in out.getvalue()
    out = io.StringIO()
    assert main(["outbox", "create-schema", "sqlite:///any.db", "--print"], out, err) == 0
    assert "AUTOINCREMENT" in out.getvalue()
    assert not Path("any.db").exists()
    err = io.StringIO()
    assert main(["outbox", "create-schema", "mysql://u:p@h/db", "--print"], io.StringIO(), err) == 2
    assert "not 'mysql'" in err.getvalue()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_cli_relay_publishes_and_stops_on_sigterm(engine: AsyncEngine, tmp_path: Path) -> None:
    await _add(engine, [("t", None, b"x")] * 5)
    db_url = f"sqlite:///{tmp_path / 'service.db'}"
    child = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "msgkit.cli", "outbox", "relay", db_url, "memory://", "--poll-interval", "0.05"),
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    relay = OutboxRelay(engine, "memory://")
    try:
        deadline = time.monotonic() + 30
        while await relay.pending():
            assert time.monotonic() < deadline, "the CLI relay published nothing"
            await asyncio.sleep(0.05)
    finally:
        child.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(child.communicate(), 20)
    assert child.returncode == 0, stderr.decode()
    assert "stopped after publishing 5 messages" in stderr.decode()
    async with engine.connect() as conn:
        assert (await conn.execute(select(relay_lock_table))).all() == []  # a graceful stop drops the lock


def test_importing_msgkit_and_its_dedup_layer_does_not_import_sqlalchemy_or_redis() -> None:
    code = (
        "import sys, msgkit, msgkit.stores, msgkit.middleware.idempotency, msgkit.testing.stores;"
        "bad = [m for m in ('sqlalchemy', 'redis', 'asyncpg', 'aiosqlite') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def test_the_documented_ddl_is_the_ddl_msgkit_runs() -> None:
    docs = (REPO / "docs" / "idempotency.md").read_text()

    def squash(sql: str) -> str:
        return re.sub(r"\s+", " ", sql).strip()

    for dialect in ("postgresql", "sqlite"):
        for statement in schema_sql(dialect):
            assert squash(statement) in squash(docs), f"docs/idempotency.md lacks ({dialect}): {statement}"

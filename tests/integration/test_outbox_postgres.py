"""Outbox, relay and inbox on PostgreSQL (needs a server: $MSGKIT_POSTGRES_URL or Docker).

Each test works in a schema of its own (search_path), so runs never see each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import msgkit
from msgkit.outbox import Inbox, Outbox, OutboxRelay, create_schema, engine_from_url
from msgkit.outbox.schema import ADVISORY_LOCK_SPACE
from msgkit.transports.memory import MemoryTransport
from tests.unit.test_outbox_kill import (
    add_rows,
    check_published,
    finish_with_a_second_relay,
    kill_at_hang,
    start_child,
)

TIMEOUT = 60


def schema_engine(url: str, schema: str) -> AsyncEngine:
    """An engine whose connections work in ``schema``."""
    return engine_from_url(url, connect_args={"server_settings": {"search_path": schema}})


@contextlib.asynccontextmanager
async def postgres_schema(url: str) -> AsyncIterator[str]:
    """A fresh schema, dropped with everything in it afterwards."""
    schema = f"msgkit_test_{uuid.uuid4().hex[:12]}"
    admin = engine_from_url(url)
    try:
        async with admin.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield schema
    finally:
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()


@contextlib.asynccontextmanager
async def postgres_engine(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine in a fresh schema."""
    async with postgres_schema(url) as schema:
        engine = schema_engine(url, schema)
        try:
            yield engine
        finally:
            await engine.dispose()


class SlowMemory(MemoryTransport):
    """memory:// whose publishes take a random little while, so concurrent relays overlap and
    finish in any order: only the relays' locking can keep a key's messages in order."""

    async def publish(self, topic: str, messages: Sequence[msgkit.Message]) -> None:
        await asyncio.sleep(random.uniform(0, 0.01))
        await super().publish(topic, messages)


async def _collect(broker: msgkit.Broker, topic: str, into: list[msgkit.Delivery]) -> msgkit.Consumer:
    async def handle(delivery: msgkit.Delivery) -> None:
        into.append(delivery)

    await broker.declare(topic, "g")
    consumer = broker.consumer(topic, "g", handle, max_in_flight=1000)
    await consumer.start()
    return consumer


async def _eventually(predicate: object, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_notify_wakes_the_relay_for_rows_committed_by_another_process(msgkit_postgres_url: str) -> None:
    import asyncpg

    async with postgres_schema(msgkit_postgres_url) as schema:
        engine = schema_engine(msgkit_postgres_url, schema)
        await create_schema(engine)
        async with msgkit.Broker(f"memory://pg-{uuid.uuid4().hex}") as broker:
            got: list[msgkit.Delivery] = []
            consumer = await _collect(broker, "t", got)
            async with OutboxRelay(engine, broker, poll_interval=60):
                await asyncio.sleep(0.3)  # listening, and asleep for a minute
                # a raw connection: no in-process wake-up, only the trigger's NOTIFY at commit
                raw = await asyncpg.connect(msgkit_postgres_url, server_settings={"search_path": schema})
                try:
                    started = time.monotonic()
                    await raw.execute(
                        "INSERT INTO msgkit_outbox (message_id, topic, key, headers, body, created_at) "
                        """VALUES ('m1', 't', 'k', '{"traceparent": "00-ab-cd-01"}', 'hi', 1.0)"""
                    )
                    await _eventually(lambda: len(got) == 1, "the message", timeout=5)
                    latency = time.monotonic() - started
                finally:
                    await raw.close()
            await consumer.stop()
        await engine.dispose()
    assert latency < 1.0
    assert (got[0].id, got[0].key, got[0].body, got[0].headers) == ("m1", "k", b"hi", {"traceparent": "00-ab-cd-01"})


@pytest.mark.asyncio
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("keys", "relays"), [(12, 2), (1, 3)], ids=["12-keys-2-relays", "1-hot-key-3-relays"])
async def test_concurrent_relays_share_the_work_without_duplicates_and_keep_key_order(
    msgkit_postgres_url: str, keys: int, relays: int
) -> None:
    count = 600
    async with postgres_schema(msgkit_postgres_url) as schema:
        engines = [schema_engine(msgkit_postgres_url, schema) for _ in range(relays + 1)]  # connections apart
        try:
            await create_schema(engines[0])
            name = f"pg-{uuid.uuid4().hex}"
            async with msgkit.Broker(transport=SlowMemory(name)) as broker:
                got: list[msgkit.Delivery] = []
                consumer = await _collect(broker, "orders", got)
                outbox = Outbox()
                expected: dict[str | None, list[int]] = {}
                running = [OutboxRelay(e, broker, batch_size=5, poll_interval=0.02, retention=0) for e in engines[1:]]
                for relay in running:
                    await relay.start()
                for start in range(0, count, 20):  # added while the relays run
                    async with async_sessionmaker(engines[0])() as session, session.begin():
                        for n in range(start, start + 20):
                            key = None if n % 10 == 9 else f"k{n % keys}"
                            expected.setdefault(key, []).append(n)
                            await outbox.add(session, "orders", str(n).encode(), key=key)
                await _eventually(lambda: len(got) >= count, "every message")
                await asyncio.sleep(0.2)
                for relay in running:
                    await relay.stop()
                await consumer.stop()
        finally:
            for e in engines:
                await e.dispose()
    ids = [d.id for d in got]
    assert len(ids) == len(set(ids)) == count, "a message was published twice or lost"
    for key, ns in expected.items():
        if key is not None:
            assert [int(d.body) for d in got if d.key == key] == ns, f"key {key} out of order"
    assert sum(r.published for r in running) == count
    if keys > 1:
        assert all(r.published > 0 for r in running), [r.published for r in running]


class LockCounting(MemoryTransport):
    """memory:// that counts, at each publish, the msgkit advisory locks held in the database."""

    def __init__(self, name: str, url: str) -> None:
        super().__init__(name)
        self.url = url
        self.counts: list[int] = []

    async def publish(self, topic: str, messages: Sequence[msgkit.Message]) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid",
                ADVISORY_LOCK_SPACE,
            )
        finally:
            await conn.close()
        self.counts.append(count)
        await super().publish(topic, messages)


@pytest.mark.asyncio
async def test_a_batch_locks_a_bounded_number_of_keys_even_on_a_fresh_table(msgkit_postgres_url: str) -> None:
    """With no statistics PostgreSQL may sort the whole backlog: the locks must not follow it."""
    async with postgres_engine(msgkit_postgres_url) as engine:
        await create_schema(engine)
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO msgkit_outbox (message_id, topic, key, headers, body, created_at) "
                    "SELECT g::text, 't', 'key-' || g, '{}', 'x', 1 FROM generate_series(1, 3000) g"
                )
            )
        transport = LockCounting(f"pg-{uuid.uuid4().hex}", msgkit_postgres_url)
        async with msgkit.Broker(transport=transport) as broker:
            relay = OutboxRelay(engine, broker, batch_size=10)
            assert await relay.relay_once() == 10
    assert 10 <= transport.counts[0] <= 40


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_postgres_relay_killed_mid_batch_loses_nothing_and_keeps_key_order(
    msgkit_postgres_url: str, tmp_path: Path
) -> None:
    jsonl = tmp_path / "published.jsonl"
    async with postgres_schema(msgkit_postgres_url) as schema:
        engine = schema_engine(msgkit_postgres_url, schema)
        try:
            await create_schema(engine)
            ids = await add_rows(engine, 60)
            child = await start_child(msgkit_postgres_url, jsonl, schema)
            await kill_at_hang(child, jsonl)
            started = time.monotonic()
            relay = await finish_with_a_second_relay(engine, jsonl)  # the dead transaction's locks are gone
            assert time.monotonic() - started < 10
            assert relay.published == 50
            check_published(jsonl, ids, child.pid)
        finally:
            await engine.dispose()


@pytest.mark.asyncio
async def test_create_schema_from_several_processes_at_once(msgkit_postgres_url: str) -> None:
    async with postgres_schema(msgkit_postgres_url) as schema:
        engines = [schema_engine(msgkit_postgres_url, schema) for _ in range(4)]
        try:
            await asyncio.gather(*(create_schema(e) for e in engines))
            await create_schema(engines[0])
        finally:
            for e in engines:
                await e.dispose()


@pytest.mark.asyncio
async def test_inbox_on_postgres_rolls_back_a_failed_handler_and_runs_concurrent_copies_once(
    msgkit_postgres_url: str,
) -> None:
    async with postgres_engine(msgkit_postgres_url) as engine:
        await create_schema(engine)
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE ledger (payment_id TEXT)"))
        inbox = Inbox(engine)
        attempts: list[tuple[str, int]] = []
        running: dict[str, int] = {}
        overlap = False

        async def book(delivery: msgkit.Delivery) -> None:
            nonlocal overlap
            attempts.append((delivery.id, delivery.attempt))
            running[delivery.id] = running.get(delivery.id, 0) + 1
            overlap |= running[delivery.id] > 1
            try:
                await inbox.session().execute(text("INSERT INTO ledger VALUES (:id)"), {"id": delivery.id})
                await asyncio.sleep(0.2)
                if delivery.body == b"fail-once" and delivery.attempt == 1:
                    raise ConnectionError("after the write")
            finally:
                running[delivery.id] -= 1

        async with msgkit.Broker(f"memory://pg-{uuid.uuid4().hex}") as broker:
            await broker.declare("payments", "ledger")
            await broker.send("payments", b"fail-once", message_id="a")
            consumer = broker.consumer(
                "payments", "ledger", book, middleware=[inbox], retry=msgkit.RetryPolicy(initial_delay=0.01)
            )
            await consumer.start()
            await _eventually(lambda: attempts == [("a", 1), ("a", 2)], "a failure and a redelivery")
            for _ in range(3):
                await broker.send("payments", b"dup", message_id="b")
            await _eventually(lambda: ("b", 1) in attempts, "the duplicate")
            await asyncio.sleep(0.5)
            await _eventually(lambda: consumer.in_flight == 0, "everything settled")
            await consumer.stop()
        async with engine.connect() as conn:
            ledger = sorted((await conn.execute(text("SELECT payment_id FROM ledger"))).scalars().all())
            inbox_rows = (await conn.execute(text("SELECT count(*) FROM msgkit_inbox"))).scalar()
    assert ledger == ["a", "b"]
    assert inbox_rows == 2
    assert [a for a in attempts if a[0] == "b"] == [("b", 1)]
    assert not overlap  # the copies of "b" waited on the inbox row, outside the handler

"""The inbox on SQLite: effect and "processed" row commit together or not at all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import msgkit
from msgkit.consumer import StateError
from msgkit.outbox import Inbox, Outbox, create_schema, engine_from_url
from msgkit.outbox.schema import inbox_table, outbox_table

from .conftest import eventually


class Payment(BaseModel):
    id: int
    amount: int


@pytest_asyncio.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = engine_from_url(f"sqlite:///{tmp_path / 'consumer.db'}")
    await create_schema(engine)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE ledger (payment_id INTEGER, amount INTEGER)"))
    yield engine
    await engine.dispose()


async def _rows(engine: AsyncEngine, sql: str) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in (await conn.execute(text(sql))).all()]


async def _settled(consumer: msgkit.Consumer) -> None:
    await eventually(lambda: consumer.in_flight == 0, what="everything settled")


@pytest.mark.asyncio
async def test_a_handler_that_fails_after_its_write_leaves_no_effect_and_runs_again(
    engine: AsyncEngine, broker: msgkit.Broker
) -> None:
    inbox = Inbox(engine)
    attempts: list[int] = []
    effects_seen_after_failure: list[list[tuple[object, ...]]] = []

    async def book(payment: Payment, delivery: msgkit.Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 2:  # what the failed first attempt left behind, seen from outside
            effects_seen_after_failure.append(await _rows(engine, "SELECT * FROM ledger"))
            effects_seen_after_failure.append(await _rows(engine, "SELECT * FROM msgkit_inbox"))
        await inbox.session().execute(
            text("INSERT INTO ledger VALUES (:id, :amount)"), {"id": payment.id, "amount": payment.amount}
        )
        if delivery.attempt == 1:
            raise ConnectionError("the downstream call after the write failed")

    await broker.declare("payments", "ledger")
    message_id = await broker.send("payments", Payment(id=7, amount=100))
    policy = msgkit.RetryPolicy(initial_delay=0.01, jitter=0)
    consumer = broker.consumer("payments", "ledger", book, middleware=[inbox], retry=policy)
    await consumer.start()
    await eventually(lambda: attempts == [1, 2], what="a failure and a redelivery")
    await _settled(consumer)
    await consumer.stop()
    assert effects_seen_after_failure == [[], []]  # neither the effect nor the inbox row survived
    assert await _rows(engine, "SELECT * FROM ledger") == [(7, 100)]
    assert await _rows(engine, "SELECT group_name, message_id FROM msgkit_inbox") == [("ledger", message_id)]


@pytest.mark.asyncio
async def test_a_duplicate_is_acked_without_running_and_each_group_runs_once(
    engine: AsyncEngine, broker: msgkit.Broker
) -> None:
    inbox = Inbox(engine)
    calls: list[str] = []

    def handler(group: str) -> Callable[[Payment], Awaitable[None]]:
        async def book(payment: Payment) -> None:
            calls.append(group)
            await inbox.session().execute(text("INSERT INTO ledger VALUES (:id, 1)"), {"id": payment.id})

        return book

    for group in ("ledger", "audit"):
        await broker.declare("payments", group)
    await broker.send("payments", Payment(id=1, amount=1), message_id="dup")
    await broker.send("payments", Payment(id=1, amount=1), message_id="dup")  # e.g. a producer retry
    await broker.send("payments", Payment(id=2, amount=1), message_id="other")
    consumers = [broker.consumer("payments", g, handler(g), middleware=[inbox]) for g in ("ledger", "audit")]
    for c in consumers:
        await c.start()
    await eventually(lambda: len(calls) == 4, what="two messages in two groups")
    await asyncio.sleep(0.1)
    for c in consumers:
        await _settled(c)
        await c.stop()
    assert sorted(calls) == ["audit", "audit", "ledger", "ledger"]
    assert sorted(await _rows(engine, "SELECT * FROM ledger")) == [(1, 1), (1, 1), (2, 1), (2, 1)]


@pytest.mark.asyncio
async def test_retry_and_dead_letter_outcomes_roll_back(engine: AsyncEngine, broker: msgkit.Broker) -> None:
    inbox = Inbox(engine)
    calls: list[int] = []

    async def book(payment: Payment, delivery: msgkit.Delivery) -> msgkit.Outcome | None:
        calls.append(delivery.attempt)
        await inbox.session().execute(text("INSERT INTO ledger VALUES (:id, 0)"), {"id": payment.id})
        if delivery.attempt == 1:
            return msgkit.Retry(0.01)
        if delivery.attempt == 2:
            return msgkit.DeadLetter("no")
        return None

    await broker.declare("payments", "ledger")
    await broker.send("payments", Payment(id=1, amount=1))
    consumer = broker.consumer("payments", "ledger", book, middleware=[inbox])
    await consumer.start()
    await eventually(lambda: calls == [1, 2], what="two attempts")
    await _settled(consumer)
    await consumer.stop()
    assert await _rows(engine, "SELECT * FROM ledger") == []
    assert await _rows(engine, "SELECT * FROM msgkit_inbox") == []


@pytest.mark.asyncio
async def test_concurrent_duplicates_run_once(engine: AsyncEngine, broker: msgkit.Broker) -> None:
    """The second copy waits on the first's transaction, then finds the row and acks."""
    inbox = Inbox(engine)
    running = 0
    overlap = False
    calls = 0

    async def book(payment: Payment) -> None:
        nonlocal running, overlap, calls
        calls += 1
        running += 1
        overlap |= running > 1
        await inbox.session().execute(text("INSERT INTO ledger VALUES (:id, 0)"), {"id": payment.id})
        await asyncio.sleep(0.2)
        running -= 1

    await broker.declare("payments", "ledger")
    for _ in range(3):
        await broker.send("payments", Payment(id=1, amount=1), message_id="same")
    consumer = broker.consumer("payments", "ledger", book, middleware=[inbox], max_in_flight=3)
    await consumer.start()
    await eventually(lambda: calls >= 1, what="the first run")
    await asyncio.sleep(0.5)
    await _settled(consumer)
    await consumer.stop()
    assert (calls, overlap) == (1, False)
    assert await _rows(engine, "SELECT * FROM ledger") == [(1, 0)]


@pytest.mark.asyncio
async def test_the_consumer_outbox_commits_with_the_effect(engine: AsyncEngine, broker: msgkit.Broker) -> None:
    """Messages a handler adds to the outbox through the inbox's session share its fate."""
    inbox, outbox = Inbox(engine), Outbox()
    attempts: list[int] = []

    async def book(payment: Payment, delivery: msgkit.Delivery) -> None:
        attempts.append(delivery.attempt)
        session = inbox.session()
        await session.execute(text("INSERT INTO ledger VALUES (:id, 0)"), {"id": payment.id})
        await outbox.add(session, "booked", {"id": payment.id}, key=str(payment.id))
        if delivery.attempt == 1:
            raise RuntimeError("fails after adding to the outbox")

    await broker.declare("payments", "ledger")
    await broker.send("payments", Payment(id=3, amount=1))
    consumer = broker.consumer(
        "payments", "ledger", book, middleware=[inbox], retry=msgkit.RetryPolicy(initial_delay=0.01)
    )
    await consumer.start()
    await eventually(lambda: attempts == [1, 2], what="a failure and a redelivery")
    await _settled(consumer)
    await consumer.stop()
    assert await _rows(engine, f"SELECT topic, key FROM {outbox_table.name}") == [("booked", "3")]
    assert len(await _rows(engine, f"SELECT * FROM {inbox_table.name}")) == 1


@pytest.mark.asyncio
async def test_session_outside_a_handler_is_a_clear_error(engine: AsyncEngine) -> None:
    with pytest.raises(StateError, match="only available inside a handler"):
        Inbox(engine).session()


@pytest.mark.asyncio
async def test_a_custom_key_a_sessionmaker_and_cleanup(engine: AsyncEngine, broker: msgkit.Broker) -> None:
    inbox = Inbox(async_sessionmaker(engine), key=lambda d: d.headers["request-id"], keep_for=0.1)
    calls: list[str] = []

    async def book(delivery: msgkit.Delivery) -> None:
        calls.append(delivery.id)

    await broker.declare("payments", "ledger")
    await broker.send("payments", b"1", headers={"request-id": "r1"})
    await broker.send("payments", b"2", headers={"request-id": "r1"})  # another id, same request
    consumer = broker.consumer("payments", "ledger", book, middleware=[inbox])
    await consumer.start()
    await eventually(lambda: len(calls) == 1, what="one call")
    await asyncio.sleep(0.15)
    await _settled(consumer)
    assert len(calls) == 1
    assert await inbox.cleanup() == 1  # older than keep_for
    await broker.send("payments", b"3", headers={"request-id": "r1"})
    await eventually(lambda: len(calls) == 2, what="the window passed: runs again")
    await consumer.stop()


@pytest.mark.asyncio
async def test_a_handler_that_commits_itself_is_warned_about(
    engine: AsyncEngine, broker: msgkit.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox(engine)
    done = asyncio.Event()

    async def book(delivery: msgkit.Delivery) -> None:
        await inbox.session().commit()
        done.set()

    await broker.declare("payments", "ledger")
    await broker.send("payments", b"x")
    consumer = broker.consumer("payments", "ledger", book, middleware=[inbox])
    with caplog.at_level(logging.WARNING, logger="msgkit.inbox"):
        await consumer.start()
        await asyncio.wait_for(done.wait(), 5)
        await _settled(consumer)
        await consumer.stop()
    assert "committed or rolled back the inbox's transaction itself" in caplog.text

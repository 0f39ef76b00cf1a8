"""The idempotency middleware on memory:// with the memory store: claim, done after success only,
release on failure, concurrent duplicates, lease renewal, keys and groups."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

import msgkit
from msgkit.middleware.idempotency import Idempotency
from msgkit.stores import Claim, ClaimStatus, DedupStore, MemoryDedupStore

from .conftest import eventually

FAST = msgkit.RetryPolicy(initial_delay=0.01, jitter=0)


async def _run(broker: msgkit.Broker, consumer: msgkit.Consumer, until: object, what: str) -> None:
    await consumer.start()
    await eventually(until, what=what)  # type: ignore[arg-type]
    await eventually(lambda: consumer.in_flight == 0, what="everything settled")
    await consumer.stop()


async def check_fail_once_then_duplicate(broker: msgkit.Broker, store: DedupStore) -> None:
    """The Watermill trap: a message marked seen before its handler failed would be lost.

    Shared with the SQL and Redis store tests.
    """
    attempts: list[int] = []
    topic, message_id = f"t-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex}"

    async def handle(delivery: msgkit.Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 1:
            raise ConnectionError("fails once")

    await broker.declare(topic, "g")
    await broker.send(topic, b"x", message_id=message_id)
    consumer = broker.consumer(topic, "g", handle, middleware=[Idempotency(store)], retry=FAST)
    await _run(broker, consumer, lambda: attempts == [1, 2], "a failure, then a successful redelivery")
    assert (await store.claim(f"g/{message_id}", 1)).status is ClaimStatus.DONE
    await broker.send(topic, b"x", message_id=message_id)  # a duplicate after success
    await broker.send(topic, b"y", message_id=message_id + "-other")
    consumer = broker.consumer(topic, "g", handle, middleware=[Idempotency(store)], retry=FAST)
    await _run(broker, consumer, lambda: len(attempts) == 3, "the new message")
    await asyncio.sleep(0.05)
    assert attempts == [1, 2, 1]  # the duplicate was not run again; the other message ran


@pytest.mark.asyncio
async def test_a_failed_handler_runs_again_and_only_success_makes_a_duplicate(broker: msgkit.Broker) -> None:
    await check_fail_once_then_duplicate(broker, MemoryDedupStore())


@pytest.mark.asyncio
async def test_retry_and_dead_letter_outcomes_release_the_claim(broker: msgkit.Broker) -> None:
    store = MemoryDedupStore()
    attempts: list[int] = []

    async def handle(delivery: msgkit.Delivery) -> msgkit.Outcome | None:
        attempts.append(delivery.attempt)
        return msgkit.Retry(0.01) if delivery.attempt == 1 else msgkit.DeadLetter("bad")

    await broker.declare("t", "g")
    await broker.send("t", b"x", message_id="m1")
    consumer = broker.consumer("t", "g", handle, middleware=[Idempotency(store)])
    await _run(broker, consumer, lambda: attempts == [1, 2], "a retry and a dead letter")
    assert (await store.claim("g/m1", 1)).status is ClaimStatus.CLAIMED  # free for a replay


@pytest.mark.asyncio
async def test_concurrent_duplicates_run_once_and_the_other_copy_comes_back_later(broker: msgkit.Broker) -> None:
    store = MemoryDedupStore()
    runs: list[int] = []
    seen: list[tuple[str, int]] = []

    async def handle(delivery: msgkit.Delivery) -> None:
        seen.append((delivery.id, delivery.attempt))
        runs.append(delivery.attempt)
        await asyncio.sleep(0.3)

    await broker.declare("t", "g")
    await broker.send("t", b"x", message_id="same")
    await broker.send("t", b"x", message_id="same")
    consumer = broker.consumer("t", "g", handle, middleware=[Idempotency(store, lease=0.6)], max_in_flight=2)
    await consumer.start()
    await eventually(lambda: len(runs) == 1, what="the first copy running")
    # the busy copy went back to the broker instead of holding a slot while the first runs
    await eventually(lambda: consumer.in_flight == 1, timeout=0.25, what="the busy copy settled")
    await asyncio.sleep(0.8)
    await eventually(lambda: consumer.in_flight == 0, what="everything settled")
    await consumer.stop()
    assert runs == [1]
    transport = broker.transport
    assert isinstance(transport, msgkit.transports.memory.MemoryTransport)
    stats = transport.stats("t", "g")
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)


@pytest.mark.asyncio
async def test_a_long_handler_keeps_its_claim_by_renewing_the_lease(broker: msgkit.Broker) -> None:
    store = MemoryDedupStore()
    observed: list[Claim] = []

    async def handle(delivery: msgkit.Delivery) -> None:
        await asyncio.sleep(0.7)  # more than two leases
        observed.append(await store.claim("g/long", 10))

    await broker.declare("t", "g")
    await broker.send("t", b"x", message_id="long")
    consumer = broker.consumer("t", "g", handle, middleware=[Idempotency(store, lease=0.3)])
    await _run(broker, consumer, lambda: len(observed) == 1, "the long handler")
    assert observed[0].status is ClaimStatus.BUSY  # still ours, not taken over
    assert (await store.claim("g/long", 1)).status is ClaimStatus.DONE


@pytest.mark.asyncio
async def test_keys_come_from_a_function_and_none_skips_dedup(broker: msgkit.Broker) -> None:
    store = MemoryDedupStore()
    calls: list[bytes] = []

    async def handle(body: bytes) -> None:
        calls.append(body)

    def order_key(delivery: msgkit.Delivery) -> str | None:
        return delivery.headers.get("order")

    await broker.declare("t", "g")
    await broker.send("t", b"a1", headers={"order": "A"})
    await broker.send("t", b"a2", headers={"order": "A"})  # another message, same order: skipped
    await broker.send("t", b"n1")
    await broker.send("t", b"n1")  # no key: not deduplicated
    consumer = broker.consumer("t", "g", handle, middleware=[Idempotency(store, key=order_key)])
    await _run(broker, consumer, lambda: len(calls) == 3, "three calls")
    await asyncio.sleep(0.05)
    assert calls == [b"a1", b"n1", b"n1"]


@pytest.mark.asyncio
async def test_every_group_handles_every_message_once(broker: msgkit.Broker) -> None:
    store = MemoryDedupStore()
    calls: list[str] = []

    def handler(group: str) -> object:
        async def handle(body: bytes) -> None:
            calls.append(group)

        return handle

    for group in ("g1", "g2"):
        await broker.declare("t", group)
    await broker.send("t", b"x", message_id="m")
    await broker.send("t", b"x", message_id="m")
    consumers = [
        broker.consumer("t", g, handler(g), middleware=[Idempotency(store)])  # type: ignore[arg-type]
        for g in ("g1", "g2")
    ]
    for c in consumers:
        await c.start()
    await eventually(lambda: len(calls) == 2, what="one call per group")
    await asyncio.sleep(0.1)
    for c in consumers:
        await c.stop()
    assert sorted(calls) == ["g1", "g2"]


class _BrokenStore(MemoryDedupStore):
    async def mark_done(self, key: str, token: str, keep_for: float) -> bool:
        raise ConnectionError("store went away")


@pytest.mark.asyncio
async def test_a_store_failure_after_success_still_acks(
    broker: msgkit.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    async def handle(delivery: msgkit.Delivery) -> None:
        calls.append(delivery.attempt)

    await broker.declare("t", "g")
    await broker.send("t", b"x")
    consumer = broker.consumer("t", "g", handle, middleware=[Idempotency(_BrokenStore())], retry=FAST)
    with caplog.at_level(logging.ERROR, logger="msgkit.idempotency"):
        await _run(broker, consumer, lambda: len(calls) == 1, "one call")
    await asyncio.sleep(0.05)
    assert calls == [1]  # the work is done: acked, not redone
    assert "marking key" in caplog.text


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="DedupStore"):
        Idempotency(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease"):
        Idempotency(MemoryDedupStore(), lease=0)
    with pytest.raises(ValueError, match="keep_for"):
        Idempotency(MemoryDedupStore(), keep_for=-1)
    assert isinstance(MemoryDedupStore(), DedupStore)

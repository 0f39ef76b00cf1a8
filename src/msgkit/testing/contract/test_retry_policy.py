"""The retry policy and the dead-letter tooling on the real broker: attempts that hold across
consumers, backoff honoured, complete dead-letter headers, a poison pill that costs one dead
letter, and a replay that restores messages exactly once."""

from __future__ import annotations

import asyncio
import time

import pytest

import msgkit
from msgkit import Delivery, RetryPolicy
from msgkit.message import (
    DLQ_ATTEMPTS,
    DLQ_ERROR_TYPE,
    DLQ_FIRST_FAILED_AT,
    DLQ_GROUP,
    DLQ_HOST,
    DLQ_LAST_FAILED_AT,
    DLQ_REASON,
    DLQ_TOPIC,
)
from msgkit.testing.contract.helpers import MARGIN, Received, contract_run, eventually


@pytest.mark.asyncio
async def test_attempts_hold_across_consumers(msgkit_contract_url: str) -> None:
    """A policy limit counts the broker's deliveries, not one process's tries ("retry=3" for ever)."""
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        message_id = await run.broker.send(topic, b"fails")
        policy = RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0)
        seen: list[tuple[str, int]] = []

        def failing(name: str) -> object:
            async def handler(delivery: Delivery) -> None:
                seen.append((name, delivery.attempt))
                raise ConnectionError(f"{name} cannot reach its database")

            return handler

        first = await run.start(topic, group, failing("first"), retry=policy)
        await eventually(lambda: len(seen) >= 1, what="the first consumer's delivery")
        await first.stop()
        second = await run.start(topic, group, failing("second"), retry=policy)
        dead = await run.dead_letters(topic, group)
        await dead.wait_for([message_id])
        await second.stop()
        attempts = [attempt for _, attempt in seen]
        assert attempts == [1, 2, 3], f"deliveries seen: {seen}"
        assert seen[0][0] == "first"
        assert dead.by_id()[message_id].message.headers.get(DLQ_ATTEMPTS) == "3"


@pytest.mark.msgkit_capability("delay_tolerance")
@pytest.mark.asyncio
async def test_backoff_delays_are_honoured(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        caps = run.capabilities
        topic, group = run.names()
        await run.broker.declare(topic, group)
        await run.broker.send(topic, b"x")
        delay = 1.0
        times: list[float] = []

        async def handler(delivery: Delivery) -> None:
            times.append(time.monotonic())
            if delivery.attempt == 1:
                raise ConnectionError("transient")

        policy = RetryPolicy(initial_delay=delay, jitter=0)
        await run.start(topic, group, handler, retry=policy)
        await eventually(lambda: len(times) >= 2, what="the redelivery after the backoff")
        waited = times[1] - times[0]
        assert waited >= delay - 0.05, f"redelivered after {waited:.2f}s, before the {delay}s backoff"
        assert waited <= delay + caps.delay_tolerance + MARGIN, f"redelivered after {waited:.2f}s"


@pytest.mark.asyncio
async def test_dead_letter_headers_are_complete(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        message_id = await run.broker.send(topic, b"x")

        async def handler(body: bytes) -> None:
            raise TimeoutError("the payment service timed out")

        started = time.time()
        await run.start(topic, group, handler, retry=RetryPolicy(max_attempts=2, initial_delay=0.3, jitter=0))
        dead = await run.dead_letters(topic, group)
        await dead.wait_for([message_id])
        headers = dead.by_id()[message_id].message.headers
        for name in (DLQ_REASON, DLQ_ERROR_TYPE, DLQ_ATTEMPTS, DLQ_TOPIC, DLQ_GROUP, DLQ_HOST):
            assert headers.get(name), f"dead letter header {name} is missing: {dict(headers)}"
        assert headers[DLQ_ERROR_TYPE] == "TimeoutError"
        assert "the payment service timed out" in headers[DLQ_REASON]
        first, last = float(headers[DLQ_FIRST_FAILED_AT]), float(headers[DLQ_LAST_FAILED_AT])
        assert started - 1 <= first <= last <= time.time() + 1


@pytest.mark.asyncio
async def test_a_poison_pill_among_a_thousand_costs_one_dead_letter(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        good_ids = await run.broker.send_batch(topic, [b"good %d" % i for i in range(500)])
        poison = await run.broker.send(topic, b"poison")
        good_ids += await run.broker.send_batch(topic, [b"good %d" % i for i in range(500, 1000)])
        good = Received()

        async def handler(body: bytes, delivery: Delivery) -> None:
            if body == b"poison":
                raise ValueError("cannot bill this")
            good.record(delivery)

        await run.start(topic, group, handler, max_in_flight=64, retry=RetryPolicy(max_attempts=1))
        dead = await run.dead_letters(topic, group)
        await good.wait_for(good_ids)
        await dead.wait_for([poison])
        assert dead.ids == [poison]
        assert not good.duplicates(), "good messages were redelivered"


@pytest.mark.asyncio
async def test_replay_restores_dead_letters_exactly_once(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        ids = await run.broker.send_batch(topic, [b"a", b"b", b"c"])
        healed = asyncio.Event()
        received = Received()

        async def handler(body: bytes, delivery: Delivery) -> None:
            if not healed.is_set():
                raise ValueError("bug, fixed later")
            received.record(delivery)

        consumer = await run.start(topic, group, handler, retry=RetryPolicy(max_attempts=1))
        tooling = await run.broker.dead_letters(topic, group)

        async def dead_count() -> int:
            return len(await tooling.peek(limit=None))

        deadline = time.monotonic() + 30
        while await dead_count() < 3:
            assert time.monotonic() < deadline, "the three messages never reached the dead letters"
            await asyncio.sleep(0.1)
        healed.set()  # the bug is fixed: replay them
        replayed = await tooling.replay(ids[:2])
        assert sorted(replayed) == sorted(ids[:2])
        await received.wait_for(ids[:2])
        await consumer.stop()
        assert sorted(received.ids) == sorted(ids[:2]), "a replayed message arrived twice or not at all"
        assert all(d.attempt == 1 for d in received.deliveries), "replayed messages must start at attempt 1"
        left = await tooling.peek(limit=None)
        assert [info.id for info in left] == [ids[2]]


@pytest.mark.asyncio
async def test_tooling_sees_more_dead_letters_than_one_batch(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        ids = await run.broker.send_batch(topic, [b"poison %d" % i for i in range(150)])
        rejected: set[str] = set()

        async def handler(delivery: Delivery) -> None:
            rejected.add(delivery.message.id)
            raise msgkit.Reject("poison")

        consumer = await run.start(topic, group, handler)
        await eventually(lambda: len(rejected) == len(ids), what="all 150 rejected")
        await eventually(lambda: consumer.in_flight == 0, what="all 150 settled")
        await consumer.stop()
        tooling = await run.broker.dead_letters(topic, group)
        listed = await tooling.peek(limit=None)
        assert sorted(info.id for info in listed) == sorted(ids)
        chosen = ids[-3:]  # beyond the first batches the tooling fetches
        assert sorted(await tooling.purge(chosen)) == sorted(chosen)
        assert len(await tooling.peek(limit=None)) == 147

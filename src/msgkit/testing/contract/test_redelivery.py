"""Redelivery: after a failed handler, after a lost consumer, and after a requested delay."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

import msgkit
from msgkit import Delivery
from msgkit.testing.contract.helpers import MARGIN, WAIT, Received, contract_run, eventually, require

#: Delay of the delayed-redelivery test, in seconds; not a whole number, so rounding shows.
DELAY = 1.25


@pytest.mark.asyncio
async def test_a_failed_message_is_redelivered_with_the_attempt_incremented(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        attempts: dict[str, list[int]] = defaultdict(list)

        async def fail_once(delivery: Delivery) -> None:
            attempts[delivery.message.id].append(delivery.attempt)
            if delivery.attempt == 1:
                raise RuntimeError("failing the first attempt on purpose")

        ids = await run.send_all(topic, [f"m{i}".encode() for i in range(3)])
        consumer = await run.start(topic, group, fail_once, retry=msgkit.RetryPolicy(initial_delay=0))
        await eventually(
            lambda: all(len(attempts[i]) >= 2 for i in ids),
            what=lambda: f"failed messages were not redelivered; attempts seen: {dict(attempts)}",
        )
        await consumer.stop()
        assert {i: attempts[i] for i in ids} == {i: [1, 2] for i in ids}


@pytest.mark.msgkit_capability("consumer_loss_redelivery")
@pytest.mark.asyncio
async def test_messages_of_a_lost_consumer_reach_another_consumer(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        bound = run.capabilities.consumer_loss_redelivery
        if bound > 60:
            pytest.skip(f"consumer_loss_redelivery is {bound}s, too long for this test")
        topic, group = run.names()
        await run.broker.declare(topic, group)
        ids = await run.send_all(topic, [f"m{i}".encode() for i in range(5)])

        # a consumer that fetches through the SPI and vanishes without settling anything
        subscription = await run.broker.transport.subscribe(topic, group, prefetch=5)
        fetched: list[Delivery] = []
        deadline = time.monotonic() + WAIT
        while len(fetched) < len(ids) and time.monotonic() < deadline:
            fetched += await subscription.fetch(len(ids) - len(fetched), timeout=1.0)
        assert sorted(d.message.id for d in fetched) == sorted(ids), "the lost consumer did not fetch every message"
        await subscription.close()
        lost_at = time.monotonic()

        received = Received()
        await run.start(topic, group, received)
        await received.wait_for(ids, timeout=bound + MARGIN + WAIT)
        late = max(received.times) - lost_at
        assert late <= bound + MARGIN, f"redelivered after {late:.2f}s; consumer_loss_redelivery is {bound}s"


@pytest.mark.msgkit_capability("delay_tolerance")
@pytest.mark.asyncio
async def test_delayed_redelivery_is_not_early_and_not_late(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        tolerance = run.capabilities.delay_tolerance
        if tolerance > 60:
            pytest.skip(f"delay_tolerance is {tolerance}s, too long for this test")
        topic, group = run.names()
        await run.broker.declare(topic, group)
        seen: dict[str, list[tuple[int, float]]] = defaultdict(list)

        async def retry_later(body: bytes, delivery: Delivery) -> msgkit.Retry | None:
            seen[delivery.message.id].append((delivery.attempt, time.monotonic()))
            if delivery.attempt > 1:
                return None
            if body == b"raise":
                raise msgkit.RetryLater(DELAY)
            return msgkit.Retry(delay=DELAY)

        ids = await run.send_all(topic, [b"raise", b"return"])
        await run.start(topic, group, retry_later)
        await eventually(
            lambda: all(len(seen[i]) >= 2 for i in ids),
            timeout=DELAY + tolerance + MARGIN + WAIT,
            what=lambda: f"delayed messages were not redelivered: {dict(seen)}",
        )
        for message_id, way in zip(ids, ("RetryLater raised", "Retry returned"), strict=True):
            (first_attempt, first), (second_attempt, second) = seen[message_id][:2]
            waited = second - first
            assert (first_attempt, second_attempt) == (1, 2), f"{way}: attempts {first_attempt}, {second_attempt}"
            assert waited >= DELAY - 0.01, f"{way}: redelivered after {waited:.3f}s, before the {DELAY}s delay"
            assert waited <= DELAY + tolerance + MARGIN, (
                f"{way}: redelivered after {waited:.3f}s; delay {DELAY}s, delay_tolerance {tolerance}s"
            )


@pytest.mark.msgkit_capability("native_delay")
@pytest.mark.asyncio
async def test_a_delayed_redelivery_holds_no_in_flight_slot(msgkit_contract_url: str) -> None:
    delay = 4.0
    async with contract_run(msgkit_contract_url) as run:
        require(run.capabilities.native_delay, "native_delay")
        topic, group = run.names()
        await run.broker.declare(topic, group)
        handled: list[tuple[str, int, float]] = []

        async def handler(body: bytes, delivery: Delivery) -> msgkit.Retry | None:
            handled.append((body.decode(), delivery.attempt, time.monotonic()))
            return msgkit.Retry(delay=delay) if body == b"later" and delivery.attempt == 1 else None

        # one slot: while "later" waits for its redelivery, the slot must serve "now"
        await run.send_all(topic, [b"later"], key="a")
        await run.start(topic, group, handler, max_in_flight=1)
        await eventually(lambda: len(handled) >= 1, what="the first message was not delivered")
        await run.send_all(topic, [b"now"], key="b")
        await eventually(
            lambda: sum(attempt == 2 for body, attempt, _ in handled if body == "later") == 1,
            timeout=delay + run.capabilities.delay_tolerance + MARGIN + WAIT,
            what=lambda: f"the delayed message did not come back: {handled}",
        )
        order = [(body, attempt) for body, attempt, _ in handled]
        assert order[:3] == [("later", 1), ("now", 1), ("later", 2)], (
            f"the delay held the consumer's only in-flight slot: handled {order}"
        )

"""Flow control: the in-flight bound, per-key order with parallel keys, and a graceful stop."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict

import pytest

from msgkit import Consumer, Delivery, Message
from msgkit.testing.contract.helpers import WAIT, Received, contract_run, eventually, quiet_period, require


@pytest.mark.asyncio
async def test_the_in_flight_bound_is_reached_and_never_exceeded(msgkit_contract_url: str) -> None:
    bound = 4
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        release = asyncio.Event()
        running = peak_running = peak_in_flight = done = 0
        consumer: Consumer | None = None

        async def slow(delivery: Delivery) -> None:
            nonlocal running, peak_running, peak_in_flight, done
            assert consumer is not None
            running += 1
            peak_running = max(peak_running, running)
            peak_in_flight = max(peak_in_flight, consumer.in_flight)
            try:
                await release.wait()
            finally:
                running -= 1
            done += 1

        await run.send_all(topic, [f"m{i}".encode() for i in range(3 * bound)])
        consumer = run.consumer(topic, group, slow, max_in_flight=bound)
        await consumer.start()
        await eventually(lambda: running == bound, what=lambda: f"{running} handlers running, expected {bound}")
        await asyncio.sleep(0.3)  # give a consumer that ignores its bound the time to fetch more
        assert (running, consumer.in_flight) == (bound, bound)

        release.set()
        await eventually(lambda: done == 3 * bound, what=lambda: f"{done} of {3 * bound} handled")
        assert peak_running == bound, f"{peak_running} handlers ran at once with max_in_flight={bound}"
        assert peak_in_flight <= bound, f"in_flight reached {peak_in_flight} with max_in_flight={bound}"


@pytest.mark.msgkit_capability("ordered")
@pytest.mark.asyncio
async def test_per_key_order_holds_while_different_keys_run_in_parallel(msgkit_contract_url: str) -> None:
    keys, per_key = [f"key-{k}" for k in range(6)], 30
    async with contract_run(msgkit_contract_url) as run:
        require(run.capabilities.ordered, "ordered")
        topic, group = run.names()
        await run.broker.declare(topic, group)
        seen: dict[str, list[int]] = defaultdict(list)
        active: set[str] = set()
        overlaps: list[str] = []
        peak_keys = 0
        rng = random.Random(20240601)

        async def handler(body: bytes) -> None:
            nonlocal peak_keys
            key, _, seq = body.decode().partition(":")
            if key in active:
                overlaps.append(key)
            active.add(key)
            peak_keys = max(peak_keys, len(active))
            await asyncio.sleep(rng.uniform(0, 0.003))
            seen[key].append(int(seq))
            active.discard(key)

        messages = [Message.of(f"{key}:{seq}".encode(), key=key) for seq in range(per_key) for key in keys]
        for start in range(0, len(messages), 60):
            await run.broker.send_batch(topic, messages[start : start + 60])
        await run.start(topic, group, handler, max_in_flight=20, ordered_by_key=True)

        total = len(keys) * per_key
        await eventually(lambda: sum(map(len, seen.values())) >= total, what=lambda: f"handled {dict(seen)}")
        assert not overlaps, f"two messages of one key ran at the same time: {overlaps[:5]}"
        for key in keys:
            assert seen[key] == list(range(per_key)), f"{key} was handled out of order: {seen[key]}"
        assert peak_keys >= 2, "different keys never ran in parallel"


@pytest.mark.msgkit_capability("exclusive_keys")
@pytest.mark.asyncio
async def test_a_graceful_stop_finishes_running_work_and_releases_the_rest(msgkit_contract_url: str) -> None:
    count = 10
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        gate, started = asyncio.Event(), asyncio.Event()
        began: list[str] = []
        finished: list[str] = []

        async def blocking(delivery: Delivery) -> None:
            began.append(delivery.message.id)
            started.set()
            await gate.wait()
            finished.append(delivery.message.id)

        # one key: the first message runs, the others are fetched and wait in its lane
        ids = await run.send_all(topic, [f"m{i}".encode() for i in range(count)], key="one-key")
        first = await run.start(topic, group, blocking, max_in_flight=20, ordered_by_key=True, stop_timeout=WAIT)
        await asyncio.wait_for(started.wait(), WAIT)
        await eventually(lambda: first.in_flight == count, what=lambda: f"fetched {first.in_flight} of {count}")

        second = Received()
        await run.start(topic, group, second)
        stopping = asyncio.create_task(first.stop())
        stop_began = time.monotonic()
        exclusive = run.capabilities.exclusive_keys
        try:
            running = began[0]
            rest = set(ids) - {running}
            if exclusive:
                # the broker hands out the key's other messages only once the running one is
                # settled: let it finish, then the rest must follow promptly
                await asyncio.sleep(0.2)
                assert not stopping.done(), "stop() returned while a handler was still running"
                gate.set()
                await stopping
                stop_began = time.monotonic()
            await second.wait_for(rest)
            released_after = max(second.times) - stop_began
            assert exclusive or not stopping.done(), "stop() returned while a handler was still running"
        finally:
            gate.set()
        await stopping

        bound = run.capabilities.consumer_loss_redelivery
        if bound > 0:
            assert released_after < bound / 2, (
                f"unstarted messages reached another consumer after {released_after:.2f}s: not released on stop "
                f"(consumer_loss_redelivery is {bound}s)"
            )
        assert began == finished == [running], "the running handler was not allowed to finish"
        await quiet_period(run.capabilities)  # an unsettled message would come back by now
        assert running not in second.ids, "the message finished during stop() was not settled"
        assert sorted(second.ids) == sorted(rest)

"""The consumer engine on the memory transport: bound, order, stop, batching, poison."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Sequence

import pytest
from pydantic import BaseModel

import msgkit
from msgkit.message import DLQ_ATTEMPTS, DLQ_ERROR_TYPE, DLQ_GROUP, DLQ_REASON, DLQ_TOPIC, Outcome
from msgkit.transports.memory import MemorySubscription, MemoryTransport

from .conftest import eventually, wait_for

pytestmark = pytest.mark.asyncio


class Order(BaseModel):
    id: int


async def test_in_flight_bound_is_reached_and_never_exceeded(broker: msgkit.Broker) -> None:
    transport = broker.transport
    assert isinstance(transport, MemoryTransport)
    await broker.declare("t", "g")
    await broker.send_batch("t", [Order(id=i) for i in range(200)])
    running = 0
    peak_running = 0
    peak_leased = 0
    release = asyncio.Event()
    done = 0

    async def handle(order: Order) -> None:
        nonlocal running, peak_running, peak_leased, done
        running += 1
        peak_running = max(peak_running, running)
        peak_leased = max(peak_leased, transport.stats("t", "g").leased)
        await release.wait()
        running -= 1
        done += 1

    consumer = broker.consumer("t", "g", handle, max_in_flight=8)
    await consumer.start()
    await eventually(lambda: running == 8, what="8 handlers running")
    # the broker holds no more leases than the bound, and no more are fetched while it is full
    assert transport.stats("t", "g").leased == 8
    assert consumer.in_flight == 8
    release.set()
    await eventually(lambda: done == 200, what="all handled")
    await consumer.stop()
    assert peak_running == 8
    assert peak_leased <= 8
    assert transport.stats("t", "g") == type(transport.stats("t", "g"))(0, 0, 0, 0, 0)


async def test_ordered_by_key_keeps_order_and_runs_keys_in_parallel(broker: msgkit.Broker) -> None:
    keys = [f"k{i}" for i in range(6)]
    await broker.declare("t", "g")
    await broker.send_batch("t", [msgkit.Message.of(Order(id=n), key=keys[n % len(keys)]) for n in range(300)])
    seen: dict[str, list[int]] = defaultdict(list)
    active: set[str] = set()
    peak_parallel_keys = 0
    overlap_same_key = False
    rng = random.Random(7)

    async def handle(order: Order, delivery: msgkit.Delivery) -> None:
        nonlocal peak_parallel_keys, overlap_same_key
        assert delivery.key is not None
        if delivery.key in active:
            overlap_same_key = True
        active.add(delivery.key)
        peak_parallel_keys = max(peak_parallel_keys, len(active))
        await asyncio.sleep(rng.random() / 1000)
        seen[delivery.key].append(order.id)
        active.discard(delivery.key)

    consumer = broker.consumer("t", "g", handle, max_in_flight=64, ordered_by_key=True)
    await consumer.start()
    await eventually(lambda: sum(map(len, seen.values())) == 300, what="all handled")
    await consumer.stop()
    assert not overlap_same_key
    for i, key in enumerate(keys):
        assert seen[key] == list(range(i, 300, len(keys)))
    assert peak_parallel_keys > 1


async def test_without_ordering_same_key_runs_in_parallel(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send_batch("t", [msgkit.Message.of(b"x", key="same") for _ in range(10)])
    running = 0
    peak = 0
    gate = asyncio.Event()

    async def handle(body: bytes) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1

    consumer = broker.consumer("t", "g", handle, max_in_flight=10)
    await consumer.start()
    await eventually(lambda: peak == 10, what="10 in parallel")
    gate.set()
    await consumer.stop()


async def test_graceful_stop_finishes_running_and_releases_unstarted(memory_url: str) -> None:
    async with msgkit.Broker(memory_url) as broker:
        await broker.declare("t", "g")
        # one key: one handler runs, the others are fetched and wait in the key's lane
        await broker.send_batch("t", [msgkit.Message.of(Order(id=i), key="k") for i in range(20)])
        started = asyncio.Event()
        finish = asyncio.Event()
        handled: list[int] = []

        async def slow(order: Order) -> None:
            started.set()
            await finish.wait()
            handled.append(order.id)

        first = broker.consumer("t", "g", slow, max_in_flight=20, ordered_by_key=True)
        await first.start()
        await wait_for(started.wait())
        assert first.in_flight == 20
        stopping = asyncio.create_task(first.stop(timeout=5))
        await asyncio.sleep(0)
        finish.set()
        await stopping
        assert handled == [0]

        # the 19 released messages go to the next consumer at once, first attempt, in order
        again: list[tuple[int, int]] = []

        async def fast(order: Order, delivery: msgkit.Delivery) -> None:
            again.append((order.id, delivery.attempt))

        second = broker.consumer("t", "g", fast, max_in_flight=20, ordered_by_key=True)
        await second.start()
        await eventually(lambda: len(again) == 19, timeout=0.4, what="released messages redelivered promptly")
        await second.stop()
        assert again == [(i, 1) for i in range(1, 20)]


async def test_stop_timeout_cancels_stuck_handlers_and_releases_them(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send("t", b"stuck")
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(body: bytes) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    consumer = broker.consumer("t", "g", stuck)
    await consumer.start()
    await wait_for(started.wait())
    await consumer.stop(timeout=0.05)
    assert cancelled.is_set()
    got: list[int] = []

    async def handle(body: bytes, delivery: msgkit.Delivery) -> None:
        got.append(delivery.attempt)

    nxt = broker.consumer("t", "g", handle)
    await nxt.start()
    await eventually(lambda: got == [1], timeout=0.4, what="released message redelivered at once")
    await nxt.stop()


class _Recording(MemorySubscription):
    batches: list[int]

    async def settle(self, settlements: Sequence[tuple[msgkit.Delivery, Outcome]]) -> None:
        self.batches.append(len(settlements))
        await super().settle(settlements)


async def test_settlement_is_batched(memory_url: str) -> None:
    transport = MemoryTransport.from_url(memory_url)
    batches: list[int] = []
    original = transport._attach

    def attach(group):  # type: ignore[no-untyped-def]
        sub = original(group)
        sub.__class__ = _Recording
        sub.batches = batches  # type: ignore[attr-defined]
        return sub

    transport._attach = attach  # type: ignore[method-assign]
    async with msgkit.Broker(transport=transport) as broker:
        await broker.declare("t", "g")
        await broker.send_batch("t", [b"m"] * 1000)
        count = 0

        async def handle(body: bytes) -> None:
            nonlocal count
            count += 1

        consumer = broker.consumer("t", "g", handle, max_in_flight=200, settle_batch_size=50)
        await consumer.start()
        await eventually(lambda: sum(batches) == 1000, what="all settled")
        await consumer.stop()
    assert count == 1000
    assert len(batches) <= 1000 // 50 + 5
    assert max(batches) >= 50


async def test_settlement_interval_flushes_a_partial_batch(broker: msgkit.Broker) -> None:
    transport = broker.transport
    assert isinstance(transport, MemoryTransport)
    await broker.declare("t", "g")
    gate = asyncio.Event()
    handled = 0

    async def handle(body: bytes) -> None:
        nonlocal handled
        if body == b"slow":
            await gate.wait()
        handled += 1

    consumer = broker.consumer("t", "g", handle, max_in_flight=10, settle_batch_size=10, settle_interval=0.05)
    await consumer.start()
    await broker.send_batch("t", [b"slow", b"fast"])
    await eventually(lambda: handled == 1)
    # the fast one is acked by the timer although the batch is not full and one is still running
    await eventually(lambda: transport.stats("t", "g").leased == 1, timeout=1, what="timer flush")
    gate.set()
    await consumer.stop()
    assert transport.stats("t", "g").leased == 0


async def test_poison_body_is_dead_lettered_at_once_and_does_not_block(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send("t", b"not json")
    await broker.send("t", b'{"id": "not a number"}')
    await broker.send_batch("t", [Order(id=i) for i in range(5)])
    good: list[int] = []

    async def handle(order: Order) -> None:
        good.append(order.id)

    consumer = broker.consumer("t", "g", handle, max_in_flight=1)
    await consumer.start()
    await eventually(lambda: len(good) == 5)
    await consumer.stop()

    dead: list[msgkit.Delivery] = []

    async def collect(delivery: msgkit.Delivery) -> None:
        dead.append(delivery)

    reader = broker.dead_letter_consumer("t", "g", collect)
    await reader.start()
    await eventually(lambda: len(dead) == 2)
    await reader.stop()
    assert sorted(d.body for d in dead) == sorted([b"not json", b'{"id": "not a number"}'])
    for d in dead:
        assert d.headers[DLQ_REASON].startswith("undecodable body: body is not a valid Order")
        assert d.headers[DLQ_ERROR_TYPE] == "DecodeError"
        assert d.headers[DLQ_ATTEMPTS] == "1"
        assert d.headers[DLQ_TOPIC] == "t"
        assert d.headers[DLQ_GROUP] == "g"


async def test_failed_handler_is_redelivered_then_dead_lettered(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    msg_id = await broker.send("t", b"boom")
    attempts: list[int] = []

    async def failing(body: bytes, delivery: msgkit.Delivery) -> None:
        attempts.append(delivery.attempt)
        raise RuntimeError("always fails")

    consumer = broker.consumer("t", "g", failing, retry=msgkit.RetryPolicy(max_attempts=3, initial_delay=0))
    await consumer.start()
    dead: list[msgkit.Delivery] = []

    async def collect(delivery: msgkit.Delivery) -> None:
        dead.append(delivery)

    reader = broker.dead_letter_consumer("t", "g", collect)
    await reader.start()
    await eventually(lambda: len(dead) == 1)
    await consumer.stop()
    await reader.stop()
    assert attempts == [1, 2, 3]
    assert dead[0].id == msg_id
    assert "attempts exhausted (3 of 3)" in dead[0].headers[DLQ_REASON]
    assert "RuntimeError: always fails" in dead[0].headers[DLQ_REASON]


async def test_outcomes_from_handler_exceptions(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send("t", b"later")
    await broker.send("t", b"reject")
    seen: list[tuple[bytes, int, float]] = []
    loop = asyncio.get_running_loop()

    async def handle(body: bytes, delivery: msgkit.Delivery) -> msgkit.Outcome | None:
        seen.append((body, delivery.attempt, loop.time()))
        if body == b"reject":
            raise msgkit.Reject("bad order")
        if delivery.attempt == 1:
            raise msgkit.RetryLater(0.2)
        return None

    consumer = broker.consumer("t", "g", handle)
    await consumer.start()
    await eventually(lambda: len(seen) == 3)
    await consumer.stop()
    later = [s for s in seen if s[0] == b"later"]
    assert [s[1] for s in later] == [1, 2]
    assert later[1][2] - later[0][2] >= 0.2
    transport = broker.transport
    assert isinstance(transport, MemoryTransport)
    assert transport.stats("t", "g").dead == 1


async def test_handler_may_return_an_outcome(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send("t", b"x")
    attempts: list[int] = []

    async def handle(delivery: msgkit.Delivery) -> msgkit.Outcome | None:
        attempts.append(delivery.attempt)
        return msgkit.Retry(0) if delivery.attempt < 3 else None

    consumer = broker.consumer("t", "g", handle)
    await consumer.start()
    await eventually(lambda: attempts == [1, 2, 3])
    await consumer.stop()


async def test_middleware_wraps_in_order_and_sees_the_outcome(broker: msgkit.Broker) -> None:
    calls: list[str] = []

    async def outer(delivery: msgkit.Delivery, call_next: msgkit.CallNext) -> msgkit.Outcome | None:
        calls.append("outer-in")
        result = await call_next(delivery)
        calls.append(f"outer-out:{result!r}")
        return result

    async def inner(delivery: msgkit.Delivery, call_next: msgkit.CallNext) -> msgkit.Outcome | None:
        calls.append("inner-in")
        await asyncio.sleep(0)
        return await call_next(delivery)

    async def handle(order: Order) -> None:
        calls.append(f"handler:{order.id}")

    await broker.declare("t", "g")
    await broker.send("t", Order(id=5))
    consumer = broker.consumer("t", "g", handle, middleware=[outer, inner])
    await consumer.start()
    await eventually(lambda: len(calls) == 4)
    await consumer.stop()
    assert calls == ["outer-in", "inner-in", "handler:5", "outer-out:None"]


async def test_consumer_cannot_start_twice(broker: msgkit.Broker) -> None:
    async def handle(body: bytes) -> None:
        pass

    consumer = broker.consumer("t", "g", handle)
    await consumer.start()
    with pytest.raises(msgkit.StateError, match="already running"):
        await consumer.start()
    await consumer.stop()
    await consumer.stop()  # twice is fine


async def test_run_stops_on_stop_and_closes(memory_url: str) -> None:
    broker = msgkit.Broker(memory_url)
    got = asyncio.Event()

    @broker.subscriber("t", "g")
    async def handle(body: bytes) -> None:
        got.set()
        broker.stop()

    await broker.declare("t", "g")
    await broker.send("t", b"x")
    await asyncio.wait_for(broker.run(handle_signals=False), 5)
    assert got.is_set()
    with pytest.raises(msgkit.ClosedError):
        await broker.send("t", b"y")


async def test_run_without_consumers_is_an_error(broker: msgkit.Broker) -> None:
    with pytest.raises(msgkit.StateError, match="no consumers"):
        await broker.run()


async def test_context_of_one_message_does_not_leak_into_the_next(broker: msgkit.Broker) -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []

    async def mw(delivery: msgkit.Delivery, call_next: msgkit.CallNext) -> msgkit.Outcome | None:
        seen.append(var.get())
        token = var.set(delivery.id)
        try:
            if delivery.body == b"wait":
                await asyncio.sleep(0.01)
            return await call_next(delivery)
        finally:
            var.reset(token)  # raises if the context changed between set and reset

    handled: list[tuple[int, bool]] = []

    async def handle(delivery: msgkit.Delivery) -> None:
        handled.append((delivery.attempt, var.get() == delivery.id))

    await broker.declare("t", "g")
    await broker.send_batch("t", [b"wait", b"now", b"wait", b"now"])
    consumer = broker.consumer("t", "g", handle, max_in_flight=4, middleware=[mw])
    await consumer.start()
    await eventually(lambda: len(seen) == 4)
    await consumer.stop()
    assert seen == ["unset"] * 4
    # each handler saw its own middleware's value, and no reset failed (no redelivery)
    assert handled == [(1, True)] * 4


async def test_run_raises_when_the_subscription_closes_under_it(broker: msgkit.Broker) -> None:
    async def handle(body: bytes) -> None:
        pass

    consumer = broker.consumer("t", "g", handle)
    running = asyncio.create_task(consumer.run())
    await eventually(lambda: consumer.running)
    await broker.transport.close()  # the broker side goes away without the consumer stopping
    with pytest.raises(msgkit.ClosedError):
        await asyncio.wait_for(running, 5)
    assert not consumer.running
    assert isinstance(consumer.last_error, msgkit.ClosedError)


async def test_fetch_errors_are_retried_with_backoff_and_surfaced(broker: msgkit.Broker) -> None:
    transport = broker.transport
    assert isinstance(transport, MemoryTransport)
    await broker.declare("t", "g")
    await broker.send("t", b"x")
    failures = 2
    original = MemorySubscription.fetch

    async def flaky(self: MemorySubscription, max_count: int, timeout: float) -> Sequence[msgkit.Delivery]:
        nonlocal failures
        if failures:
            failures -= 1
            raise msgkit.BrokerUnavailableError("broker down")
        return await original(self, max_count, timeout)

    MemorySubscription.fetch = flaky  # type: ignore[method-assign]
    try:
        got = asyncio.Event()
        errors: list[BaseException | None] = []

        async def handle(body: bytes) -> None:
            got.set()

        consumer = broker.consumer("t", "g", handle)
        await consumer.start()
        await eventually(lambda: consumer.last_error is not None, what="the outage surfaced")
        errors.append(consumer.last_error)
        await wait_for(got.wait())
        await consumer.stop()
    finally:
        MemorySubscription.fetch = original  # type: ignore[method-assign]
    assert isinstance(errors[0], msgkit.BrokerUnavailableError)
    assert failures == 0


async def test_consumer_lag_counts_what_the_group_has_not_fetched(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send_batch("t", [b"m"] * 100)
    gate = asyncio.Event()

    async def slow(body: bytes) -> None:
        await gate.wait()

    consumer = broker.consumer("t", "g", slow, max_in_flight=10)
    assert consumer.lag is None  # not running
    await consumer.start()
    await eventually(lambda: consumer.in_flight == 10)
    assert consumer.lag == 90
    gate.set()
    await eventually(lambda: consumer.lag == 0)
    await consumer.stop()

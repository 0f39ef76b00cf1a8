"""The memory transport through its SPI: leases, visibility, delays, fan-out, history."""

from __future__ import annotations

import asyncio
import time

import pytest

import msgkit
from msgkit.message import Message
from msgkit.transports.memory import MemoryTransport


async def _transport(name: str, query: str = "") -> MemoryTransport:
    t = MemoryTransport.from_url(f"memory://{name}{query}")
    await t.connect()
    return t


def _msgs(*bodies: bytes) -> list[Message]:
    return [Message(body=b) for b in bodies]


@pytest.mark.asyncio
async def test_fetch_respects_max_and_times_out_empty(memory_url: str) -> None:
    t = MemoryTransport.from_url(memory_url)
    await t.declare("t", "g")
    await t.publish("t", _msgs(*[b"%d" % i for i in range(5)]))
    sub = await t.subscribe("t", "g", prefetch=3)
    assert [d.body for d in await sub.fetch(3, 0.1)] == [b"0", b"1", b"2"]
    assert [d.body for d in await sub.fetch(10, 0.1)] == [b"3", b"4"]
    started = time.monotonic()
    assert list(await sub.fetch(10, 0.05)) == []
    assert time.monotonic() - started >= 0.05
    await sub.close()


@pytest.mark.asyncio
async def test_a_waiting_fetch_wakes_on_publish(memory_url: str) -> None:
    t = MemoryTransport.from_url(memory_url)
    sub = await t.subscribe("t", "g", prefetch=1)
    fetch = asyncio.create_task(sub.fetch(1, 5.0))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    await t.publish("t", _msgs(b"x"))
    got = await fetch
    assert [d.body for d in got] == [b"x"]
    assert time.monotonic() - started < 1.0


@pytest.mark.asyncio
async def test_cancelled_fetch_loses_nothing(memory_url: str) -> None:
    t = MemoryTransport.from_url(memory_url)
    sub = await t.subscribe("t", "g", prefetch=1)
    fetch = asyncio.create_task(sub.fetch(1, 5.0))
    await asyncio.sleep(0.01)
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    await t.publish("t", _msgs(b"x"))
    assert [d.body for d in await sub.fetch(1, 0.5)] == [b"x"]


@pytest.mark.asyncio
async def test_groups_fan_out_and_consumers_in_a_group_compete(memory_url: str) -> None:
    t = MemoryTransport.from_url(memory_url)
    await t.declare("t", "a")
    await t.declare("t", "b")
    await t.publish("t", _msgs(b"1", b"2", b"3", b"4"))
    a1 = await t.subscribe("t", "a", prefetch=2)
    a2 = await t.subscribe("t", "a", prefetch=2)
    b1 = await t.subscribe("t", "b", prefetch=4)
    assert [d.body for d in await a1.fetch(2, 0.1)] == [b"1", b"2"]
    assert [d.body for d in await a2.fetch(2, 0.1)] == [b"3", b"4"]
    assert [d.body for d in await b1.fetch(4, 0.1)] == [b"1", b"2", b"3", b"4"]


@pytest.mark.asyncio
async def test_new_group_replays_history_within_the_limit(memory_url: str) -> None:
    t = MemoryTransport.from_url(memory_url + "&history=100")
    await t.declare("t", "early")
    await t.publish("t", _msgs(*[b"%d" % i for i in range(2000)]))
    early = await t.subscribe("t", "early", prefetch=5000)
    assert len(await early.fetch(5000, 0.1)) == 2000  # unread messages of a group are never trimmed
    await t.publish("t", _msgs(b"2000"))  # now the read part beyond the history goes
    late = await t.subscribe("t", "late", prefetch=5000)
    got = await late.fetch(5000, 0.1)
    assert [d.body for d in got] == [b"%d" % i for i in range(1901, 2001)]


@pytest.mark.asyncio
async def test_release_is_not_an_attempt_and_keeps_order(memory_url: str) -> None:
    t = MemoryTransport.from_url(memory_url)
    await t.publish("t", _msgs(b"1", b"2", b"3"))
    sub = await t.subscribe("t", "g", prefetch=3)
    got = await sub.fetch(3, 0.1)
    await sub.release(got)
    again = await sub.fetch(3, 0.1)
    assert [(d.body, d.attempt) for d in again] == [(b"1", 1), (b"2", 1), (b"3", 1)]


@pytest.mark.asyncio
async def test_retry_counts_attempts_and_delays(memory_url: str) -> None:
    t = MemoryTransport.from_url(memory_url)
    await t.publish("t", _msgs(b"now", b"later"))
    sub = await t.subscribe("t", "g", prefetch=2)
    now, later = await sub.fetch(2, 0.1)
    started = time.monotonic()
    await sub.settle([(now, msgkit.Retry(0)), (later, msgkit.Retry(0.2))])
    first = await sub.fetch(2, 1.0)
    assert [(d.body, d.attempt) for d in first] == [(b"now", 2)]
    second = await sub.fetch(2, 1.0)
    waited = time.monotonic() - started
    assert [(d.body, d.attempt) for d in second] == [(b"later", 2)]
    assert 0.2 <= waited < 0.2 + t.capabilities.delay_tolerance + 0.2


@pytest.mark.asyncio
async def test_closing_without_settling_redelivers_after_visibility_timeout(memory_url: str) -> None:
    t = MemoryTransport.from_url(memory_url)  # visibility_timeout=0.5
    await t.publish("t", _msgs(b"x"))
    crashed = await t.subscribe("t", "g", prefetch=1)
    (lost,) = await crashed.fetch(1, 0.1)
    await crashed.close()
    survivor = await t.subscribe("t", "g", prefetch=1)
    started = time.monotonic()
    assert list(await survivor.fetch(1, 0.2)) == []  # not before the timeout
    (again,) = await survivor.fetch(1, 2.0)
    assert time.monotonic() - started >= 0.45
    assert (again.id, again.attempt) == (lost.id, 2)
    # a late settle from the closed subscription changes nothing
    await crashed.settle([(lost, msgkit.ACK)])
    assert t.stats("t", "g").leased == 1


@pytest.mark.asyncio
async def test_a_subscription_dropped_without_close_is_a_lost_consumer(memory_url: str) -> None:
    import gc

    t = MemoryTransport.from_url(memory_url)  # visibility_timeout=0.5
    await t.publish("t", _msgs(b"x"))
    dropped = await t.subscribe("t", "g", prefetch=1)
    (lost,) = await dropped.fetch(1, 0.1)
    del dropped
    gc.collect()
    survivor = await t.subscribe("t", "g", prefetch=1)
    (again,) = await survivor.fetch(1, 2.0)
    assert (again.id, again.attempt) == (lost.id, 2)


@pytest.mark.asyncio
async def test_fetch_after_close_raises(memory_url: str) -> None:
    t = MemoryTransport.from_url(memory_url)
    sub = await t.subscribe("t", "g", prefetch=1)
    await sub.close()
    await sub.close()
    with pytest.raises(msgkit.ClosedError):
        await sub.fetch(1, 0.1)
    await t.close()
    await t.close()
    with pytest.raises(msgkit.ClosedError):
        await t.publish("t", _msgs(b"x"))


@pytest.mark.asyncio
async def test_brokers_with_the_same_name_share_state(memory_url: str) -> None:
    async with msgkit.Broker(memory_url) as producer, msgkit.Broker(memory_url) as consumer_side:
        await consumer_side.declare("t", "g")
        await producer.send("t", b"shared")
        sub = await consumer_side.transport.subscribe("t", "g", prefetch=1)
        assert [d.body for d in await sub.fetch(1, 0.5)] == [b"shared"]
    async with msgkit.Broker(memory_url.replace("?", "-other?")) as other:
        sub = await other.transport.subscribe("t", "g", prefetch=1)
        assert list(await sub.fetch(1, 0.05)) == []


def test_state_survives_event_loops(memory_url: str) -> None:
    """A waiter left by a loop that has closed does not break the next loop (pytest makes many)."""

    async def leave_waiter() -> None:
        t = MemoryTransport.from_url(memory_url)
        sub = await t.subscribe("t", "g", prefetch=1)
        task = asyncio.create_task(sub.fetch(1, 10))
        await asyncio.sleep(0.01)
        task.cancel()

    async def publish_and_fetch() -> list[bytes]:
        t = MemoryTransport.from_url(memory_url)
        await t.publish("t", _msgs(b"x"))
        sub = await t.subscribe("t", "g", prefetch=1)
        return [d.body for d in await sub.fetch(1, 0.5)]

    asyncio.run(leave_waiter())
    assert asyncio.run(publish_and_fetch()) == [b"x"]

"""The retry policy on the memory transport: immediate tries, backoff, limits, filters, headers."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel

import msgkit
from msgkit.message import (
    DLQ_ATTEMPTS,
    DLQ_ERROR_TYPE,
    DLQ_FIRST_FAILED_AT,
    DLQ_LAST_FAILED_AT,
    DLQ_REASON,
    FIRST_FAILED_AT,
)

from .conftest import eventually


class Order(BaseModel):
    id: int


def test_backoff_grows_caps_and_jitters() -> None:
    policy = msgkit.RetryPolicy(initial_delay=1, multiplier=3, max_delay=20, jitter=0)
    assert [policy.delay_for(a) for a in (1, 2, 3, 4)] == [1, 3, 9, 20]
    jittered = msgkit.RetryPolicy(initial_delay=10, jitter=0.2)
    samples = [jittered.delay_for(1) for _ in range(200)]
    assert all(8 <= s <= 12 for s in samples)
    assert len(set(samples)) > 1


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="subclass of BaseException"):
        msgkit.RetryPolicy(retry_on=(int,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_delay"):
        msgkit.RetryPolicy(initial_delay=10, max_delay=1)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        msgkit.RetryPolicy(max_attempts=0)


async def _dead_letters(broker: msgkit.Broker, count: int) -> list[msgkit.Delivery]:
    dead: list[msgkit.Delivery] = []

    async def collect(delivery: msgkit.Delivery) -> None:
        dead.append(delivery)

    reader = broker.dead_letter_consumer("t", "g", collect)
    await reader.start()
    await eventually(lambda: len(dead) >= count, what=f"{count} dead letters")
    await reader.stop()
    return dead


@pytest.mark.asyncio
async def test_immediate_tries_then_delayed_redeliveries_then_dead_letters(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send("t", b"x")
    calls: list[tuple[int, float]] = []
    policy = msgkit.RetryPolicy(immediate_retries=2, max_attempts=3, initial_delay=0.1, multiplier=2, jitter=0)

    async def failing(delivery: msgkit.Delivery) -> None:
        calls.append((delivery.attempt, time.monotonic()))
        raise ConnectionError("downstream unavailable")

    consumer = broker.consumer("t", "g", failing, retry=policy)
    await consumer.start()
    (dead,) = await _dead_letters(broker, 1)
    await consumer.stop()
    assert [a for a, _ in calls] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    gap_1_2 = calls[3][1] - calls[2][1]
    gap_2_3 = calls[6][1] - calls[5][1]
    assert 0.1 <= gap_1_2 < 0.1 + 0.3
    assert 0.2 <= gap_2_3 < 0.2 + 0.3
    headers = dead.headers
    assert headers[DLQ_REASON].startswith("attempts exhausted (3 of 3); last error ConnectionError")
    assert headers[DLQ_ERROR_TYPE] == "ConnectionError"
    assert headers[DLQ_ATTEMPTS] == "3"
    first, last = float(headers[DLQ_FIRST_FAILED_AT]), float(headers[DLQ_LAST_FAILED_AT])
    assert last - first >= 0.3  # the first failure was remembered across redeliveries
    assert FIRST_FAILED_AT in headers


@pytest.mark.asyncio
async def test_errors_outside_retry_on_and_validation_errors_dead_letter_at_once(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send("t", b"not-retried")
    await broker.send("t", b"invalid")
    await broker.send("t", b"listed")
    calls: list[bytes] = []
    policy = msgkit.RetryPolicy(retry_on=(ConnectionError,), dead_letter_on=(KeyError,), initial_delay=0)

    async def handle(body: bytes) -> None:
        calls.append(body)
        if body == b"not-retried":
            raise ZeroDivisionError("bug")
        if body == b"invalid":
            Order.model_validate({"id": "x"})
        raise KeyError("missing")  # a ConnectionError would be retried; KeyError is listed

    consumer = broker.consumer("t", "g", handle, retry=policy)
    await consumer.start()
    dead = await _dead_letters(broker, 3)
    await consumer.stop()
    assert sorted(calls) == sorted([b"not-retried", b"invalid", b"listed"])  # one call each
    by_body = {d.body: d.headers for d in dead}
    assert by_body[b"not-retried"][DLQ_REASON] == "not retried: ZeroDivisionError: bug"
    assert by_body[b"invalid"][DLQ_ERROR_TYPE] == "ValidationError"
    assert by_body[b"listed"][DLQ_ERROR_TYPE] == "KeyError"
    assert {h[DLQ_ATTEMPTS] for h in by_body.values()} == {"1"}


@pytest.mark.asyncio
async def test_too_old_messages_are_not_retried(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    old = msgkit.Message(body=b"old", timestamp=time.time() - 3600)
    await broker.send_batch("t", [old])
    calls = 0

    async def failing(body: bytes) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    consumer = broker.consumer("t", "g", failing, retry=msgkit.RetryPolicy(max_age=60))
    await consumer.start()
    (dead,) = await _dead_letters(broker, 1)
    await consumer.stop()
    assert calls == 1
    assert dead.headers[DLQ_REASON].startswith("too old to retry (3600s, max_age 60s)")


@pytest.mark.asyncio
async def test_retry_later_counts_attempts_and_is_limited(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send("t", b"x")
    attempts: list[int] = []

    async def later(delivery: msgkit.Delivery) -> None:
        attempts.append(delivery.attempt)
        raise msgkit.RetryLater(0.05, "not yet")

    consumer = broker.consumer("t", "g", later, retry=msgkit.RetryPolicy(max_attempts=3))
    await consumer.start()
    (dead,) = await _dead_letters(broker, 1)
    await consumer.stop()
    assert attempts == [1, 2, 3]
    assert "retry requested: not yet" in dead.headers[DLQ_REASON]


@pytest.mark.asyncio
async def test_default_policy_retries_with_backoff(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send("t", b"x")
    times: list[float] = []
    recovered = asyncio.Event()

    async def flaky(delivery: msgkit.Delivery) -> None:
        times.append(time.monotonic())
        if delivery.attempt == 1:
            raise ConnectionError("blip")
        recovered.set()

    consumer = broker.consumer("t", "g", flaky)
    assert consumer.settings.retry == msgkit.RetryPolicy()
    await consumer.start()
    await asyncio.wait_for(recovered.wait(), 5)
    await consumer.stop()
    assert 0.9 <= times[1] - times[0] < 2.0  # the default first delay is 1 s, jitter 10%


@pytest.mark.asyncio
async def test_without_a_policy_failures_redeliver_at_once(broker: msgkit.Broker) -> None:
    await broker.declare("t", "g")
    await broker.send("t", b"x")
    attempts: list[int] = []

    async def flaky(delivery: msgkit.Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt < 4:
            raise ConnectionError("blip")

    consumer = broker.consumer("t", "g", flaky, retry=None)
    await consumer.start()
    await eventually(lambda: attempts == [1, 2, 3, 4])
    await consumer.stop()

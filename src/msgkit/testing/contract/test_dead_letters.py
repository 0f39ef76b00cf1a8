"""Dead letters: exhausted and undecodable messages are parked with the reason, and block nothing."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import BaseModel

from msgkit import Delivery, RetryPolicy
from msgkit.message import DLQ_ATTEMPTS, DLQ_ERROR_TYPE, DLQ_GROUP, DLQ_REASON, DLQ_TOPIC
from msgkit.testing.contract.helpers import Received, contract_run, eventually

MAX_ATTEMPTS = 3


class Order(BaseModel):
    """The body type of the undecodable-message test."""

    number: int


@pytest.mark.asyncio
async def test_a_message_that_always_fails_is_dead_lettered_and_blocks_nothing(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        calls: Counter[str] = Counter()
        good = Received()

        async def handler(body: bytes, delivery: Delivery) -> None:
            calls[delivery.message.id] += 1
            if body == b"poison":
                raise ValueError("boom ✗ always")
            good.record(delivery)

        key = "one-key"  # the poison message and the good ones share a key (partition, lane)
        poison = await run.broker.send(topic, b"poison", key=key, headers={"origin": "contract ✓"})
        good_ids = await run.send_all(topic, [f"good {i}".encode() for i in range(10)], key=key)
        policy = RetryPolicy(max_attempts=MAX_ATTEMPTS, initial_delay=0)
        consumer = await run.start(topic, group, handler, retry=policy)
        dead = await run.dead_letters(topic, group)

        await good.wait_for(good_ids)
        await dead.wait_for([poison])
        await consumer.stop()
        letter = dead.by_id()[poison]
        assert letter.message.body == b"poison"
        assert letter.message.key == key
        headers = letter.message.headers
        assert headers.get("origin") == "contract ✓", "the dead letter lost the message's own headers"
        assert "boom ✗ always" in headers.get(DLQ_REASON, ""), f"reason header: {headers.get(DLQ_REASON)!r}"
        assert headers.get(DLQ_ERROR_TYPE) == "ValueError"
        assert headers.get(DLQ_ATTEMPTS) == str(MAX_ATTEMPTS)
        assert (headers.get(DLQ_TOPIC), headers.get(DLQ_GROUP)) == (topic, group)
        assert calls[poison] == MAX_ATTEMPTS, f"handled {calls[poison]} times with max_attempts={MAX_ATTEMPTS}"
        assert dead.ids == [poison], "only the failing message belongs in the dead letters"


@pytest.mark.asyncio
async def test_an_undecodable_message_is_dead_lettered_at_once_and_blocks_nothing(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        numbers: list[int] = []

        async def handler(order: Order) -> None:
            numbers.append(order.number)

        key = "one-key"
        poison = await run.broker.send(topic, b"not json", key=key)
        for number in range(10):
            await run.broker.send(topic, Order(number=number), key=key)
        await run.start(topic, group, handler)
        dead = await run.dead_letters(topic, group)

        await dead.wait_for([poison])
        headers = dead.by_id()[poison].message.headers
        assert headers.get(DLQ_ATTEMPTS) == "1", "an undecodable message must not be retried"
        assert headers.get(DLQ_ERROR_TYPE) == "DecodeError"
        assert headers.get(DLQ_REASON), "the dead letter does not say why"
        assert (headers.get(DLQ_TOPIC), headers.get(DLQ_GROUP)) == (topic, group)
        await eventually(lambda: sorted(numbers) == list(range(10)), what=lambda: f"handled {sorted(numbers)}")
        assert dead.ids == [poison]

"""Deleting a group: its messages, delayed redeliveries and dead letters go; deleting is idempotent."""

from __future__ import annotations

import asyncio
import time

import pytest

import msgkit
from msgkit import Delivery
from msgkit.testing.contract.helpers import MARGIN, ContractRun, Received, contract_run, eventually

#: Seconds of the delayed redelivery pending when the group is deleted (short: the test waits it out).
RETRY_DELAY = 2.0


async def _delete(run: ContractRun, topic: str, group: str) -> None:
    """``broker.delete``, or skip the test on a transport that cannot delete."""
    try:
        await run.broker.delete(topic, group)
    except msgkit.NotSupportedError as exc:
        pytest.skip(f"the transport cannot delete: {exc}")


async def _dead_letter_ids(run: ContractRun, topic: str, group: str) -> list[str]:
    tooling = await run.broker.dead_letters(topic, group, wait=1.0)
    return [info.id for info in await tooling.peek(limit=None)]


@pytest.mark.asyncio
async def test_a_deleted_group_declared_again_starts_empty(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        poison = await run.broker.send(topic, b"poison")
        later = await run.broker.send(topic, b"later")
        seen: set[str] = set()

        async def handler(body: bytes, delivery: Delivery) -> None:
            seen.add(delivery.message.id)
            if body == b"poison":
                raise msgkit.Reject("contract: dead-letter me")
            raise msgkit.RetryLater(RETRY_DELAY, "contract: come back later")

        consumer = await run.start(topic, group, handler)
        await eventually(lambda: {poison, later} <= seen, what="both messages handled once")
        await eventually(lambda: consumer.in_flight == 0, what="both messages settled")
        retried_at = time.monotonic()
        await consumer.stop()
        pending = await run.send_all(topic, [b"pending 1", b"pending 2"])
        deadline = time.monotonic() + 30
        while poison not in await _dead_letter_ids(run, topic, group):
            assert time.monotonic() < deadline, "the rejected message never reached the dead letters"

        await _delete(run, topic, group)
        await run.broker.delete(topic, group)  # idempotent

        await run.broker.declare(topic, group)
        received = Received()
        await run.start(topic, group, received)
        sentinel = await run.broker.send(topic, b"sentinel")
        await received.wait_for([sentinel])
        # absence needs waiting: until the deleted delayed redelivery would have been due, and then some
        due = retried_at + RETRY_DELAY + run.capabilities.delay_tolerance + MARGIN
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        old = {poison, later, *pending}
        assert not old & set(received.ids), f"the new group received old messages: {sorted(old & set(received.ids))}"
        assert received.ids == [sentinel]
        assert await _dead_letter_ids(run, topic, group) == [], "the new group has the old group's dead letters"


@pytest.mark.asyncio
async def test_deleting_what_does_not_exist_is_fine(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await _delete(run, topic, group)
        await run.broker.delete(topic, group)
        with pytest.raises(ValueError, match="invalid group name"):
            await run.broker.delete(topic, "a b")
        with pytest.raises(ValueError, match="invalid topic name"):
            await run.broker.delete("", group)


@pytest.mark.asyncio
async def test_deleting_a_group_with_a_running_consumer_is_refused(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        received = Received()
        consumer = await run.start(topic, group, received)
        with pytest.raises(msgkit.StateError, match="running consumer"):
            await run.broker.delete(topic, group)
        sent = await run.broker.send(topic, b"still here")
        await received.wait_for([sent])  # the refused delete changed nothing
        await consumer.stop()
        await _delete(run, topic, group)

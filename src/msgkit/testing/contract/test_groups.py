"""Groups: competing consumers share a group's work, every group gets every message, acks stick."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from msgkit import Delivery, Message
from msgkit.testing.contract.helpers import Received, contract_run, eventually, quiet_period, require


def _working(received: Received) -> Callable[[Delivery], Awaitable[None]]:
    async def handler(delivery: Delivery) -> None:
        received.record(delivery)
        await asyncio.sleep(0.002)  # a little work, so that one consumer cannot take everything

    return handler


@pytest.mark.asyncio
async def test_competing_consumers_share_a_group_and_each_message_is_handled_once(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        first, second = Received(), Received()
        await run.start(topic, group, _working(first), max_in_flight=5)
        await run.start(topic, group, _working(second), max_in_flight=5)
        ids = await run.broker.send_batch(topic, [Message.of(f"m{i}".encode(), key=f"k{i}") for i in range(200)])

        await eventually(
            lambda: set(ids) <= set(first.ids) | set(second.ids),
            what=lambda: f"{len(set(ids) - set(first.ids) - set(second.ids))} of 200 messages never arrived",
        )
        assert first.ids, "the first consumer of the group got nothing"
        assert second.ids, "the second consumer of the group got nothing"
        twice = [i for i, n in Counter(first.ids + second.ids).items() if n > 1]
        assert not twice, f"{len(twice)} messages were handled more than once in one group"


@pytest.mark.msgkit_capability("fan_out")
@pytest.mark.asyncio
async def test_every_group_receives_every_message(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        require(run.capabilities.fan_out, "fan_out")
        topic, group_a = run.names()
        group_b = run.names()[1]
        await run.broker.declare(topic, group_a)
        await run.broker.declare(topic, group_b)
        received_a, received_b = Received(), Received()
        await run.start(topic, group_a, received_a)
        await run.start(topic, group_b, received_b)

        ids = await run.send_all(topic, [f"m{i}".encode() for i in range(50)])
        await received_a.wait_for(ids)
        await received_b.wait_for(ids)
        assert sorted(received_a.ids) == sorted(ids)
        assert sorted(received_b.ids) == sorted(ids)
        assert {d.group for d in received_a.deliveries} == {group_a}
        assert {d.group for d in received_b.deliveries} == {group_b}


@pytest.mark.asyncio
async def test_acked_messages_are_not_delivered_again_after_a_restart(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        before = Received()
        consumer = await run.start(topic, group, before)
        old = await run.send_all(topic, [f"old {i}".encode() for i in range(20)])
        await before.wait_for(old)
        await consumer.stop()

        after = Received()
        await run.start(topic, group, after)
        new = await run.send_all(topic, [f"new {i}".encode() for i in range(5)])
        await after.wait_for(new)
        await quiet_period(run.capabilities)  # acks lost on stop would come back by now
        again = set(after.ids) & set(old)
        assert not again, f"{len(again)} acked messages were delivered again to the next consumer"


@pytest.mark.msgkit_capability("replay_for_new_group")
@pytest.mark.asyncio
async def test_a_new_group_receives_the_topic_history(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        require(run.capabilities.replay_for_new_group, "replay_for_new_group")
        topic, group = run.names()
        await run.broker.declare(topic)
        ids = await run.send_all(topic, [f"history {i}".encode() for i in range(10)])

        received = Received()
        await run.start(topic, group, received)
        await received.wait_for(ids)
        later = Received()
        await run.start(topic, run.names()[1], later)
        await later.wait_for(ids)
        assert sorted(received.ids) == sorted(later.ids) == sorted(ids)

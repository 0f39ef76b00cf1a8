"""Lifecycle and input checks: closing, using a closed broker, bad names, messages too large."""

from __future__ import annotations

import asyncio

import pytest

import msgkit
from msgkit import Delivery, Message
from msgkit.testing.contract.helpers import Received, contract_run, unique

BAD_NAMES = ["", "a b", "x" * 300, "a/b", "-leading-dash", "new\nline", "ünï"]


async def _ignore(delivery: Delivery) -> None:
    return None


@pytest.mark.asyncio
async def test_close_is_idempotent_and_a_closed_broker_refuses_work(msgkit_contract_url: str) -> None:
    broker = msgkit.Broker(msgkit_contract_url)
    await broker.connect()
    topic, group = unique("ct"), unique("cg")
    consumer = broker.consumer(topic, group, _ignore, stop_timeout=1.0)
    await consumer.start()
    await asyncio.gather(broker.close(), broker.close())  # concurrently
    await broker.close()  # and again
    assert not consumer.running, "closing the broker must stop its consumers"
    await consumer.stop()  # stopping a stopped consumer is fine

    with pytest.raises(msgkit.ClosedError):
        await broker.send(topic, b"after close")
    with pytest.raises(msgkit.ClosedError):
        await broker.send_batch(topic, [b"after close"])
    with pytest.raises(msgkit.ClosedError):
        await broker.declare(topic, group)
    with pytest.raises(msgkit.ClosedError):
        broker.consumer(topic, group, _ignore)
    async with contract_run(msgkit_contract_url) as cleanup:
        cleanup.track(topic, group)  # deleted by another broker, as this one is closed


@pytest.mark.asyncio
@pytest.mark.parametrize("name", BAD_NAMES, ids=["empty", "space", "300-chars", "slash", "dash", "newline", "unicode"])
async def test_bad_topic_and_group_names_are_refused_clearly(msgkit_contract_url: str, name: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        good_topic, good_group = run.names()
        with pytest.raises(ValueError, match="invalid topic name"):
            await run.broker.send(name, b"x")
        with pytest.raises(ValueError, match="invalid topic name"):
            await run.broker.send_batch(name, [b"x"])
        with pytest.raises(ValueError, match="invalid topic name"):
            await run.broker.declare(name, good_group)
        with pytest.raises(ValueError, match="invalid topic name"):
            run.broker.consumer(name, good_group, _ignore)
        with pytest.raises(ValueError, match="invalid group name"):
            await run.broker.declare(good_topic, name)
        with pytest.raises(ValueError, match="invalid group name"):
            run.broker.consumer(good_topic, name, _ignore)


@pytest.mark.msgkit_capability("max_message_size")
@pytest.mark.asyncio
async def test_a_message_too_large_is_refused_before_it_reaches_the_broker(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        limit = run.capabilities.max_message_size
        topic, group = run.names()
        await run.broker.declare(topic, group)
        received = Received()
        await run.start(topic, group, received)

        with pytest.raises(msgkit.MessageTooLargeError):
            await run.broker.send(topic, b"x" * (limit + 1))
        with pytest.raises(msgkit.MessageTooLargeError):  # the headers count too
            await run.broker.send(topic, b"x" * (limit - 100), headers={"h": "y" * 200})
        fits = Message.of(b"fits")
        with pytest.raises(msgkit.MessageTooLargeError):  # nothing of a batch is sent
            await run.broker.send_batch(topic, [fits, Message.of(b"x" * (limit + 1))])

        sentinel = await run.broker.send(topic, b"sentinel")
        await received.wait_for([sentinel])
        assert received.ids == [sentinel], "a refused message (or part of a refused batch) reached the broker"

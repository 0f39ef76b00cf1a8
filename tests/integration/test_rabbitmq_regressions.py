"""Regressions the fault-injection suite (chaos/, docs/fault-injection.md) found on RabbitMQ.

Both restart the broker: they run only with ``MSGKIT_RABBITMQ_RESTART_COMMAND`` set, and must
never be pointed at a broker that others are using.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import aio_pika
import pytest

import msgkit
from msgkit.transports import _rabbitmq as rabbitmq_internals

pytestmark = pytest.mark.asyncio

MESSAGES = 200
#: Long enough that every message still waits in the delay queue when the broker goes down.
DELAY = 3.0


async def _restart(command: str) -> None:
    process = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode(errors="replace")


async def _delete(url: str, topic: str, group: str, delay_ms: int) -> None:
    """Quorum queues cost the broker memory: leave none behind."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        names = rabbitmq_internals.group_names(topic, group)
        for queue in (names.queue, names.dead_letters, names.delay_queue(delay_ms)):
            await channel.queue_delete(queue)
        await channel.exchange_delete(topic)
    finally:
        await connection.close()


@pytest.mark.timeout(240)
async def test_delayed_redeliveries_waiting_across_a_broker_restart_all_come_back(msgkit_rabbitmq_url: str) -> None:
    # Found by the chaos suite: 3 of 10,000 messages lost around a restart. Cause: a Retry(delay)
    # waits in a delay queue that dead-letters back to the group's quorum queue; a classic delay
    # queue expires its messages at boot before the quorum queue has a leader, and RabbitMQ drops
    # them (classic queues dead-letter at most once). Here all 200 were lost before the fix.
    command = os.environ.get("MSGKIT_RABBITMQ_RESTART_COMMAND")
    if not command:
        pytest.skip("MSGKIT_RABBITMQ_RESTART_COMMAND is not set (. .brokers/env)")
    topic, group = f"regr-{uuid.uuid4().hex[:10]}", "g"
    first: set[str] = set()
    second: set[str] = set()
    all_failed_once = asyncio.Event()
    all_back = asyncio.Event()

    async def handler(delivery: msgkit.Delivery) -> msgkit.Outcome | None:
        if delivery.attempt == 1:
            first.add(delivery.id)
            if len(first) == MESSAGES:
                all_failed_once.set()
            return msgkit.Retry(delay=DELAY)
        second.add(delivery.id)
        if len(second) == MESSAGES:
            all_back.set()
        return None

    async with msgkit.Broker(msgkit_rabbitmq_url) as broker:
        await broker.declare(topic, group)
        consumer = broker.consumer(topic, group, handler, max_in_flight=100, retry=None)
        await consumer.start()
        ids = await broker.send_batch(topic, [msgkit.Message.of(b"x") for _ in range(MESSAGES)])
        await asyncio.wait_for(all_failed_once.wait(), DELAY)
        assert len(second) < MESSAGES, "the delay passed before the restart: this tests nothing"
        await _restart(command)
        try:
            await asyncio.wait_for(all_back.wait(), 90)
        except TimeoutError:
            pass  # the assertion below says how many
        await consumer.stop()
    await _delete(msgkit_rabbitmq_url, topic, group, rabbitmq_internals.delay_tier_ms(DELAY))
    lost = set(ids) - second
    assert not lost, f"{len(lost)} of {MESSAGES} delayed redeliveries lost across the restart"


async def test_delay_queues_are_quorum_with_at_least_once_dead_lettering_and_outlive_their_epoch() -> None:
    names = rabbitmq_internals.group_names("orders", "billing")
    arguments = rabbitmq_internals.delay_queue_arguments(200, names.queue)
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-dead-letter-strategy"] == "at-least-once"
    assert arguments["x-overflow"] == "reject-publish"  # at-least-once is ignored without it
    epoch_ms = rabbitmq_internals.DELAY_QUEUE_EPOCH * 1000
    assert arguments["x-expires"] > epoch_ms + 2 * 200
    today, tomorrow = names.delay_queue(200, 7), names.delay_queue(200, 8)
    assert today != tomorrow
    assert rabbitmq_internals.delay_of(today) == 200

"""Broker.delete on memory://: what goes, what stays, and what is refused."""

from __future__ import annotations

import pytest

import msgkit
from msgkit.transports.memory import MemoryTransport, _namespaces

pytestmark = pytest.mark.asyncio


async def _ignore(delivery: msgkit.Delivery) -> None:
    return None


async def test_a_topic_stays_while_another_group_has_it(memory_url: str) -> None:
    async with msgkit.Broker(memory_url) as broker:
        await broker.declare("orders", "billing")
        await broker.declare("orders", "shipping")
        await broker.send("orders", b"one")
        await broker.delete("orders", "billing")
        transport = broker.transport
        assert isinstance(transport, MemoryTransport)
        topics = _namespaces[transport.name].topics
        assert set(topics["orders"].groups) == {"shipping"}
        assert transport.stats("orders", "shipping").unread == 1, "deleting billing took shipping's message"
        await broker.delete("orders", "shipping")
        assert "orders" not in topics


async def test_a_running_consumer_of_the_group_refuses_the_delete(memory_url: str) -> None:
    async with msgkit.Broker(memory_url) as broker:
        consumer = broker.consumer("orders", "billing", _ignore)
        await consumer.start()
        with pytest.raises(msgkit.StateError, match="stop the 1 running consumer"):
            await broker.delete("orders", "billing")
        await broker.delete("orders", "shipping")  # another group of the topic is fine
        await consumer.stop()
        await broker.delete("orders", "billing")


async def test_a_transport_without_delete_says_so(memory_url: str) -> None:
    class Older(MemoryTransport):  # a third-party transport written before delete existed
        delete = msgkit.Transport.delete

    async with msgkit.Broker(memory_url, transport=Older()) as broker:
        with pytest.raises(msgkit.NotSupportedError, match="Older cannot delete"):
            await broker.delete("orders", "billing")
        with pytest.raises(NotImplementedError):
            await broker.delete("orders", "billing")

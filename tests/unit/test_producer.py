"""Sending: encodings, ids, sizes, headers, and using a closed broker."""

from __future__ import annotations

import re
import uuid

import pytest
from pydantic import BaseModel

import msgkit
from msgkit.transports.memory import MemoryTransport

pytestmark = pytest.mark.asyncio


class Order(BaseModel):
    id: int
    note: str = ""


async def _received(broker: msgkit.Broker, topic: str, count: int) -> list[msgkit.Delivery]:
    transport = broker.transport
    sub = await transport.subscribe(topic, "probe", prefetch=count)
    try:
        got = list(await sub.fetch(count, 1.0))
        await sub.settle([(d, msgkit.ACK) for d in got])
        return got
    finally:
        await sub.close()


async def test_bodies_are_encoded_once_and_kept(broker: msgkit.Broker) -> None:
    await broker.declare("t", "probe")
    await broker.send("t", Order(id=1, note="ü"))
    await broker.send("t", {"a": [1, 2]})
    await broker.send("t", b"\x00\xffraw")
    await broker.send("t", bytearray(b"ba"))
    await broker.send("t", "text")
    got = await _received(broker, "t", 5)
    assert [d.body for d in got] == [
        b'{"id":1,"note":"\xc3\xbc"}',
        b'{"a":[1,2]}',
        b"\x00\xffraw",
        b"ba",
        b'"text"',
    ]


async def test_ids_are_uuid7_and_kept_with_key_and_headers(broker: msgkit.Broker) -> None:
    await broker.declare("t", "probe")
    first = await broker.send("t", b"a", key="k", headers={"héader": "välue"})
    given = await broker.send("t", b"b", message_id="my-id")
    got = await _received(broker, "t", 2)
    parsed = uuid.UUID(first)
    assert parsed.version == 7
    assert (got[0].id, got[0].key, dict(got[0].headers)) == (first, "k", {"héader": "välue"})
    assert got[1].id == given == "my-id"
    ids = [msgkit.new_message_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", i) for i in ids)


async def test_too_large_is_refused_before_the_broker(memory_url: str) -> None:
    async with msgkit.Broker(memory_url + "&max_message_size=2048") as broker:
        await broker.declare("t", "probe")
        with pytest.raises(msgkit.MessageTooLargeError, match="at most 2048 bytes"):
            await broker.send("t", b"x" * 2049)
        with pytest.raises(msgkit.MessageTooLargeError):
            await broker.send("t", b"x" * 1000, headers={"h": "y" * 1100})
        with pytest.raises(msgkit.MessageTooLargeError):
            await broker.send_batch("t", [b"ok", b"x" * 4000])
        transport = broker.transport
        assert isinstance(transport, MemoryTransport)
        assert transport.stats("t", "probe").unread == 0  # nothing of the failed batch was sent


async def test_bad_arguments_are_clear(broker: msgkit.Broker) -> None:
    with pytest.raises(TypeError, match="headers must map str to str"):
        await broker.send("t", b"x", headers={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="key must be a string"):
        await broker.send("t", b"x", key=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot encode a object body as JSON"):
        await broker.send("t", object())
    with pytest.raises(TypeError, match=r"Message.body must be bytes"):
        await broker.send_batch("t", [msgkit.Message(body="str")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid topic name"):
        await broker.send("bad topic", b"x")


async def test_closed_broker_refuses_and_close_is_idempotent(memory_url: str) -> None:
    broker = msgkit.Broker(memory_url)
    await broker.send("t", b"x")  # connects on first use
    await broker.close()
    await broker.close()
    with pytest.raises(msgkit.ClosedError, match="is closed"):
        await broker.send("t", b"x")
    with pytest.raises(msgkit.ClosedError):
        await broker.connect()

    async def handle(body: bytes) -> None:
        pass

    with pytest.raises(msgkit.ClosedError):
        broker.consumer("t", "g", handle)

"""Messages arrive whole: id, key, body and headers kept; none lost, none duplicated, none misrouted."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from msgkit import Message
from msgkit.testing.contract.helpers import Received, contract_run

#: Every byte value, NUL and bytes that are not UTF-8.
BINARY = bytes(range(256)) + b"\x00\x00 not utf-8: \xc3\x28 \xff\xfe\x80\x00"
#: 50 headers with non-ASCII names and values.
UNICODE_HEADERS = {f"h{i}-naïve-ключ": f'välue {i} ✓ 日本語 🎉 "quoted" ;=,: ' for i in range(50)}


def _large_body(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.mark.msgkit_capability("max_message_size")
@pytest.mark.asyncio
async def test_roundtrip_keeps_id_key_body_and_headers(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        header_room = 1024  # id, key and headers of the large message fit well within this
        large = _large_body(max(run.capabilities.max_message_size - header_room, 1))
        custom_id = f"ct-custom-id-{uuid.uuid4().hex}"
        cases: list[tuple[bytes, str | None, str | None, dict[str, str]]] = [
            (BINARY, custom_id, "ключ-🔑", UNICODE_HEADERS),
            (b"", None, None, {}),
            (large, None, "large", {"kind": "large"}),
        ]
        expected: list[Message] = []
        for body, message_id, key, headers in cases:
            sent_id = await run.broker.send(topic, body, key=key, headers=headers, message_id=message_id)
            if message_id is not None:
                assert sent_id == message_id, "send() must return the message_id it was given"
            expected.append(Message(body=body, id=sent_id, key=key, headers=headers))
        batch = [Message.of(BINARY, key="batch", headers=UNICODE_HEADERS), Message.of(b"")]
        batch_ids = await run.broker.send_batch(topic, batch)
        assert batch_ids == [m.id for m in batch], "send_batch() must return the ids of the messages, in order"
        expected += batch

        received = Received()
        await run.start(topic, group, received)
        await received.wait_for([m.id for m in expected])

        got = received.by_id()
        for message in expected:
            delivery = got[message.id]
            assert delivery.message.body == message.body, f"body of {message!r} changed"
            assert delivery.message.key == message.key
            for name, value in message.headers.items():
                assert delivery.message.headers.get(name) == value, f"header {name!r} of {message!r} changed"
            assert (delivery.topic, delivery.group, delivery.attempt) == (topic, group, 1)
        assert not received.duplicates()


@pytest.mark.asyncio
async def test_messages_sent_before_the_first_consumer_are_delivered(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        ids = await run.send_all(topic, [f"early {i}".encode() for i in range(10)])
        ids += await run.broker.send_batch(topic, [f"early batch {i}".encode() for i in range(10)])

        received = Received()
        await run.start(topic, group, received)
        await received.wait_for(ids)
        assert sorted(received.ids) == sorted(ids)


@pytest.mark.asyncio
async def test_thousands_of_messages_from_concurrent_producers_all_arrive_once(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        topic, group = run.names()
        await run.broker.declare(topic, group)
        received = Received()
        await run.start(topic, group, received)

        async def one_by_one(producer: int) -> list[str]:
            return await run.send_all(topic, [f"p{producer} m{i}".encode() for i in range(250)], key=f"p{producer}")

        async def in_batches(producer: int) -> list[str]:
            ids: list[str] = []
            for start in range(0, 750, 50):
                bodies = [Message.of(f"b{producer} m{i}".encode(), key=f"k{i % 7}") for i in range(start, start + 50)]
                ids += await run.broker.send_batch(topic, bodies)
            return ids

        results = await asyncio.gather(*(one_by_one(p) for p in range(3)), *(in_batches(p) for p in range(3)))
        sent = [i for ids in results for i in ids]
        assert len(sent) == len(set(sent)) == 3000, "every send must return a distinct id"

        await received.wait_for(sent, timeout=60)
        for consumer in run.broker.consumers:
            await consumer.stop()
        assert not received.duplicates(), f"{len(received.duplicates())} messages arrived twice without any failure"
        assert len(received.ids) == 3000


@pytest.mark.asyncio
async def test_topics_are_isolated(msgkit_contract_url: str) -> None:
    async with contract_run(msgkit_contract_url) as run:
        (topic_a, group), topic_b = run.names(), run.names()[0]
        received_a, received_b = Received(), Received()
        await run.start(topic_a, group, received_a)
        await run.start(topic_b, group, received_b)  # the same group name on another topic

        ids_b = await run.send_all(topic_b, [f"b{i}".encode() for i in range(20)])
        ids_a = await run.send_all(topic_a, [f"a{i}".encode() for i in range(20)])

        await received_a.wait_for(ids_a)
        await received_b.wait_for(ids_b)
        assert sorted(received_a.ids) == sorted(ids_a), "a consumer of topic A got messages of topic B"
        assert sorted(received_b.ids) == sorted(ids_b), "a consumer of topic B got messages of topic A"

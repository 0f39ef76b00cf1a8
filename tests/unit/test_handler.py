"""Handler signatures are checked when the consumer is built, with errors that teach."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import msgkit
from msgkit.handler import bind_handler
from msgkit.message import Message


class Order(BaseModel):
    id: int


def _delivery(body: bytes) -> msgkit.Delivery:
    return msgkit.Delivery(Message(body=body), "t", "g", 1, None)


async def _call(handler: Any, body: bytes) -> Any:
    return await bind_handler(handler)(_delivery(body))


@pytest.mark.asyncio
async def test_shapes_are_bound_by_annotation() -> None:
    got: list[object] = []

    async def model_only(order: Order) -> None:
        got.append(order)

    async def model_and_delivery(o: Order, d: msgkit.Delivery) -> None:
        got.append((o, d.attempt))

    async def delivery_then_model(d: msgkit.Delivery, o: Order) -> None:
        got.append((d.topic, o))

    async def raw(body: bytes) -> None:
        got.append(body)

    async def as_dict(data: dict[str, int]) -> None:
        got.append(data)

    class Callable:
        async def __call__(self, order: Order) -> None:
            got.append(("callable", order.id))

    for handler in (model_only, model_and_delivery, delivery_then_model, raw, as_dict, Callable()):
        await _call(handler, b'{"id": 3}')
    assert got == [
        Order(id=3),
        (Order(id=3), 1),
        ("t", Order(id=3)),
        b'{"id": 3}',
        {"id": 3},
        ("callable", 3),
    ]


@pytest.mark.asyncio
async def test_undecodable_body_raises_decode_error() -> None:
    async def handle(order: Order) -> None:
        raise AssertionError("not reached")

    with pytest.raises(msgkit.DecodeError, match="body is not a valid Order: id: Field required"):
        await _call(handle, b"{}")
    with pytest.raises(msgkit.DecodeError, match="Invalid JSON"):
        await _call(handle, b"\x00\xff")


def test_bad_signatures_fail_at_build_time() -> None:
    def sync_handler(order: Order) -> None:
        pass

    async def unannotated(order) -> None:  # type: ignore[no-untyped-def]
        pass

    async def no_params() -> None:
        pass

    async def too_many(order: Order, delivery: msgkit.Delivery, extra: int) -> None:
        pass

    async def kw_only(order: Order, *, flag: bool) -> None:
        pass

    broker = msgkit.Broker("memory://sig")
    cases = [
        (sync_handler, "must be an async function"),
        (unannotated, "has no type annotation"),
        (no_params, "takes no parameters"),
        (too_many, "parameter 'extra' cannot be filled"),
        (kw_only, "keyword-only parameter 'flag' needs a default"),
    ]
    for handler, message in cases:
        with pytest.raises(msgkit.HandlerSignatureError, match=message):
            broker.consumer("t", "g", handler)


def test_bad_names_fail_at_build_time() -> None:
    broker = msgkit.Broker("memory://names")

    async def handle(body: bytes) -> None:
        pass

    for bad in ("", "has space", "-lead", "x" * 201, "ünï"):
        with pytest.raises(ValueError, match="invalid topic name"):
            broker.consumer(bad, "g", handle)
    with pytest.raises(ValueError, match="invalid group name"):
        broker.consumer("t", "a/b", handle)

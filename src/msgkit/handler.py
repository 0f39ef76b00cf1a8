"""Binding a user's handler once: which parameter gets the decoded body, which the Delivery."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from msgkit.codec import decoder_for
from msgkit.errors import HandlerSignatureError
from msgkit.message import Delivery, Outcome

Handler = Callable[..., Awaitable[Any]]
BoundHandler = Callable[[Delivery], Awaitable[Outcome | None]]


def _is_async(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an instance with async __call__
    return call is not None and not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


def bind_handler(handler: Handler) -> BoundHandler:
    """Check ``handler``'s signature and return ``f(delivery)`` that decodes and calls it.

    Accepted shapes (by annotation, any names)::

        async def h(order: Order) -> None
        async def h(order: Order, delivery: msgkit.Delivery) -> None
        async def h(delivery: msgkit.Delivery) -> None
        async def h(body: bytes) -> None          # the raw body

    The body is decoded and validated once per delivery; a body that fails raises DecodeError.
    """
    name = getattr(handler, "__qualname__", repr(handler))
    if not callable(handler):
        raise HandlerSignatureError(f"handler {name} is not callable")
    if not _is_async(handler):
        raise HandlerSignatureError(f"handler {name} must be an async function (async def)")
    target = handler if inspect.isfunction(handler) or inspect.ismethod(handler) else type(handler).__call__
    try:
        signature = inspect.signature(handler)
        hints = typing.get_type_hints(target)
    except (NameError, TypeError, ValueError) as exc:
        raise HandlerSignatureError(f"cannot read the signature of handler {name}: {exc}") from None

    body_type: Any = None
    order: list[str] = []  # "body" or "delivery", in parameter order
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.kind is param.KEYWORD_ONLY:
            if param.default is param.empty:
                raise HandlerSignatureError(
                    f"handler {name}: keyword-only parameter {param.name!r} needs a default; msgkit passes "
                    "the body and the Delivery positionally"
                )
            continue
        annotation = hints.get(param.name, param.empty)
        if annotation is Delivery:
            if "delivery" in order:
                raise HandlerSignatureError(f"handler {name} takes the Delivery twice")
            order.append("delivery")
            continue
        if len(order) == 2 or "body" in order:
            if param.default is not param.empty:
                continue
            raise HandlerSignatureError(
                f"handler {name}: parameter {param.name!r} cannot be filled; a handler takes the body "
                "and optionally a msgkit.Delivery"
            )
        if annotation is param.empty:
            raise HandlerSignatureError(
                f"handler {name}: parameter {param.name!r} has no type annotation; annotate it with the body "
                "type (a pydantic model, dict, bytes, ...) or with msgkit.Delivery"
            )
        body_type = annotation
        order.append("body")
    if not order:
        raise HandlerSignatureError(f"handler {name} takes no parameters; it needs the body or a msgkit.Delivery")

    if order == ["delivery"]:
        return typing.cast(BoundHandler, handler)
    decode = decoder_for(body_type)
    if order == ["body"]:

        def call_body(delivery: Delivery) -> Awaitable[Any]:
            return handler(decode(delivery.message.body))

        return call_body
    if order == ["body", "delivery"]:

        def call_body_delivery(delivery: Delivery) -> Awaitable[Any]:
            return handler(decode(delivery.message.body), delivery)

        return call_body_delivery

    def call_delivery_body(delivery: Delivery) -> Awaitable[Any]:
        return handler(delivery, decode(delivery.message.body))

    return call_delivery_body

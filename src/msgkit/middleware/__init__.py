"""Middleware: plain async callables that wrap the handler, composed once per consumer.

A middleware is ``async def mw(delivery, call_next) -> Outcome | None``. It may act before and
after ``await call_next(delivery)``, replace the outcome, or raise. Returning ``None`` means ack.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias

from msgkit.message import Delivery, Outcome

CallNext: TypeAlias = Callable[[Delivery], Awaitable[Outcome | None]]
Middleware: TypeAlias = Callable[[Delivery, CallNext], Awaitable[Outcome | None]]


def _bind(middleware: Middleware, call_next: CallNext) -> CallNext:
    def call(delivery: Delivery) -> Awaitable[Outcome | None]:
        return middleware(delivery, call_next)

    return call


def compose(handler: CallNext, middleware: Sequence[Middleware]) -> CallNext:
    """One callable running ``middleware`` outermost-first around ``handler``."""
    call = handler
    for mw in reversed(middleware):
        call = _bind(mw, call)
    return call


__all__ = ["CallNext", "Middleware", "compose"]

"""Sending: encode bodies, check sizes and names before anything reaches the broker."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TypeAlias

from msgkit.codec import encode_body
from msgkit.errors import MessageTooLargeError
from msgkit.message import Message, new_message_id
from msgkit.names import check_name
from msgkit.transports.base import Transport

#: Stores messages on a topic: ``Transport.publish``, or that wrapped by send middleware.
Publish: TypeAlias = Callable[[str, Sequence[Message]], Awaitable[None]]
#: ``async def mw(topic, messages, publish) -> None``: wraps every publish of a producer. It may
#: pass on other Message objects (same ids), e.g. with trace context added to their headers.
SendMiddleware: TypeAlias = Callable[[str, Sequence[Message], Publish], Awaitable[None]]


def _check_headers(headers: Mapping[str, str]) -> None:
    for name, value in headers.items():
        if type(name) is not str or type(value) is not str:
            raise TypeError(
                f"headers must map str to str; got {type(name).__name__} -> {type(value).__name__} for {name!r}"
            )


def _bind(middleware: SendMiddleware, publish: Publish) -> Publish:
    def call(topic: str, messages: Sequence[Message]) -> Awaitable[None]:
        return middleware(topic, messages, publish)

    return call


class Producer:
    """Sends to a transport. Use it through :meth:`msgkit.Broker.send` and ``send_batch``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._max_size = transport.capabilities.max_message_size
        self._middleware: list[SendMiddleware] = []
        self._publish: Publish | None = None  # the middleware chain, if any

    def add_middleware(self, middleware: SendMiddleware) -> None:
        """Wrap every later publish in ``middleware``; the first added runs outermost.

        Without send middleware a send calls the transport directly: unused, this costs nothing.
        """
        self._middleware.append(middleware)
        publish: Publish = self._publish_now
        for mw in reversed(self._middleware):
            publish = _bind(mw, publish)
        self._publish = publish

    def _publish_now(self, topic: str, messages: Sequence[Message]) -> Awaitable[None]:
        return self._transport.publish(topic, messages)

    def build(
        self,
        body: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> Message:
        """Encode and check one message without sending it."""
        if key is not None and type(key) is not str:
            raise TypeError(f"key must be a string or None, got {type(key).__name__}")
        if message_id is not None and (type(message_id) is not str or not message_id):
            raise TypeError("message_id must be a non-empty string or None")
        if headers:
            _check_headers(headers)
            headers = dict(headers)
        message = Message(encode_body(body), message_id or new_message_id(), key, headers or {}, time.time())
        self._check_size(message)
        return message

    def _check_size(self, message: Message) -> None:
        if message.size() > self._max_size:
            raise MessageTooLargeError(
                f"message {message.id} is {message.size()} bytes; this transport accepts at most "
                f"{self._max_size} bytes (body, id, key and headers together)"
            )

    async def send(self, topic: str, message: Message) -> str:
        check_name("topic", topic)
        if self._publish is None:
            await self._transport.publish(topic, (message,))
        else:
            await self._publish(topic, (message,))
        return message.id

    async def send_batch(self, topic: str, items: Iterable[object]) -> list[str]:
        check_name("topic", topic)
        messages: list[Message] = []
        for item in items:
            if isinstance(item, Message):
                if type(item.body) is not bytes:
                    raise TypeError("Message.body must be bytes; build the message with Message.of(body, ...)")
                if item.headers:
                    _check_headers(item.headers)
                self._check_size(item)
                messages.append(item)
            else:
                body = encode_body(item)
                message = Message(body, new_message_id(), None, {}, time.time())
                if len(body) + 36 > self._max_size:
                    self._check_size(message)
                messages.append(message)
        if messages:
            if self._publish is None:
                await self._transport.publish(topic, messages)
            else:
                await self._publish(topic, messages)
        return [m.id for m in messages]

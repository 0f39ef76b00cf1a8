"""The entry point of the API: a Broker connects by URL, sends, and runs consumers."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from msgkit.config import TransportSettings, redact_url, resolve_url
from msgkit.consumer import Consumer, ConsumerSettings, StateError
from msgkit.dlq import DeadLetters
from msgkit.errors import ClosedError, ConfigurationError
from msgkit.handler import Handler, bind_handler
from msgkit.middleware import Middleware, compose
from msgkit.names import check_name
from msgkit.producer import Producer, SendMiddleware
from msgkit.transports.base import Capabilities, Transport
from msgkit.transports.registry import transport_from_url

logger = logging.getLogger("msgkit.broker")

HandlerT = TypeVar("HandlerT", bound=Handler)


def _consumer_settings(settings: ConsumerSettings | None, options: Mapping[str, Any]) -> ConsumerSettings:
    if settings is not None and options:
        raise ConfigurationError(
            f"pass consumer options either as settings= or as keywords, not both ({sorted(options)})"
        )
    if settings is not None:
        return settings
    try:
        return ConsumerSettings(**options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid consumer option: {problems}") from None


class Broker:
    """A connection to one broker, chosen by URL, with the consumers that run on it.

    The URL is ``url`` if given, else ``$MSGKIT_URL``, else ``memory://``. Transport options go in
    the URL query or in ``settings`` (the transport's settings model, e.g.
    ``msgkit.transports.memory.MemorySettings``), not both. Use it as an async
    context manager, or call :meth:`connect` and :meth:`close`::

        async with msgkit.Broker("amqp://guest:guest@localhost/") as broker:
            await broker.send("orders", Order(id=1))

    ``send`` connects on first use. A closed broker stays closed.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: TransportSettings | None = None,
        transport: Transport | None = None,
    ) -> None:
        self._url = resolve_url(url)
        if transport is not None and settings is not None:
            raise ConfigurationError("pass a transport or settings for one, not both")
        self._transport = transport if transport is not None else transport_from_url(self._url, settings)
        self._producer = Producer(self._transport)
        self._state: Literal["new", "connected", "closed"] = "new"
        self._connect_lock = asyncio.Lock()
        self._consumers: list[Consumer] = []
        self._outer: list[Middleware] = []  # broker-wide, outside each consumer's retry policy
        self._inner: list[Middleware] = []  # broker-wide, inside it
        self._stop_requested: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"Broker({redact_url(self._url)!r}, state={self._state!r})"

    @property
    def url(self) -> str:
        """The broker URL with its secrets replaced by ``***``."""
        return redact_url(self._url)

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def capabilities(self) -> Capabilities:
        """What the transport behind this broker guarantees."""
        return self._transport.capabilities

    @property
    def consumers(self) -> Sequence[Consumer]:
        """The consumers built on this broker, in the order they were built."""
        return tuple(self._consumers)

    # ------------------------------------------------------------------ connection

    async def connect(self) -> Broker:
        """Connect the transport (once). Raise ClosedError after :meth:`close`."""
        if self._state == "connected":
            return self
        async with self._connect_lock:
            if self._state == "closed":
                raise ClosedError(f"broker {self.url} is closed")
            if self._state == "new":
                await self._transport.connect()
                self._state = "connected"
        return self

    async def _open(self) -> Transport:
        if self._state != "connected":
            await self.connect()
        return self._transport

    async def close(self) -> None:
        """Stop this broker's consumers gracefully, then close the transport. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        await asyncio.gather(*(c.stop() for c in self._consumers), return_exceptions=True)
        await self._transport.close()

    async def __aenter__(self) -> Broker:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ topology and sending

    async def declare(self, topic: str, group: str | None = None) -> None:
        """Create ``topic`` (and ``group``'s subscription) so messages sent from now on are kept."""
        check_name("topic", topic)
        if group is not None:
            check_name("group", group)
        transport = await self._open()
        await transport.declare(topic, group)

    async def delete(self, topic: str, group: str) -> None:
        """Delete ``group`` of ``topic`` with all it holds, and ``topic`` once no group of it remains.

        Removes what :meth:`declare` created for the group: its pending and delayed messages,
        dead letters, offsets and retry queues; then the topic and its messages when the transport
        sees no other group of it (each transport's ``delete`` docstring says how far it can tell).
        Deleting what does not exist is not an error. Stop every consumer of the group first, in
        every process: a running consumer of it on this broker is a :class:`StateError`. A
        transport that cannot delete raises :class:`msgkit.NotSupportedError`.
        """
        check_name("topic", topic)
        check_name("group", group)
        running = [c for c in self._consumers if c.topic == topic and c.group == group and c.running]
        if running:
            raise StateError(f"stop the {len(running)} running consumer(s) of {topic}/{group} before deleting it")
        transport = await self._open()
        await transport.delete(topic, group)

    async def send(
        self,
        topic: str,
        body: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Send one message; return its id once the broker has stored it.

        ``body`` is bytes (sent as is), a pydantic model, or any value pydantic dumps as JSON.
        """
        message = self._producer.build(body, key=key, headers=headers, message_id=message_id)
        if self._state != "connected":
            await self.connect()
        return await self._producer.send(topic, message)

    async def send_batch(self, topic: str, items: Iterable[object]) -> list[str]:
        """Send many messages in one go; return their ids once the broker has stored all of them.

        Each item is a :class:`msgkit.Message` (see ``Message.of`` for keys and headers) or a body.
        Raise :class:`msgkit.PublishError` naming the messages the broker did not store.
        """
        if self._state != "connected":
            await self.connect()
        return await self._producer.send_batch(topic, items)

    # ------------------------------------------------------------------ broker-wide middleware

    def add_send_middleware(self, middleware: SendMiddleware) -> None:
        """Wrap every publish of this broker (``send``, ``send_batch``) in ``middleware``.

        A send middleware is ``async def mw(topic, messages, publish) -> None``; the first added
        runs outermost. :func:`msgkit.telemetry.instrument` uses it to start producer spans and
        put trace context in headers.
        """
        self._producer.add_middleware(middleware)

    def add_middleware(self, middleware: Middleware, *, outer: bool = False) -> None:
        """Add ``middleware`` to every consumer built after this call, dead-letter consumers included.

        It runs inside the consumer's retry policy, before the consumer's own middleware; with
        ``outer=True`` it runs outside the retry policy and sees each delivery's final outcome.
        Add broker-wide middleware before building consumers: adding it later is an error.
        """
        if not callable(middleware):
            raise TypeError(f"middleware {middleware!r} is not callable")
        if self._consumers:
            raise StateError(
                f"add broker-wide middleware before building consumers ({len(self._consumers)} already built)"
            )
        (self._outer if outer else self._inner).append(middleware)

    # ------------------------------------------------------------------ consuming

    def consumer(
        self,
        topic: str,
        group: str,
        handler: Handler,
        *,
        middleware: Sequence[Middleware] = (),
        settings: ConsumerSettings | None = None,
        **options: Any,
    ) -> Consumer:
        """Build a consumer of (topic, group) that calls ``handler`` for each message.

        Options are :class:`ConsumerSettings` fields as keywords (``max_in_flight=64``) or one
        ``settings`` object. The handler's signature is checked here, not on the first message.
        """
        return self._build_consumer(topic, group, handler, middleware, settings, options, dead_letters=False)

    def dead_letter_consumer(
        self,
        topic: str,
        group: str,
        handler: Handler,
        *,
        settings: ConsumerSettings | None = None,
        **options: Any,
    ) -> Consumer:
        """A consumer of the dead letters of (topic, group); each carries ``msgkit-dlq-*`` headers."""
        return self._build_consumer(topic, group, handler, (), settings, options, dead_letters=True)

    def _build_consumer(
        self,
        topic: str,
        group: str,
        handler: Handler,
        middleware: Sequence[Middleware],
        settings: ConsumerSettings | None,
        options: Mapping[str, Any],
        *,
        dead_letters: bool,
    ) -> Consumer:
        if self._state == "closed":
            raise ClosedError(f"broker {self.url} is closed")
        check_name("topic", topic)
        check_name("group", group)
        for mw in middleware:
            if not callable(mw):
                raise TypeError(f"middleware {mw!r} is not callable")
        settings = _consumer_settings(settings, options)
        chain = [*self._inner, *middleware]
        if settings.retry is not None and not dead_letters:
            chain.insert(0, settings.retry.middleware())
        chain[:0] = self._outer
        call = compose(bind_handler(handler), chain)
        consumer = Consumer(self._open, topic, group, call, settings, dead_letters=dead_letters)
        self._consumers.append(consumer)
        return consumer

    async def dead_letters(self, topic: str, group: str, *, wait: float = 2.0) -> DeadLetters:
        """Tooling for the dead letters of (topic, group): peek, show, replay, purge.

        ``wait`` is how long a look waits for the first dead letter before concluding there is none.
        """
        return DeadLetters(await self._open(), topic, group, wait)

    def subscriber(
        self,
        topic: str,
        group: str,
        *,
        middleware: Sequence[Middleware] = (),
        settings: ConsumerSettings | None = None,
        **options: Any,
    ) -> Callable[[HandlerT], HandlerT]:
        """Decorator form of :meth:`consumer`: the consumer runs when :meth:`run` runs."""

        def register(handler: HandlerT) -> HandlerT:
            self.consumer(topic, group, handler, middleware=middleware, settings=settings, **options)
            return handler

        return register

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run every consumer of this broker until :meth:`stop`, SIGINT or SIGTERM, then close.

        Stopping is graceful: each consumer finishes or releases its in-flight messages.
        """
        if not self._consumers:
            raise StateError("no consumers to run: add one with broker.consumer() or @broker.subscriber()")
        await self.connect()
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
                    break
        try:
            for consumer in self._consumers:
                if not consumer.running:
                    await consumer.start()
            await self._stop_requested.wait()
            logger.info("stopping %d consumer(s) on %s", len(self._consumers), self.url)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await asyncio.shield(self.close())

    def stop(self) -> None:
        """Ask :meth:`run` to stop gracefully. Safe to call from a signal handler or twice."""
        if self._stop_requested is not None:
            self._stop_requested.set()

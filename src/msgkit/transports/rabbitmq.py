"""The RabbitMQ transport: ``amqp://`` and ``amqps://`` URLs, on aio-pika (RabbitMQ 3.10+).

How msgkit maps onto RabbitMQ (docs/transports/rabbitmq.md has the whole story):

* A topic is a durable fanout exchange named after it. A group is a durable quorum queue
  ``TOPIC:GROUP`` bound to it: every group gets every message, a group's consumers compete.
* ``publish`` sends persistent, mandatory messages on a confirm channel with up to
  ``publish_window`` confirms outstanding, so a batch costs about one round trip. A message that
  no queue is bound to is returned by the broker and reported as a PublishError.
* ``Delivery.attempt`` is the quorum queue's ``x-delivery-count`` plus the ``msgkit-attempts``
  header that msgkit writes when it republishes a message (retry, release).
* ``Retry`` without delay is a ``basic.nack`` with requeue (the quorum queue counts it). A delay,
  or headers to rewrite, republish the message with its attempt count to a delay queue whose
  TTL dead-letters it back to the group's queue (or straight to the queue). ``DeadLetter``
  publishes to ``TOPIC:GROUP:dead-letters``. A copy is confirmed before its original is acked;
  acks go out as ``multiple`` over the contiguous prefix.
* Connections come back after a broker restart or a dropped socket; consumers re-declare and
  re-consume, producers republish what was not confirmed. Deliveries of a lost channel are
  dropped: the broker has requeued them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import unquote

import aio_pika  # noqa: F401 - the client library; the registry maps its absence to "pip install msgkit[rabbitmq]"
import aiormq
import aiormq.abc
from pydantic import Field

from msgkit.config import TransportSettings, redact_url, settings_from_url, split_url
from msgkit.errors import (
    BrokerUnavailableError,
    ClosedError,
    ConfigurationError,
    MessageTooLargeError,
    MsgkitError,
    PublishError,
)
from msgkit.message import Ack, DeadLetter, Delivery, Message, Outcome, dead_letter_message
from msgkit.transports._rabbitmq import (
    CONNECTION_ERRORS,
    MAX_HEADER_BYTES,
    MAX_HEADER_NAME,
    Endpoint,
    Entry,
    Link,
    Publisher,
    close_channel,
    declare_group,
    decode,
    delay_tier_ms,
    encode,
    group_names,
    header_problem,
    open_channel,
    reply_text,
    ssl_context,
)
from msgkit.transports.base import Capabilities, Subscription, Transport

logger = logging.getLogger("msgkit.rabbitmq")

_MIB = 1024 * 1024
_HOST = re.compile(r"[A-Za-z0-9._:%-]+")  # a name, an IPv4 or (unbracketed by urlsplit) IPv6 address
#: Seconds a release may spend republishing before it falls back to a (counted) requeue: a release
#: happens while a consumer stops, which must not wait for a broker outage to end.
_RELEASE_TIMEOUT = 5.0
#: RabbitMQ's prefetch count is a 16-bit number.
_MAX_PREFETCH = 65_535


class RabbitMQSettings(TransportSettings):
    """Options of ``amqp://`` and ``amqps://`` URLs (the query string). Defaults in brackets.

    Attributes:
        heartbeat: AMQP heartbeat in seconds (60); 0 turns heartbeats off. A dead peer is
            noticed after about three missed heartbeats.
        connect_timeout: seconds ``connect()`` keeps trying to reach the broker (10).
        reconnect_timeout: seconds an outage is ridden out (reconnecting with backoff,
            republishing unconfirmed messages) before operations raise BrokerUnavailableError (60).
        operation_timeout: seconds one declaration, channel opening or ack write may take (30).
        publish_window: publisher confirms outstanding at once within one send (1000).
        max_message_size: largest message accepted, body, id, key and headers (8 MiB; RabbitMQ's
            own limit is 128 MiB by default).
        name: connection name ("msgkit"), sent as the ``connection_name`` client property with
            " publish" or " consume" appended; shown by the management UI.
        cafile: CA bundle that signs the server's certificate (amqps; default: system CAs).
        certfile, keyfile: client certificate and key for mutual TLS (amqps).
        verify: check the server's certificate and host name (true; amqps).
    """

    heartbeat: int = Field(60, ge=0, le=3600)
    connect_timeout: float = Field(10.0, gt=0, le=600)
    reconnect_timeout: float = Field(60.0, gt=0, le=86_400)
    operation_timeout: float = Field(30.0, gt=0, le=600)
    publish_window: int = Field(1000, ge=1, le=100_000)
    max_message_size: int = Field(8 * _MIB, ge=1024, le=128 * _MIB)
    name: str = Field("msgkit", min_length=1, max_length=100)
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True


class RabbitMQTransport(Transport):
    """The ``amqp://`` / ``amqps://`` transport. See the module docstring for the mapping.

    ``amqp://USER:PASSWORD@HOST:PORT/VHOST?options``: user and password default to guest, the port
    to 5672 (5671 for amqps), the vhost to ``/`` (write ``/%2F`` or leave the path empty).
    """

    schemes = ("amqp", "amqps")

    def __init__(self, endpoint: Endpoint, settings: RabbitMQSettings | None = None) -> None:
        self.settings = settings = settings or RabbitMQSettings()
        self._endpoint = endpoint
        timeouts = (settings.connect_timeout, settings.reconnect_timeout)
        self._publisher = Publisher(
            Link(endpoint, "publish", *timeouts),
            settings.reconnect_timeout,
            settings.operation_timeout,
            settings.publish_window,
        )
        self._consumer = Link(endpoint, "consume", *timeouts)
        self._subscriptions: set[RabbitMQSubscription] = set()
        self._closed = False
        self._capabilities = Capabilities(
            fan_out=True,
            replay_for_new_group=False,
            ordered=True,
            native_delay=True,
            delay_tolerance=1.0,
            max_message_size=settings.max_message_size,
            consumer_loss_redelivery=0.0,
            persistent=True,
        )

    @classmethod
    def from_url(cls, url: str, settings: TransportSettings | None = None) -> RabbitMQTransport:
        parts = split_url(url)
        scheme = parts.scheme.lower()
        shown = redact_url(url)
        if scheme not in cls.schemes:
            raise ConfigurationError(f"RabbitMQTransport serves amqp:// and amqps:// URLs, not {scheme}://")
        options = settings_from_url(RabbitMQSettings, url, settings)
        tls = scheme == "amqps"
        host = parts.hostname or "localhost"
        if not _HOST.fullmatch(host):
            raise ConfigurationError(f"invalid host {host!r} in {shown!r}")
        if parts.port == 0:
            raise ConfigurationError(f"invalid port 0 in {shown!r}")
        if parts.fragment:
            raise ConfigurationError(f"{scheme}:// URLs take no #fragment: {shown!r}")
        vhost = "/"
        if parts.path not in ("", "/"):
            raw = parts.path[1:]
            if "/" in raw:
                raise ConfigurationError(
                    f"the path of {shown!r} must be one segment, the vhost; write a '/' inside it as %2F"
                )
            vhost = unquote(raw)
        files = (options.cafile, options.certfile, options.keyfile)
        if not tls and (any(files) or not options.verify):
            raise ConfigurationError(f"cafile, certfile, keyfile and verify apply to amqps:// URLs only: {shown!r}")
        context = ssl_context(*files, verify=options.verify, shown=shown) if tls else None
        endpoint = Endpoint(
            url=shown,
            host=host,
            port=parts.port or (5671 if tls else 5672),
            login=unquote(parts.username) if parts.username is not None else "guest",
            password=unquote(parts.password) if parts.password is not None else "guest",
            vhost=vhost,
            tls=tls,
            ssl_context=context,
            heartbeat=options.heartbeat,
            name=options.name,
        )
        return cls(endpoint, options)

    def __repr__(self) -> str:
        return f"RabbitMQTransport({self._endpoint.url!r})"

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"RabbitMQ transport {self._endpoint.url} is closed")

    async def connect(self) -> None:
        self._check_open()
        await self._publisher.link.first_connect()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(s.close() for s in list(self._subscriptions)), return_exceptions=True)
        await asyncio.gather(self._publisher.close(), self._consumer.close())

    # ------------------------------------------------------------------ topology

    async def declare(self, topic: str, group: str | None = None) -> None:
        self._check_open()
        if group is None:
            await self._publisher.ensure_exchange(topic)
        else:
            await self._publisher.declare_group(group_names(topic, group))

    async def delete(self, topic: str, group: str) -> None:
        """Delete the group's quorum queue and dead-letter queue (with their messages) and the
        delay queues this transport declared for it, then the topic's exchange unless another
        group's queue is still bound to it (``if_unused``: the broker decides, atomically).

        Delay queues declared by other processes cannot be listed over AMQP, so they stay until
        they expire by themselves (``x-expires``, see ``delay_queue_arguments``). The redeliveries
        in them can reach the group if it is declared again before then (dead-lettering at least
        once, RabbitMQ retries a target queue that is missing).
        """
        self._check_open()
        await self._publisher.delete_group(group_names(topic, group))

    # ------------------------------------------------------------------ publishing

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        self._check_open()
        if not messages:
            return
        for message in messages:
            problem = header_problem(message)
            if problem == "size":
                raise MessageTooLargeError(
                    f"message {message.id} has more than {MAX_HEADER_BYTES} bytes of id, key and headers: "
                    "RabbitMQ carries them in one frame (frame_max, 128 KiB); move data into the body"
                )
            if problem == "name":
                why = f"a header name of message {message.id} is longer than {MAX_HEADER_NAME} bytes (AMQP's limit)"
                raise PublishError(f"nothing was sent to topic {topic!r}: {why}", [(m.id, why) for m in messages])
        entries = [("", m.body, encode(m), m.id) for m in messages]
        failed = await self._publisher.send(topic, entries)
        if failed:
            reasons = [(entries[i][3], why) for i, why in sorted(failed.items())]
            raise PublishError(
                f"{len(failed)} of {len(messages)} messages were not stored on topic {topic!r}: {reasons[0][1]}",
                reasons,
            )

    # ------------------------------------------------------------------ consuming

    async def subscribe(self, topic: str, group: str, *, prefetch: int) -> RabbitMQSubscription:
        return await self._subscribe(topic, group, prefetch, dead_letters=False)

    async def subscribe_dead_letters(self, topic: str, group: str, *, prefetch: int) -> RabbitMQSubscription:
        return await self._subscribe(topic, group, prefetch, dead_letters=True)

    async def _subscribe(self, topic: str, group: str, prefetch: int, *, dead_letters: bool) -> RabbitMQSubscription:
        self._check_open()
        subscription = RabbitMQSubscription(self, topic, group, prefetch, dead_letters=dead_letters)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.reconnect_timeout
        while True:
            try:
                await subscription._attach(None)
                break
            except MsgkitError:
                raise
            except CONNECTION_ERRORS as exc:
                if loop.time() >= deadline:
                    raise BrokerUnavailableError(
                        f"could not start consuming {subscription.queue!r} on {self._endpoint.url}: {reply_text(exc)}"
                    ) from None
                await asyncio.sleep(0.2)
        self._subscriptions.add(subscription)
        return subscription


class RabbitMQSubscription(Subscription):
    """A consumer of one group's queue (or its dead letters) on its own channel.

    Deliveries pushed by the broker (at most ``prefetch`` unacked, RabbitMQ's basic.qos) wait in a
    buffer until fetched. Receipts carry the channel generation: settling a delivery of a channel
    that was lost is dropped, because the broker has already requeued it.
    """

    def __init__(
        self, transport: RabbitMQTransport, topic: str, group: str, prefetch: int, *, dead_letters: bool
    ) -> None:
        self._transport = transport
        self._topic = topic
        self._group = group
        self._names = group_names(topic, group)
        self.queue = self._names.dead_letters if dead_letters else self._names.queue
        self._dead_letters = dead_letters
        self._prefetch = max(1, min(prefetch, _MAX_PREFETCH))
        self._timeout = transport.settings.operation_timeout
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._generation = 0
        self._buffer: deque[aiormq.abc.DeliveredMessage] = deque()
        self._unsettled: dict[int, None] = {}  # delivery tags fetched and not settled, in order
        self._waiter: asyncio.Future[None] | None = None
        self._settling = asyncio.Lock()
        self._cancelled_by_broker = False
        self._closed = False

    def __repr__(self) -> str:
        return f"RabbitMQSubscription(queue={self.queue!r}, generation={self._generation})"

    # ------------------------------------------------------------------ the channel

    async def _attach(self, timeout: float | None) -> bool:
        """Open a channel, declare the topology, set the prefetch, consume. False if the broker
        was not back within ``timeout``. Connection errors are raised as they are."""
        try:
            connection = await self._transport._consumer.get(timeout)
        except TimeoutError:
            return False
        channel = await open_channel(connection, False, self._timeout)
        try:
            async with asyncio.timeout(self._timeout):
                await declare_group(channel, self._names)
                await channel.basic_qos(prefetch_count=self._prefetch)
                self._generation += 1
                self._buffer.clear()
                self._unsettled.clear()
                self._cancelled_by_broker = False
                self._channel = channel
                channel.on_consumer_cancel_callbacks.add(self._on_cancel)
                channel.closing.add_done_callback(self._on_channel_closed)
                ok = await channel.basic_consume(self.queue, self._receiver(self._generation))
                self._consumer_tag = ok.consumer_tag
        except BaseException:
            self._channel = None
            await close_channel(channel)
            raise
        return True

    def _receiver(self, generation: int) -> Callable[[aiormq.abc.DeliveredMessage], Coroutine[Any, Any, None]]:
        """The consumer callback of one channel generation (aiormq runs it in a task per message)."""

        async def receive(raw: aiormq.abc.DeliveredMessage) -> None:
            if generation == self._generation:
                self._buffer.append(raw)
                self._wake()

        return receive

    def _on_cancel(self, frame: Any) -> None:
        self._cancelled_by_broker = True  # e.g. the queue was deleted: declare and consume again
        self._wake()

    def _on_channel_closed(self, closing: asyncio.Future[Any]) -> None:
        if not closing.cancelled():
            closing.exception()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _recover(self, deadline: float) -> None:
        """Drop a lost channel (the broker requeued its deliveries) and attach again."""
        old = self._channel
        if old is not None:
            self._channel = None
            self._generation += 1  # settlements of the lost deliveries are dropped from now on
            lost = len(self._unsettled) + len(self._buffer)
            self._unsettled.clear()
            self._buffer.clear()
            why = "the broker cancelled the consumer" if self._cancelled_by_broker else "channel closed"
            logger.warning(
                "consumer of RabbitMQ queue %r lost its channel (%s); %d unsettled deliveries go back to the "
                "queue; attaching again",
                self.queue,
                why,
                lost,
            )
            await close_channel(old)
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            await self._attach(max(remaining, 0.0))
        except MsgkitError:
            raise
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailableError(f"could not consume {self.queue!r} again: {reply_text(exc)}") from None

    # ------------------------------------------------------------------ the SPI

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._closed:
                raise ClosedError(f"the subscription to RabbitMQ queue {self.queue!r} is closed")
            if self._buffer:
                return self._take(max_count)
            channel = self._channel
            if channel is None or channel.is_closed or self._cancelled_by_broker:
                await self._recover(deadline)
                if self._channel is None:
                    return ()  # the broker is not back yet
                continue
            if self._consumer_tag is None:  # paused by a release
                await self._resume(channel)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return ()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(remaining, _set_if_pending, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if len(self._buffer) < max_count:
                await asyncio.sleep(0)  # let deliveries already read from the socket join this batch

    async def _pause(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Stop the broker from pushing more deliveries (until the next fetch)."""
        tag, self._consumer_tag = self._consumer_tag, None
        if tag is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    await channel.basic_cancel(tag)
            except (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
                logger.debug("pausing the consumer of %r failed: %r", self.queue, exc)

    async def _resume(self, channel: aiormq.abc.AbstractChannel) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                ok = await channel.basic_consume(self.queue, self._receiver(self._generation))
        except (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
            logger.debug("resuming the consumer of %r failed: %r", self.queue, exc)
            return  # the channel is gone or going: the next fetch attaches again
        self._consumer_tag = ok.consumer_tag

    def _take(self, max_count: int) -> list[Delivery]:
        buffer, unsettled = self._buffer, self._unsettled
        topic, group, generation = self._topic, self._group, self._generation
        out: list[Delivery] = []
        for _ in range(min(max_count, len(buffer))):
            raw = buffer.popleft()
            tag: int = raw.delivery.delivery_tag  # type: ignore[union-attr,assignment]
            unsettled[tag] = None
            out.append(decode(raw, topic, group, (generation, tag)))
        return out

    async def settle(self, settlements: Sequence[tuple[Delivery, Outcome]]) -> None:
        channel, generation = self._channel, self._generation
        if channel is None or channel.is_closed:
            return  # all stale: the broker requeued them with the channel
        unsettled = self._unsettled
        acks: list[int] = []
        requeue: list[int] = []
        copies: list[tuple[int, Entry]] = []
        no_delay: Exception | None = None
        for delivery, outcome in settlements:
            receipt_generation, tag = delivery.receipt
            if receipt_generation != generation or tag not in unsettled:
                continue
            if isinstance(outcome, Ack):
                acks.append(tag)
            elif self._dead_letters:
                requeue.append(tag)  # a dead letter that fails again stays a dead letter
            elif isinstance(outcome, DeadLetter):
                letter = dead_letter_message(delivery, outcome)
                copies.append((tag, (self._names.dead_letters, letter.body, encode(letter), letter.id)))
            else:
                message = delivery.message
                old = message.headers
                if outcome.delay <= 0 and all(old.get(name) == value for name, value in outcome.headers.items()):
                    requeue.append(tag)  # nothing to rewrite: the broker's requeue (it counts the attempt)
                    continue
                if outcome.headers:
                    headers = {**old, **outcome.headers}
                    message = Message(message.body, message.id, message.key, headers, message.timestamp)
                queue = self._names.queue
                if outcome.delay > 0:
                    try:
                        queue = await self._transport._publisher.ensure_delay_queue(
                            self._names, delay_tier_ms(outcome.delay)
                        )
                    except (BrokerUnavailableError, ConfigurationError, ClosedError) as exc:
                        no_delay = exc
                        requeue.append(tag)
                        continue
                copies.append((tag, (queue, message.body, encode(message, delivery.attempt), message.id)))
        if no_delay is not None:
            logger.warning("no delay queue for %r (%s); requeueing at once instead", self.queue, no_delay)
        if copies:
            failed = await self._transport._publisher.store([entry for _, entry in copies], self._names)
            for n, (tag, _) in enumerate(copies):
                (requeue if n in failed else acks).append(tag)
            acks.sort()
        await self._settle_tags(channel, generation, acks, requeue)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give deliveries back at once, for another consumer, without counting an attempt.

        The consumer pauses first (basic.cancel; the next fetch resumes it), so that neither the
        released messages nor the ones received and not yet fetched come back to this consumer,
        which is typically stopping. Each is republished with its attempt count (a quorum queue
        would count a requeue as a delivery), then the original is acked.
        """
        channel, generation = self._channel, self._generation
        if channel is None or channel.is_closed:
            return
        await self._pause(channel)
        if channel.is_closed or generation != self._generation:
            return
        deliveries = [*deliveries, *self._take(len(self._buffer))]
        live = [d for d in deliveries if d.receipt[0] == generation and d.receipt[1] in self._unsettled]
        tags = [d.receipt[1] for d in live]
        if not tags:
            return
        if self._dead_letters:
            await self._settle_tags(channel, generation, [], tags)
            return
        entries = [(self.queue, d.message.body, encode(d.message, d.attempt - 1), d.message.id) for d in live]
        failed = await self._transport._publisher.store(entries, self._names, _RELEASE_TIMEOUT)
        acks = sorted(tag for n, tag in enumerate(tags) if n not in failed)
        await self._settle_tags(channel, generation, acks, [tag for n, tag in enumerate(tags) if n in failed])

    async def _settle_tags(
        self, channel: aiormq.abc.AbstractChannel, generation: int, acks: list[int], requeue: list[int]
    ) -> None:
        """Nack ``requeue`` back to the queue, then ack ``acks`` (sorted), with one ``multiple`` ack
        for the ones below the lowest delivery still unsettled.

        One batch at a time (a lock), so that a ``multiple`` ack never overtakes the single acks of
        another batch. If the frames cannot be written the channel is closed: the broker then
        requeues everything unacked, rather than holding deliveries nobody will ever settle.
        """
        async with self._settling:
            if channel.is_closed or generation != self._generation:
                return  # the channel went away while copies were stored: the broker requeued everything
            unsettled = self._unsettled
            for tag in requeue:
                del unsettled[tag]
            done = set(acks)
            floor = next((tag for tag in unsettled if tag not in done), None)
            for tag in acks:
                del unsettled[tag]
            if floor is None:
                prefix, rest = acks, []
            else:
                prefix, rest = [tag for tag in acks if tag < floor], [tag for tag in acks if tag > floor]
            try:
                async with asyncio.timeout(self._timeout):
                    for tag in requeue:
                        await channel.basic_nack(tag, requeue=True, wait=False)
                    if prefix:
                        await channel.basic_ack(prefix[-1], multiple=len(prefix) > 1, wait=False)
                    for tag in rest:
                        await channel.basic_ack(tag, wait=False)
            except (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
                logger.warning(
                    "settling %d deliveries of %r failed (%s); the broker redelivers them",
                    len(acks) + len(requeue),
                    self.queue,
                    reply_text(exc),
                )
                await close_channel(channel)

    async def close(self) -> None:
        """Stop consuming. Deliveries fetched and not settled go back to the queue (counted, as
        after a lost consumer); ones received but never fetched are given back uncounted."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._transport._subscriptions.discard(self)
        channel = self._channel
        if channel is None:
            return
        try:
            if not channel.is_closed:
                async with asyncio.timeout(self._timeout):
                    await self.release(())  # pauses, and gives back what was received and not fetched
        except Exception as exc:  # the channel is closed below whatever happened
            logger.debug("stopping the consumer of %r failed: %r", self.queue, exc)
        finally:
            self._channel = None
            await close_channel(channel)


def _set_if_pending(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

"""The transport SPI: the seam between msgkit's engine and one broker's client library.

A transport is one module that implements :class:`Transport` and :class:`Subscription`. The
SPI is batch-shaped on purpose (publish many, fetch many, settle many) so that a wrapper can
stay as fast as the raw client. Everything that is not broker-specific (codecs, middleware,
retry policy, the in-flight bound, ordering by key, batching of settlements) lives above it.

Contracts every implementation keeps:

* Methods are called from one event loop; a transport need not be thread-safe.
* ``close()`` is idempotent and safe to call while other calls are pending.
* Errors from the client library are translated into :mod:`msgkit.errors` at this boundary.
* Secrets from the URL never appear in ``repr()``, logs or exception texts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from msgkit.config import TransportSettings
from msgkit.errors import NotSupportedError
from msgkit.message import Delivery, Message, Outcome


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a transport guarantees. The contract suite gates its tests on these, never on names.

    Attributes:
        fan_out: every group of a topic receives every message.
        replay_for_new_group: a group created after messages were sent receives them.
        ordered: one consumer of a group receives a key's messages in the order they were sent.
        native_delay: delayed redelivery happens in the broker, holding no consumer resources.
        delay_tolerance: seconds a delayed redelivery may arrive after its due time.
        max_message_size: the largest message (body, key, id and headers) accepted, in bytes.
        consumer_loss_redelivery: seconds until the unsettled deliveries of a consumer that
            vanished without closing reach another consumer (0: at once).
        persistent: messages survive a broker restart.
        exclusive_keys: while a message of a key is in flight, the broker hands out no other
            message of that key (SQS FIFO message groups): released messages of a busy key wait
            until it is settled.
    """

    fan_out: bool
    replay_for_new_group: bool
    ordered: bool
    native_delay: bool
    delay_tolerance: float
    max_message_size: int
    consumer_loss_redelivery: float
    persistent: bool
    exclusive_keys: bool = False


class Subscription(ABC):
    """One consumer's attachment to a (topic, group). Created by :meth:`Transport.subscribe`."""

    @abstractmethod
    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        """Return between 1 and ``max_count`` deliveries, or none once ``timeout`` seconds pass.

        Never returns more than ``max_count``: the engine asks only for free in-flight slots.
        Cancelling a pending fetch loses nothing (the transport recovers what it had taken).
        """

    @abstractmethod
    async def settle(self, settlements: Sequence[tuple[Delivery, Outcome]]) -> None:
        """Apply outcomes in one batch: ack, redeliver after a delay, or dead-letter.

        A dead letter is stored (see :func:`msgkit.message.dead_letter_message`) before its
        original is removed. Settling a delivery twice is an error the engine never makes.
        """

    @abstractmethod
    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give back fetched deliveries that were never handled, for another consumer at once.

        Where the broker allows it the release does not count as an attempt.
        """

    @abstractmethod
    async def close(self) -> None:
        """Detach. Deliveries still unsettled are treated as after a lost consumer. Idempotent."""

    def lag(self) -> int | None:
        """Messages of the group not yet fetched by this consumer, where the transport knows it
        without a round trip (cheap: read by metrics); None where it does not."""
        return None


class Transport(ABC):
    """A connection to one broker, chosen by URL scheme (see :mod:`msgkit.transports.registry`)."""

    #: URL schemes this transport serves, e.g. ``("amqp", "amqps")``.
    schemes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, settings: TransportSettings | None = None) -> Transport:
        """Build (not connect) a transport from a URL; raise ConfigurationError when it is wrong.

        Options come from the URL query, or from ``settings`` (the transport's own
        :class:`~msgkit.config.TransportSettings` subclass) when given; see
        :func:`msgkit.config.settings_from_url`.
        """

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this transport guarantees."""

    @abstractmethod
    async def connect(self) -> None:
        """Open connections. Raise BrokerUnavailableError when the broker cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Close every connection and subscription. Idempotent."""

    @abstractmethod
    async def declare(self, topic: str, group: str | None = None) -> None:
        """Create the topic and, with ``group``, the group's subscription, idempotently.

        After ``declare(topic, group)`` returns, messages sent to ``topic`` are kept for
        ``group`` even before any consumer of it starts.
        """

    @abstractmethod
    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        """Store ``messages`` on ``topic``; return once the broker has all of them.

        Raise :class:`msgkit.errors.PublishError` naming each message that was not stored.
        """

    @abstractmethod
    async def subscribe(self, topic: str, group: str, *, prefetch: int) -> Subscription:
        """Attach a consumer to (topic, group), declaring both if needed.

        ``prefetch`` is the consumer's in-flight bound: a transport with broker-side credit
        (RabbitMQ basic.qos) sets it to this, so the broker never pushes more.
        """

    @abstractmethod
    async def subscribe_dead_letters(self, topic: str, group: str, *, prefetch: int) -> Subscription:
        """Attach to the dead letters of (topic, group): for listing, replaying and purging."""

    async def delete(self, topic: str, group: str) -> None:
        """Delete everything ``declare(topic, group)`` created for ``group``, then the topic if unused.

        That is the group's pending messages, delayed redeliveries, dead letters, offsets or
        consumer-group state and its retry or delay queues; then the topic itself (with the
        messages kept on it) when no other group of it remains, as far as the transport can tell
        cheaply and reliably. Where it cannot tell, it keeps the topic and says so in its
        docstring. After it returns, ``declare(topic, group)`` makes a fresh, empty group.

        Idempotent: deleting a group or topic that does not exist is not an error. Consumers of
        the group (in any process) must be stopped first; what a still-running consumer does is
        up to the broker (most cancel it). Returns once the broker has deleted everything.

        The default raises :class:`msgkit.errors.NotSupportedError`, so that transports written
        before this method existed keep working for everything else.
        """
        raise NotSupportedError(f"{type(self).__name__} cannot delete topics or groups")

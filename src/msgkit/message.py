"""Messages going out, deliveries coming in, and the outcomes that settle them."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

#: Header names msgkit writes on dead letters. Values are strings like every header.
DLQ_REASON: Final = "msgkit-dlq-reason"
DLQ_ERROR_TYPE: Final = "msgkit-dlq-error-type"
DLQ_ATTEMPTS: Final = "msgkit-dlq-attempts"
DLQ_TOPIC: Final = "msgkit-dlq-topic"
DLQ_GROUP: Final = "msgkit-dlq-group"
DLQ_FIRST_FAILED_AT: Final = "msgkit-dlq-first-failed-at"
DLQ_LAST_FAILED_AT: Final = "msgkit-dlq-last-failed-at"
DLQ_HOST: Final = "msgkit-dlq-host"

#: Header a retried message carries, where the transport can rewrite headers on redelivery:
#: when (epoch seconds) its first delivery failed.
FIRST_FAILED_AT: Final = "msgkit-first-failed-at"

#: Longest error text kept in a dead letter's reason header.
MAX_REASON_LENGTH: Final = 1000

_HOST = socket.gethostname()


class _IdState:
    """Per-process state of :func:`new_message_id`, renewed in a forked child."""

    def __init__(self) -> None:
        seed = int.from_bytes(os.urandom(10), "big")
        # 2 variant bits (10) and 30 random bits: the fixed middle of every id of this process
        self.middle = f"{0x8000_0000 | (seed & 0x3FFF_FFFF):08x}"
        self.middle = f"{self.middle[:4]}-{self.middle[4:]}"
        self.counter = seed >> 30  # 44 random bits to start from
        self.millis = -1
        self.prefix = ""


_ids = _IdState()


def _renew_ids() -> None:
    global _ids
    _ids = _IdState()


os.register_at_fork(after_in_child=_renew_ids)


def new_message_id() -> str:
    """A UUIDv7 string (RFC 9562): millisecond time, then a 44-bit counter that starts at a random
    value, and 30 random bits fixed per process. Ids of one process increase; a forked child gets
    fresh random bits, so ids never repeat across processes in practice.
    """
    state = _ids
    millis = time.time_ns() // 1_000_000
    if millis != state.millis:
        state.millis = millis
        t = f"{millis & 0xFFFF_FFFF_FFFF:012x}"
        state.prefix = f"{t[:8]}-{t[8:]}-7"
    counter = state.counter = (state.counter + 1) & 0xFFF_FFFF_FFFF
    return f"{state.prefix}{counter >> 32:03x}-{state.middle}{counter & 0xFFFF_FFFF:08x}"


@dataclass(frozen=True, slots=True)
class Message:
    """A message as it travels: an id kept end to end, a body of bytes, string headers, a key.

    ``key`` orders and partitions: messages with the same key are delivered and (with
    ``ordered_by_key``) handled one after another. ``timestamp`` is seconds since the epoch.
    """

    body: bytes
    id: str = field(default_factory=new_message_id)
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    @classmethod
    def of(
        cls,
        body: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # noqa: A002 - the field's name
    ) -> Message:
        """A message whose body is encoded like ``send`` encodes it (bytes as is, else JSON)."""
        from msgkit.codec import encode_body

        return cls(
            body=encode_body(body),
            id=new_message_id() if id is None else id,
            key=key,
            headers={} if headers is None else headers,
        )

    def size(self) -> int:
        """Bytes this message takes on the wire, roughly: body, id, key and headers."""
        n = len(self.body) + len(self.id)
        if self.key is not None:
            n += len(self.key.encode())
        for name, value in self.headers.items():
            n += len(name.encode()) + len(value.encode())
        return n

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, key={self.key!r}, body=<{len(self.body)} bytes>, headers={len(self.headers)})"


class Delivery:
    """One delivery of a message to a consumer group.

    ``attempt`` is 1 on the first delivery and grows with each redelivery; it comes from broker
    data where the broker keeps it, so it holds across consumers and restarts. ``receipt`` is
    the transport's own handle for settling; treat it as opaque.
    """

    __slots__ = ("message", "topic", "group", "attempt", "receipt")

    def __init__(self, message: Message, topic: str, group: str, attempt: int, receipt: Any) -> None:
        self.message = message
        self.topic = topic
        self.group = group
        self.attempt = attempt
        self.receipt = receipt

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def key(self) -> str | None:
        return self.message.key

    @property
    def headers(self) -> Mapping[str, str]:
        return self.message.headers

    def __repr__(self) -> str:
        return (
            f"Delivery(id={self.message.id!r}, topic={self.topic!r}, group={self.group!r}, "
            f"attempt={self.attempt}, key={self.message.key!r})"
        )


def log_fields(delivery: Delivery) -> dict[str, object]:
    """``extra=`` for a log record about ``delivery``: its ``msgkit_message_id``, ``msgkit_topic``,
    ``msgkit_group`` and ``msgkit_attempt``, for log pipelines to filter and join on."""
    return {
        "msgkit_message_id": delivery.message.id,
        "msgkit_topic": delivery.topic,
        "msgkit_group": delivery.group,
        "msgkit_attempt": delivery.attempt,
    }


class Ack:
    """The handler finished: remove the message for this group."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ACK"


ACK: Final = Ack()


@dataclass(frozen=True, slots=True)
class Retry:
    """Redeliver the message after ``delay`` seconds (0: as soon as possible).

    ``headers`` are set on the redelivered message where the transport can rewrite headers on
    redelivery (it says so in its documentation); elsewhere they are dropped.
    """

    delay: float = 0.0
    reason: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Move the message to the group's dead letters with ``headers`` added, then remove it."""

    reason: str
    headers: Mapping[str, str] = field(default_factory=dict)


Outcome: TypeAlias = Ack | Retry | DeadLetter


def dead_letter(
    delivery: Delivery,
    reason: str,
    error: BaseException | None = None,
    first_failed_at: float | None = None,
) -> DeadLetter:
    """The outcome that dead-letters ``delivery``, with the headers that say why.

    The first failure time is ``first_failed_at``, else the message's ``msgkit-first-failed-at``
    header, else now.
    """
    reason = reason[:MAX_REASON_LENGTH]
    now = time.time()
    if first_failed_at is None:
        first_failed_at = _header_time(delivery, FIRST_FAILED_AT, now)
    headers = {
        DLQ_REASON: reason,
        DLQ_ERROR_TYPE: type(error).__qualname__ if error is not None else "",
        DLQ_ATTEMPTS: str(delivery.attempt),
        DLQ_TOPIC: delivery.topic,
        DLQ_GROUP: delivery.group,
        DLQ_FIRST_FAILED_AT: f"{first_failed_at:.3f}",
        DLQ_LAST_FAILED_AT: f"{now:.3f}",
        DLQ_HOST: _HOST,
    }
    return DeadLetter(reason, headers)


def _header_time(delivery: Delivery, name: str, default: float) -> float:
    value = delivery.message.headers.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        return default


def dead_letter_message(delivery: Delivery, outcome: DeadLetter) -> Message:
    """The message a transport stores in the dead letters: same id, body and key, headers added."""
    message = delivery.message
    return Message(
        body=message.body,
        id=message.id,
        key=message.key,
        headers={**message.headers, **outcome.headers},
        timestamp=message.timestamp,
    )

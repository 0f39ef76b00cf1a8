"""How msgkit meets Kafka on the wire: messages as records, client errors as msgkit errors, and the
group assignment strategy msgkit's consumers use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiokafka import errors as kafka_errors  # type: ignore[import-untyped]
from aiokafka.coordinator.protocol import (  # type: ignore[import-untyped]
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

from msgkit.errors import BrokerUnavailableError, ClosedError, ConfigurationError
from msgkit.message import Message
from msgkit.transports.kafka_offsets import assign, decode_member, encode_member

#: Record headers msgkit uses for itself; a user header of the same name is not delivered.
ID_HEADER = "msgkit-id"
ATTEMPT_HEADER = "msgkit-attempt"
NOT_BEFORE_HEADER = "msgkit-not-before"
#: Dead-letter topics have one partition (created with the first dead letter): small, read oldest first.
DEAD_LETTER_PARTITIONS = 1


def to_record(message: Message, extra: Iterable[tuple[str, bytes]] = ()) -> dict[str, Any]:
    """Keyword arguments of ``AIOKafkaProducer.send`` for ``message`` (plus msgkit's ``extra`` headers)."""
    headers = [(name, value.encode()) for name, value in message.headers.items()]
    headers.append((ID_HEADER, message.id.encode()))
    headers.extend(extra)
    return {
        "value": message.body,
        "key": None if message.key is None else message.key.encode(),
        "timestamp_ms": int(message.timestamp * 1000),
        "headers": headers,
    }


def from_record(record: Any) -> tuple[Message, int, float]:
    """(message, attempt, not-before epoch seconds) of a consumed record."""
    headers: dict[str, str] = {}
    message_id: str | None = None
    attempt, not_before = 1, 0.0
    for name, value in record.headers:
        if value is None:
            headers[name] = ""
        elif name == ID_HEADER:
            message_id = value.decode("utf-8", "replace")
        elif name == ATTEMPT_HEADER:
            try:
                attempt = max(int(value), 1)
            except ValueError:
                pass
        elif name == NOT_BEFORE_HEADER:
            try:
                not_before = float(value)
            except ValueError:
                pass
        else:
            headers[name] = value.decode("utf-8", "replace")
    key = record.key
    message = Message(
        record.value if record.value is not None else b"",
        message_id or f"kafka:{record.topic}:{record.partition}:{record.offset}",
        None if key is None else key.decode("utf-8", "replace"),
        headers,
        record.timestamp / 1000,
    )
    return message, attempt, not_before


def with_headers(message: Message, headers: Mapping[str, str]) -> Message:
    return Message(message.body, message.id, message.key, {**message.headers, **headers}, message.timestamp)


_REFUSED = (  # the broker will not do it however often we ask: the configuration is wrong
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.GroupAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.InvalidSessionTimeoutError,
    kafka_errors.InvalidTopicError,
    kafka_errors.InvalidPartitionsError,
    kafka_errors.InvalidReplicationFactorError,
    kafka_errors.PolicyViolationError,
)


def translate(exc: BaseException, what: str) -> Exception:
    """The msgkit error for a client error ``exc`` met while doing ``what``."""
    if isinstance(exc, kafka_errors.ConsumerStoppedError | kafka_errors.ProducerClosed):
        return ClosedError(f"{what}: the Kafka client is closed")
    if isinstance(exc, _REFUSED):
        return ConfigurationError(f"{what}: refused by Kafka ({type(exc).__name__}: {exc})")
    return BrokerUnavailableError(f"{what}: {type(exc).__name__}: {exc}")


class Assignor:
    """msgkit's partition assignment strategy for aiokafka (see :func:`~msgkit.transports.kafka_offsets.assign`).

    ``ownership()`` returns the member's partitions and those with work in flight, as
    ``(topic, partition)`` pairs; they travel in the join request to the group's leader.
    """

    name = "msgkit-sticky-v1"
    version = 0

    def __init__(self, ownership: Callable[[], tuple[list[tuple[str, int]], list[tuple[str, int]]]]) -> None:
        self._ownership = ownership

    def metadata(self, topics: Iterable[str]) -> Any:
        owned, busy = self._ownership()
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), encode_member(owned, busy))

    def assign(self, cluster: Any, members: Any) -> dict[str, Any]:
        decoded = {m: decode_member(meta.subscription, meta.user_data) for m, meta in members.items()}
        topics = {t for member in decoded.values() for t in member.topics}
        partitions = {t: sorted(cluster.partitions_for_topic(t) or ()) for t in topics}
        result = {}
        for member_id, tps in assign(partitions, decoded).items():
            by_topic: dict[str, list[int]] = {}
            for topic, number in tps:
                by_topic.setdefault(topic, []).append(number)
            result[member_id] = ConsumerProtocolMemberAssignment(self.version, sorted(by_topic.items()), b"")
        return result

    def on_assignment(self, assignment: Any) -> None:
        return None

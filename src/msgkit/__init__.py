"""msgkit: one async API for messaging over RabbitMQ, Redis Streams, Kafka, SQS and memory.

The public API is what this module exports; everything else is internal. Names whose module
needs an optional extra (SQLAlchemy for the inbox and outbox, redis for the Redis store) load
on first use, so ``import msgkit`` needs pydantic only.
"""

import importlib
from typing import TYPE_CHECKING, Any

from msgkit.broker import Broker
from msgkit.consumer import Consumer, ConsumerSettings, StateError
from msgkit.dlq import DeadLetterInfo, DeadLetters
from msgkit.errors import (
    BrokerUnavailableError,
    ClosedError,
    ConfigurationError,
    DecodeError,
    HandlerSignatureError,
    MessageTooLargeError,
    MissingDependencyError,
    MsgkitError,
    NotSupportedError,
    PublishError,
    Reject,
    RetryLater,
    UnknownSchemeError,
)
from msgkit.message import ACK, Ack, DeadLetter, Delivery, Message, Outcome, Retry, new_message_id
from msgkit.middleware import CallNext, Middleware
from msgkit.middleware.idempotency import Idempotency
from msgkit.middleware.retry import RetryPolicy
from msgkit.producer import SendMiddleware
from msgkit.stores import Claim, ClaimStatus, DedupStore, MemoryDedupStore
from msgkit.transports.base import Capabilities, Subscription, Transport
from msgkit.transports.registry import register_transport

if TYPE_CHECKING:
    from msgkit.outbox import Inbox, Outbox, OutboxRelay, RelaySettings
    from msgkit.stores.redis import RedisDedupStore
    from msgkit.stores.sql import SqlDedupStore
    from msgkit.telemetry import Telemetry, instrument

_LAZY = {
    "Inbox": "msgkit.outbox",
    "Outbox": "msgkit.outbox",
    "OutboxRelay": "msgkit.outbox",
    "RelaySettings": "msgkit.outbox",
    "RedisDedupStore": "msgkit.stores.redis",
    "SqlDedupStore": "msgkit.stores.sql",
    "Telemetry": "msgkit.telemetry",
    "instrument": "msgkit.telemetry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'msgkit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__version__ = "0.1.0"

__all__ = [
    "ACK",
    "Ack",
    "Broker",
    "BrokerUnavailableError",
    "CallNext",
    "Capabilities",
    "Claim",
    "ClaimStatus",
    "ClosedError",
    "ConfigurationError",
    "Consumer",
    "ConsumerSettings",
    "DeadLetter",
    "DeadLetterInfo",
    "DeadLetters",
    "DecodeError",
    "DedupStore",
    "Delivery",
    "HandlerSignatureError",
    "Idempotency",
    "Inbox",
    "MemoryDedupStore",
    "Message",
    "MessageTooLargeError",
    "Middleware",
    "MissingDependencyError",
    "MsgkitError",
    "NotSupportedError",
    "Outbox",
    "OutboxRelay",
    "Outcome",
    "PublishError",
    "RedisDedupStore",
    "Reject",
    "RelaySettings",
    "Retry",
    "RetryLater",
    "RetryPolicy",
    "SendMiddleware",
    "SqlDedupStore",
    "StateError",
    "Subscription",
    "Telemetry",
    "Transport",
    "UnknownSchemeError",
    "instrument",
    "new_message_id",
    "register_transport",
]

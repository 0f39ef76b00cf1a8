"""msgkit: one async API for messaging over RabbitMQ, Redis Streams, Kafka, SQS and memory.

The public API is what this module exports; everything else is internal.
"""

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
    PublishError,
    Reject,
    RetryLater,
    UnknownSchemeError,
)
from msgkit.message import ACK, Ack, DeadLetter, Delivery, Message, Outcome, Retry, new_message_id
from msgkit.middleware import CallNext, Middleware
from msgkit.middleware.retry import RetryPolicy
from msgkit.transports.base import Capabilities, Subscription, Transport
from msgkit.transports.registry import register_transport

__version__ = "0.1.0"

__all__ = [
    "ACK",
    "Ack",
    "Broker",
    "BrokerUnavailableError",
    "CallNext",
    "Capabilities",
    "ClosedError",
    "ConfigurationError",
    "Consumer",
    "ConsumerSettings",
    "DeadLetter",
    "DeadLetterInfo",
    "DeadLetters",
    "DecodeError",
    "Delivery",
    "HandlerSignatureError",
    "Message",
    "MessageTooLargeError",
    "Middleware",
    "MissingDependencyError",
    "MsgkitError",
    "Outcome",
    "PublishError",
    "Reject",
    "Retry",
    "RetryLater",
    "RetryPolicy",
    "StateError",
    "Subscription",
    "Transport",
    "UnknownSchemeError",
    "new_message_id",
    "register_transport",
]

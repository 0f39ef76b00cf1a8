"""The msgkit error tree.

Every transport translates its client library's errors into these at its boundary
(``raise ... from exc``), so service code catches one family whatever the broker.
"""

from __future__ import annotations

from collections.abc import Sequence


class MsgkitError(Exception):
    """Base class of every error msgkit raises."""


class ConfigurationError(MsgkitError, ValueError):
    """A URL, an option or a settings object is wrong. The message names what and why."""


class UnknownSchemeError(ConfigurationError):
    """The URL's scheme names no registered transport."""


class MissingDependencyError(MsgkitError, ImportError):
    """A transport's client library is not installed; the message says which extra to install."""


class ClosedError(MsgkitError, RuntimeError):
    """The broker, producer or consumer was used after it was closed."""


class NotSupportedError(MsgkitError, NotImplementedError):
    """The transport cannot do what was asked (e.g. a third-party transport without ``delete``)."""


class BrokerUnavailableError(MsgkitError, ConnectionError):
    """The broker could not be reached (after the transport's own retries)."""


class MessageTooLargeError(MsgkitError, ValueError):
    """A message exceeds the transport's declared maximum size; it was not sent."""


class PublishError(MsgkitError):
    """Some messages of a send were not accepted by the broker.

    ``failed`` lists ``(message_id, reason)`` for each message that was not stored; every other
    message of the same call was stored. Nothing is dropped silently.
    """

    def __init__(self, message: str, failed: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.failed: tuple[tuple[str, str], ...] = tuple(failed)


class DecodeError(MsgkitError, ValueError):
    """A message body could not be decoded or validated into the handler's type (a poison message).

    The consumer sends such a message to the group's dead letters on its first delivery.
    """


class HandlerSignatureError(MsgkitError, TypeError):
    """A handler's signature cannot be bound (not async, or parameters msgkit cannot fill)."""


class Reject(MsgkitError):
    """Raise from a handler to send the message straight to the dead letters with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(MsgkitError):
    """Raise from a handler to have the message redelivered after ``delay`` seconds."""

    def __init__(self, delay: float, reason: str = "retry requested by handler") -> None:
        if delay < 0:
            raise ValueError(f"RetryLater delay must be >= 0 seconds, got {delay!r}")
        super().__init__(reason)
        self.delay = float(delay)
        self.reason = reason

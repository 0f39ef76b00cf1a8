"""The retry policy: immediate tries in-process, then delayed redeliveries by the broker, then the
dead letters.

Attempts are the broker's delivery count (``Delivery.attempt``), so a limit holds across
consumers and restarts. Only the immediate tries wait in-process (they are meant to be few and
short); every longer delay is a ``Retry(delay)`` outcome that the transport turns into its native
delayed redelivery, so a waiting message holds no in-flight slot.
"""

from __future__ import annotations

import logging
import random
import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from msgkit.errors import DecodeError, Reject, RetryLater
from msgkit.message import FIRST_FAILED_AT, Delivery, Outcome, Retry, dead_letter, log_fields
from msgkit.middleware import CallNext, Middleware

logger = logging.getLogger("msgkit.retry")

#: Errors that no retry can fix: the message goes straight to the dead letters.
ALWAYS_DEAD_LETTER: tuple[type[BaseException], ...] = (DecodeError, Reject, ValidationError)


class RetryPolicy(BaseModel):
    """How a consumer retries a failing message. Defaults: 10 deliveries, backoff 1 s doubling to 5 min.

    Attributes:
        immediate_retries: extra tries within one delivery, at once, before asking the broker
            for a delayed redelivery (keep small: these hold an in-flight slot).
        max_attempts: deliveries before the message is dead-lettered (None: no limit).
        max_age: seconds since the message was sent after which it is dead-lettered instead of
            retried (None: no limit).
        initial_delay: delay before the second delivery, seconds.
        multiplier: each further delay is the previous one times this.
        max_delay: the cap on one delay, seconds.
        jitter: each delay is spread by up to this fraction either way, so failures that
            happened together do not retry together.
        retry_on: exception types that are retried; others are dead-lettered at once.
        dead_letter_on: exception types dead-lettered at once even if ``retry_on`` matches
            (``DecodeError``, pydantic's ``ValidationError`` and ``msgkit.Reject`` always are).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    immediate_retries: int = Field(0, ge=0, le=20)
    max_attempts: int | None = Field(10, ge=1)
    max_age: float | None = Field(None, gt=0)
    initial_delay: float = Field(1.0, ge=0)
    multiplier: float = Field(2.0, ge=1)
    max_delay: float = Field(300.0, ge=0)
    jitter: float = Field(0.1, ge=0, le=1)
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dead_letter_on: tuple[type[BaseException], ...] = ()

    @model_validator(mode="after")
    def _check(self) -> RetryPolicy:
        if self.max_delay < self.initial_delay:
            raise ValueError(f"max_delay ({self.max_delay}) is below initial_delay ({self.initial_delay})")
        return self

    def delay_for(self, attempt: int) -> float:
        """The delay after delivery number ``attempt`` failed: backoff, capped, jittered."""
        base = min(self.initial_delay * self.multiplier ** max(attempt - 1, 0), self.max_delay)
        if self.jitter and base:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(base, 0.0)

    def middleware(self) -> Middleware:
        """This policy as a middleware (the consumer puts it outermost)."""
        return _retry_middleware(self)


def _retry_middleware(policy: RetryPolicy) -> Middleware:
    immediate = policy.immediate_retries
    dead_now = ALWAYS_DEAD_LETTER + policy.dead_letter_on
    retry_on = policy.retry_on

    def exhausted(delivery: Delivery) -> str | None:
        if policy.max_attempts is not None and delivery.attempt >= policy.max_attempts:
            return f"attempts exhausted ({delivery.attempt} of {policy.max_attempts})"
        if policy.max_age is not None:
            age = time.time() - delivery.message.timestamp
            if age >= policy.max_age:
                return f"too old to retry ({age:.0f}s, max_age {policy.max_age:.0f}s)"
        return None

    async def retry(delivery: Delivery, call_next: CallNext) -> Outcome | None:
        tries = 0
        while True:
            try:
                return await call_next(delivery)
            except RetryLater as exc:
                why = exhausted(delivery)
                if why is not None:
                    return dead_letter(delivery, f"{why}; last: retry requested: {exc.reason}", exc)
                return _retry(delivery, exc.delay, f"retry requested: {exc.reason}")
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, dead_now) or not isinstance(exc, retry_on):
                    if isinstance(exc, DecodeError):
                        reason = f"undecodable body: {exc}"
                    elif isinstance(exc, Reject):
                        reason = exc.reason
                    else:
                        reason = f"not retried: {text}"
                    _log(logging.WARNING, "dead-lettered", delivery, text, exc if not isinstance(exc, Reject) else None)
                    return dead_letter(delivery, reason, exc)
                if tries < immediate:
                    tries += 1
                    continue
                why = exhausted(delivery)
                if why is not None:
                    _log(logging.ERROR, f"dead-lettered, {why}", delivery, text, exc)
                    return dead_letter(delivery, f"{why}; last error {text}", exc)
                delay = policy.delay_for(delivery.attempt)
                _log(logging.WARNING, f"retried in {delay:.1f}s", delivery, text, exc)
                return _retry(delivery, delay, text)

    return retry


def _retry(delivery: Delivery, delay: float, reason: str) -> Retry:
    headers = delivery.message.headers
    first = headers.get(FIRST_FAILED_AT) or f"{time.time():.3f}"
    return Retry(delay, reason, {FIRST_FAILED_AT: first})


def _log(level: int, what: str, delivery: Delivery, text: str, exc: BaseException | None) -> None:
    logger.log(
        level,
        "message %s of %s/%s (attempt %d) failed and is %s: %s",
        delivery.message.id,
        delivery.topic,
        delivery.group,
        delivery.attempt,
        what,
        text,
        exc_info=exc,
        extra=log_fields(delivery),
    )

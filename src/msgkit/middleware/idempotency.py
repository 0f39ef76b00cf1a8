"""Idempotent handling: run the handler once per key, and record that only after it succeeded.

Per delivery the middleware claims the key in a :class:`~msgkit.stores.DedupStore`:

* ``CLAIMED``: the handler runs. Success (ack) marks the key done for ``keep_for`` seconds; an
  exception, a ``Retry`` or a ``DeadLetter`` releases the claim, so the redelivery runs the
  handler again (a key is never "seen" before its work succeeded).
* ``DONE``: a duplicate of work already done: acked without running the handler.
* ``BUSY``: another consumer is running the same key right now: the delivery comes back after
  the rest of that claim's lease (``Retry``), without holding an in-flight slot meanwhile.

A claim is a lease of ``lease`` seconds, renewed every third of it while the handler runs, so a
consumer that dies blocks its key for at most one lease and a long handler keeps its claim.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from msgkit.message import ACK, Ack, Delivery, Outcome, Retry, log_fields
from msgkit.middleware import CallNext
from msgkit.stores.base import ClaimStatus, DedupStore, check_seconds

logger = logging.getLogger("msgkit.idempotency")

#: A function of the delivery that gives its idempotency key; None handles it without dedup.
KeyFunction = Callable[[Delivery], str | None]

_MIN_BUSY_DELAY = 0.05


def message_id(delivery: Delivery) -> str:
    """The default key: the message id, which msgkit keeps from producer to consumer."""
    return delivery.message.id


class Idempotency:
    """Middleware that runs a handler at most once per key within a window, across consumers.

    Args:
        store: where claims live (memory for one process; Redis or SQL to share them).
        key: the idempotency key of a delivery; default its message id. Keys are scoped by
            consumer group (stored as ``"<group>/<key>"``), so every group handles every message.
        lease: seconds a claim lasts unless renewed; the longest a dead consumer blocks a key.
        keep_for: seconds a key stays done (the dedup window); a duplicate arriving later runs.

    Use it like any middleware: ``broker.consumer(topic, group, handler, middleware=[Idempotency(store)])``.
    """

    def __init__(
        self,
        store: DedupStore,
        *,
        key: KeyFunction | None = None,
        lease: float = 30.0,
        keep_for: float = 86_400.0,
    ) -> None:
        if not isinstance(store, DedupStore):
            raise TypeError(f"store must be a msgkit DedupStore, got {type(store).__name__}")
        self.store = store
        self.key: KeyFunction = key or message_id
        self.lease = check_seconds("lease", lease)
        self.keep_for = check_seconds("keep_for", keep_for)

    def __repr__(self) -> str:
        return f"Idempotency({self.store!r}, lease={self.lease}, keep_for={self.keep_for})"

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> Outcome | None:
        key = self.key(delivery)
        if key is None:
            return await call_next(delivery)
        key = f"{delivery.group}/{key}"
        claim = await self.store.claim(key, self.lease)
        if claim.status is ClaimStatus.DONE:
            logger.debug(
                "message %s of %s/%s: key %s already done; acked as a duplicate",
                delivery.message.id,
                delivery.topic,
                delivery.group,
                key,
                extra=log_fields(delivery),
            )
            return ACK
        if claim.status is ClaimStatus.BUSY:
            delay = min(max(claim.retry_after, _MIN_BUSY_DELAY), self.lease)
            logger.debug(
                "message %s of %s/%s: key %s is being handled elsewhere; back in %.1fs",
                delivery.message.id,
                delivery.topic,
                delivery.group,
                key,
                delay,
                extra=log_fields(delivery),
            )
            return Retry(delay, f"idempotency key {key} is being handled by another consumer")
        renewal = _Renewal(self.store, key, claim.token, self.lease, delivery)
        try:
            outcome = await call_next(delivery)
        except BaseException:
            await renewal.stop()
            await self._release(delivery, key, claim.token)
            raise
        await renewal.stop()
        if outcome is None or isinstance(outcome, Ack):
            await self._mark_done(delivery, key, claim.token)
        else:
            await self._release(delivery, key, claim.token)
        return outcome

    async def _mark_done(self, delivery: Delivery, key: str, token: str) -> None:
        try:
            if not await self.store.mark_done(key, token, self.keep_for):
                logger.warning(
                    "message %s of %s/%s: the claim on key %s was lost while the handler ran (it outlived its "
                    "lease); another consumer may run it too",
                    delivery.message.id,
                    delivery.topic,
                    delivery.group,
                    key,
                    extra=log_fields(delivery),
                )
        except Exception as exc:  # the work is done: ack it; only later duplicates may run again
            logger.error(
                "message %s of %s/%s: handled, but marking key %s done failed (%s: %s); a duplicate may run again",
                delivery.message.id,
                delivery.topic,
                delivery.group,
                key,
                type(exc).__name__,
                exc,
                extra=log_fields(delivery),
            )

    async def _release(self, delivery: Delivery, key: str, token: str) -> None:
        try:
            await self.store.release(key, token)
        except Exception as exc:  # the lease runs out on its own
            logger.warning(
                "message %s of %s/%s: releasing key %s failed (%s: %s); it frees when its lease ends",
                delivery.message.id,
                delivery.topic,
                delivery.group,
                key,
                type(exc).__name__,
                exc,
                extra=log_fields(delivery),
            )


class _Renewal:
    """Extends a claim every third of its lease while the handler runs; costs one timer if it never fires."""

    __slots__ = ("_store", "_key", "_token", "_lease", "_delivery", "_loop", "_timer", "_task", "_stopped")

    def __init__(self, store: DedupStore, key: str, token: str, lease: float, delivery: Delivery) -> None:
        self._store, self._key, self._token, self._lease = store, key, token, lease
        self._delivery = delivery
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(lease / 3, self._fire)
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def _fire(self) -> None:
        self._timer = None
        if not self._stopped:
            self._task = self._loop.create_task(self._extend())

    async def _extend(self) -> None:
        try:
            kept = await self._store.extend(self._key, self._token, self._lease)
        except Exception as exc:
            d = self._delivery
            logger.warning(
                "message %s of %s/%s: renewing the claim on key %s failed (%s: %s)",
                d.message.id,
                d.topic,
                d.group,
                self._key,
                type(exc).__name__,
                exc,
                extra=log_fields(d),
            )
            kept = True  # try again next time; the lease still has two thirds left
        if not kept:
            d = self._delivery
            logger.warning(
                "message %s of %s/%s: the claim on key %s was taken over while its handler still runs",
                d.message.id,
                d.topic,
                d.group,
                self._key,
                extra=log_fields(d),
            )
        elif not self._stopped:
            self._timer = self._loop.call_later(self._lease / 3, self._fire)

    async def stop(self) -> None:
        """Stop renewing; wait for a renewal in flight so it cannot revive a released claim."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        task = self._task
        if task is not None and not task.done():
            await asyncio.shield(task)

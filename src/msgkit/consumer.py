"""The consumer engine: bounded in-flight fetching, eager dispatch, key lanes, batched settlement.

How a delivery moves (see docs/architecture.md for why):

1. The fetch loop asks the subscription for at most the number of free in-flight slots; while
   fetches come back full (a backlog), for at most half of ``max_in_flight``, so one batch's
   fetch overlaps the previous one's settle instead of waiting for it.
2. Each delivery's handler chain starts *inline* in its own context. A handler that finishes
   without waiting costs no task at all; one that waits continues in a task of its own. There
   are never more such tasks than in-flight deliveries.
3. With ``ordered_by_key`` a delivery whose key is busy waits in that key's queue and starts
   when the one before it is settled; other keys run in parallel.
4. Outcomes collect into a batch settled by one SPI call every ``settle_batch_size`` outcomes or
   ``settle_interval`` seconds, or at once when every in-flight delivery is waiting for it.
   Slots are freed when the settle call returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Sequence
from types import CoroutineType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from msgkit.errors import ClosedError, DecodeError, MsgkitError, Reject, RetryLater
from msgkit.handler import BoundHandler
from msgkit.message import ACK, DeadLetter, Delivery, Outcome, Retry, dead_letter, log_fields
from msgkit.middleware.retry import RetryPolicy
from msgkit.transports.base import Subscription, Transport

logger = logging.getLogger("msgkit.consumer")

_MAX_FETCH_BACKOFF = 30.0


class ConsumerSettings(BaseModel):
    """A consumer's options, validated once. Defaults suit a typical service.

    Attributes:
        max_in_flight: hard bound on deliveries fetched and not yet settled.
        ordered_by_key: deliveries with the same key are handled one after another, in order.
        settle_batch_size: settle after this many outcomes (capped at ``max_in_flight``).
        settle_interval: settle at least this often (seconds) while outcomes wait.
        fetch_timeout: how long one fetch call waits for messages (seconds).
        stop_timeout: how long a graceful stop lets running handlers finish (seconds).
        retry: the retry policy, applied outermost around the middleware and handler. None
            turns retrying off: a failed message is then redelivered at once, without limit.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_in_flight: int = Field(100, ge=1, le=100_000)
    ordered_by_key: bool = False
    settle_batch_size: int = Field(100, ge=1)
    settle_interval: float = Field(0.05, gt=0, le=60)
    fetch_timeout: float = Field(1.0, gt=0, le=20)
    stop_timeout: float = Field(30.0, ge=0)
    retry: RetryPolicy | None = RetryPolicy()


class StateError(MsgkitError, RuntimeError):
    """An object was used in a state that does not allow it (e.g. starting a running consumer)."""


class _Resume:
    """Await the rest of a coroutine that was started by hand and suspended on ``pending``."""

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Any, pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, None, Any]:
        coro, pending = self._coro, self._pending
        while True:
            try:
                yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # forwarded into the handler where it waits
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(None)
                except StopIteration as stop:
                    return stop.value


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable


class Consumer:
    """Consumes one (topic, group) with one handler. Build it with :meth:`msgkit.Broker.consumer`.

    ``await consumer.run()`` consumes until :meth:`stop` is called (or the task is cancelled);
    ``start()`` and ``stop()`` do the same in two steps. A consumer runs once at a time.
    """

    def __init__(
        self,
        open_transport: Callable[[], Awaitable[Transport]],
        topic: str,
        group: str,
        call: BoundHandler,
        settings: ConsumerSettings,
        *,
        dead_letters: bool = False,
    ) -> None:
        self.topic = topic
        self.group = group
        self.settings = settings
        self._open_transport = open_transport
        self._call = call
        self._dead_letters = dead_letters
        self._max = settings.max_in_flight
        self._half = max(1, settings.max_in_flight // 2)
        self._fetch_max = self._max  # _half while fetches come back full
        self._batch_size = min(settings.settle_batch_size, settings.max_in_flight)
        self._state: Literal["new", "starting", "running", "stopping", "stopped"] = "new"
        self._failure: BaseException | None = None
        self._stopper: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None
        self._in_flight = 0
        self._runnable: deque[Delivery] = deque()
        self._pumping = False
        self._key_queues: dict[str, deque[Delivery]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: list[tuple[Delivery, Outcome]] = []
        self._settling = 0
        self._abandoned: list[Delivery] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_wakeup: asyncio.Future[None] | None = None
        self._flush_requested = False
        self._flusher_closing = False
        self._slot_wakeup: asyncio.Future[None] | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The last error from fetching or settling, or None; cleared by the next success.
        self.last_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"Consumer(topic={self.topic!r}, group={self.group!r}, state={self._state!r})"

    @property
    def in_flight(self) -> int:
        """Deliveries fetched and not yet settled, right now."""
        return self._in_flight

    @property
    def lag(self) -> int | None:
        """Messages of the group not yet fetched, where the transport knows it (else None)."""
        sub = self._sub
        return sub.lag() if sub is not None and self._state == "running" else None

    @property
    def running(self) -> bool:
        return self._state == "running"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Subscribe and start consuming in the background."""
        if self._state != "new" and self._state != "stopped":
            raise StateError(f"consumer for {self.topic}/{self.group} is already {self._state}")
        previous, self._state = self._state, "starting"
        try:
            self._loop = asyncio.get_running_loop()
            transport = await self._open_transport()
            if self._dead_letters:
                self._sub = await transport.subscribe_dead_letters(self.topic, self.group, prefetch=self._max)
            else:
                self._sub = await transport.subscribe(self.topic, self.group, prefetch=self._max)
        except BaseException:
            self._state = previous
            raise
        self._state = "running"
        self._failure = None
        self._in_flight = self._settling = 0
        self._flush_requested = self._flusher_closing = False
        self._fetch_max = self._max
        self._stopped = asyncio.Event()
        self._fetch_task = self._loop.create_task(self._fetch_loop(), name=f"msgkit-fetch-{self.topic}-{self.group}")
        self._flush_task = self._loop.create_task(self._flush_loop(), name=f"msgkit-settle-{self.topic}-{self.group}")

    async def run(self) -> None:
        """Consume until :meth:`stop` is called; cancelling ``run`` stops gracefully too.

        Raises the error that ended consumption if it ended on its own (e.g. the transport closed).
        """
        await self.start()
        assert self._stopped is not None
        try:
            await self._stopped.wait()
        except asyncio.CancelledError:
            await asyncio.shield(self.stop())
            raise
        if self._failure is not None:
            raise self._failure

    async def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: fetch no more, release what has not started, let running handlers
        finish within ``timeout`` (default ``settings.stop_timeout``), settle, then detach.

        Handlers still running at the deadline are cancelled and their messages released.
        Safe to call more than once and from several tasks.
        """
        if self._state == "new" or self._state == "stopped":
            return
        if self._state == "stopping":
            assert self._stopped is not None
            await self._stopped.wait()
            return
        self._state = "stopping"
        timeout = self.settings.stop_timeout if timeout is None else timeout
        assert self._sub is not None
        assert self._stopped is not None
        try:
            if self._fetch_task is not None:
                self._fetch_task.cancel()
                await asyncio.gather(self._fetch_task, return_exceptions=True)
            unstarted = list(self._runnable)
            self._runnable.clear()
            for queue in self._key_queues.values():
                unstarted.extend(queue)
                queue.clear()
            await self._release(unstarted)
            if self._tasks:
                _, late = await asyncio.wait(set(self._tasks), timeout=timeout)
                for task in late:
                    task.cancel()
                if late:
                    logger.warning(
                        "stop of %s/%s: %d handler(s) still running after %.1fs were cancelled; their messages "
                        "are released for redelivery",
                        self.topic,
                        self.group,
                        len(late),
                        timeout,
                    )
                    await asyncio.gather(*late, return_exceptions=True)
            abandoned, self._abandoned = self._abandoned, []
            await self._release(abandoned)
            self._flusher_closing = True
            self._wake_flusher()
            if self._flush_task is not None:
                await asyncio.gather(self._flush_task, return_exceptions=True)
            while self._pending:  # the flusher failed or was cancelled: settle here
                await self._flush_once()
        finally:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            try:
                await self._sub.close()
            finally:
                self._state = "stopped"
                self._stopped.set()

    # ------------------------------------------------------------------ fetching

    async def _fetch_loop(self) -> None:
        sub = self._sub
        assert sub is not None
        assert self._loop is not None
        backoff = 0.1
        while self._state == "running":
            free = self._max - self._in_flight
            if free <= 0:
                self._slot_wakeup = self._loop.create_future()
                await self._slot_wakeup
                continue
            want = min(free, self._fetch_max)
            try:
                batch = await sub.fetch(want, self.settings.fetch_timeout)
            except asyncio.CancelledError:
                raise
            except ClosedError as exc:
                if self._state != "running":
                    return
                logger.error(
                    "subscription of %s/%s closed under the consumer (%s); stopping", self.topic, self.group, exc
                )
                self.last_error = self._failure = exc
                self._stopper = self._loop.create_task(self.stop())
                return
            except Exception as exc:
                self.last_error = exc
                logger.warning(
                    "fetch from %s/%s failed (%s: %s); retrying in %.1fs",
                    self.topic,
                    self.group,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_FETCH_BACKOFF)
                continue
            backoff = 0.1
            # a full batch means a backlog: then ask for half the bound at a time, so the next
            # fetch runs while this batch is settled (fetch and ack round trips overlap)
            self._fetch_max = self._half if len(batch) >= want else self._max
            if not batch:
                continue
            if len(batch) > free:
                logger.error("transport returned %d deliveries for %d free slots", len(batch), free)
            self._in_flight += len(batch)
            self._dispatch(batch)

    def _dispatch(self, batch: Sequence[Delivery]) -> None:
        runnable = self._runnable
        if self.settings.ordered_by_key:
            queues = self._key_queues
            for delivery in batch:
                key = delivery.message.key
                if key is None:
                    runnable.append(delivery)
                elif key in queues:
                    queues[key].append(delivery)
                else:
                    queues[key] = deque()
                    runnable.append(delivery)
        else:
            runnable.extend(batch)
        self._pump()

    # ------------------------------------------------------------------ handling

    def _pump(self) -> None:
        """Start every runnable delivery; re-entrant calls leave the work to the outer loop."""
        if self._pumping:
            return
        self._pumping = True
        try:
            runnable = self._runnable
            while runnable:
                self._start(runnable.popleft())
        finally:
            self._pumping = False

    def _start(self, delivery: Delivery) -> None:
        context = contextvars.copy_context()
        try:
            coro = context.run(self._call, delivery)
            if type(coro) is not CoroutineType:
                coro = _as_coroutine(coro)
            pending = context.run(coro.send, None)
        except StopIteration as stop:
            outcome = _outcome_of(stop.value)
        except Exception as exc:
            outcome = self._outcome_for_error(delivery, exc)
        else:
            assert self._loop is not None
            task = self._loop.create_task(self._finish(delivery, coro, pending), context=context)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._complete(delivery, outcome)

    async def _finish(self, delivery: Delivery, coro: Any, pending: Any) -> None:
        try:
            result = await _Resume(coro, pending)
        except asyncio.CancelledError:
            self._abandoned.append(delivery)
            self._release_key(delivery)
            raise
        except Exception as exc:
            outcome = self._outcome_for_error(delivery, exc)
        else:
            outcome = _outcome_of(result)
        self._complete(delivery, outcome)
        self._pump()

    def _outcome_for_error(self, delivery: Delivery, exc: Exception) -> Outcome:
        """What an exception that escaped the middleware (no retry policy, or a failing
        middleware) means: the same rules as the policy, without limits or delays."""
        if isinstance(exc, DecodeError):
            logger.warning(
                "message %s on %s/%s is undecodable and goes to the dead letters: %s",
                delivery.message.id,
                delivery.topic,
                delivery.group,
                exc,
                extra=log_fields(delivery),
            )
            return dead_letter(delivery, f"undecodable body: {exc}", exc)
        if isinstance(exc, Reject):
            return dead_letter(delivery, exc.reason, exc)
        if isinstance(exc, RetryLater):
            return Retry(exc.delay, exc.reason)
        logger.error(
            "handler failed on message %s of %s/%s (attempt %d); redelivering",
            delivery.message.id,
            delivery.topic,
            delivery.group,
            delivery.attempt,
            exc_info=exc,
            extra=log_fields(delivery),
        )
        return Retry(0.0, f"{type(exc).__name__}: {exc}")

    def _complete(self, delivery: Delivery, outcome: Outcome) -> None:
        pending = self._pending
        pending.append((delivery, outcome))
        if self._flush_requested:
            pass
        elif len(pending) >= self._batch_size or len(pending) + self._settling >= self._in_flight:
            self._wake_flusher()
        elif self._flush_timer is None:
            assert self._loop is not None
            self._flush_timer = self._loop.call_later(self.settings.settle_interval, self._wake_flusher)
        key = delivery.message.key
        if key is not None and self.settings.ordered_by_key:
            queue = self._key_queues[key]
            if queue and self._state == "running":
                self._runnable.append(queue.popleft())
            elif not queue:
                del self._key_queues[key]

    def _release_key(self, delivery: Delivery) -> None:
        key = delivery.message.key
        if key is not None and self.settings.ordered_by_key:
            queue = self._key_queues.pop(key, None)
            if queue:
                self._abandoned.extend(queue)

    # ------------------------------------------------------------------ settling

    def _wake_flusher(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._flush_requested = True
        wakeup = self._flush_wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _flush_loop(self) -> None:
        """Settle whenever asked; one settle call at a time, so outcomes reach the broker in order."""
        assert self._loop is not None
        while True:
            if not self._flush_requested:
                if self._flusher_closing:
                    return
                self._flush_wakeup = self._loop.create_future()
                await self._flush_wakeup
                continue
            self._flush_requested = False
            await self._flush_once()

    async def _flush_once(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        assert self._sub is not None
        self._settling += len(batch)
        try:
            await self._sub.settle(batch)
            self.last_error = None
        except Exception as exc:
            self.last_error = exc
            logger.warning(
                "settling %d deliveries of %s/%s failed (%s: %s); the broker will redeliver them",
                len(batch),
                self.topic,
                self.group,
                type(exc).__name__,
                exc,
            )
        finally:
            self._settling -= len(batch)
            self._in_flight -= len(batch)
            wakeup = self._slot_wakeup
            if wakeup is not None and not wakeup.done():
                wakeup.set_result(None)

    async def _release(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        assert self._sub is not None
        try:
            await self._sub.release(deliveries)
        except Exception as exc:
            self.last_error = exc
            logger.warning(
                "releasing %d deliveries of %s/%s failed (%s: %s); the broker will redeliver them",
                len(deliveries),
                self.topic,
                self.group,
                type(exc).__name__,
                exc,
            )
        finally:
            self._in_flight -= len(deliveries)


def _outcome_of(result: object) -> Outcome:
    if isinstance(result, Retry | DeadLetter):
        return result
    return ACK

"""The outbox relay: publishes committed outbox rows at-least-once, in order per key, then marks
them sent and deletes them after a retention.

One batch is one database transaction:

* PostgreSQL: transaction-scoped advisory locks on the keys of the oldest unsent rows, then
  ``SELECT ... FOR UPDATE SKIP LOCKED`` of those rows whose key this relay locked (and of rows
  without a key). Several relays share the work without taking the same row, and a key's rows
  are only ever in one relay's hands, oldest first, so a later row of a key is never published
  while an earlier one is in flight elsewhere.
* SQLite: a lock row with a lease makes one relay the publisher; the others wait and take over
  when its lease runs out (at most ``lock_lease`` seconds after it died).

The batch is published with ``Broker.send_batch`` per topic (same message ids, headers and
timestamps as added), stopping at the first failure; what the broker stored is marked sent in
the same transaction. A relay killed between publishing and committing leaves its rows unsent:
the next relay publishes them again (duplicates only at that point; consumers dedup by id).
Relays wake on PostgreSQL ``NOTIFY`` and on commits of outbox rows in their own process, and
otherwise look every ``poll_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from msgkit.broker import Broker
from msgkit.consumer import StateError
from msgkit.errors import PublishError
from msgkit.message import Message
from msgkit.outbox.db import dialect_name, engine_of, insert_for
from msgkit.outbox.schema import ADVISORY_LOCK_SPACE, NOTIFY_CHANNEL, outbox_table, relay_lock_table
from msgkit.outbox.writer import register_wakeup

logger = logging.getLogger("msgkit.outbox")

_o = outbox_table
_lock = relay_lock_table
_LOCK_NAME = "relay"
_COLUMNS = (_o.c.seq, _o.c.message_id, _o.c.topic, _o.c.key, _o.c.headers, _o.c.body, _o.c.created_at)


class RelaySettings(BaseModel):
    """How a relay works. Defaults suit a typical service.

    Attributes:
        batch_size: rows claimed and published per transaction.
        poll_interval: seconds between looks for new rows when nothing wakes the relay.
        listen: on PostgreSQL, wake on ``NOTIFY msgkit_outbox`` (sent by the table's trigger).
        retention: seconds sent rows are kept before deletion (0: delete them as they are sent).
        cleanup_interval: seconds between deletions of sent rows older than ``retention``.
        publish_timeout: seconds one ``send_batch`` may take before it counts as failed.
        lock_lease: on SQLite, seconds the publishing relay's lock lasts unless renewed: how long
            a relay that died blocks the others. Must exceed ``publish_timeout``.
        max_backoff: the longest wait between retries after failures (they start at 0.1 s and double).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(100, ge=1, le=10_000)
    poll_interval: float = Field(1.0, gt=0, le=3600)
    listen: bool = True
    retention: float = Field(3600.0, ge=0)
    cleanup_interval: float = Field(60.0, gt=0)
    publish_timeout: float = Field(10.0, gt=0)
    lock_lease: float = Field(30.0, gt=0)
    max_backoff: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> RelaySettings:
        if self.lock_lease <= self.publish_timeout:
            raise ValueError(f"lock_lease ({self.lock_lease}) must exceed publish_timeout ({self.publish_timeout})")
        return self


class OutboxRelay:
    """Publishes the outbox of one database through one broker. Run it in-process or with
    ``msgkit outbox relay DB_URL BROKER_URL``; run as many as you like.

    ``bind`` is an engine or a database URL, ``broker`` a :class:`msgkit.Broker` or a broker URL
    (a relay owns what it built from a URL). ``await relay.run()`` relays until :meth:`stop` or
    cancellation; :meth:`start` runs it in the background.
    """

    def __init__(
        self,
        bind: AsyncEngine | str,
        broker: Broker | str,
        settings: RelaySettings | None = None,
        **options: Any,
    ) -> None:
        if settings is not None and options:
            raise TypeError("pass relay options either as settings= or as keywords, not both")
        self.settings = settings if settings is not None else RelaySettings(**options)
        self._engine = engine_of(bind)
        self._owns_engine = self._engine is not bind
        self._broker = Broker(broker) if isinstance(broker, str) else broker
        self._owns_broker = isinstance(broker, str)
        self._dialect = dialect_name(self._engine)
        self.relay_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        #: Rows this relay has published (counted once the broker stored them).
        self.published = 0
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._stop_requested = False
        self._task: asyncio.Task[None] | None = None
        self._next_cleanup = 0.0
        self._holds_lock = False
        self._listener: tuple[AsyncConnection, Any] | None = None

    def __repr__(self) -> str:
        return f"OutboxRelay({self._engine.url.render_as_string(hide_password=True)!r}, {self._broker.url!r})"

    @property
    def holds_lock(self) -> bool:
        """SQLite: whether this relay is the one publishing (PostgreSQL relays always publish)."""
        return self._dialect == "postgresql" or self._holds_lock

    # ------------------------------------------------------------------ one batch

    async def relay_once(self) -> int:
        """Claim, publish and mark one batch; return how many rows were published.

        Raise the publish error after marking what was stored, if the broker failed.
        """
        if self._dialect == "sqlite" and not await self._take_lock():
            return 0
        async with self._engine.connect() as conn, conn.begin():
            rows = await self._claim(conn)
            if not rows:
                return 0
            sent, error = await self._publish(rows)
            if sent:
                if self.settings.retention == 0:
                    await conn.execute(delete(_o).where(_o.c.seq.in_(sent)))
                else:
                    await conn.execute(update(_o).where(_o.c.seq.in_(sent)).values(sent_at=time.time()))
        self.published += len(sent)
        if error is not None:
            raise error
        return len(sent)

    async def _claim(self, conn: AsyncConnection) -> Sequence[Any]:
        """The oldest unsent rows this relay may publish now, locked for this transaction."""
        unsent = _o.c.sent_at.is_(None)
        batch = self.settings.batch_size
        if self._dialect == "sqlite":  # the publishing lock makes this relay the only one
            return (await conn.execute(select(*_COLUMNS).where(unsent).order_by(_o.c.seq).limit(batch))).all()
        # 1. Lock the keys of a window of the oldest rows (a key held by another relay is skipped
        #    whole, so its later rows never overtake the earlier ones in that relay's hands). The
        #    window bounds how many locks one batch takes, whatever plan PostgreSQL picks.
        window = select(_o.c.seq, _o.c.key).where(unsent).order_by(_o.c.seq).limit(4 * batch).subquery()
        key_is_ours = func.pg_try_advisory_xact_lock(ADVISORY_LOCK_SPACE, func.hashtext(window.c.key))
        ours = (await conn.execute(select(window.c.seq).where(window.c.key.is_(None) | key_is_ours))).scalars().all()
        if not ours:
            return []
        # 2. A new statement sees whatever the key's previous holder committed before letting go.
        claim = select(*_COLUMNS).where(_o.c.seq.in_(ours) & unsent).order_by(_o.c.seq).limit(batch)
        return (await conn.execute(claim.with_for_update(skip_locked=True))).all()

    async def _publish(self, rows: Sequence[Any]) -> tuple[list[int], Exception | None]:
        """Send ``rows`` per topic in seq order; return the seqs the broker stored and the first error."""
        by_topic: dict[str, list[Any]] = {}
        for row in rows:
            by_topic.setdefault(row.topic, []).append(row)
        sent: list[int] = []
        for topic, group in by_topic.items():
            messages = [Message(r.body, r.message_id, r.key, r.headers or {}, r.created_at) for r in group]
            try:
                async with asyncio.timeout(self.settings.publish_timeout):
                    await self._broker.send_batch(topic, messages)
            except PublishError as exc:
                failed = {message_id for message_id, _ in exc.failed}
                sent.extend(r.seq for r in group if r.message_id not in failed)
                return sent, exc
            except Exception as exc:
                return sent, exc
            sent.extend(r.seq for r in group)
        return sent, None

    async def _take_lock(self) -> bool:
        """SQLite: take or renew the publishing lock; whether this relay holds it now."""
        now = time.time()
        stmt = insert_for("sqlite")(_lock).values(
            name=_LOCK_NAME, holder=self.relay_id, expires_at=now + self.settings.lock_lease
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[_lock.c.name],
            set_={"holder": stmt.excluded.holder, "expires_at": stmt.excluded.expires_at},
            where=(_lock.c.holder == self.relay_id) | (_lock.c.expires_at <= now),
        ).returning(_lock.c.holder)
        async with self._engine.begin() as conn:
            held = (await conn.execute(stmt)).first() is not None
        if held != self._holds_lock:
            logger.info("outbox relay %s %s the publishing lock", self.relay_id, "took" if held else "lost")
        self._holds_lock = held
        return held

    async def _drop_lock(self) -> None:
        if self._dialect == "sqlite" and self._holds_lock:
            self._holds_lock = False
            async with self._engine.begin() as conn:
                await conn.execute(delete(_lock).where(_lock.c.holder == self.relay_id))

    # ------------------------------------------------------------------ housekeeping

    async def pending(self) -> int:
        """Rows not sent yet."""
        async with self._engine.connect() as conn:
            count = await conn.scalar(select(func.count()).select_from(_o).where(_o.c.sent_at.is_(None)))
        return int(count or 0)

    async def cleanup(self) -> int:
        """Delete rows sent more than ``retention`` seconds ago; return how many."""
        cutoff = time.time() - self.settings.retention
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(_o).where(_o.c.sent_at.is_not(None) & (_o.c.sent_at <= cutoff)))
        return int(result.rowcount)

    async def _cleanup_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_cleanup or not self.holds_lock:
            return
        self._next_cleanup = now + self.settings.cleanup_interval
        try:
            removed = await self.cleanup()
        except Exception as exc:
            logger.warning("outbox cleanup failed (%s: %s)", type(exc).__name__, exc)
        else:
            if removed:
                logger.debug("outbox cleanup deleted %d sent rows", removed)

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Relay until :meth:`stop` is called or the task is cancelled; failures are retried with
        backoff, never raised."""
        if self._task is not None and self._task is not asyncio.current_task():
            raise StateError("this relay is already running")
        if self._task is None:  # called directly, not through start()
            self._reset()
        loop = asyncio.get_running_loop()
        unregister = register_wakeup(loop, self._wake)
        failures = 0
        logger.info("outbox relay %s started (%s -> %s)", self.relay_id, self._dialect, self._broker.url)
        try:
            await self._broker.connect()
            while not self._stop_requested:
                await self._ensure_listener()
                self._wake.clear()  # before looking, so a row committed meanwhile wakes the next look
                try:
                    count = await self.relay_once()
                except Exception as exc:
                    failures += 1
                    delay = min(0.1 * 2 ** (failures - 1), self.settings.max_backoff) * random.uniform(0.8, 1.2)
                    logger.warning(
                        "outbox relay %s: publishing failed (%s: %s); retrying in %.1fs",
                        self.relay_id,
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    await self._sleep(delay, wakeable=False)
                    continue
                failures = 0
                if count >= self.settings.batch_size:
                    continue  # likely more waiting
                await self._cleanup_if_due()
                await self._sleep(self.settings.poll_interval, wakeable=True)
        finally:
            unregister()
            await asyncio.shield(self._shutdown())
            logger.info("outbox relay %s stopped after publishing %d messages", self.relay_id, self.published)

    async def _sleep(self, seconds: float, *, wakeable: bool) -> None:
        if self._stop_requested:
            return
        waiter = self._wake if wakeable else self._stop_event
        try:
            await asyncio.wait_for(waiter.wait(), seconds)
        except TimeoutError:
            pass

    def _reset(self) -> None:
        self._stop_requested = False
        self._stop_event.clear()

    async def _shutdown(self) -> None:
        await self._close_listener()
        try:
            await self._drop_lock()
        except Exception as exc:
            logger.warning("outbox relay %s could not drop its lock (%s); it expires on its own", self.relay_id, exc)

    async def start(self) -> None:
        """Run the relay in a background task."""
        if self._task is not None and not self._task.done():
            raise StateError("this relay is already running")
        self._reset()
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"msgkit-outbox-relay-{self.relay_id}")

    def request_stop(self) -> None:
        """Ask the relay to stop after the batch in hand. Safe from a signal handler."""
        self._stop_requested = True
        self._wake.set()
        self._stop_event.set()

    async def stop(self) -> None:
        """Stop after the batch in hand and release what the relay holds. Idempotent."""
        self.request_stop()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        """Stop, drop the SQLite lock if held, then close what the relay built from URLs."""
        await self.stop()
        await self._shutdown()
        if self._owns_broker:
            await self._broker.close()
        if self._owns_engine:
            await self._engine.dispose()

    async def __aenter__(self) -> OutboxRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ PostgreSQL LISTEN

    async def _ensure_listener(self) -> None:
        if self._dialect != "postgresql" or not self.settings.listen:
            return
        if self._listener is not None:
            if not self._listener[1].is_closed():
                return
            await self._close_listener()
        try:
            conn = await self._engine.connect()
        except Exception as exc:
            logger.warning("outbox relay %s cannot listen for NOTIFY (%s); polling", self.relay_id, exc)
            return
        try:
            driver: Any = (await conn.get_raw_connection()).driver_connection
            await driver.add_listener(NOTIFY_CHANNEL, self._on_notify)
        except Exception as exc:
            logger.warning("outbox relay %s cannot listen for NOTIFY (%s); polling", self.relay_id, exc)
            await conn.close()
            return
        self._listener = (conn, driver)

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    async def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        conn, driver = listener
        try:
            if not driver.is_closed():
                await driver.remove_listener(NOTIFY_CHANNEL, self._on_notify)
            await conn.close()
        except Exception:
            await conn.invalidate()

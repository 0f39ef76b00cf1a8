"""The inbox: a handler's database writes and the record that it processed the message commit in
one transaction, so a message's effect happens once even when the message is delivered twice.

Per delivery the inbox opens a session and a transaction, inserts the row (group, message id)
into ``msgkit_inbox`` first, and runs the handler with that session (``inbox.session()``):

* the handler returns: the transaction commits, row and effects together;
* it raises, or returns ``Retry``/``DeadLetter``: the transaction rolls back, row and effects
  together, and the redelivery runs the handler again;
* the row exists already: the message was processed, it is acked without running the handler.

A duplicate arriving while the first is still running waits on the row (PostgreSQL's unique
index, SQLite's write lock) and is then acked, or runs if the first rolled back.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from msgkit.consumer import StateError
from msgkit.message import ACK, Ack, Delivery, Outcome, log_fields
from msgkit.middleware import CallNext
from msgkit.outbox.db import dialect_name, engine_of, insert_for
from msgkit.outbox.schema import inbox_table
from msgkit.stores.base import check_seconds

logger = logging.getLogger("msgkit.inbox")

_t = inbox_table


def _message_id(delivery: Delivery) -> str:
    return delivery.message.id


class _RollBack(Exception):
    """Roll the transaction back and settle with ``outcome``."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


class Inbox:
    """Middleware that runs a handler in a database transaction which also records the message.

    Args:
        bind: an engine, a database URL, or an ``async_sessionmaker`` (to use your own session
            options); PostgreSQL or SQLite.
        key: what identifies a message; default its id. Rows are per (consumer group, key).
        keep_for: seconds a processed row is kept (the dedup window); older ones are deleted every
            ``cleanup_interval`` seconds.

    The handler gets the transaction's session from :meth:`session` and must neither commit nor
    roll it back: the inbox does, after the handler::

        inbox = Inbox(engine)

        async def ship(order: Order) -> None:
            inbox.session().add(Shipment(order_id=order.id))

        broker.consumer("orders", "shipping", ship, middleware=[inbox])
    """

    def __init__(
        self,
        bind: AsyncEngine | str | async_sessionmaker[AsyncSession],
        *,
        key: Callable[[Delivery], str] | None = None,
        keep_for: float = 7 * 86_400.0,
        cleanup_interval: float = 3600.0,
    ) -> None:
        if isinstance(bind, async_sessionmaker):
            self._sessions = bind
            self._engine: AsyncEngine | None = None
        else:
            self._engine = engine_of(bind)
            self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        self._owns_engine = isinstance(bind, str)
        self.key = key or _message_id
        self.keep_for = check_seconds("keep_for", keep_for)
        self._cleanup_interval = check_seconds("cleanup_interval", cleanup_interval)
        self._next_cleanup = time.monotonic() + self._cleanup_interval
        self._insert: Callable[..., Any] | None = None
        self._current: contextvars.ContextVar[AsyncSession] = contextvars.ContextVar("msgkit_inbox_session")

    def session(self) -> AsyncSession:
        """The session of the message being handled (valid only inside a handler this inbox wraps)."""
        try:
            return self._current.get()
        except LookupError:
            raise StateError("inbox.session() is only available inside a handler that this Inbox wraps") from None

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> Outcome | None:
        message_key = self.key(delivery)
        try:
            async with self._sessions() as session, session.begin():
                if self._insert is None:
                    self._insert = insert_for(dialect_name(session))
                row = {"group_name": delivery.group, "message_id": message_key, "processed_at": time.time()}
                stmt = self._insert(_t).values(**row).on_conflict_do_nothing().returning(_t.c.message_id)
                if (await session.execute(stmt)).first() is None:
                    logger.debug(
                        "message %s of %s/%s already processed (inbox key %s); acked",
                        delivery.message.id,
                        delivery.topic,
                        delivery.group,
                        message_key,
                        extra=log_fields(delivery),
                    )
                    return ACK
                transaction = session.get_transaction()
                token = self._current.set(session)
                try:
                    outcome = await call_next(delivery)
                finally:
                    self._current.reset(token)
                if session.get_transaction() is not transaction:
                    logger.warning(
                        "the handler of message %s of %s/%s committed or rolled back the inbox's transaction "
                        "itself; its effects and the inbox row may not have committed together",
                        delivery.message.id,
                        delivery.topic,
                        delivery.group,
                        extra=log_fields(delivery),
                    )
                if outcome is not None and not isinstance(outcome, Ack):
                    raise _RollBack(outcome)
        except _RollBack as rollback:
            return rollback.outcome
        if time.monotonic() >= self._next_cleanup:
            await self._cleanup_quietly()
        return outcome

    async def cleanup(self) -> int:
        """Delete rows processed more than ``keep_for`` seconds ago; return how many."""
        self._next_cleanup = time.monotonic() + self._cleanup_interval
        async with self._sessions() as session, session.begin():
            result = await session.execute(delete(_t).where(_t.c.processed_at < time.time() - self.keep_for))
        return int(getattr(result, "rowcount", 0))

    async def _cleanup_quietly(self) -> None:
        try:
            await self.cleanup()
        except Exception as exc:
            logger.warning("inbox cleanup failed (%s: %s)", type(exc).__name__, exc)

    async def close(self) -> None:
        """Dispose of the engine if the inbox built it from a URL."""
        if self._owns_engine and self._engine is not None:
            await self._engine.dispose()

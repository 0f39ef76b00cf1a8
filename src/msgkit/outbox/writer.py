"""Adding messages to the outbox table inside the caller's own transaction.

The row commits or rolls back with the caller's other writes, so a message is published (by the
relay, :mod:`msgkit.outbox.relay`) if and only if the business change it announces happened.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from msgkit.codec import encode_body
from msgkit.message import new_message_id
from msgkit.names import check_name
from msgkit.outbox.schema import outbox_table

_PENDING = "msgkit_outbox_pending"
_ARMED = "msgkit_outbox_armed"

# Relays running in this process, woken when a session that added outbox rows commits, so an
# in-process relay publishes at once even on SQLite, which has no NOTIFY.
_wakeups: set[Callable[[], None]] = set()
_wakeups_lock = threading.Lock()


def register_wakeup(loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> Callable[[], None]:
    """Have ``wake`` set (on ``loop``) whenever outbox rows commit in this process; return the
    function that undoes it."""

    def callback() -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    with _wakeups_lock:
        _wakeups.add(callback)

    def unregister() -> None:
        with _wakeups_lock:
            _wakeups.discard(callback)

    return unregister


def _after_commit(session: Session) -> None:
    if session.info.pop(_PENDING, False):
        with _wakeups_lock:
            callbacks = list(_wakeups)
        for callback in callbacks:
            callback()


def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)


def _arm(session: AsyncSession) -> None:
    sync = session.sync_session
    if not sync.info.get(_ARMED):
        sync.info[_ARMED] = True
        event.listen(sync, "after_commit", _after_commit)
        event.listen(sync, "after_rollback", _after_rollback)
    sync.info[_PENDING] = True


def _check_headers(headers: Mapping[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if type(name) is not str or type(value) is not str:
            raise TypeError(f"headers must map str to str; got {type(name).__name__} -> {type(value).__name__}")
    return dict(headers)


class Outbox:
    """Writes messages to the ``msgkit_outbox`` table in the caller's transaction.

    ::

        outbox = Outbox()
        async with sessions() as session, session.begin():
            session.add(order)
            await outbox.add(session, "orders", OrderPlaced(id=order.id), key=str(order.id))
        # committed: the relay publishes the message; rolled back: it never existed

    Headers given here (a W3C ``traceparent``, for instance) are published unchanged.
    ``on_add(topic, message_id, headers)`` is called for each message before its row is written
    and may add headers to the dict it gets (``Telemetry.on_outbox_add`` adds trace context).
    """

    def __init__(self, *, on_add: Callable[[str, str, dict[str, str]], None] | None = None) -> None:
        self._on_add = on_add

    async def add(
        self,
        session: AsyncSession | AsyncConnection,
        topic: str,
        body: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Add one message for ``topic`` in ``session``'s transaction; return its id.

        ``body`` is encoded as ``Broker.send`` encodes it (bytes as is, models and values as JSON).
        Messages with the same ``key`` are published in the order they were added. The id is
        kept when published, so consumers can deduplicate on it.
        """
        row = self._row(topic, body, key, headers, message_id)
        if self._on_add is not None:
            self._on_add(topic, row["message_id"], row["headers"])
        await session.execute(outbox_table.insert().values(**row))
        if isinstance(session, AsyncSession):
            _arm(session)
        return str(row["message_id"])

    @staticmethod
    def _row(
        topic: str, body: object, key: str | None, headers: Mapping[str, str] | None, message_id: str | None
    ) -> dict[str, Any]:
        check_name("topic", topic)
        if key is not None and type(key) is not str:
            raise TypeError(f"key must be a string or None, got {type(key).__name__}")
        if message_id is not None and (type(message_id) is not str or not message_id):
            raise TypeError("message_id must be a non-empty string or None")
        return {
            "message_id": message_id or new_message_id(),
            "topic": topic,
            "key": key,
            "headers": _check_headers(headers) if headers else {},
            "body": encode_body(body),
            "created_at": time.time(),
        }

"""A dedup store in a SQL database (PostgreSQL or SQLite) through SQLAlchemy 2 async.

One row per key in ``msgkit_dedup`` (see :mod:`msgkit.outbox.schema`): the token of the current
claim, whether it is done, and when the row stops counting (the lease's end while claimed, the
window's end once done). A claim is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired``,
so of concurrent claims exactly one wins; rows past their time are deleted every
``cleanup_interval`` seconds by the store that notices. Times are the clients' clocks: keep them
in sync (NTP) to well within a lease.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from msgkit.outbox.db import dialect_name, engine_of, insert_for, unavailable_as
from msgkit.outbox.schema import create_schema, dedup_table
from msgkit.stores.base import DONE, Claim, ClaimStatus, DedupStore, check_seconds

logger = logging.getLogger("msgkit.stores.sql")

_t = dedup_table


class SqlDedupStore(DedupStore):
    """Claims in the ``msgkit_dedup`` table. Pass an engine or a URL (the store then owns the engine).

    Create the table first: :meth:`create_schema`, :func:`msgkit.outbox.create_schema`, or the DDL
    in docs/idempotency.md. Needs ``pip install "msgkit[sql]"``.
    """

    def __init__(self, bind: AsyncEngine | str, *, cleanup_interval: float = 300.0) -> None:
        self._engine = engine_of(bind)
        self._owned = self._engine is not bind
        self._insert = insert_for(dialect_name(self._engine))
        self._cleanup_interval = check_seconds("cleanup_interval", cleanup_interval)
        self._next_cleanup = time.monotonic() + self._cleanup_interval

    def __repr__(self) -> str:
        return f"SqlDedupStore({self._engine.url.render_as_string(hide_password=True)!r})"

    async def create_schema(self) -> None:
        """Create msgkit's tables where missing (see :func:`msgkit.outbox.create_schema`)."""
        await create_schema(self._engine)

    def _upsert(self, key: str, token: str, done: bool, expires_at: float, where: Any) -> Any:
        stmt = self._insert(_t).values(key=key, token=token, done=done, expires_at=expires_at)
        return stmt.on_conflict_do_update(
            index_elements=[_t.c.key],
            set_={"token": stmt.excluded.token, "done": stmt.excluded.done, "expires_at": stmt.excluded.expires_at},
            where=where,
        ).returning(_t.c.key)

    async def claim(self, key: str, lease: float) -> Claim:
        lease = check_seconds("lease", lease)
        token = uuid.uuid4().hex
        async with unavailable_as("dedup store"):
            for _ in range(5):  # a row that vanishes between the two statements: look again
                now = time.time()
                async with self._engine.begin() as conn:
                    won = await conn.execute(self._upsert(key, token, False, now + lease, _t.c.expires_at <= now))
                    if won.first() is not None:
                        claim = Claim(ClaimStatus.CLAIMED, token)
                        break
                    row = (await conn.execute(select(_t.c.done, _t.c.expires_at).where(_t.c.key == key))).first()
                if row is not None and row.expires_at > now:
                    claim = DONE if row.done else Claim(ClaimStatus.BUSY, retry_after=row.expires_at - now)
                    break
            else:
                raise RuntimeError(f"claim of {key!r} kept racing with deletes")  # pragma: no cover
        if time.monotonic() >= self._next_cleanup:
            await self._cleanup_quietly()
        return claim

    async def mark_done(self, key: str, token: str, keep_for: float) -> bool:
        keep_for = check_seconds("keep_for", keep_for)
        now = time.time()
        mine_or_expired = (_t.c.token == token) | (_t.c.expires_at <= now)
        async with unavailable_as("dedup store"), self._engine.begin() as conn:
            result = await conn.execute(self._upsert(key, token, True, now + keep_for, mine_or_expired))
            return result.first() is not None

    async def release(self, key: str, token: str) -> bool:
        mine = (_t.c.key == key) & (_t.c.token == token) & (_t.c.done == False)  # noqa: E712 - SQL
        async with unavailable_as("dedup store"), self._engine.begin() as conn:
            row = (await conn.execute(delete(_t).where(mine).returning(_t.c.expires_at))).first()
        return row is not None and row.expires_at > time.time()

    async def extend(self, key: str, token: str, lease: float) -> bool:
        lease = check_seconds("lease", lease)
        now = time.time()
        mine_or_expired = ((_t.c.token == token) & (_t.c.done == False)) | (_t.c.expires_at <= now)  # noqa: E712
        async with unavailable_as("dedup store"), self._engine.begin() as conn:
            result = await conn.execute(self._upsert(key, token, False, now + lease, mine_or_expired))
            return result.first() is not None

    async def cleanup(self) -> int:
        """Delete rows whose lease or window has passed; return how many."""
        self._next_cleanup = time.monotonic() + self._cleanup_interval
        async with unavailable_as("dedup store"), self._engine.begin() as conn:
            result = await conn.execute(delete(_t).where(_t.c.expires_at <= time.time()))
            return int(result.rowcount)

    async def _cleanup_quietly(self) -> None:
        try:
            removed = await self.cleanup()
        except Exception as exc:  # the claim succeeded; cleaning up can wait for the next interval
            logger.warning("dedup store cleanup failed (%s: %s)", type(exc).__name__, exc)
        else:
            logger.debug("dedup store cleanup removed %d expired rows", removed)

    async def close(self) -> None:
        if self._owned:
            await self._engine.dispose()

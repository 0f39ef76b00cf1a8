"""The suite's tables, in a PostgreSQL schema of their own (``chaos``) beside msgkit's inbox and
outbox tables, so a run never touches the application tables of whoever else uses the database.

``chaos_effects`` is the consumers' effect: one row per handler run that committed, with no unique
key, so a duplicate effect shows up as two rows. ``chaos_suppressed`` counts deliveries that the
inbox acked without running the handler (written outside the inbox's transaction).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, Table, Text, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from msgkit.outbox import create_schema, engine_from_url

SCHEMA = "chaos"
metadata = MetaData()
effects = Table(
    "chaos_effects",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("run", Text, nullable=False, index=True),
    Column("message_id", Text, nullable=False),
    Column("n", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("at", Float, nullable=False),
)
suppressed = Table(
    "chaos_suppressed",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("run", Text, nullable=False, index=True),
    Column("message_id", Text, nullable=False),
)


def engine(url: str, **options: Any) -> AsyncEngine:
    """An engine whose tables (msgkit's and the suite's) live in the ``chaos`` schema."""
    return engine_from_url(url, connect_args={"server_settings": {"search_path": SCHEMA}}, **options)


async def prepare(db: AsyncEngine) -> None:
    """Create the schema and every table the suite and msgkit need; drop unsent outbox rows a
    killed earlier run left behind (they would go to that run's topics)."""
    async with db.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(4242, 1)"))
        await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    await create_schema(db)
    async with db.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.execute(text("DELETE FROM msgkit_outbox WHERE sent_at IS NULL"))


async def effect_counts(db: AsyncEngine, run: str) -> dict[str, int]:
    """Committed effects per message id."""
    async with db.connect() as conn:
        rows = await conn.execute(
            select(effects.c.message_id, func.count()).where(effects.c.run == run).group_by(effects.c.message_id)
        )
        return {str(message_id): int(count) for message_id, count in rows}


async def count_effects(db: AsyncEngine, run: str, prefix: str = "") -> int:
    """Distinct messages of ``run`` (ids starting with ``prefix``) that have an effect."""
    query = select(func.count(func.distinct(effects.c.message_id))).where(effects.c.run == run)
    if prefix:
        query = query.where(effects.c.message_id.startswith(prefix))
    async with db.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def first_effect_after(db: AsyncEngine, run: str, since: float) -> float | None:
    """When the first effect committed after ``since`` (epoch seconds), or None."""
    query = select(func.min(effects.c.at)).where(effects.c.run == run, effects.c.at > since)
    async with db.connect() as conn:
        value = (await conn.execute(query)).scalar_one()
    return None if value is None else float(value)


async def effect_times(db: AsyncEngine, run: str, since: float, until: float) -> list[float]:
    """When effects committed between ``since`` and ``until`` (epoch seconds), in order."""
    query = (
        select(effects.c.at)
        .where(effects.c.run == run, effects.c.at >= since, effects.c.at <= until)
        .order_by(effects.c.at)
    )
    async with db.connect() as conn:
        return [float(at) for (at,) in await conn.execute(query)]


async def count_suppressed(db: AsyncEngine, run: str) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(select(func.count()).where(suppressed.c.run == run))).scalar_one())


async def unsent_outbox_rows(db: AsyncEngine, topic: str) -> int:
    async with db.connect() as conn:
        query = text("SELECT count(*) FROM msgkit_outbox WHERE topic = :topic AND sent_at IS NULL")
        return int((await conn.execute(query, {"topic": topic})).scalar_one())

"""The tables msgkit keeps in your database, and how to create them.

``msgkit_outbox`` holds messages waiting for the relay, ``msgkit_outbox_lock`` the SQLite relay's
lock, ``msgkit_inbox`` the messages a consumer group has processed, and ``msgkit_dedup`` the claims
of :class:`~msgkit.stores.sql.SqlDedupStore`. Create them with :func:`create_schema` (or
``msgkit outbox create-schema DB_URL``), or take the DDL from :func:`schema_sql` (``--print``) into
your own migrations. Times are seconds since the epoch (double precision), so the same columns
work on both databases. On PostgreSQL a statement trigger on ``msgkit_outbox`` sends
``NOTIFY msgkit_outbox`` when rows are added, which wakes the relays at commit.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.schema import CreateIndex, CreateTable

from msgkit.outbox.db import Dialect, dialect_name, engine_of

#: NOTIFY channel the outbox trigger signals and relays listen on (PostgreSQL).
NOTIFY_CHANNEL = "msgkit_outbox"
#: First key of msgkit's PostgreSQL advisory locks ("msgk"), so they never meet the application's.
ADVISORY_LOCK_SPACE = 0x6D73676B

metadata = MetaData()

outbox_table = Table(
    "msgkit_outbox",
    metadata,
    # SQLite autoincrements only an INTEGER PRIMARY KEY; AUTOINCREMENT never reuses a number
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("message_id", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("key", Text, nullable=True),
    Column("headers", JSON, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("sent_at", Double, nullable=True),
    Index(
        "msgkit_outbox_unsent",
        "seq",
        postgresql_where=text("sent_at IS NULL"),
        sqlite_where=text("sent_at IS NULL"),
    ),
    Index(
        "msgkit_outbox_sent",
        "sent_at",
        postgresql_where=text("sent_at IS NOT NULL"),
        sqlite_where=text("sent_at IS NOT NULL"),
    ),
    sqlite_autoincrement=True,
)

relay_lock_table = Table(
    "msgkit_outbox_lock",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", Text, nullable=False),
    Column("expires_at", Double, nullable=False),
)

inbox_table = Table(
    "msgkit_inbox",
    metadata,
    Column("group_name", String(200), primary_key=True),
    Column("message_id", Text, primary_key=True),
    Column("processed_at", Double, nullable=False),
    Index("msgkit_inbox_processed", "processed_at"),
)

dedup_table = Table(
    "msgkit_dedup",
    metadata,
    Column("key", Text, primary_key=True),
    Column("token", String(32), nullable=False),
    Column("done", Boolean, nullable=False),
    Column("expires_at", Double, nullable=False),
    Index("msgkit_dedup_expires", "expires_at"),
)

_PG_TRIGGER = (
    f"""CREATE OR REPLACE FUNCTION msgkit_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
  RETURN NULL;
END $$""",
    "DROP TRIGGER IF EXISTS msgkit_outbox_notify ON msgkit_outbox",
    "CREATE TRIGGER msgkit_outbox_notify AFTER INSERT ON msgkit_outbox "
    "FOR EACH STATEMENT EXECUTE FUNCTION msgkit_outbox_notify()",
)


def schema_sql(dialect: Dialect) -> list[str]:
    """The DDL statements :func:`create_schema` runs on ``dialect``, for your own migrations."""
    compiled_for: Any = postgresql.dialect() if dialect == "postgresql" else sqlite.dialect()  # type: ignore[no-untyped-call]
    statements: list[str] = []
    for table in metadata.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=compiled_for)).strip())
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            statements.append(str(CreateIndex(index).compile(dialect=compiled_for)).strip())
    if dialect == "postgresql":
        statements.extend(_PG_TRIGGER)
    return statements


async def create_schema(bind: AsyncEngine | str) -> None:
    """Create msgkit's tables (and, on PostgreSQL, the NOTIFY trigger) where missing. Idempotent,
    and safe when several processes call it at once."""
    engine = engine_of(bind)
    try:
        async with engine.begin() as conn:
            if dialect_name(conn) == "postgresql":  # one creator at a time
                await conn.execute(text("SELECT pg_advisory_xact_lock(:space, 0)"), {"space": ADVISORY_LOCK_SPACE})
                await conn.run_sync(metadata.create_all)
                for statement in _PG_TRIGGER:
                    await conn.execute(text(statement))
            else:
                await conn.run_sync(metadata.create_all)
    finally:
        if engine is not bind:
            await engine.dispose()


async def drop_schema(bind: AsyncEngine | str) -> None:
    """Drop msgkit's tables and trigger function, with everything in them."""
    engine = engine_of(bind)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)
            if dialect_name(conn) == "postgresql":
                await conn.execute(text("DROP FUNCTION IF EXISTS msgkit_outbox_notify()"))
    finally:
        if engine is not bind:
            await engine.dispose()

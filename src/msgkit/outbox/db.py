"""Database plumbing shared by the SQL dedup store, the inbox and the outbox: engines and dialects.

Two databases are supported: PostgreSQL (through asyncpg) for production and SQLite (through
aiosqlite) as the embedded default. Both speak ``INSERT ... ON CONFLICT`` and ``RETURNING``, which
is all the portable SQL msgkit needs; the PostgreSQL relay adds row and advisory locks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TypeAlias

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SqlTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from msgkit.errors import BrokerUnavailableError, ConfigurationError

Dialect: TypeAlias = Literal["postgresql", "sqlite"]

#: Seconds a SQLite connection waits for another writer before failing with "database is locked".
SQLITE_BUSY_TIMEOUT = 30.0

_DRIVERS = {"postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}


def async_url(url: str) -> str:
    """``url`` with the async driver msgkit uses: ``postgresql://`` -> ``postgresql+asyncpg://``,
    ``sqlite:///file.db`` -> ``sqlite+aiosqlite:///file.db``; URLs naming a driver stay as they are."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError
        raise ConfigurationError(f"malformed database URL: {exc}") from None
    driver = _DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False) if driver else url


def engine_from_url(url: str, **options: Any) -> AsyncEngine:
    """An async engine for ``url`` (see :func:`async_url`), tuned for msgkit's use.

    SQLite databases must be files (an in-memory database is one connection that every session
    would share, so their transactions would mix); they are opened in WAL mode with a busy timeout
    of ``SQLITE_BUSY_TIMEOUT`` seconds, so readers do not block the writer and writers queue.
    ``options`` go to :func:`sqlalchemy.ext.asyncio.create_async_engine`.
    """
    full = make_url(async_url(url))
    if full.get_backend_name() not in ("postgresql", "sqlite"):
        raise ConfigurationError(
            f"msgkit's SQL features support PostgreSQL and SQLite, not {full.get_backend_name()!r}"
        )
    if full.get_backend_name() == "sqlite":
        if full.database in (None, "", ":memory:") or "mode=memory" in str(full):
            raise ConfigurationError(
                "use a SQLite file (sqlite:///path/to/file.db): an in-memory database is one connection "
                "shared by every session, so transactions would mix"
            )
        options.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT)
        engine = create_async_engine(full, **options)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(full, **options)


def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def engine_of(bind: AsyncEngine | str) -> AsyncEngine:
    """``bind`` if it is an engine, else an engine for the URL it is."""
    return engine_from_url(bind) if isinstance(bind, str) else bind


def dialect_name(bind: AsyncEngine | AsyncConnection | AsyncSession) -> Dialect:
    """``"postgresql"`` or ``"sqlite"`` for what ``bind`` talks to; ConfigurationError otherwise."""
    name = bind.get_bind().dialect.name if isinstance(bind, AsyncSession) else bind.dialect.name
    if name == "postgresql":
        return "postgresql"
    if name == "sqlite":
        return "sqlite"
    raise ConfigurationError(f"msgkit's SQL features support PostgreSQL and SQLite, not {name!r}")


def insert_for(dialect: Dialect) -> Callable[..., Any]:
    """The dialect's ``insert`` construct, which has ``on_conflict_do_*``."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


@contextlib.asynccontextmanager
async def unavailable_as(what: str) -> AsyncIterator[None]:
    """Turn "cannot reach or use the database" errors into :class:`msgkit.BrokerUnavailableError`."""
    try:
        yield
    except (OperationalError, InterfaceError, SqlTimeoutError, OSError) as exc:
        raise BrokerUnavailableError(f"{what} unavailable: {type(exc).__name__}: {exc}") from exc

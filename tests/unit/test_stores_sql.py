"""The dedup store contract on the SQL store over SQLite, plus its cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import msgkit
from msgkit.stores import ClaimStatus, DedupStore, SqlDedupStore
from msgkit.testing.stores import DedupStoreContract

from .test_idempotency import check_fail_once_then_duplicate


class TestSqliteStore(DedupStoreContract):
    @pytest_asyncio.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[DedupStore]:
        async with SqlDedupStore(f"sqlite:///{tmp_path / 'dedup.db'}") as store:
            await store.create_schema()
            yield store


@pytest.mark.asyncio
async def test_cleanup_deletes_only_what_expired(tmp_path: Path) -> None:
    async with SqlDedupStore(f"sqlite:///{tmp_path / 'dedup.db'}") as store:
        await store.create_schema()
        short = await store.claim("short", 0.05)
        await store.mark_done("short", short.token, 0.05)
        await store.claim("live", 30)
        await asyncio.sleep(0.1)
        assert await store.cleanup() == 1
        assert (await store.claim("live", 30)).status is ClaimStatus.BUSY
        assert (await store.claim("short", 30)).status is ClaimStatus.CLAIMED


@pytest.mark.asyncio
async def test_claims_clean_up_on_their_own_every_interval(tmp_path: Path) -> None:
    async with SqlDedupStore(f"sqlite:///{tmp_path / 'dedup.db'}", cleanup_interval=0.05) as store:
        await store.create_schema()
        for i in range(10):
            await store.claim(f"k{i}", 0.01)
        await asyncio.sleep(0.1)
        await store.claim("trigger", 30)  # the first claim after the interval sweeps
        assert await store.cleanup() == 0


def test_an_in_memory_sqlite_database_is_refused() -> None:
    with pytest.raises(ValueError, match="SQLite file"):
        SqlDedupStore("sqlite://")
    with pytest.raises(ValueError, match="PostgreSQL and SQLite"):
        SqlDedupStore("mysql://u:p@localhost/db")


@pytest.mark.asyncio
async def test_the_idempotency_middleware_on_the_sqlite_store(tmp_path: Path, broker: msgkit.Broker) -> None:
    async with SqlDedupStore(f"sqlite:///{tmp_path / 'dedup.db'}") as store:
        await store.create_schema()
        await check_fail_once_then_duplicate(broker, store)

"""The dedup store contract on PostgreSQL (needs a server: $MSGKIT_POSTGRES_URL or Docker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from msgkit.stores import ClaimStatus, DedupStore, SqlDedupStore
from msgkit.testing.stores import DedupStoreContract
from tests.unit.test_idempotency import check_fail_once_then_duplicate

from .test_outbox_postgres import postgres_engine, postgres_schema, schema_engine


class TestPostgresStore(DedupStoreContract):
    @pytest_asyncio.fixture
    async def store(self, msgkit_postgres_url: str) -> AsyncIterator[DedupStore]:
        async with postgres_engine(msgkit_postgres_url) as engine:
            store = SqlDedupStore(engine)
            await store.create_schema()
            yield store


@pytest.mark.asyncio
async def test_claims_from_separate_engines_have_one_winner(msgkit_postgres_url: str) -> None:
    """Separate engines are separate connections, like separate processes."""
    async with postgres_schema(msgkit_postgres_url) as schema:
        engines = [schema_engine(msgkit_postgres_url, schema) for _ in range(4)]
        try:
            await SqlDedupStore(engines[0]).create_schema()
            stores = [SqlDedupStore(e) for e in engines]
            for round_ in range(5):
                key = f"race-{round_}"
                claims = await asyncio.gather(*(s.claim(key, 30) for s in stores for _ in range(3)))
                assert [c.status for c in claims].count(ClaimStatus.CLAIMED) == 1
        finally:
            for e in engines:
                await e.dispose()


@pytest.mark.asyncio
async def test_the_idempotency_middleware_on_the_postgres_store(msgkit_postgres_url: str) -> None:
    import uuid

    import msgkit

    async with (
        postgres_engine(msgkit_postgres_url) as engine,
        msgkit.Broker(f"memory://pg-{uuid.uuid4().hex}") as broker,
    ):
        store = SqlDedupStore(engine)
        await store.create_schema()
        await check_fail_once_then_duplicate(broker, store)

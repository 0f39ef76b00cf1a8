"""The dedup store contract on Redis (needs a Redis server: $MSGKIT_REDIS_URL or Docker)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from msgkit.stores import DedupStore, RedisDedupStore
from msgkit.testing.stores import DedupStoreContract
from tests.unit.test_idempotency import check_fail_once_then_duplicate


class TestRedisStore(DedupStoreContract):
    @pytest_asyncio.fixture
    async def store(self, msgkit_redis_url: str) -> AsyncIterator[DedupStore]:
        async with RedisDedupStore(msgkit_redis_url) as store:
            yield store


@pytest.mark.asyncio
async def test_keys_live_under_the_dedup_prefix_and_expire(msgkit_redis_url: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(msgkit_redis_url)
    try:
        store = RedisDedupStore(client)  # a client we own: closing the store leaves it open
        key = f"prefix-{uuid.uuid4().hex}"
        claim = await store.claim(key, 5)
        assert await client.get(f"msgkit:dedup:{key}") == f"c:{claim.token}".encode()
        assert 0 < await client.pttl(f"msgkit:dedup:{key}") <= 5000
        assert await store.mark_done(key, claim.token, 60)
        assert await client.get(f"msgkit:dedup:{key}") == f"d:{claim.token}".encode()
        assert 55_000 < await client.pttl(f"msgkit:dedup:{key}") <= 60_000
        await store.close()
        assert await client.ping()
    finally:
        await client.delete(f"msgkit:dedup:{key}")
        await client.aclose()


@pytest.mark.asyncio
async def test_an_unreachable_redis_is_a_broker_unavailable_error() -> None:
    import msgkit

    async with RedisDedupStore("redis://127.0.0.1:1/0") as store:
        with pytest.raises(msgkit.BrokerUnavailableError, match="dedup store unreachable"):
            await store.claim("k", 1)


@pytest.mark.asyncio
async def test_the_idempotency_middleware_on_the_redis_store(msgkit_redis_url: str) -> None:
    import msgkit

    async with (
        msgkit.Broker(f"memory://redis-store-{uuid.uuid4().hex}") as broker,
        RedisDedupStore(msgkit_redis_url) as store,
    ):
        await check_fail_once_then_duplicate(broker, store)

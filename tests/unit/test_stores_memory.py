"""The dedup store contract on the memory store, plus its lazy sweeping."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from msgkit.stores import ClaimStatus, DedupStore, MemoryDedupStore
from msgkit.testing.stores import DedupStoreContract


class TestMemoryStore(DedupStoreContract):
    @pytest_asyncio.fixture
    async def store(self) -> AsyncIterator[DedupStore]:
        async with MemoryDedupStore() as store:
            yield store


@pytest.mark.asyncio
async def test_expired_entries_are_swept_so_memory_stays_bounded() -> None:
    store = MemoryDedupStore()
    for i in range(5000):
        claim = await store.claim(f"k{i}", 0.001)
        assert claim.status is ClaimStatus.CLAIMED
    assert len(store) < 2100  # swept whenever it doubles past the live entries

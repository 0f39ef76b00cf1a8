"""The dedup store contract suite: run it on any :class:`~msgkit.stores.DedupStore`.

Subclass :class:`DedupStoreContract` in a test module and provide a ``store`` fixture that yields
a fresh, empty store (or one whose keys no other test uses)::

    import pytest_asyncio
    from msgkit.testing.stores import DedupStoreContract

    class TestMyStore(DedupStoreContract):
        @pytest_asyncio.fixture
        async def store(self):
            async with MyStore(...) as store:
                yield store

The tests use leases and windows of a fraction of a second and sleep past them, so a store that
measures time coarsely (whole seconds) needs a larger ``unit`` (class attribute, seconds).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from msgkit.stores.base import ClaimStatus, DedupStore


def _key() -> str:
    return f"contract-{uuid.uuid4().hex}"


class DedupStoreContract:
    """Tests every dedup store must pass. Override the ``store`` fixture."""

    pytestmark = pytest.mark.asyncio

    #: A short time the store measures reliably, seconds: leases in the tests are a few units.
    unit: float = 0.2

    @pytest_asyncio.fixture
    async def store(self) -> AsyncIterator[DedupStore]:  # pragma: no cover - overridden
        raise NotImplementedError("override the store fixture")
        yield

    async def test_first_claim_wins_and_others_are_busy_for_the_rest_of_the_lease(self, store: DedupStore) -> None:
        key = _key()
        first = await store.claim(key, 10 * self.unit)
        assert first.status is ClaimStatus.CLAIMED
        assert first.claimed
        assert first.token
        second = await store.claim(key, 10 * self.unit)
        assert second.status is ClaimStatus.BUSY
        assert not second.token
        assert 0 < second.retry_after <= 10 * self.unit

    async def test_done_after_mark_done(self, store: DedupStore) -> None:
        key = _key()
        claim = await store.claim(key, 10 * self.unit)
        assert await store.mark_done(key, claim.token, 100 * self.unit)
        assert (await store.claim(key, 10 * self.unit)).status is ClaimStatus.DONE
        assert await store.mark_done(key, claim.token, 100 * self.unit)  # idempotent for its own token

    async def test_released_key_is_claimed_again(self, store: DedupStore) -> None:
        """Never "seen" before success: a failed attempt's release lets the redelivery run."""
        key = _key()
        first = await store.claim(key, 10 * self.unit)
        assert await store.release(key, first.token)
        again = await store.claim(key, 10 * self.unit)
        assert again.status is ClaimStatus.CLAIMED
        assert again.token != first.token

    async def test_a_wrong_token_changes_nothing(self, store: DedupStore) -> None:
        key = _key()
        claim = await store.claim(key, 10 * self.unit)
        assert not await store.mark_done(key, "not-the-token", 100 * self.unit)
        assert not await store.release(key, "not-the-token")
        assert not await store.extend(key, "not-the-token", 10 * self.unit)
        assert (await store.claim(key, 10 * self.unit)).status is ClaimStatus.BUSY
        assert await store.mark_done(key, claim.token, 100 * self.unit)
        assert not await store.release(key, claim.token)  # done is done
        assert not await store.extend(key, claim.token, 10 * self.unit)
        assert (await store.claim(key, 10 * self.unit)).status is ClaimStatus.DONE

    async def test_an_expired_lease_is_taken_over_and_the_old_token_is_powerless(self, store: DedupStore) -> None:
        key = _key()
        old = await store.claim(key, 2 * self.unit)
        await asyncio.sleep(4 * self.unit)
        new = await store.claim(key, 10 * self.unit)
        assert new.status is ClaimStatus.CLAIMED
        assert new.token != old.token
        assert not await store.mark_done(key, old.token, 100 * self.unit)
        assert not await store.release(key, old.token)
        assert not await store.extend(key, old.token, 10 * self.unit)
        assert (await store.claim(key, 10 * self.unit)).status is ClaimStatus.BUSY
        assert await store.mark_done(key, new.token, 100 * self.unit)

    async def test_mark_done_after_the_lease_ran_out_untaken_still_records(self, store: DedupStore) -> None:
        key = _key()
        claim = await store.claim(key, 2 * self.unit)
        await asyncio.sleep(4 * self.unit)
        assert await store.mark_done(key, claim.token, 100 * self.unit)
        assert (await store.claim(key, 10 * self.unit)).status is ClaimStatus.DONE

    async def test_done_is_forgotten_after_the_window(self, store: DedupStore) -> None:
        key = _key()
        claim = await store.claim(key, 10 * self.unit)
        assert await store.mark_done(key, claim.token, 2 * self.unit)
        assert (await store.claim(key, 10 * self.unit)).status is ClaimStatus.DONE
        await asyncio.sleep(4 * self.unit)
        assert (await store.claim(key, 10 * self.unit)).status is ClaimStatus.CLAIMED

    async def test_extend_keeps_a_claim_past_its_first_lease(self, store: DedupStore) -> None:
        key = _key()
        claim = await store.claim(key, 3 * self.unit)
        assert await store.extend(key, claim.token, 20 * self.unit)
        await asyncio.sleep(5 * self.unit)
        busy = await store.claim(key, 10 * self.unit)
        assert busy.status is ClaimStatus.BUSY
        assert busy.retry_after > 10 * self.unit
        assert await store.mark_done(key, claim.token, 100 * self.unit)

    async def test_concurrent_claims_have_exactly_one_winner(self, store: DedupStore) -> None:
        key = _key()
        claims = await asyncio.gather(*(store.claim(key, 50 * self.unit) for _ in range(20)))
        assert [c.status for c in claims].count(ClaimStatus.CLAIMED) == 1
        assert {c.status for c in claims} == {ClaimStatus.CLAIMED, ClaimStatus.BUSY}

    async def test_keys_are_independent_and_may_be_long_and_unicode(self, store: DedupStore) -> None:
        base = _key()
        keys = [f"{base}-a", f"{base}-b", f"{base}-ключ-✓-" + "x" * 300]
        claims = [await store.claim(k, 10 * self.unit) for k in keys]
        assert all(c.status is ClaimStatus.CLAIMED for c in claims)
        assert len({c.token for c in claims}) == 3
        assert await store.mark_done(keys[0], claims[0].token, 100 * self.unit)
        assert (await store.claim(keys[0], 10 * self.unit)).status is ClaimStatus.DONE
        assert (await store.claim(keys[1], 10 * self.unit)).status is ClaimStatus.BUSY
        assert await store.release(keys[2], claims[2].token)
        assert (await store.claim(keys[2], 10 * self.unit)).status is ClaimStatus.CLAIMED

    async def test_bad_durations_are_refused(self, store: DedupStore) -> None:
        key = _key()
        with pytest.raises(ValueError, match="lease"):
            await store.claim(key, 0)
        claim = await store.claim(key, 10 * self.unit)
        with pytest.raises(ValueError, match="keep_for"):
            await store.mark_done(key, claim.token, -1)

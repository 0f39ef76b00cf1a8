"""A dedup store in the process's memory: for tests, demos and single-process services.

Claims and done-marks are lost when the process ends and are not shared between processes; use
the Redis or SQL store when several consumers must see each other's claims.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from msgkit.stores.base import DONE, Claim, ClaimStatus, DedupStore, check_seconds


@dataclass(slots=True)
class _Record:
    token: str
    done: bool
    expires_at: float  # monotonic: the lease's end while claimed, the window's end once done


class MemoryDedupStore(DedupStore):
    """Claims in a dict, measured with the monotonic clock; expired entries are swept lazily."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._sweep_at = 1024

    def __len__(self) -> int:
        """Entries held, live or not yet swept."""
        return len(self._records)

    def _live(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and record.expires_at <= now:
            del self._records[key]
            return None
        return record

    def _sweep(self, now: float) -> None:
        if len(self._records) >= self._sweep_at:
            self._records = {k: r for k, r in self._records.items() if r.expires_at > now}
            self._sweep_at = max(1024, 2 * len(self._records))

    async def claim(self, key: str, lease: float) -> Claim:
        lease = check_seconds("lease", lease)
        now = time.monotonic()
        record = self._live(key, now)
        if record is None:
            self._sweep(now)
            token = uuid.uuid4().hex
            self._records[key] = _Record(token, False, now + lease)
            return Claim(ClaimStatus.CLAIMED, token)
        if record.done:
            return DONE
        return Claim(ClaimStatus.BUSY, retry_after=record.expires_at - now)

    async def mark_done(self, key: str, token: str, keep_for: float) -> bool:
        keep_for = check_seconds("keep_for", keep_for)
        now = time.monotonic()
        record = self._live(key, now)
        if record is not None and record.token != token:
            return False
        self._records[key] = _Record(token, True, now + keep_for)
        return True

    async def release(self, key: str, token: str) -> bool:
        record = self._records.get(key)
        if record is None or record.done or record.token != token:
            return False
        del self._records[key]
        return record.expires_at > time.monotonic()

    async def extend(self, key: str, token: str, lease: float) -> bool:
        lease = check_seconds("lease", lease)
        now = time.monotonic()
        record = self._live(key, now)
        if record is not None and (record.done or record.token != token):
            return False
        self._records[key] = _Record(token, False, now + lease)
        return True

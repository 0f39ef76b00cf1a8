"""The dedup store interface: claim a key with a lease, mark it done after success, or release it.

The protocol exists so that a message is never recorded as processed before its work succeeded
(the trap of marking a message "seen" when it arrives: a handler that then fails has its
redelivery acked as a duplicate and the message is lost). Instead:

1. ``claim(key, lease)`` before the work. ``CLAIMED``: run it; the claim's token proves it is
   yours. ``DONE``: the work was done within the window, skip it. ``BUSY``: another consumer
   holds a live lease; try again after ``retry_after`` seconds.
2. ``mark_done(key, token, keep_for)`` after the work succeeded: the key is done for
   ``keep_for`` seconds (the dedup window), then forgotten.
3. ``release(key, token)`` after the work failed: the next delivery claims the key again.

A lease that runs out without being extended can be taken over by the next claimant, so a
consumer that died while holding a claim blocks its key for at most one lease.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Final


class ClaimStatus(enum.Enum):
    """What :meth:`DedupStore.claim` found."""

    CLAIMED = "claimed"
    """The key is yours until the lease runs out: do the work, then mark it done or release it."""
    DONE = "done"
    """The work for this key was done within the dedup window: skip it."""
    BUSY = "busy"
    """Another claimant holds a live lease on the key: try again after ``retry_after``."""


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to a claim.

    ``token`` identifies a ``CLAIMED`` claim (empty otherwise); ``retry_after`` is, for ``BUSY``,
    the seconds until the other claimant's lease runs out (0 otherwise).
    """

    status: ClaimStatus
    token: str = ""
    retry_after: float = 0.0

    @property
    def claimed(self) -> bool:
        return self.status is ClaimStatus.CLAIMED


DONE: Final = Claim(ClaimStatus.DONE)


def check_seconds(name: str, value: float) -> float:
    """``value`` as a float, or ValueError unless it is a positive number of seconds."""
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


class DedupStore(ABC):
    """Where claims and done-marks of idempotency keys live. One store serves many consumers.

    Contract (the suite in :mod:`msgkit.testing.stores` checks it on every store):

    * Every method is safe to call concurrently, from many tasks and many processes sharing the
      store; of concurrent claims on a free key exactly one is ``CLAIMED``.
    * A claim's lease and a done-mark's window are measured from the call; expired ones count as
      absent.
    * ``mark_done`` and ``extend`` succeed when the key is absent or expired, or when its current
      claim carries ``token``; they never overwrite another live claim. ``release`` removes only a
      claim carrying ``token``.
    * Tokens are unique per claim.
    """

    @abstractmethod
    async def claim(self, key: str, lease: float) -> Claim:
        """Claim ``key`` for ``lease`` seconds unless it is done or held by a live claim."""

    @abstractmethod
    async def mark_done(self, key: str, token: str, keep_for: float) -> bool:
        """Record ``key`` as done for ``keep_for`` seconds; False if another claim holds it now
        or it was already done by another claimant."""

    @abstractmethod
    async def release(self, key: str, token: str) -> bool:
        """Drop the claim ``token`` holds on ``key`` so the next claim runs the work again.

        True if it was dropped; False if ``token`` no longer holds it (taken over or expired).
        """

    @abstractmethod
    async def extend(self, key: str, token: str, lease: float) -> bool:
        """Make the claim ``token`` holds on ``key`` last ``lease`` more seconds from now.

        False if another claimant holds or finished the key: the claim is lost.
        """

    async def close(self) -> None:  # noqa: B027 - a no-op by default, overridden where needed
        """Release the store's connections (if it opened them). Idempotent."""

    async def __aenter__(self) -> DedupStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

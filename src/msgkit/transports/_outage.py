"""One connection's outage, as a transport sees it: warn when it starts, raise when it lasts too
long, note when it ends. Shared by the transports that retry broker calls themselves."""

from __future__ import annotations

import logging
import time

from msgkit.errors import BrokerUnavailableError


class OutageClock:
    """Tracks how long ``name`` (e.g. "redis at redis://host:6379/0", secrets redacted) has been down.

    ``failed()`` after each failed call: the first one logs a warning, and once the outage has
    lasted longer than ``bound`` seconds it raises BrokerUnavailableError. ``recovered()`` after
    a call that worked.
    """

    def __init__(self, name: str, bound: float, logger: logging.Logger) -> None:
        self.name = name
        self.bound = bound
        self._logger = logger
        self.down_since: float | None = None

    def failed(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            self._logger.warning("%s unavailable (%s: %s); retrying for up to %.0fs", self.name, what, exc, self.bound)
        elif now - self.down_since > self.bound:
            raise BrokerUnavailableError(
                f"{self.name} unavailable for {now - self.down_since:.0f}s ({what}): {exc}"
            ) from exc

    def recovered(self) -> None:
        if self.down_since is not None:
            self._logger.info("%s is reachable again after %.1fs", self.name, time.monotonic() - self.down_since)
            self.down_since = None

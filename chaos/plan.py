"""What a run does: the scenario sizes (full and short) and the deterministic message plan.

Message ids are ``<run>-<phase><n>``; whether message ``n`` is poison or goes through the outbox
follows from ``n`` and the run's seed alone, so the orchestrator knows what was sent without the
producer telling it message by message.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

#: The message body consumers expect; a poison message's body is valid JSON that fails validation.
POISON_BODY = b'{"poison": true}'
MAIN = "m"
OVERLOAD = "o"


@dataclass(frozen=True)
class Scenario:
    """Sizes and rates of one run on one broker (the same for every broker)."""

    name: str
    messages: int
    kills: int
    restarts: int
    consumers: int = 2
    #: Messages per second one consumer process handles at most (a token bucket before the inbox).
    consumer_rate: float = 150.0
    #: The main phase's send rate, as a fraction of all consumers' rate.
    main_load: float = 0.8
    overload_seconds: float = 60.0
    #: The overload's send rate, as a multiple of all consumers' rate.
    overload_factor: float = 3.0
    poison_share: float = 0.01
    failure_share: float = 0.05
    outbox_share: float = 0.5
    max_in_flight: int = 20
    #: How long the backlog may take to drain after the producer stopped (seconds).
    drain_timeout: float = 300.0
    #: How much one consumer process's resident memory may grow during the overload (MiB).
    max_rss_growth: float = 64.0
    #: Padding in each overload message, so that a consumer buffering the backlog would show.
    overload_padding: int = 1024

    @property
    def capacity(self) -> float:
        return self.consumers * self.consumer_rate

    @property
    def overload_messages(self) -> int:
        return round(self.capacity * self.overload_factor * self.overload_seconds)


FULL = Scenario("full", messages=10_000, kills=3, restarts=2)
SHORT = Scenario("short", messages=1_500, kills=1, restarts=1, main_load=0.5, overload_seconds=8.0, drain_timeout=120.0)


@dataclass(frozen=True)
class Plan:
    """The messages of one phase: ids, which are poison, which go through the outbox."""

    run: str
    phase: str
    count: int
    seed: int
    poison_share: float
    outbox_share: float
    poison: frozenset[int] = field(init=False)
    via_outbox: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(f"{self.seed}-{self.phase}")
        poison = frozenset(n for n in range(self.count) if rng.random() < self.poison_share)
        outbox = frozenset(n for n in range(self.count) if rng.random() < self.outbox_share)
        object.__setattr__(self, "poison", poison)
        object.__setattr__(self, "via_outbox", outbox)

    def message_id(self, n: int) -> str:
        return f"{self.run}-{self.phase}{n:06d}"

    def body(self, n: int, padding: int = 0) -> bytes:
        if n in self.poison:
            return POISON_BODY
        return b'{"run": "%s", "n": %d, "pad": "%s"}' % (self.run.encode(), n, b"x" * padding)

    def ids(self) -> tuple[set[str], set[str]]:
        """(good ids, poison ids)."""
        good = {self.message_id(n) for n in range(self.count) if n not in self.poison}
        bad = {self.message_id(n) for n in self.poison}
        return good, bad

"""The outcome of a run on one broker, and the tables printed from it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Restart:
    """One broker restart: how long the restart command took, and the recovery time: the longest
    stretch without any effect committed, from the restart's start until effects flow after it
    (None: they did not flow again)."""

    command: float
    stall: float | None


@dataclass
class Result:
    broker: str
    scenario: str
    run: str
    sent: int = 0
    sent_via_outbox: int = 0
    good: int = 0
    poison: int = 0
    effects: int = 0
    suppressed: int = 0
    dead_letters: int = 0
    lost: int = 0
    duplicate_effects: int = 0
    #: Effects of poison messages, dead letters of good ones, poison dead-lettered without a reason.
    unexpected: int = 0
    kills: int = 0
    restarts: list[Restart] = field(default_factory=list)
    restarts_skipped: str = ""
    peak_lag: int = 0
    drain_seconds: float | None = None
    rss_before: float | None = None
    rss_peak: float | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and self.lost == 0 and self.duplicate_effects == 0 and self.unexpected == 0

    def restarts_text(self) -> str:
        if self.restarts_skipped:
            return f"skipped ({self.restarts_skipped})"
        parts = []
        for r in self.restarts:
            stall = "no recovery" if r.stall is None else f"{r.stall:.1f} s"
            parts.append(f"{stall} (restart {r.command:.1f} s)")
        return "; ".join(parts) or "none"

    def overload_text(self) -> str:
        drain = "did not drain" if self.drain_seconds is None else f"drained {self.drain_seconds:.0f} s after"
        memory = "n/a"
        if self.rss_before is not None and self.rss_peak is not None:
            memory = f"{self.rss_before:.0f} -> peak {self.rss_peak:.0f} MiB"
        return f"peak lag {self.peak_lag:,}, {drain}; consumer RSS {memory}"

    def table(self) -> str:
        rows = [
            ("sent", f"{self.sent:,} ({self.sent_via_outbox:,} via the outbox; {self.poison:,} poison)"),
            ("effects", f"{self.effects:,} (good messages: {self.good:,})"),
            ("duplicates suppressed by the inbox", f"{self.suppressed:,}"),
            ("dead letters", f"{self.dead_letters:,}"),
            ("lost (must be 0)", f"{self.lost:,}"),
            ("duplicate effects (must be 0)", f"{self.duplicate_effects:,}"),
            ("unexpected (must be 0)", f"{self.unexpected:,}"),
            ("consumers killed (SIGKILL)", f"{self.kills}"),
            ("recovery after each restart", self.restarts_text()),
            ("overload", self.overload_text()),
        ]
        width = max(len(name) for name, _ in rows)
        status = "PASS" if self.passed else "FAIL"
        lines = [f"== {self.broker} ({self.scenario}, run {self.run}, {self.seconds:.0f} s): {status}"]
        lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  e.g. {e}" for e in self.examples[:10]]
        return "\n".join(lines)


def markdown(results: list[Result]) -> str:
    """One markdown table over all brokers (the one in docs/fault-injection.md)."""
    head = (
        "| broker | sent | effects | duplicates suppressed | dead letters | lost | duplicate effects "
        "| kills | recovery after each restart | overload | time |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"
    )
    rows = [
        f"| {r.broker} | {r.sent:,} | {r.effects:,} | {r.suppressed:,} | {r.dead_letters:,} | {r.lost} "
        f"| {r.duplicate_effects} | {r.kills} | {r.restarts_text()} | {r.overload_text()} | {r.seconds:.0f} s |"
        for r in results
    ]
    return "\n".join([head, *rows])

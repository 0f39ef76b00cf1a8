"""One run on one broker: consumers, a producer, kills and restarts on a random schedule, an
overload, then the count of every outcome from the database and the broker's dead letters."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy.ext.asyncio import AsyncEngine

import msgkit
from chaos import db as chaos_db
from chaos.plan import MAIN, OVERLOAD, Plan, Scenario
from chaos.processes import Child, rss_mib, run_shell
from chaos.report import Restart, Result

logger = logging.getLogger("chaos")

GROUP = "effects"
#: Transport options that make a killed consumer's messages come back sooner than the defaults.
URL_OPTIONS = {
    "redis": {"visibility_timeout": "5"},
    "sqs": {"visibility_timeout": "5"},
    "kafka": {"session_timeout": "6"},
}
POLL = 0.25
FLOW_BACK_TIMEOUT = 120.0
#: Kills and restarts come at random moments, but at least this many seconds apart.
MIN_EVENT_GAP = 3.0


def with_options(broker: str, url: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for name, value in URL_OPTIONS.get(broker, {}).items():
        query.setdefault(name, value)
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass(frozen=True)
class Target:
    """Where a run goes: a broker URL, its restart command (None: no restarts), the database."""

    broker: str
    url: str
    restart_command: str | None
    db_url: str


class BrokerRun:
    def __init__(self, target: Target, scenario: Scenario, seed: int, log_dir: Path) -> None:
        self.target = target
        self.scenario = scenario
        self.seed = seed
        self.rng = random.Random(seed)
        self.run_id = f"chaos-{target.broker}-{int(time.time())}-{seed % 10_000:04d}"
        self.topic = self.run_id
        self.url = with_options(target.broker, target.url)
        self.log_dir = log_dir / self.run_id
        self.consumers: list[Child] = []
        self.result = Result(target.broker, scenario.name, self.run_id)
        self.db: AsyncEngine = chaos_db.engine(target.db_url)
        self._consumer_count = 0
        self._events: list[str] = []
        self._last_event = 0.0

    def note(self, event: str) -> None:
        """Add ``event`` to the run's timeline (events.log in its log directory)."""
        line = f"{time.time():.3f} {event}"
        self._events.append(line)
        logger.info("%s: %s", self.target.broker, event)

    # ------------------------------------------------------------------ processes

    async def start_consumer(self) -> Child:
        self._consumer_count += 1
        name = f"consumer-{self._consumer_count}"
        args = [self.url, self.target.db_url, self.topic, GROUP, self.run_id]
        args += ["--rate", str(self.scenario.consumer_rate), "--failure-share", str(self.scenario.failure_share)]
        args += ["--max-in-flight", str(self.scenario.max_in_flight)]
        child = await Child.start("chaos.consumer", args, self.log_dir / f"{name}.log", name)
        await child.wait_for_line("ready")
        self.consumers.append(child)
        return child

    async def start_producer(self, plan: Plan, rate: float) -> Child:
        args = [self.url, self.target.db_url, self.topic, self.run_id, plan.phase, str(plan.count), str(rate)]
        args += [str(self.seed), "--poison-share", str(plan.poison_share), "--outbox-share", str(plan.outbox_share)]
        if plan.phase == OVERLOAD:
            args += ["--padding", str(self.scenario.overload_padding)]
        return await Child.start("chaos.producer", args, self.log_dir / f"producer-{plan.phase}.log", "producer")

    def plan(self, phase: str, count: int) -> Plan:
        s = self.scenario
        return Plan(self.run_id, phase, count, self.seed, s.poison_share, s.outbox_share)

    # ------------------------------------------------------------------ the run

    async def execute(self) -> Result:
        started = time.monotonic()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            await chaos_db.prepare(self.db)
            async with msgkit.Broker(self.url) as admin:
                await admin.declare(self.topic, GROUP)
            for _ in range(self.scenario.consumers):
                await self.start_consumer()
            main = self.plan(MAIN, self.scenario.messages)
            await self.main_phase(main)
            overload = self.plan(OVERLOAD, self.scenario.overload_messages)
            await self.overload_phase(overload)
            for child in self.consumers:
                await child.stop(timeout=40)
            self.consumers.clear()
            await self.count_outcomes([main, overload])
            if self.result.passed:
                await self.delete_topic()
        except Exception as exc:
            logger.exception("the run on %s failed", self.target.broker)
            self.result.problems.append(f"run aborted: {type(exc).__name__}: {exc}")
            self.note(f"aborted: {exc!r}")
        finally:
            for child in self.consumers:
                child.kill()
                await child.close()
            await self.db.dispose()
            self.result.seconds = time.monotonic() - started
            (self.log_dir / "events.log").write_text("\n".join(self._events) + "\n")
        return self.result

    async def main_phase(self, plan: Plan) -> None:
        s = self.scenario
        rate = s.capacity * s.main_load
        producer = await self.start_producer(plan, rate)
        try:
            await producer.wait_for_line("start")
            self.note(f"main producer started: {plan.count} messages at {rate:.0f}/s")
            for fraction, kind in self.schedule():
                await self.wait_sent(producer, math.ceil(fraction * plan.count))
                await asyncio.sleep(max(0.0, self._last_event + MIN_EVENT_GAP - time.monotonic()))
                if kind == "kill":
                    await self.kill_a_consumer()
                else:
                    await self.restart_broker()
                self._last_event = time.monotonic()
            await producer.wait_for_line("done", timeout=plan.count / rate + 300)
        finally:
            await producer.stop(timeout=10)
        good, _ = plan.ids()
        await self.wait_for_effects(MAIN, len(good), s.drain_timeout)

    def schedule(self) -> list[tuple[float, str]]:
        """Random moments (as fractions of the main phase's messages sent) for kills and restarts."""
        s = self.scenario
        kinds = ["kill"] * s.kills
        if self.target.restart_command:
            kinds += ["restart"] * s.restarts
        else:
            self.result.restarts_skipped = "no restart command"
        slots = len(kinds)
        # one event per equal slice of 10%..85% of the phase, at a random point in its slice
        width = 0.75 / max(slots, 1)
        self.rng.shuffle(kinds)
        return [(0.1 + width * (i + self.rng.uniform(0.1, 0.9)), kind) for i, kind in enumerate(kinds)]

    async def wait_sent(self, producer: Child, count: int) -> None:
        while producer.last_number("sent") < count:
            if producer.process.returncode is not None or any(line.startswith("done") for line in producer.lines):
                return
            await asyncio.sleep(0.05)

    async def kill_a_consumer(self) -> None:
        victim = self.rng.choice(self.consumers)
        victim.kill()
        await victim.close()
        self.consumers.remove(victim)
        self.result.kills += 1
        self.note(f"SIGKILLed {victim.name} (pid {victim.pid})")
        child = await self.start_consumer()
        self.note(f"started {child.name} (pid {child.pid})")

    async def restart_broker(self) -> None:
        """Restart the broker; record how long the command took and the longest stretch without
        any effect committed from the restart's start until effects flow after it."""
        assert self.target.restart_command
        went_down = time.time()
        self.note("restarting the broker")
        code, output = await run_shell(self.target.restart_command)
        back = time.time()
        if code != 0:
            raise RuntimeError(f"restart command exited with {code}: {output[-2000:]}")
        self.note(f"restart command done in {back - went_down:.1f} s")
        first_after: float | None = None
        deadline = time.monotonic() + FLOW_BACK_TIMEOUT
        while first_after is None and time.monotonic() < deadline:
            first_after = await chaos_db.first_effect_after(self.db, self.run_id, back)
            if first_after is None:
                await asyncio.sleep(0.1)
        stall: float | None = None
        if first_after is not None:
            times = [went_down, *await chaos_db.effect_times(self.db, self.run_id, went_down, first_after)]
            stall = max(b - a for a, b in itertools.pairwise(times))
        self.note(f"longest stretch without effects: {stall} s; effects flow again at {first_after}")
        self.result.restarts.append(Restart(back - went_down, stall))

    async def wait_for_effects(self, phase: str, expected: int, timeout: float) -> float | None:
        """Wait until ``expected`` messages of ``phase`` have effects; return how long it took."""
        started = time.monotonic()
        prefix = f"{self.run_id}-{phase}"
        while (done := await chaos_db.count_effects(self.db, self.run_id, prefix)) < expected:
            if time.monotonic() - started > timeout:
                self.result.problems.append(f"{phase}: only {done:,} of {expected:,} effects after {timeout:.0f} s")
                return None
            await asyncio.sleep(POLL)
        return time.monotonic() - started

    async def overload_phase(self, plan: Plan) -> None:
        s = self.scenario
        good, poison = plan.ids()
        self.result.rss_before = self.total_rss()
        producer = await self.start_producer(plan, s.capacity * s.overload_factor)
        prefix = f"{self.run_id}-{OVERLOAD}"
        peak_rss = self.result.rss_before or 0.0
        try:
            producer_done_at: float | None = None
            deadline = time.monotonic() + s.overload_seconds + s.drain_timeout + 120
            while time.monotonic() < deadline:
                sent = producer.last_number("sent")
                done = await chaos_db.count_effects(self.db, self.run_id, prefix)
                self.result.peak_lag = max(self.result.peak_lag, round(sent * (1 - s.poison_share)) - done)
                peak_rss = max(peak_rss, self.total_rss() or 0.0)
                if producer_done_at is None and any(line.startswith("done") for line in producer.lines):
                    producer_done_at = time.monotonic()
                if producer_done_at is not None and done >= len(good):
                    self.result.drain_seconds = time.monotonic() - producer_done_at
                    break
                if producer.process.returncode not in (None, 0):
                    raise RuntimeError(f"the overload producer exited with {producer.process.returncode}")
                await asyncio.sleep(0.5)
            else:
                self.result.problems.append("overload: the backlog did not drain in time")
        finally:
            await producer.stop(timeout=10)
        self.result.rss_peak = peak_rss
        backlog = s.overload_messages * (1 - 1 / s.overload_factor) * 0.5
        if self.result.peak_lag < backlog:
            self.result.problems.append(
                f"overload: peak lag {self.result.peak_lag:,} is below half the expected backlog; not an overload"
            )
        if self.result.rss_before is not None and peak_rss - self.result.rss_before > s.max_rss_growth:
            self.result.problems.append(
                f"overload: consumer memory grew by {peak_rss - self.result.rss_before:.0f} MiB"
                f" (limit {s.max_rss_growth:.0f} MiB)"
            )
        del poison

    def total_rss(self) -> float | None:
        values = [rss_mib(c.pid) for c in self.consumers]
        return None if any(v is None for v in values) else max(v or 0.0 for v in values)

    async def delete_topic(self) -> None:
        """Remove the run's topic and group from the broker (kept after a failure, to look at)."""
        try:
            async with msgkit.Broker(self.url) as admin:
                await admin.transport.delete(self.topic, GROUP)
        except msgkit.MsgkitError as exc:
            logger.warning("could not delete %s from %s: %s", self.topic, self.target.broker, exc)

    # ------------------------------------------------------------------ counting

    async def count_outcomes(self, plans: list[Plan]) -> None:
        r = self.result
        good: set[str] = set()
        poison: set[str] = set()
        for plan in plans:
            g, p = plan.ids()
            good |= g
            poison |= p
            r.sent_via_outbox += len(plan.via_outbox)
        r.sent, r.good, r.poison = len(good) + len(poison), len(good), len(poison)
        effects = await chaos_db.effect_counts(self.db, self.run_id)
        r.effects = sum(effects.values())
        r.suppressed = await chaos_db.count_suppressed(self.db, self.run_id)
        async with msgkit.Broker(self.url) as admin:
            dead = await (await admin.dead_letters(self.topic, GROUP, wait=5.0)).peek(limit=None)
        dead_ids = {info.id for info in dead}
        r.dead_letters = len(dead)
        lost_good = sorted(good - effects.keys())
        lost_poison = sorted(poison - dead_ids)
        r.lost = len(lost_good) + len(lost_poison)
        r.duplicate_effects = sum(n - 1 for n in effects.values() if n > 1)
        poison_effects = sorted(poison & effects.keys())
        good_dead = sorted(good & dead_ids)
        strangers = sorted((effects.keys() | dead_ids) - good - poison)
        no_reason = sorted(info.id for info in dead if info.id in poison and not info.reason)
        r.unexpected = len(poison_effects) + len(good_dead) + len(strangers) + len(no_reason)
        for label, ids in (
            ("lost good message", lost_good),
            ("poison message not in the dead letters", lost_poison),
            ("effect of a poison message", poison_effects),
            ("good message dead-lettered", good_dead),
            ("effect or dead letter of an unknown id", strangers),
            ("dead letter without a reason", no_reason),
        ):
            r.examples += [f"{label}: {i}" for i in ids[:5]]
        r.examples += [f"duplicate effect: {i} x{n}" for i, n in effects.items() if n > 1][:5]
        for label, ids in (
            ("lost", [*lost_good, *lost_poison]),
            ("duplicate-effects", [i for i, n in effects.items() if n > 1]),
        ):
            if ids:
                (self.log_dir / f"{label}.txt").write_text("\n".join(ids) + "\n")
        if len(dead) > len(dead_ids):  # at-least-once dead-lettering: a kill between DLQ write and ack
            r.examples.append(f"{len(dead) - len(dead_ids)} poison message(s) dead-lettered twice")
        reasons = {info.reason.split(":")[0] for info in dead if info.id in poison}
        logger.info("%s: dead-letter reasons of poison messages: %s", self.target.broker, sorted(reasons))

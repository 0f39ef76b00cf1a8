"""One measurement in a fresh process: ``python -m benchmarks.child '<json spec>'`` prints one JSON
line. A fresh process per run keeps peak RSS per implementation and stops one implementation's
imports, caches or leaks from touching the next. The parent (``benchmarks.suite``) alternates them.

Workloads:

* ``backlog``: publish N in chunks of 1000 (timed: publish rate), then start the consumer and
  drain the backlog (timed from the first message handled to the last: drain rate; consumer
  start-up, e.g. a Kafka group join, is reported apart). RSS is sampled during the drain.
* ``latency``: consumer running, N messages published at a fixed rate in 5 ms ticks; latency is
  the handler's clock minus the send time carried in the body: p50, p99.
* ``slow``: a backlog of N, a handler that awaits 10 ms (stand-in for I/O), max_in_flight from
  the spec: drain rate against the ideal max_in_flight / 10 ms.

Every run counts each order id once; a missing message is an error, duplicates are reported.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import sys
import time
import traceback
import uuid
from typing import Any

from benchmarks.cleanup import cleanup
from benchmarks.common import PUBLISH_CHUNK, Bench, RssSampler, Tracker, body

MB = 1024 * 1024


def make_bench(impl: str, broker: str, url: str, topic: str, group: str) -> Bench:
    if impl == "msgkit":
        from benchmarks.impl_msgkit import MsgkitBench

        return MsgkitBench(url, topic, group)
    if impl == "raw":
        from benchmarks.raw_clients import RAW

        return RAW[broker](url, topic, group)  # type: ignore[no-any-return]
    if impl == "faststream":
        from benchmarks.impl_faststream import FASTSTREAM

        return FASTSTREAM[broker](url, topic, group)  # type: ignore[no-any-return]
    raise ValueError(f"unknown implementation {impl!r}")


async def publish_all(bench: Bench, bodies: list[bytes]) -> None:
    for i in range(0, len(bodies), PUBLISH_CHUNK):
        await bench.publish(bodies[i : i + PUBLISH_CHUNK])


async def backlog(bench: Bench, spec: dict[str, Any], result: dict[str, Any]) -> None:
    n = spec["messages"]
    bodies = [body(i) for i in range(n)]
    started = time.perf_counter()
    await publish_all(bench, bodies)
    result["publish_rate"] = n / (time.perf_counter() - started)
    del bodies
    await drain(bench, spec, result, Tracker(n))


async def drain(bench: Bench, spec: dict[str, Any], result: dict[str, Any], tracker: Tracker) -> None:
    n = len(tracker.seen)
    gc.collect()
    with RssSampler() as rss:
        cpu, started = time.process_time(), time.perf_counter()
        await bench.start(tracker.on_order, spec["max_in_flight"], tracker.delay > 0)
        await tracker.wait(spec["timeout"])
        cpu = time.process_time() - cpu
        await bench.stop()
    elapsed = tracker.last_at - tracker.first_at
    result["drain_rate"] = (n - 1) / elapsed if n > 1 and elapsed > 0 else float("nan")
    result["drain_cpu_rate"] = n / cpu
    result["startup_s"] = tracker.first_at - started
    result["rss_start_mb"] = rss.start_bytes / MB
    result["rss_peak_mb"] = rss.peak_bytes / MB
    result["duplicates"] = tracker.duplicates


async def slow(bench: Bench, spec: dict[str, Any], result: dict[str, Any]) -> None:
    n = spec["messages"]
    await publish_all(bench, [body(i) for i in range(n)])
    await drain(bench, spec, result, Tracker(n, delay=0.010))
    result["ideal_rate"] = spec["max_in_flight"] / 0.010


async def latency(bench: Bench, spec: dict[str, Any], result: dict[str, Any]) -> None:
    n, rate = spec["messages"], spec["rate"]
    tracker = Tracker(n + 1, measure_below=n)  # id n is the warm-up message
    await bench.start(tracker.on_order, spec["max_in_flight"], False)
    await bench.publish([body(n, time.time())])
    deadline = time.monotonic() + spec["timeout"]
    while not tracker.seen[n]:  # consumer joined and running (a Kafka group join takes seconds)
        if time.monotonic() > deadline:
            raise TimeoutError("the warm-up message was not handled")
        await asyncio.sleep(0.01)
    sent, started = 0, time.perf_counter()
    while sent < n:
        due = min(n, int((time.perf_counter() - started) * rate) + 1)
        if due > sent:
            now = time.time()
            await bench.publish([body(i, now) for i in range(sent, due)])
            sent = due
        await asyncio.sleep(0.005)
    result["offered_rate"] = n / (time.perf_counter() - started)
    await tracker.wait(spec["timeout"])
    await bench.stop()
    ms = sorted(x * 1000 for x in tracker.latencies)
    result["p50_ms"] = statistics.median(ms)
    result["p99_ms"] = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    result["duplicates"] = tracker.duplicates


WORKLOADS = {"backlog": backlog, "latency": latency, "slow": slow}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    topic, group = f"bench-{uuid.uuid4().hex[:10]}", "bench"
    result: dict[str, Any] = {"ok": False}
    bench = make_bench(spec["impl"], spec["broker"], spec["url"], topic, group)
    try:
        await bench.open()
        if spec.get("profile"):  # a pyinstrument profile of the whole workload, as text
            from pyinstrument import Profiler

            with Profiler(interval=0.002, async_mode="disabled") as profiler:
                await WORKLOADS[spec["workload"]](bench, spec, result)
            with open(spec["profile"], "w") as out:  # noqa: ASYNC230 (after the measurement)
                out.write(profiler.output_text(unicode=True, show_all=False))
        else:
            await WORKLOADS[spec["workload"]](bench, spec, result)
        result["ok"] = True
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc(limit=8)
    finally:
        try:
            await asyncio.wait_for(bench.close(), 30)
        finally:
            await asyncio.wait_for(cleanup(spec["broker"], spec["url"], topic, group), 60)
    import resource

    result["rss_max_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = asyncio.run(run(spec))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""msgkit against the raw clients and FastStream, per broker: ``python -m benchmarks`` (or
``nox -s benchmarks -- OPTIONS``).

Broker URLs come from MSGKIT_RABBITMQ_URL, MSGKIT_REDIS_URL, MSGKIT_KAFKA_URL and MSGKIT_SQS_URL
(``scripts/brokers up`` then ``. .brokers/env``); a broker without its URL is reported as skipped.
memory:// needs nothing. Each measurement runs in a fresh child process (``benchmarks.child``)
on fresh queue/topic names, deleted afterwards; implementations take turns within each repeat,
so drift on a shared machine hits them alike. Results are medians over the repeats, written to
benchmarks/results/ as JSON, a markdown table and an SVG plot. Workloads: see benchmarks/child.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.report import machine_info, write_reports

BROKERS = ("memory", "rabbitmq", "redis", "kafka", "sqs")
IMPLS = ("raw", "msgkit", "faststream")
WORKLOADS = ("backlog", "latency", "slow")
FASTSTREAM_BROKERS = ("rabbitmq", "redis", "kafka")

#: Defaults sized so a whole run takes about 10-15 minutes on a 2-core machine.
BACKLOG = {"memory": 100_000, "rabbitmq": 5_000, "redis": 20_000, "kafka": 20_000, "sqs": 2_000}
RATE = {"memory": 2_000, "rabbitmq": 200, "redis": 1_000, "kafka": 1_000, "sqs": 100}
SLOW_CAP = {"memory": 10_000, "rabbitmq": 2_000, "redis": 3_000, "kafka": 3_000, "sqs": 1_000}

#: Metrics reported as medians; the rest of a child's result is kept per run.
METRICS = (
    "publish_rate",
    "drain_rate",
    "drain_cpu_rate",
    "startup_s",
    "rss_start_mb",
    "rss_peak_mb",
    "rss_max_mb",
    "p50_ms",
    "p99_ms",
    "offered_rate",
    "ideal_rate",
    "duplicates",
)


def broker_urls() -> dict[str, str | None]:
    urls: dict[str, str | None] = {"memory": "memory://"}
    for name in BROKERS[1:]:
        urls[name] = os.environ.get(f"MSGKIT_{name.upper()}_URL") or None
    return urls


def cases(args: argparse.Namespace, broker: str) -> list[tuple[str, dict[str, Any]]]:
    """(case label, spec without impl) for every workload asked for on ``broker``."""
    out: list[tuple[str, dict[str, Any]]] = []
    n = args.messages or BACKLOG[broker]
    if "backlog" in args.workloads:
        out.append(("backlog", {"workload": "backlog", "messages": n, "max_in_flight": args.max_in_flight}))
    if "latency" in args.workloads:
        rate = args.rate or RATE[broker]
        spec = {"workload": "latency", "messages": int(rate * args.latency_seconds), "rate": rate}
        out.append(("latency", {**spec, "max_in_flight": args.max_in_flight}))
    if "slow" in args.workloads:
        for k in args.slow_in_flight:
            m = min(max(200, k * 100 * 2), args.messages or SLOW_CAP[broker])  # ~2 s at the ideal rate
            out.append((f"slow-{k}", {"workload": "slow", "messages": m, "max_in_flight": k}))
    return out


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout + 120,
            cwd=Path(__file__).parent.parent,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"child timed out after {timeout + 120:.0f}s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": f"child exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def median_of(runs: list[dict[str, Any]]) -> dict[str, float]:
    ok = [r for r in runs if r.get("ok")]
    return {m: statistics.median(r[m] for r in ok) for m in METRICS if ok and all(m in r for r in ok)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated, default: all five")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: raw,msgkit,faststream")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: backlog,latency,slow")
    parser.add_argument("--messages", type=int, default=0, help=f"backlog size (default per broker: {BACKLOG})")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; medians are reported")
    parser.add_argument("--max-in-flight", type=int, default=256, help="for backlog and latency")
    parser.add_argument("--slow-in-flight", default="1,64,512", help="max_in_flight values of the slow workload")
    parser.add_argument("--rate", type=float, default=0, help=f"latency workload msg/s (default per broker: {RATE})")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take to drain")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="latest", help="results file stem: <dir>/<name>.{json,md,svg}")
    args = parser.parse_args(argv)
    args.brokers = [b for b in args.brokers.split(",") if b]
    args.impls = [i for i in args.impls.split(",") if i]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.slow_in_flight = [int(k) for k in args.slow_in_flight.split(",") if k]
    for value, allowed, what in ((args.brokers, BROKERS, "broker"), (args.impls, IMPLS, "implementation")):
        unknown = set(value) - set(allowed)
        if unknown:
            parser.error(f"unknown {what}(s) {sorted(unknown)}; choose from {', '.join(allowed)}")
    if set(args.workloads) - set(WORKLOADS):
        parser.error(f"unknown workload(s); choose from {', '.join(WORKLOADS)}")

    urls = broker_urls()
    started = time.time()
    info = machine_info(urls, started)
    results: dict[str, Any] = {"meta": {**info, "options": {k: v for k, v in vars(args).items() if k != "output_dir"}}}
    results["skipped"] = {}
    results["cases"] = []
    for broker in args.brokers:
        url = urls[broker]
        if url is None:
            results["skipped"][broker] = f"MSGKIT_{broker.upper()}_URL is not set"
            print(f"{broker}: SKIPPED (MSGKIT_{broker.upper()}_URL is not set)", flush=True)
            continue
        impls = [i for i in args.impls if i != "faststream" or broker in FASTSTREAM_BROKERS]
        for label, base in cases(args, broker):
            runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
            for r in range(args.repeat):
                order = impls[r % len(impls) :] + impls[: r % len(impls)]  # rotate who goes first
                for impl in order:
                    spec = {**base, "impl": impl, "broker": broker, "url": url, "timeout": args.timeout}
                    result = run_child(spec, args.timeout)
                    runs[impl].append(result)
                    shown = " ".join(
                        f"{name} {result[key]:,.{digits}f}{unit}"
                        for name, key, unit, digits in (
                            ("publish", "publish_rate", "/s", 0),
                            ("drain", "drain_rate", "/s", 0),
                            ("p50", "p50_ms", " ms", 1),
                            ("p99", "p99_ms", " ms", 1),
                        )
                        if key in result
                    )
                    if not result.get("ok"):
                        shown = f"FAILED: {result.get('error')}"

                    print(f"{broker:8} {label:9} {impl:10} run {r + 1}: {shown}", flush=True)
            for impl in impls:
                results["cases"].append(
                    {
                        "broker": broker,
                        "case": label,
                        "impl": impl,
                        "spec": base,
                        "failures": [r.get("error") for r in runs[impl] if not r.get("ok")],
                        "median": median_of(runs[impl]),
                        "runs": runs[impl],
                    }
                )
    results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["meta"]["duration_s"] = round(time.time() - started)
    results["meta"]["loadavg_end"] = os.getloadavg()
    paths = write_reports(results, args.output_dir, args.name)
    print("\n" + paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    failed = sum(len(c["failures"]) for c in results["cases"])
    return 1 if failed else 0

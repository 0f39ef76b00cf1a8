"""The run's machine description, and its results as JSON, a markdown table and an SVG bar chart."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent
CLIENTS = ("msgkit", "pydantic", "aio-pika", "aiormq", "redis", "aiokafka", "aiobotocore", "faststream")
LABELS = {"raw": "raw client", "msgkit": "msgkit", "faststream": "FastStream"}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _installed(prefix: str) -> str:
    """Versions of a server scripts/brokers installed in its cache (Kafka, ElasticMQ jars)."""
    cache = Path(os.environ.get("MSGKIT_BROKERS_CACHE", Path.home() / ".cache" / "msgkit-brokers"))
    return "/".join(sorted(p.name[len(prefix) :] for p in cache.glob(prefix + "*"))) or "unknown"


async def _broker_versions(urls: dict[str, str | None]) -> dict[str, str]:
    versions: dict[str, str] = {}
    if urls.get("rabbitmq"):
        with contextlib.suppress(Exception):
            import aiormq

            conn = await aiormq.connect(urls["rabbitmq"])
            props = conn.server_properties
            versions["rabbitmq"] = f"RabbitMQ {props['version']!s}"
            await conn.close()
    if urls.get("redis"):
        with contextlib.suppress(Exception):
            import redis.asyncio as redis

            client = redis.Redis.from_url(urls["redis"])
            versions["redis"] = f"Redis {(await client.info('server'))['redis_version']}"
            await client.aclose()
    return versions


def machine_info(urls: dict[str, str | None], started: float) -> dict[str, Any]:
    clients = {}
    for name in CLIENTS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            clients[name] = metadata.version(name)
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "git_commit": _git("rev-parse", "HEAD") + (" (with uncommitted changes)" if dirty else ""),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "clients": clients,
        "brokers": {
            **asyncio.run(_broker_versions(urls)),
            **({"kafka": f"Apache Kafka {_installed('kafka-')} (scripts/brokers)"} if urls.get("kafka") else {}),
            **({"sqs": f"ElasticMQ {_installed('elasticmq-')} (scripts/brokers)"} if urls.get("sqs") else {}),
        },
        "loadavg_start": os.getloadavg(),
    }


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _index(results: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(c["broker"], c["case"], c["impl"]): c for c in results["cases"]}


def markdown(results: dict[str, Any]) -> str:
    meta, index = results["meta"], _index(results)
    brokers = list(dict.fromkeys(c["broker"] for c in results["cases"]))
    impls = list(dict.fromkeys(c["impl"] for c in results["cases"]))
    cases = list(dict.fromkeys(c["case"] for c in results["cases"]))
    opts = meta["options"]
    lines = [
        f"# msgkit benchmarks, {meta['date']}",
        "",
        f"- machine: {meta['cpu_count']} x {meta['cpu_model']}, {meta['memory_gb']} GB, {meta['os']}; "
        f"Python {meta['python']}; brokers on the same host",
        f"- load average at start {', '.join(f'{x:.2f}' for x in meta['loadavg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in meta.get('loadavg_end', ()))}: "
        + (
            "**noisy**: other work shared the machine (load above the core count), so single runs swing; "
            "trust the medians and the per-CPU-second column"
            if max(meta["loadavg_start"][0], meta.get("loadavg_end", (0,))[0]) > meta["cpu_count"]
            else "a quiet machine (load below the core count)"
        ),
        f"- brokers: {'; '.join(meta['brokers'].values()) or 'memory only'}",
        f"- clients: {', '.join(f'{k} {v}' for k, v in meta['clients'].items())}",
        f"- git commit {meta['git_commit']}; {meta.get('duration_s', 0)} s; medians of {opts['repeat']} runs",
        f"- command: `python -m benchmarks --brokers {','.join(opts['brokers'])} --impls {','.join(opts['impls'])} "
        f"--workloads {','.join(opts['workloads'])} --repeat {opts['repeat']}"
        + (f" --messages {opts['messages']}" if opts["messages"] else "")
        + "`",
    ]
    for broker, why in results.get("skipped", {}).items():
        lines.append(f"- **{broker} skipped**: {why}")
    failures = [(c["broker"], c["case"], c["impl"], f) for c in results["cases"] for f in c["failures"]]
    for broker, case, impl, failure in failures:
        lines.append(f"- **FAILED** {broker} {case} {impl}: {failure}")

    if "backlog" in cases:
        lines += [
            "",
            f"## Publish N, then drain the backlog (max_in_flight {opts['max_in_flight']})",
            "",
            "| broker | N | implementation | publish msg/s | vs raw | drain msg/s | vs raw | vs FastStream "
            "| drain msg per CPU-s | RSS drain start -> peak MB |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for broker in brokers:
            raw = index.get((broker, "backlog", "raw"), {}).get("median", {})
            fs = index.get((broker, "backlog", "faststream"), {}).get("median", {})
            for impl in impls:
                case = index.get((broker, "backlog", impl))
                if case is None:
                    continue
                m = case["median"]
                publish, publish_ratio = (
                    _num(m.get("publish_rate")),
                    _ratio(m.get("publish_rate"), raw.get("publish_rate")),
                )
                if broker == "memory":  # the raw "client" is a deque: its publish is no yardstick
                    publish_ratio = "-"
                    if impl == "raw":
                        publish = "(deque)"
                lines.append(
                    f"| {broker} | {case['spec']['messages']:,} | {LABELS[impl]} | {publish} "
                    f"| {publish_ratio} | {_num(m.get('drain_rate'))} "
                    f"| {_ratio(m.get('drain_rate'), raw.get('drain_rate'))} "
                    f"| {_ratio(m.get('drain_rate'), fs.get('drain_rate')) if impl != 'faststream' else '-'} "
                    f"| {_num(m.get('drain_cpu_rate'))} "
                    f"| {_num(m.get('rss_start_mb'), 1)} -> {_num(m.get('rss_peak_mb'), 1)} |"
                )
    if "latency" in cases:
        lines += [
            "",
            f"## Steady load: latency from send to handler ({opts['latency_seconds']:.0f} s at a fixed rate)",
            "",
            "| broker | rate msg/s | implementation | p50 ms | p99 ms | p99 vs raw |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
        ]
        for broker in brokers:
            raw = index.get((broker, "latency", "raw"), {}).get("median", {})
            for impl in impls:
                case = index.get((broker, "latency", impl))
                if case is None:
                    continue
                m = case["median"]
                lines.append(
                    f"| {broker} | {_num(case['spec']['rate'])} | {LABELS[impl]} | {_num(m.get('p50_ms'), 1)} "
                    f"| {_num(m.get('p99_ms'), 1)} | {_ratio(m.get('p99_ms'), raw.get('p99_ms'))} |"
                )
    slow_cases = [c for c in cases if c.startswith("slow-")]
    if slow_cases:
        lines += [
            "",
            "## Slow handler (awaits 10 ms): drain rate by max_in_flight",
            "",
            "| broker | max_in_flight | N | ideal msg/s | implementation | msg/s | of ideal | vs raw |",
            "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        for broker in brokers:
            for label in slow_cases:
                raw = index.get((broker, label, "raw"), {}).get("median", {})
                for impl in impls:
                    case = index.get((broker, label, impl))
                    if case is None:
                        continue
                    m, k = case["median"], case["spec"]["max_in_flight"]
                    ideal = k / 0.010
                    of_ideal = f"{m['drain_rate'] / ideal:.0%}" if m.get("drain_rate") else "-"
                    lines.append(
                        f"| {broker} | {k} | {case['spec']['messages']:,} | {_num(ideal)} | {LABELS[impl]} "
                        f"| {_num(m.get('drain_rate'))} | {of_ideal} | {_ratio(m.get('drain_rate'), raw.get('drain_rate'))} |"
                    )
    return "\n".join(lines) + "\n"


def svg(results: dict[str, Any]) -> str:
    """Grouped bars: backlog drain and publish rates per broker and implementation, log scale."""
    import math

    index = _index(results)
    brokers = [b for b in dict.fromkeys(c["broker"] for c in results["cases"]) if (b, "backlog", "msgkit") in index]
    impls = list(dict.fromkeys(c["impl"] for c in results["cases"]))
    colors = {"raw": "#8c8c8c", "msgkit": "#2b6cb0", "faststream": "#dd6b20"}
    panels = [("drain_rate", "drain msg/s"), ("publish_rate", "publish msg/s")]
    width, panel_h, left, top = 120 + 150 * max(1, len(brokers)), 260, 70, 60
    height = top + len(panels) * (panel_h + 60) + 30
    lo, hi = 2, 7  # 100 .. 10,000,000 msg/s
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14">msgkit vs raw client vs FastStream, {html.escape(results["meta"]["date"])} '
        f"(median, log scale)</text>",
    ]
    for i, impl in enumerate(impls):
        out.append(f'<rect x="{left + i * 110}" y="30" width="12" height="12" fill="{colors[impl]}"/>')
        out.append(f'<text x="{left + 16 + i * 110}" y="41">{LABELS[impl]}</text>')
    for p, (metric, title) in enumerate(panels):
        y0 = top + p * (panel_h + 60)
        out.append(f'<text x="{left}" y="{y0 - 6}" font-weight="bold">{title}</text>')
        for e in range(lo, hi + 1):
            y = y0 + panel_h - (e - lo) / (hi - lo) * panel_h
            out.append(f'<line x1="{left}" x2="{width - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">1e{e}</text>')
        for b, broker in enumerate(brokers):
            x0 = left + 20 + b * 150
            out.append(f'<text x="{x0 + 50}" y="{y0 + panel_h + 18}" text-anchor="middle">{broker}</text>')
            for i, impl in enumerate(impls):
                value = index.get((broker, "backlog", impl), {}).get("median", {}).get(metric)
                if not value:
                    continue
                h = max(0.0, (math.log10(value) - lo) / (hi - lo) * panel_h)
                x = x0 + i * 34
                out.append(
                    f'<rect x="{x}" y="{y0 + panel_h - h:.1f}" width="30" height="{h:.1f}" fill="{colors[impl]}">'
                    f"<title>{broker} {LABELS[impl]}: {value:,.0f} msg/s</title></rect>"
                )
                out.append(
                    f'<text x="{x + 15}" y="{y0 + panel_h - h - 3:.1f}" text-anchor="middle" font-size="9">'
                    f"{value / 1000:.1f}k</text>"
                )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_reports(results: dict[str, Any], directory: Path, name: str) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {ext: directory / f"{name}.{ext}" for ext in ("json", "md", "svg")}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown(results))
    paths["svg"].write_text(svg(results))
    return paths

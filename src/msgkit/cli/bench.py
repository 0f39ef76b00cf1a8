"""``msgkit bench``: a quick produce-and-consume throughput and latency check against one URL.

For comparisons between transports and against the raw clients, see benchmarks/ in the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import uuid
from typing import Any

from msgkit.cli.common import (
    EXIT_BROKER,
    EXIT_OK,
    EXIT_USAGE,
    add_broker_options,
    command_parser,
    connected,
    count,
    delete_throwaway,
    positive_float,
)
from msgkit.cli.output import Ui
from msgkit.message import Delivery, Message

_CHUNK = 100


def register(commands: Any) -> None:
    parser = command_parser(
        commands,
        "bench",
        help="measure send and consume throughput and end-to-end latency",
        description="""
            Send --count messages of --size bytes to a new topic (msgkit-bench-<random>) in batches
            of 100 while one consumer with --max-in-flight slots receives and acknowledges them, then
            report messages per second for sending and for the whole round, and the latency from
            send to handler (p50, p95, p99, max). Exit 3 when not every message arrived within
            --timeout. The topic and group are deleted afterwards.

            Numbers from a shared machine are noisy: run it a few times. For a comparison with the
            raw client libraries, use the benchmarks in the msgkit repository.
            """,
        examples="""
            msgkit bench memory://
            msgkit bench redis://localhost:6379/0 --count 20000 --size 512
            msgkit bench kafka://localhost:9092 --max-in-flight 500 --json
            """,
    )
    parser.set_defaults(handler=run)
    add_broker_options(parser)
    parser.add_argument("--count", type=count, default=10_000, metavar="N", help="messages to send (default 10000)")
    parser.add_argument("--size", type=count, default=256, metavar="B", help="body size in bytes (default 256)")
    parser.add_argument(
        "--max-in-flight", type=count, default=100, metavar="M", help="the consumer's in-flight bound (default 100)"
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        metavar="SECONDS",
        help="give up when the messages have not all arrived after this long (default 120)",
    )


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, ui: Ui) -> int:
    if args.count < 1 or args.max_in_flight < 1:
        ui.note("msgkit bench: --count and --max-in-flight must be at least 1")
        return EXIT_USAGE
    name = f"msgkit-bench-{uuid.uuid4().hex[:12]}"
    body = os.urandom(args.size)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    received: set[str] = set()
    duplicates = 0
    all_in = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        nonlocal duplicates
        now = time.perf_counter()
        if delivery.id in received:
            duplicates += 1
            return
        received.add(delivery.id)
        started = sent_at.get(delivery.id)
        if started is not None:
            latencies.append(now - started)
        if len(received) >= args.count:
            all_in.set()

    async with connected(args.url, args.connect_timeout) as broker:
        await broker.declare(name, name)
        consumer = broker.consumer(name, name, handle, max_in_flight=args.max_in_flight, retry=None)
        await consumer.start()
        with ui.progress("received", args.count) as progress:
            started = time.perf_counter()
            for first in range(0, args.count, _CHUNK):
                batch = [Message(body=body) for _ in range(min(_CHUNK, args.count - first))]
                now = time.perf_counter()
                sent_at.update((m.id, now) for m in batch)
                await broker.send_batch(name, batch)
                if progress is not None:
                    progress(len(received), args.count)
            send_s = time.perf_counter() - started
            deadline = started + args.timeout
            while not all_in.is_set() and (left := deadline - time.perf_counter()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_in.wait(), min(left, 0.2))
                if progress is not None:
                    progress(len(received), args.count)
            total_s = time.perf_counter() - started
        await consumer.stop()
        await delete_throwaway(broker, name, name, ui)
    ordered = sorted(latencies)
    report: dict[str, Any] = {
        "url": broker.url,
        "topic": name,
        "count": args.count,
        "size": args.size,
        "max_in_flight": args.max_in_flight,
        "sent": len(sent_at),
        "received": len(received),
        "duplicates": duplicates,
        "send_seconds": round(send_s, 4),
        "total_seconds": round(total_s, 4),
        "send_per_second": round(len(sent_at) / send_s, 1),
        "end_to_end_per_second": round(len(received) / total_s, 1),
        "latency_ms": {
            "p50": round(_percentile(ordered, 0.50) * 1000, 3),
            "p95": round(_percentile(ordered, 0.95) * 1000, 3),
            "p99": round(_percentile(ordered, 0.99) * 1000, 3),
            "max": round(ordered[-1] * 1000, 3),
            "mean": round(statistics.fmean(ordered) * 1000, 3),
        }
        if ordered
        else None,
    }
    _print(report, ui)
    if len(received) < args.count:
        ui.note(
            f"msgkit bench: {args.count - len(received)} of {args.count} messages did not arrive in {args.timeout:g}s"
        )
        return EXIT_BROKER
    return EXIT_OK


def _print(report: dict[str, Any], ui: Ui) -> None:
    if ui.as_json:
        ui.json(report)
        return
    ui.say(
        f"{report['url']}: {report['count']} messages of {report['size']} bytes, "
        f"max_in_flight {report['max_in_flight']}"
    )
    latency = report["latency_ms"] or {}
    ui.fields(
        {
            "sent": f"{report['sent']} in {report['send_seconds']:.3f}s ({report['send_per_second']:,.0f}/s)",
            "received": f"{report['received']} in {report['total_seconds']:.3f}s "
            f"({report['end_to_end_per_second']:,.0f}/s), {report['duplicates']} duplicate(s)",
            "latency": ", ".join(f"{k} {v:.2f} ms" for k, v in latency.items()) or "-",
        }
    )

"""What telemetry costs: the engine benchmark's workload with telemetry off, installed without an
OpenTelemetry SDK, and (for reference) with the SDK recording every span, side by side.

    python -m benchmarks.telemetry [--messages 100000] [--max-in-flight 256] [--repeat 5] [--sdk]

Same workload as benchmarks/engine.py: a backlog of N JSON messages (~150 bytes) sent with
send_batch, drained by a handler taking a validated pydantic model, through memory://. Rates are
messages per second of this process's CPU time (the run is one thread), so other load on the
machine does not tilt the comparison. Modes run in turn within each repeat so drift hits them
alike; results are medians, a JSON copy goes to benchmarks/results/telemetry.json. ``--sdk`` adds a run with the SDK installed, sampling every
span into a processor that drops it at once (the cost of recording, not of exporting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import msgkit
from benchmarks.engine import BODY, msgkit_run


async def run(n: int, max_in_flight: int, mode: str, providers: dict[str, Any]) -> tuple[float, float, float]:
    """(publish/s, drain/s, end-to-end/s) of CPU time for one backlog through memory:// in ``mode``."""

    def setup(broker: msgkit.Broker) -> None:
        if mode != "off":
            from msgkit.telemetry import instrument

            instrument(broker, **providers if mode == "sdk" else {})

    return await msgkit_run(n, max_in_flight, setup=setup, clock=time.process_time)


def sdk_providers() -> dict[str, Any]:
    """An SDK tracer provider that samples everything into a no-op processor, and a meter provider."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SpanProcessor())  # on_end does nothing: recording cost only
    return {"tracer_provider": tracer_provider, "meter_provider": MeterProvider()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sdk", action="store_true", help="also run with the OpenTelemetry SDK recording")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "telemetry.json")
    args = parser.parse_args()

    modes = ["off", "no_sdk"] + (["sdk"] if args.sdk else [])
    providers = sdk_providers() if args.sdk else {}
    runs: dict[str, dict[str, list[float]]] = {m: {"publish": [], "drain": [], "end_to_end": []} for m in modes}
    for _ in range(args.repeat):
        for mode in modes:
            publish, drain, end_to_end = asyncio.run(run(args.messages, args.max_in_flight, mode, providers))
            runs[mode]["publish"].append(publish)
            runs[mode]["drain"].append(drain)
            runs[mode]["end_to_end"].append(end_to_end)
    medians = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in runs.items()}

    labels = {"off": "telemetry off", "no_sdk": "instrumented, no SDK", "sdk": "instrumented, SDK recording"}
    print(f"memory://, {args.messages:,} messages of {len(BODY)} bytes, max_in_flight={args.max_in_flight}")
    print(f"median of {args.repeat} runs, messages/s:")
    print(f"  {'':30} {'publish':>10} {'drain':>10} {'end-to-end':>11} {'vs off':>8}")
    for mode in modes:
        m = medians[mode]
        ratio = m["end_to_end"] / medians["off"]["end_to_end"]
        print(
            f"  {labels[mode]:30} {m['publish']:>10,.0f} {m['drain']:>10,.0f} {m['end_to_end']:>11,.0f} {ratio:>7.2f}x"
        )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "messages": args.messages,
                "max_in_flight": args.max_in_flight,
                "body_bytes": len(BODY),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "runs": runs,
                "medians": medians,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

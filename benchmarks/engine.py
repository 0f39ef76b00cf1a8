"""Engine throughput through memory://, end to end, beside a bare-asyncio baseline in one run.

    python -m benchmarks.engine [--messages 200000] [--max-in-flight 256] [--repeat 5]

Workload: send a backlog of N JSON messages (~150 bytes) with send_batch, then drain it with a
handler that takes a validated pydantic model and does nothing, acks settled in batches. The
baseline validates the same bodies inline in a bare loop: the ceiling for any dispatch design.
Results are medians over the repeats; a JSON copy goes to benchmarks/results/engine.json.
Target on a 2-core machine: at least 100,000 messages/s end to end at max_in_flight 256.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

import msgkit


class Order(BaseModel):
    order_id: int
    customer: str
    sku: str
    quantity: int
    price: float
    currency: str
    note: str


BODY = (
    Order(
        order_id=123456,
        customer="customer-0042",
        sku="SKU-12345-XL",
        quantity=3,
        price=19.99,
        currency="EUR",
        note="leave it at the door, please",
    )
    .model_dump_json()
    .encode()
)


async def baseline(n: int) -> float:
    """Validate n bodies inline in one coroutine: no broker, no dispatch."""
    validate = Order.model_validate_json
    started = time.perf_counter()
    for _ in range(n):
        validate(BODY)
    return n / (time.perf_counter() - started)


async def msgkit_run(
    n: int,
    max_in_flight: int,
    *,
    setup: Callable[[msgkit.Broker], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float, float]:
    """(publish/s, drain/s, end-to-end/s) for one backlog through memory://, timed by ``clock``;
    ``setup`` prepares the broker first (e.g. instruments it)."""
    async with msgkit.Broker(f"memory://bench-{uuid.uuid4().hex[:8]}") as broker:
        if setup is not None:
            setup(broker)
        await broker.declare("orders", "bench")
        started = clock()
        for offset in range(0, n, 1000):
            await broker.send_batch("orders", [BODY] * min(1000, n - offset))
        published = clock()
        done = asyncio.Event()
        handled = 0

        async def handle(order: Order) -> None:
            nonlocal handled
            handled += 1
            if handled == n:
                done.set()

        consumer = broker.consumer("orders", "bench", handle, max_in_flight=max_in_flight)
        drain_started = clock()
        await consumer.start()
        await done.wait()
        await consumer.stop()
        finished = clock()
    return n / (published - started), n / (finished - drain_started), n / (finished - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "engine.json")
    args = parser.parse_args()

    runs: dict[str, list[float]] = {"baseline": [], "publish": [], "drain": [], "end_to_end": []}
    for _ in range(args.repeat):  # alternate, so drift hits both sides alike
        runs["baseline"].append(asyncio.run(baseline(args.messages)))
        publish, drain, end_to_end = asyncio.run(msgkit_run(args.messages, args.max_in_flight))
        runs["publish"].append(publish)
        runs["drain"].append(drain)
        runs["end_to_end"].append(end_to_end)
    medians = {name: statistics.median(values) for name, values in runs.items()}

    print(f"memory://, {args.messages:,} messages of {len(BODY)} bytes, max_in_flight={args.max_in_flight}")
    print(f"median of {args.repeat} runs, messages/s:")
    print(f"  {'inline validation (baseline)':32} {medians['baseline']:>12,.0f}")
    for name in ("publish", "drain", "end_to_end"):
        ratio = medians[name] / medians["baseline"]
        print(f"  {'msgkit ' + name.replace('_', '-'):32} {medians[name]:>12,.0f}   ({ratio:.2f}x baseline)")
    target = 100_000
    verdict = "meets" if medians["end_to_end"] >= target else "MISSES"
    print(f"end-to-end {verdict} the {target:,}/s target")

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

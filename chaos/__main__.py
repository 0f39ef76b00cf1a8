"""``python -m chaos [--short] [--brokers rabbitmq,redis,kafka,sqs] [--seed N]``

Broker URLs come from ``MSGKIT_<BROKER>_URL``, restart commands from
``MSGKIT_<BROKER>_RESTART_COMMAND`` (without one, that broker is not restarted), the database from
``MSGKIT_POSTGRES_URL``. Exits 1 if any broker's run lost a message, duplicated an effect or
failed a check. Never point it at brokers others are using: it restarts them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

from chaos.plan import FULL, SHORT
from chaos.report import Result, markdown
from chaos.run import BrokerRun, Target

BROKERS = ("rabbitmq", "redis", "kafka", "sqs")


def targets(names: list[str]) -> list[Target]:
    db_url = os.environ.get("MSGKIT_POSTGRES_URL")
    missing = [f"MSGKIT_{n.upper()}_URL" for n in names if not os.environ.get(f"MSGKIT_{n.upper()}_URL")]
    if not db_url:
        missing.append("MSGKIT_POSTGRES_URL")
    if missing or not db_url:
        raise SystemExit(f"chaos: set {', '.join(missing)} (e.g. `. .brokers/env` after `scripts/brokers up`)")
    return [
        Target(
            n,
            os.environ[f"MSGKIT_{n.upper()}_URL"],
            os.environ.get(f"MSGKIT_{n.upper()}_RESTART_COMMAND") or None,
            db_url,
        )
        for n in names
    ]


async def run_all(args: argparse.Namespace) -> list[Result]:
    scenario = SHORT if args.short else FULL
    if args.messages:
        scenario = type(scenario)(**{**scenario.__dict__, "messages": args.messages})
    results = []
    for target in targets(args.brokers):
        print(f"-- {target.broker}: {scenario.name} run (seed {args.seed})", flush=True)
        result = await BrokerRun(target, scenario, args.seed, args.log_dir).execute()
        print(result.table(), flush=True)
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="the CI version: fewer messages, one kill, one restart")
    parser.add_argument(
        "--brokers", type=lambda v: v.split(","), default=list(BROKERS), help="comma-separated, default all four"
    )
    parser.add_argument(
        "--seed", type=int, default=random.randrange(1 << 30), help="makes the schedule and plan reproducible"
    )
    parser.add_argument("--messages", type=int, default=0, help="override the main phase's message count")
    parser.add_argument(
        "--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "msgkit-chaos", help="child process logs"
    )
    parser.add_argument("--markdown", type=Path, help="also write the summary table to this file")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    unknown = sorted(set(args.brokers) - set(BROKERS))
    if unknown:
        parser.error(f"unknown broker(s) {unknown}; choose from {', '.join(BROKERS)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    results = asyncio.run(run_all(args))
    table = markdown(results)
    print(f"\n{table}\n\nchild logs: {args.log_dir}")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    sys.exit(0 if all(r.passed for r in results) else 1)


if __name__ == "__main__":
    main()

"""The ``msgkit`` command: the top-level parser, running a command, and mapping errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import IO, Any, TextIO

from msgkit.cli import bench, check, delete, dlq, outbox, send, tail
from msgkit.cli.common import EXIT_BROKER, EXIT_USAGE
from msgkit.cli.output import Ui
from msgkit.errors import BrokerUnavailableError, ConfigurationError, MissingDependencyError, MsgkitError

_EPILOG = """\
URL is a broker URL: memory://, amqp://user:pass@host/, redis://host:6379/0, kafka://host:9092 or
sqs://host:9324?region=us-east-1; its secrets are never printed. Each command's --help has examples.

exit codes: 0 done, 1 not found, 2 bad usage or configuration, 3 broker unreachable or failing,
130 interrupted.

examples:
  msgkit check redis://localhost:6379/0
  msgkit send redis://localhost:6379/0 orders '{"id": 1}' --group billing
  msgkit tail redis://localhost:6379/0 orders billing --limit 10
  msgkit dlq list redis://localhost:6379/0 orders billing
  msgkit delete redis://localhost:6379/0 orders billing --yes
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (each module registers its own)."""
    parser = argparse.ArgumentParser(
        prog="msgkit",
        description="msgkit: send, watch and benchmark the topics and groups of any broker msgkit speaks, "
        "and manage dead letters and the outbox.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (send, tail, check, bench, dlq, outbox, delete):
        module.register(commands)
    return parser


def main(
    argv: Sequence[str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stdin: IO[Any] | None = None,
) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    ui = Ui(out, err, stdin or sys.stdin, as_json=bool(getattr(args, "json", False)))
    try:
        code: int = asyncio.run(args.handler(args, ui))
        return code
    except MissingDependencyError as exc:
        ui.note(f"msgkit: {exc}")
        return EXIT_USAGE
    except (ConfigurationError, ValueError, TypeError) as exc:
        ui.note(f"msgkit: {exc}")
        return EXIT_USAGE
    except (BrokerUnavailableError, OSError) as exc:
        ui.note(f"msgkit: broker unreachable: {exc}")
        return EXIT_BROKER
    except MsgkitError as exc:
        ui.note(f"msgkit: {type(exc).__name__}: {exc}")
        return EXIT_BROKER
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """Console entry point (``msgkit``)."""
    sys.exit(main())

"""What the CLI commands share: exit codes, common options, connecting with a deadline, stopping on signals."""

from __future__ import annotations

import argparse
import asyncio
import signal
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from msgkit.broker import Broker
from msgkit.cli.output import Ui
from msgkit.errors import BrokerUnavailableError, MsgkitError

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_BROKER = 0, 1, 2, 3

#: A command: parsed arguments and the output in, exit code out.
Command = Callable[[argparse.Namespace, Ui], Awaitable[int]]

DEFAULT_CONNECT_TIMEOUT = 10.0


def command_parser(
    commands: Any,
    name: str,
    *,
    help: str,  # noqa: A002 - argparse's name
    description: str,
    examples: str,
) -> argparse.ArgumentParser:
    """A sub-command parser whose ``--help`` shows the description, then examples."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help,
        description=textwrap.dedent(description).strip(),
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def add_broker_options(parser: argparse.ArgumentParser, *, url: bool = True) -> None:
    """URL (positional), ``--json`` and ``--connect-timeout``."""
    if url:
        parser.add_argument("url", metavar="URL", help="broker URL (its secrets are never printed)")
    add_json_option(parser)
    parser.add_argument(
        "--connect-timeout",
        type=positive_float,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up (exit 3) when the broker does not answer within this (default {DEFAULT_CONNECT_TIMEOUT:g})",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts on stdout (errors on stderr)")


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


@asynccontextmanager
async def connected(url: str, timeout: float) -> AsyncIterator[Broker]:
    """A connected Broker, or BrokerUnavailableError once ``timeout`` seconds passed without a connection."""
    broker = Broker(url)
    try:
        try:
            await asyncio.wait_for(broker.connect(), timeout)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"no connection to {broker.url} within {timeout:g}s (see --connect-timeout)"
            ) from None
        yield broker
    finally:
        await broker.close()


@contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event set on SIGINT or SIGTERM while the block runs (where the loop can take signal handlers)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            break
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def delete_throwaway(broker: Broker, topic: str, group: str, ui: Ui) -> bool:
    """Delete a (topic, group) a command made for itself; a failure is a note, not the command's
    failure. True if deleted."""
    try:
        await broker.delete(topic, group)
    except MsgkitError as exc:  # NotSupportedError included: a transport that cannot delete
        ui.note(f"msgkit: could not delete {topic}/{group} ({type(exc).__name__}: {exc}); it stays on the broker")
        return False
    return True

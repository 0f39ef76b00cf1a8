"""The ``msgkit`` command line.

    msgkit dlq list    URL TOPIC GROUP [--limit N] [--json]
    msgkit dlq show    URL TOPIC GROUP ID [--json]
    msgkit dlq replay  URL TOPIC GROUP (ID... | --all) [--json]
    msgkit dlq purge   URL TOPIC GROUP (ID... | --all) [--yes] [--json]
    msgkit outbox relay          DB_URL BROKER_URL [--batch-size N] [--poll-interval S] [--retention S]
    msgkit outbox create-schema  DB_URL [--print]

Exit codes: 0 done, 1 not found, 2 bad usage or configuration, 3 broker unreachable or failing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from msgkit.broker import Broker
from msgkit.dlq import DeadLetterInfo
from msgkit.errors import BrokerUnavailableError, ConfigurationError, MsgkitError

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_BROKER = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msgkit",
        description="msgkit: work with the topics, groups and dead letters of any broker msgkit speaks.",
        epilog="URL is a broker URL such as amqp://user:pass@host/, redis://host:6379/0, kafka://host:9092 "
        "or sqs://...; its secrets are never printed.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dlq = commands.add_parser(
        "dlq",
        help="list, show, replay or purge a group's dead letters",
        description="The dead letters of a (topic, group): messages whose retries ran out or whose body could "
        "not be decoded, each with headers saying why.",
    )
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("url", metavar="URL", help="broker URL")
        p.add_argument("topic", metavar="TOPIC")
        p.add_argument("group", metavar="GROUP")
        p.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
        p.add_argument(
            "--wait",
            type=float,
            default=2.0,
            metavar="SECONDS",
            help="how long to wait for the first dead letter before concluding there is none (default 2)",
        )

    p = actions.add_parser("list", help="list dead letters with their reasons (leaves them in place)")
    common(p)
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100; 0 for all)")
    p = actions.add_parser("show", help="show one dead letter in full, body included (leaves it in place)")
    common(p)
    p.add_argument("id", metavar="ID", help="the message id")
    for name, text in (
        ("replay", "send dead letters back to their topic (same id, attempts reset) and remove them"),
        ("purge", "delete dead letters for good"),
    ):
        p = actions.add_parser(name, help=text, description=text)
        common(p)
        p.add_argument("ids", nargs="*", metavar="ID", help="message ids (or --all)")
        p.add_argument("--all", action="store_true", help="every dead letter of the group")
        if name == "purge":
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _outbox_parser(commands)
    return parser


def _outbox_parser(commands: Any) -> None:
    outbox = commands.add_parser(
        "outbox",
        help="run an outbox relay, or create the outbox tables",
        description="The transactional outbox: messages a service added to its database's msgkit_outbox "
        "table are published by relays. DB_URL is postgresql://user:pass@host/db or sqlite:///path/file.db.",
    )
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    relay = actions.add_parser(
        "relay",
        help="publish the outbox of DB_URL to BROKER_URL until SIGINT or SIGTERM",
        description="Publish committed outbox rows at-least-once, in order per key, then mark them sent. "
        "Run several for availability: on PostgreSQL they share the work, on SQLite one publishes and the "
        "others stand by.",
    )
    relay.add_argument("db_url", metavar="DB_URL", help="database URL")
    relay.add_argument("broker_url", metavar="BROKER_URL", help="broker URL")
    relay.add_argument("--batch-size", type=int, default=100, help="rows per transaction (default 100)")
    relay.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between looks when no NOTIFY wakes the relay (default 1)",
    )
    relay.add_argument(
        "--retention",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="keep sent rows this long before deleting them (default 3600; 0 deletes them when sent)",
    )
    schema = actions.add_parser(
        "create-schema",
        help="create msgkit's tables (and PostgreSQL's NOTIFY trigger) where missing",
        description="Create msgkit_outbox, msgkit_outbox_lock, msgkit_inbox and msgkit_dedup where missing. "
        "With --print, print the DDL for your own migrations instead (nothing is executed).",
    )
    schema.add_argument("db_url", metavar="DB_URL", help="database URL")
    schema.add_argument("--print", action="store_true", help="print the DDL instead of running it")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _as_json(info: DeadLetterInfo, with_body: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": info.id,
        "reason": info.reason,
        "error_type": info.error_type,
        "attempts": info.attempts,
        "topic": info.topic,
        "group": info.group,
        "first_failed_at": info.first_failed_at,
        "last_failed_at": info.last_failed_at,
        "host": info.host,
        "key": info.key,
        "body_size": len(info.body),
    }
    if with_body:
        data["headers"] = info.headers
        try:
            data["body"] = info.body.decode()
        except UnicodeDecodeError:
            data["body_base64"] = base64.b64encode(info.body).decode()
    return data


def _table(infos: Sequence[DeadLetterInfo], out: TextIO) -> None:
    if not infos:
        print("no dead letters", file=out)
        return
    rows = [("ID", "ATTEMPTS", "LAST FAILED (UTC)", "ERROR", "REASON")]
    for i in infos:
        reason = i.reason if len(i.reason) <= 70 else i.reason[:67] + "..."
        rows.append((i.id, str(i.attempts or "-"), _when(i.last_failed_at), i.error_type or "-", reason))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4], file=out)


def _progress(verb: str, err: TextIO) -> Any:
    """A progress line on a terminal: a bar when the total is known, else a running count."""
    if not err.isatty():
        return None
    started = time.monotonic()

    def show(done: int, total: int | None) -> None:
        rate = done / max(time.monotonic() - started, 1e-6)
        if total:
            filled = int(30 * min(done / total, 1.0))
            line = f"{verb} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} ({rate:,.0f}/s)"
        else:
            line = f"{verb} {done} ({rate:,.0f}/s)"
        print(f"\r{line}", end="", file=err, flush=True)

    return show


async def _dlq(args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    async with Broker(args.url) as broker:
        dead = await broker.dead_letters(args.topic, args.group, wait=args.wait)
        if args.action == "list":
            infos = await dead.peek(limit=args.limit or None)
            if args.json:
                json.dump([_as_json(i, False) for i in infos], out, indent=2)
                print(file=out)
            else:
                _table(infos, out)
            return EXIT_OK
        if args.action == "show":
            info = await dead.show(args.id)
            if info is None:
                print(f"no dead letter with id {args.id} in {args.topic}/{args.group}", file=err)
                return EXIT_NOT_FOUND
            if args.json:
                json.dump(_as_json(info, True), out, indent=2)
                print(file=out)
            else:
                for name, value in _as_json(info, True).items():
                    print(f"{name}: {value}", file=out)
            return EXIT_OK
        if bool(args.ids) == bool(args.all):
            print(f"msgkit dlq {args.action}: give message ids or --all (not both)", file=err)
            return EXIT_USAGE
        ids = None if args.all else args.ids
        if args.action == "purge" and not args.yes:
            what = "ALL dead letters" if ids is None else f"{len(ids)} dead letter(s)"
            if not stdin.isatty():
                print("msgkit dlq purge: pass --yes to confirm when not run interactively", file=err)
                return EXIT_USAGE
            print(f"delete {what} of {args.topic}/{args.group} for good? [y/N] ", end="", file=err, flush=True)
            if stdin.readline().strip().lower() not in ("y", "yes"):
                print("nothing deleted", file=err)
                return EXIT_USAGE
        verb = "replayed" if args.action == "replay" else "purged"
        progress = _progress(verb, err)
        if args.action == "replay":
            done = await dead.replay(ids, progress)
        else:
            done = await dead.purge(ids, progress)
        if progress is not None:
            print(file=err)
        missing = sorted(set(ids) - set(done)) if ids is not None else []
        if args.json:
            json.dump({verb: done, "not_found": missing}, out, indent=2)
            print(file=out)
        else:
            print(f"{verb} {len(done)} dead letter(s) of {args.topic}/{args.group}", file=out)
            for message_id in missing:
                print(f"not found: {message_id}", file=err)
        return EXIT_NOT_FOUND if missing else EXIT_OK


async def _outbox(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        from msgkit.outbox import OutboxRelay, create_schema, schema_sql
        from msgkit.outbox.db import async_url
    except ImportError as exc:
        print(f'msgkit outbox needs SQLAlchemy and a driver: pip install "msgkit[sql]" ({exc})', file=err)
        return EXIT_USAGE
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    if args.action == "create-schema":
        if args.print:
            backend = make_url(async_url(args.db_url)).get_backend_name()
            if backend not in ("postgresql", "sqlite"):
                print(f"msgkit outbox: PostgreSQL and SQLite are supported, not {backend!r}", file=err)
                return EXIT_USAGE
            print(";\n\n".join(schema_sql("postgresql" if backend == "postgresql" else "sqlite")) + ";", file=out)
            return EXIT_OK
        try:
            await create_schema(args.db_url)
        except SQLAlchemyError as exc:
            print(f"msgkit outbox: database error: {type(exc).__name__}: {exc}", file=err)
            return EXIT_BROKER
        print("msgkit tables are in place", file=out)
        return EXIT_OK
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=err, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    relay = OutboxRelay(
        args.db_url,
        args.broker_url,
        batch_size=args.batch_size,
        poll_interval=args.poll_interval,
        retention=args.retention,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, relay.request_stop)
    try:
        await relay.run()
    finally:
        await relay.close()
    return EXIT_OK


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command line; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    try:
        if args.command == "outbox":
            return asyncio.run(_outbox(args, out, err))
        return asyncio.run(_dlq(args, out, err, sys.stdin))
    except (ConfigurationError, ValueError, TypeError) as exc:
        print(f"msgkit: {exc}", file=err)
        return EXIT_USAGE
    except (BrokerUnavailableError, OSError) as exc:
        print(f"msgkit: broker unreachable: {exc}", file=err)
        return EXIT_BROKER
    except MsgkitError as exc:
        print(f"msgkit: {type(exc).__name__}: {exc}", file=err)
        return EXIT_BROKER
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()

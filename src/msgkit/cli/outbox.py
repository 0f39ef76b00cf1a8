"""``msgkit outbox relay|create-schema``: the transactional outbox's relay and tables."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from msgkit.cli.common import (
    EXIT_BROKER,
    EXIT_OK,
    EXIT_USAGE,
    add_json_option,
    command_parser,
    positive_float,
)
from msgkit.cli.output import Ui


def register(commands: Any) -> None:
    outbox = command_parser(
        commands,
        "outbox",
        help="run an outbox relay, or create the outbox tables",
        description="""
            The transactional outbox: messages a service added to its database's msgkit_outbox
            table are published by relays. DB_URL is postgresql://user:pass@host/db or
            sqlite:///path/file.db (needs the sql extra: pip install "msgkit[sql]").
            """,
        examples="""
            msgkit outbox create-schema postgresql://app:secret@db/app
            msgkit outbox relay postgresql://app:secret@db/app amqp://guest:guest@rabbit/
            """,
    )
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    relay = command_parser(
        actions,
        "relay",
        help="publish the outbox of DB_URL to BROKER_URL until SIGINT or SIGTERM",
        description="""
            Publish committed outbox rows at-least-once, in order per key, then mark them sent. Run
            several for availability: on PostgreSQL they share the work, on SQLite one publishes and
            the others stand by. Logs go to stderr.
            """,
        examples="""
            msgkit outbox relay sqlite:///app.db redis://localhost:6379/0
            msgkit outbox relay postgresql://app:secret@db/app kafka://kafka:9092 --batch-size 500
            """,
    )
    relay.set_defaults(handler=run)
    relay.add_argument("db_url", metavar="DB_URL", help="database URL")
    relay.add_argument("broker_url", metavar="BROKER_URL", help="broker URL")
    relay.add_argument("--batch-size", type=int, default=100, help="rows per transaction (default 100)")
    relay.add_argument(
        "--poll-interval",
        type=positive_float,
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
    schema = command_parser(
        actions,
        "create-schema",
        help="create msgkit's tables (and PostgreSQL's NOTIFY trigger) where missing",
        description="""
            Create msgkit_outbox, msgkit_outbox_lock, msgkit_inbox and msgkit_dedup where missing.
            With --print, print the DDL for your own migrations instead (nothing is executed).
            """,
        examples="""
            msgkit outbox create-schema sqlite:///app.db
            msgkit outbox create-schema postgresql://app:secret@db/app --print > migrations/msgkit.sql
            """,
    )
    schema.set_defaults(handler=run)
    schema.add_argument("db_url", metavar="DB_URL", help="database URL")
    schema.add_argument("--print", action="store_true", help="print the DDL instead of running it")
    add_json_option(schema)


async def run(args: argparse.Namespace, ui: Ui) -> int:
    try:
        from msgkit.outbox import OutboxRelay, create_schema, schema_sql
        from msgkit.outbox.db import async_url
    except ImportError as exc:
        ui.note(f'msgkit outbox needs SQLAlchemy and a driver: pip install "msgkit[sql]" ({exc})')
        return EXIT_USAGE
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    if args.action == "create-schema":
        if args.print:
            backend = make_url(async_url(args.db_url)).get_backend_name()
            if backend not in ("postgresql", "sqlite"):
                ui.note(f"msgkit outbox: PostgreSQL and SQLite are supported, not {backend!r}")
                return EXIT_USAGE
            statements = schema_sql("postgresql" if backend == "postgresql" else "sqlite")
            if args.json:
                ui.json({"statements": list(statements)})
            else:
                print(";\n\n".join(statements) + ";", file=ui.out)
            return EXIT_OK
        try:
            await create_schema(args.db_url)
        except SQLAlchemyError as exc:
            ui.note(f"msgkit outbox: database error: {type(exc).__name__}: {exc}")
            return EXIT_BROKER
        if args.json:
            ui.json({"created": True})
        else:
            ui.say("msgkit tables are in place")
        return EXIT_OK
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=ui.err, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await relay.close()
    return EXIT_OK

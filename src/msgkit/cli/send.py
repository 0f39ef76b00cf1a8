"""``msgkit send``: publish messages from the command line."""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from typing import Any

from msgkit.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    add_broker_options,
    command_parser,
    connected,
    count,
)
from msgkit.cli.output import Ui
from msgkit.message import Message, new_message_id
from msgkit.names import check_name

_CHUNK = 500


def register(commands: Any) -> None:
    parser = command_parser(
        commands,
        "send",
        help="send a message (JSON text, or raw bytes from a file or stdin)",
        description="""
            Send a message to TOPIC and print its id once the broker has stored it. BODY is JSON
            text, checked before sending and sent as it is; for any other bytes use --file F, or
            "-" to read them from stdin. A topic keeps messages only for groups that exist when
            they are sent: --group G creates G's subscription first.
            """,
        examples="""
            msgkit send redis://localhost:6379/0 orders '{"id": 1, "total": 9.5}' --key customer-7
            msgkit send amqp://guest:guest@localhost/ orders '"hello"' --header source=cli --group billing
            msgkit send kafka://localhost:9092 images --file cat.png
            echo '{"id": 2}' | msgkit send memory:// orders - --json
            msgkit send redis://localhost:6379/0 orders '{"load": true}' --count 10000
            """,
    )
    parser.set_defaults(handler=run)
    add_broker_options(parser)
    parser.add_argument("topic", metavar="TOPIC")
    parser.add_argument("body", metavar="BODY", nargs="?", help='JSON text, or "-" for raw bytes from stdin')
    parser.add_argument("--file", metavar="F", help="send the bytes of file F as the body")
    parser.add_argument("--key", metavar="K", help="the message key (ordering and partitioning)")
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a header (repeatable)",
    )
    parser.add_argument("--id", metavar="ID", help="the message id (default: a new UUIDv7); only with --count 1")
    parser.add_argument("--count", type=count, default=1, metavar="N", help="send N copies, each its own id")
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="G",
        help="create group G's subscription before sending, so the message is kept for it (repeatable)",
    )


class UsageError(ValueError):
    """The command line is inconsistent; the message says how to fix it."""


def _body(args: argparse.Namespace, ui: Ui) -> bytes:
    given = [args.body is not None, args.file is not None]
    if sum(given) != 1:
        raise UsageError('give exactly one body: BODY (JSON text), "-" (stdin) or --file F')
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                return f.read()
        except OSError as exc:
            raise UsageError(f"cannot read --file {args.file}: {exc.strerror}") from None
    if args.body == "-":
        stream = getattr(ui.stdin, "buffer", ui.stdin)
        data = stream.read()
        return data.encode() if isinstance(data, str) else bytes(data)
    try:
        json.loads(args.body)
    except ValueError as exc:
        raise UsageError(
            f"BODY is not JSON ({exc}); quote text as a JSON string ('\"hello\"'), or use --file or - for raw bytes"
        ) from None
    return str(args.body).encode()


def _headers(pairs: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--header {pair!r}: expected NAME=VALUE")
        headers[name] = value
    return headers


async def run(args: argparse.Namespace, ui: Ui) -> int:
    try:
        body = _body(args, ui)
        headers = _headers(args.header)
        if args.count < 1:
            raise UsageError("--count must be at least 1")
        if args.id is not None and args.count != 1:
            raise UsageError("--id names one message: it cannot go with --count above 1")
    except UsageError as exc:
        ui.note(f"msgkit send: {exc}")
        return EXIT_USAGE
    check_name("topic", args.topic)
    for group in args.group:
        check_name("group", group)
    ids: list[str] = []
    async with connected(args.url, args.connect_timeout) as broker:
        for group in args.group:
            await broker.declare(args.topic, group)
        bar = ui.progress("sent", args.count) if args.count > _CHUNK else nullcontext()
        with bar as progress:
            while len(ids) < args.count:
                n = min(_CHUNK, args.count - len(ids))
                batch = [
                    Message(body=body, id=args.id or new_message_id(), key=args.key, headers=headers) for _ in range(n)
                ]
                ids += await broker.send_batch(args.topic, batch)
                if progress is not None:
                    progress(len(ids), args.count)
    if args.json:
        ui.json({"topic": args.topic, "ids": ids})
    elif len(ids) == 1:
        ui.say(f"sent {ids[0]} to {args.topic}")
    else:
        ui.say(f"sent {len(ids)} messages to {args.topic} (first {ids[0]}, last {ids[-1]})")
    return EXIT_OK

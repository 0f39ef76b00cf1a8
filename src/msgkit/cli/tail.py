"""``msgkit tail``: print a group's messages as they arrive, acknowledging them or giving them back."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

from msgkit.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    add_broker_options,
    command_parser,
    connected,
    count,
    positive_float,
    stop_on_signals,
)
from msgkit.cli.output import Ui, decode_body
from msgkit.errors import MsgkitError
from msgkit.message import ACK, Delivery
from msgkit.names import check_name
from msgkit.transports.base import Subscription

#: Messages a tail without --ack prints (and holds) when no --limit is given.
DEFAULT_PEEK_LIMIT = 100
#: The most a tail without --ack may hold: each is leased to it until it stops.
MAX_HELD = 10_000
_BATCH = 100
#: One fetch waits at most this long, so a stop request (Ctrl-C) is seen quickly.
_FETCH_SLICE = 0.5


def register(commands: Any) -> None:
    parser = command_parser(
        commands,
        "tail",
        help="print a group's messages as they arrive (without --ack they stay for the group)",
        description=f"""
            Print the messages of (TOPIC, GROUP) as they arrive: id, key, attempt, headers, and the
            body (JSON indented, text, else base64). With --json, one JSON object per line.

            tail joins GROUP as one more competing consumer: it sees only the messages the broker
            hands to it, not those that go to the group's other consumers. Use a group of its own to
            see every message of a topic (where the transport fans out), or the group itself to look
            at what waits there. A new group is created, and on Kafka and Redis starts from the
            oldest message.

            Without --ack nothing is consumed: tail holds each message it printed (so it sees each
            once and other consumers do not get it meanwhile), and when it stops (--limit,
            --timeout, Ctrl-C) gives them all back to the group at once. It stops after --limit
            messages (default {DEFAULT_PEEK_LIMIT}, at most {MAX_HELD}). On SQS a message
            given back counts one receive more for consumers in other processes.

            With --ack each message is acknowledged once printed: it is gone from the group.
            """,
        examples="""
            msgkit tail redis://localhost:6379/0 orders billing --limit 10
            msgkit tail amqp://guest:guest@localhost/ orders debug-tail --ack --timeout 30
            msgkit tail kafka://localhost:9092 orders billing --json --timeout 5 | jq .body
            """,
    )
    parser.set_defaults(handler=run)
    add_broker_options(parser)
    parser.add_argument("topic", metavar="TOPIC")
    parser.add_argument("group", metavar="GROUP")
    parser.add_argument("--ack", action="store_true", help="acknowledge each message once printed (consumes it)")
    parser.add_argument(
        "--limit",
        type=count,
        default=None,
        metavar="N",
        help=f"stop after N messages (default: none with --ack; {DEFAULT_PEEK_LIMIT} without)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="stop once no message arrived for this long (default: wait until Ctrl-C)",
    )


def record(delivery: Delivery) -> dict[str, Any]:
    """A delivery as a JSON object: the body parsed when JSON, else text, else base64."""
    kind, body = decode_body(delivery.body)
    return {
        "id": delivery.id,
        "topic": delivery.topic,
        "group": delivery.group,
        "key": delivery.key,
        "attempt": delivery.attempt,
        "timestamp": delivery.message.timestamp,
        "headers": dict(delivery.headers),
        "body_format": kind,
        "body": body,
    }


def _show(delivery: Delivery, ui: Ui) -> None:
    if ui.as_json:
        ui.json(record(delivery), one_line=True)
        return
    ui.rule(f"{delivery.id}  key={delivery.key or '-'}  attempt={delivery.attempt}")
    for name, value in delivery.headers.items():
        ui.say(f"  {name}: {value}")
    ui.body(delivery.body)


async def run(args: argparse.Namespace, ui: Ui) -> int:
    limit = args.limit if args.limit is not None else (0 if args.ack else DEFAULT_PEEK_LIMIT)
    if not args.ack and not 1 <= limit <= MAX_HELD:
        ui.note(
            f"msgkit tail: without --ack give a --limit from 1 to {MAX_HELD} (each message is held until tail stops)"
        )
        return EXIT_USAGE
    check_name("topic", args.topic)
    check_name("group", args.group)
    prefetch = limit if not args.ack else min(limit or _BATCH, _BATCH)
    async with connected(args.url, args.connect_timeout) as broker:
        subscription = await broker.transport.subscribe(args.topic, args.group, prefetch=prefetch)
        held: list[Delivery] = []
        try:
            printed = await _tail(subscription, args, limit, held, ui)
        finally:
            await _give_back(subscription, held, ui)
    if not args.json:
        done = "acknowledged" if args.ack else f"given back to {args.group}"
        ui.note(f"{printed} message(s) from {args.topic}/{args.group}, {done}")
    return EXIT_OK


async def _tail(subscription: Subscription, args: argparse.Namespace, limit: int, held: list[Delivery], ui: Ui) -> int:
    """Fetch and print until the limit, the idle timeout or a signal; return how many were printed."""
    loop = asyncio.get_running_loop()
    printed = 0
    seen: set[str] = set()
    idle_since = loop.time()
    with stop_on_signals() as stop:
        while not stop.is_set() and (limit == 0 or printed < limit):
            wait = _FETCH_SLICE
            if args.timeout is not None:
                left = idle_since + args.timeout - loop.time()
                if left <= 0:
                    break
                wait = min(wait, left)
            batch = await subscription.fetch(_BATCH if limit == 0 else min(_BATCH, limit - printed), wait)
            if not batch:
                continue
            idle_since = loop.time()
            if args.ack:
                fresh = list(batch)
            else:
                held.extend(batch)  # a message held past a visibility timeout may come again: show it once
                fresh = [d for d in batch if d.id not in seen]
                seen.update(d.id for d in fresh)
            for delivery in fresh:
                _show(delivery, ui)
            printed += len(fresh)
            if args.ack:
                await subscription.settle([(d, ACK) for d in batch])
    return printed


async def _give_back(subscription: Subscription, held: list[Delivery], ui: Ui) -> None:
    """Release what tail holds, then detach; what cannot be released returns after the broker's timeout."""
    try:
        if held:
            await subscription.release(held)
    except MsgkitError as exc:
        ui.note(
            f"msgkit tail: could not give back every message at once ({exc}); the rest return to the group "
            "after the broker's visibility or session timeout"
        )
    finally:
        with contextlib.suppress(MsgkitError):
            await subscription.close()

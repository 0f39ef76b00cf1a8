"""``msgkit check``: connect to a broker, round-trip one message, print what the transport guarantees."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
import uuid
from typing import Any

from msgkit.cli.common import (
    EXIT_BROKER,
    EXIT_OK,
    add_broker_options,
    command_parser,
    connected,
    delete_throwaway,
    positive_float,
)
from msgkit.cli.output import Ui
from msgkit.message import ACK, Delivery, Message
from msgkit.names import check_name
from msgkit.transports.base import Subscription


def register(commands: Any) -> None:
    parser = command_parser(
        commands,
        "check",
        help="connect, round-trip one message, and print the transport's capabilities",
        description="""
            Check that a broker URL works: connect, declare a topic and a group, send one message,
            receive and acknowledge it, and report the time each step took and the capabilities of
            the transport (fan-out, ordering, native delay, maximum message size...).

            The topic and group are new ones named msgkit-check-<random>, deleted afterwards; with
            --topic T the check uses a new group of T, which stays (remove it with msgkit delete
            URL T GROUP, GROUP as reported). Exit 0 when the round trip worked, 2 for a bad URL, 3 when the broker is
            unreachable or the message did not come back within --timeout.
            """,
        examples="""
            msgkit check redis://localhost:6379/0
            msgkit check amqp://guest:guest@localhost/ --json | jq .capabilities
            msgkit check "sqs://localhost:9324?region=us-east-1&secure=false" --topic smoke-test
            """,
    )
    parser.set_defaults(handler=run)
    add_broker_options(parser)
    parser.add_argument("--topic", metavar="T", help="use topic T (default: a new msgkit-check-<random>)")
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the message to come back (default 30)",
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def run(args: argparse.Namespace, ui: Ui) -> int:
    name = f"msgkit-check-{uuid.uuid4().hex[:12]}"
    topic = check_name("topic", args.topic) if args.topic else name
    started = time.perf_counter()
    async with connected(args.url, args.connect_timeout) as broker:
        connect_s = time.perf_counter() - started
        report: dict[str, Any] = {
            "url": broker.url,
            "transport": type(broker.transport).__name__,
            "topic": topic,
            "group": name,
            "connect_ms": _ms(connect_s),
        }
        t = time.perf_counter()
        await broker.declare(topic, name)
        report["declare_ms"] = _ms(time.perf_counter() - t)
        subscription = await broker.transport.subscribe(topic, name, prefetch=10)
        try:
            message = Message.of({"msgkit_check": name}, headers={"msgkit-check": "1"})
            t = time.perf_counter()
            await broker.send_batch(topic, [message])
            report["send_ms"] = _ms(time.perf_counter() - t)
            got = await _receive(subscription, message.id, args.timeout)
            report["round_trip_ms"] = _ms(time.perf_counter() - t)
        finally:
            await subscription.close()
        report["deleted"] = not args.topic and await delete_throwaway(broker, topic, name, ui)
        report["capabilities"] = dataclasses.asdict(broker.capabilities)
    if got is None:
        ui.note(f"msgkit check: sent a message to {topic} but it did not come back within {args.timeout:g}s")
        return EXIT_BROKER
    report["ok"] = True
    if args.json:
        ui.json(report)
        return EXIT_OK
    ui.say(f"ok: {report['url']} ({report['transport']})")
    ui.fields(
        {
            "connect": f"{report['connect_ms']} ms",
            "declare": f"{report['declare_ms']} ms",
            "send": f"{report['send_ms']} ms",
            "round trip": f"{report['round_trip_ms']} ms (send, receive, acknowledge)",
            "topic/group": f"{topic}/{name}" + (" (deleted)" if report["deleted"] else " (kept)"),
        }
    )
    ui.table(("CAPABILITY", "VALUE"), [(k, str(v)) for k, v in report["capabilities"].items()])
    return EXIT_OK


async def _receive(subscription: Subscription, message_id: str, timeout: float) -> Delivery | None:
    """Fetch until the message ``message_id`` comes; acknowledge everything fetched (the group is ours)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        batch = await subscription.fetch(10, min(left, 1.0))
        if batch:
            await subscription.settle([(d, ACK) for d in batch])
        for delivery in batch:
            if delivery.id == message_id:
                return delivery
    return None

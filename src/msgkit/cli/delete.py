"""``msgkit delete``: delete a group with everything it holds, and its topic once no group is left."""

from __future__ import annotations

import argparse
from typing import Any

from msgkit.cli.common import EXIT_OK, EXIT_USAGE, add_broker_options, command_parser, connected
from msgkit.cli.output import Ui
from msgkit.names import check_name


def register(commands: Any) -> None:
    parser = command_parser(
        commands,
        "delete",
        help="delete a group (messages, dead letters, offsets) and its topic once no group is left",
        description="""
            Delete GROUP of TOPIC with everything the broker keeps for it: pending and delayed
            messages, dead letters, offsets, retry and delay queues. Then delete TOPIC too, with its
            messages, when the broker shows no other group of it (how far each broker can tell:
            docs/concepts.md). Stop the group's consumers first. Deleting what does not exist is
            fine. Asks for confirmation unless --yes; without a terminal, --yes is required.
            """,
        examples="""
            msgkit delete redis://localhost:6379/0 orders billing
            msgkit delete kafka://localhost:9092 load-test load-test-group --yes --json
            """,
    )
    parser.set_defaults(handler=run)
    add_broker_options(parser)
    parser.add_argument("topic", metavar="TOPIC")
    parser.add_argument("group", metavar="GROUP")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


async def run(args: argparse.Namespace, ui: Ui) -> int:
    check_name("topic", args.topic)
    check_name("group", args.group)
    if not args.yes and not _confirmed(args, ui):
        return EXIT_USAGE
    async with connected(args.url, args.connect_timeout) as broker:
        await broker.delete(args.topic, args.group)
        url = broker.url
    if args.json:
        ui.json({"deleted": {"url": url, "topic": args.topic, "group": args.group}})
    else:
        ui.say(f"deleted group {args.group} of {args.topic} (and the topic if no group of it was left) on {url}")
    return EXIT_OK


def _confirmed(args: argparse.Namespace, ui: Ui) -> bool:
    if not ui.stdin.isatty():
        ui.note("msgkit delete: pass --yes to confirm when not run interactively")
        return False
    what = f"group {args.group} of topic {args.topic}, with its messages and dead letters"
    print(f"delete {what} for good? [y/N] ", end="", file=ui.err, flush=True)
    if ui.stdin.readline().strip().lower() not in ("y", "yes"):
        ui.note("nothing deleted")
        return False
    return True

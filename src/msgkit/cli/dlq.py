"""``msgkit dlq list|show|replay|purge``: a group's dead letters."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
from typing import Any

from msgkit.cli.common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    add_broker_options,
    command_parser,
    connected,
    count,
)
from msgkit.cli.output import Ui
from msgkit.dlq import DeadLetterInfo


def register(commands: Any) -> None:
    dlq = command_parser(
        commands,
        "dlq",
        help="list, show, replay or purge a group's dead letters",
        description="""
            The dead letters of a (topic, group): messages whose retries ran out or whose body could
            not be decoded, each with headers saying why. list and show leave them in place.
            """,
        examples="""
            msgkit dlq list redis://localhost:6379/0 orders billing
            msgkit dlq show redis://localhost:6379/0 orders billing 0192f3a4-...
            msgkit dlq replay redis://localhost:6379/0 orders billing --all
            msgkit dlq purge redis://localhost:6379/0 orders billing --all --yes --json
            """,
    )
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str, example: str) -> argparse.ArgumentParser:
        p = command_parser(actions, name, help=text, description=text, examples=example)
        p.set_defaults(handler=run)
        add_broker_options(p)
        p.add_argument("topic", metavar="TOPIC")
        p.add_argument("group", metavar="GROUP")
        p.add_argument(
            "--wait",
            type=float,
            default=2.0,
            metavar="SECONDS",
            help="how long to wait for the first dead letter before concluding there is none (default 2)",
        )
        return p

    url = "redis://localhost:6379/0 orders billing"
    p = action("list", "list dead letters with their reasons (leaves them in place)", f"msgkit dlq list {url}")
    p.add_argument("--limit", type=count, default=100, help="at most this many (default 100; 0 for all)")
    p = action("show", "show one dead letter in full, body included (leaves it in place)", f"msgkit dlq show {url} ID")
    p.add_argument("id", metavar="ID", help="the message id")
    p = action(
        "replay",
        "send dead letters back to their topic (same id, attempts reset) and remove them",
        f"msgkit dlq replay {url} ID1 ID2\nmsgkit dlq replay {url} --all",
    )
    p.add_argument("ids", nargs="*", metavar="ID", help="message ids (or --all)")
    p.add_argument("--all", action="store_true", help="every dead letter of the group")
    p = action("purge", "delete dead letters for good", f"msgkit dlq purge {url} --all --yes")
    p.add_argument("ids", nargs="*", metavar="ID", help="message ids (or --all)")
    p.add_argument("--all", action="store_true", help="every dead letter of the group")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def as_json(info: DeadLetterInfo, with_body: bool) -> dict[str, Any]:
    """A dead letter as a JSON object (the body, text or base64, only ``with_body``)."""
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


def _table(infos: list[DeadLetterInfo], ui: Ui) -> None:
    if not infos:
        ui.say("no dead letters")
        return
    rows = []
    for i in infos:
        reason = i.reason if len(i.reason) <= 70 else i.reason[:67] + "..."
        rows.append((i.id, str(i.attempts or "-"), _when(i.last_failed_at), i.error_type or "-", reason))
    ui.table(("ID", "ATTEMPTS", "LAST FAILED (UTC)", "ERROR", "REASON"), rows)


async def run(args: argparse.Namespace, ui: Ui) -> int:
    if args.action in ("replay", "purge") and bool(args.ids) == bool(args.all):
        ui.note(f"msgkit dlq {args.action}: give message ids or --all (not both)")
        return EXIT_USAGE
    async with connected(args.url, args.connect_timeout) as broker:
        dead = await broker.dead_letters(args.topic, args.group, wait=args.wait)
        if args.action == "list":
            infos = await dead.peek(limit=args.limit or None)
            if args.json:
                ui.json([as_json(i, False) for i in infos])
            else:
                _table(infos, ui)
            return EXIT_OK
        if args.action == "show":
            info = await dead.show(args.id)
            if info is None:
                ui.note(f"no dead letter with id {args.id} in {args.topic}/{args.group}")
                return EXIT_NOT_FOUND
            if args.json:
                ui.json(as_json(info, True))
            else:
                ui.fields({k: v for k, v in as_json(info, True).items() if k not in ("body", "body_base64")})
                ui.body(info.body)
            return EXIT_OK
        ids = None if args.all else args.ids
        if args.action == "purge" and not args.yes and not _confirmed(args, ids, ui):
            return EXIT_USAGE
        verb = "replayed" if args.action == "replay" else "purged"
        with ui.progress(verb, len(ids) if ids is not None else None) as progress:
            if args.action == "replay":
                done = await dead.replay(ids, progress)
            else:
                done = await dead.purge(ids, progress)
    missing = sorted(set(ids) - set(done)) if ids is not None else []
    if args.json:
        ui.json({verb: done, "not_found": missing})
    else:
        ui.say(f"{verb} {len(done)} dead letter(s) of {args.topic}/{args.group}")
        for message_id in missing:
            ui.note(f"not found: {message_id}")
    return EXIT_NOT_FOUND if missing else EXIT_OK


def _confirmed(args: argparse.Namespace, ids: list[str] | None, ui: Ui) -> bool:
    what = "ALL dead letters" if ids is None else f"{len(ids)} dead letter(s)"
    if not ui.stdin.isatty():
        ui.note("msgkit dlq purge: pass --yes to confirm when not run interactively")
        return False
    print(f"delete {what} of {args.topic}/{args.group} for good? [y/N] ", end="", file=ui.err, flush=True)
    if ui.stdin.readline().strip().lower() not in ("y", "yes"):
        ui.note("nothing deleted")
        return False
    return True

"""The msgkit CLI on memory://, run in-process: send, tail, check, bench, errors and --help."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import msgkit
from msgkit.cli import build_parser, main


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def cli(*argv: str, stdin: io.IOBase | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err, stdin=stdin or io.StringIO())
    return code, out.getvalue(), err.getvalue()


def lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def url() -> str:
    """A private in-memory broker; leases last 30 s, longer than any test."""
    return f"memory://cli-{uuid.uuid4().hex[:10]}"


def test_send_then_tail_ack_prints_each_message_once_and_consumes_it(url: str) -> None:
    code, out, _ = cli("send", url, "orders", '{"id": 7, "items": ["a"]}', "--group", "g", "--key", "k7",
                       "--header", "source=cli", "--header", "trace=a=b", "--json")  # fmt: skip
    assert code == 0
    sent = json.loads(out)
    assert sent["topic"] == "orders"
    assert len(sent["ids"]) == 1

    code, out, err = cli("tail", url, "orders", "g", "--ack", "--timeout", "0.3", "--json")
    assert code == 0
    [record] = lines(out)
    assert record["id"] == sent["ids"][0]
    assert (record["key"], record["attempt"], record["group"]) == ("k7", 1, "g")
    assert record["headers"] == {"source": "cli", "trace": "a=b"}
    assert (record["body_format"], record["body"]) == ("json", {"id": 7, "items": ["a"]})
    assert err == ""  # --json: nothing but records, and no chatter either

    assert cli("tail", url, "orders", "g", "--ack", "--timeout", "0.3", "--json")[1] == ""  # consumed


def test_tail_without_ack_leaves_the_messages_for_the_group(url: str) -> None:
    ids = json.loads(cli("send", url, "t", '"hello"', "--group", "g", "--count", "3", "--json")[1])["ids"]

    code, out, err = cli("tail", url, "t", "g", "--limit", "2")
    assert code == 0
    assert out.count("--- ") == 2
    assert out.count('"hello"') == 2  # a JSON string body is shown as JSON
    assert "2 message(s) from t/g, given back to g" in err

    async def consume() -> list[msgkit.Delivery]:
        got: list[msgkit.Delivery] = []
        done = asyncio.Event()

        async def handle(delivery: msgkit.Delivery) -> None:
            got.append(delivery)
            if len(got) == 3:
                done.set()

        async with msgkit.Broker(url) as broker:
            consumer = broker.consumer("t", "g", handle)
            await consumer.start()
            await asyncio.wait_for(done.wait(), 5)
            await consumer.stop()
        return got

    got = asyncio.run(consume())
    assert sorted(d.id for d in got) == sorted(ids)
    assert all(d.attempt == 1 for d in got)  # giving back is not an attempt


def test_tail_shows_text_and_binary_bodies(url: str, tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(b"\x00\xffbinary")
    assert cli("send", url, "t", "--file", str(tmp_path / "blob"), "--group", "g")[0] == 0
    assert cli("send", url, "t", "-", "--group", "g", stdin=io.BytesIO(b"plain text, not JSON"))[0] == 0
    code, out, _ = cli("tail", url, "t", "g", "--json", "--timeout", "0.3")
    assert code == 0
    records = lines(out)
    assert [(r["body_format"], r["body"]) for r in records] == [
        ("base64", "AP9iaW5hcnk="),
        ("text", "plain text, not JSON"),
    ]
    code, out, _ = cli("tail", url, "t", "g", "--timeout", "0.3")
    assert "(binary, 8 bytes, base64) AP9iaW5hcnk=" in out
    assert "plain text, not JSON" in out


def test_send_many_shows_a_summary_and_every_id_is_sent(url: str) -> None:
    code, out, _ = cli("send", url, "t", "{}", "--group", "g", "--count", "1201")
    assert code == 0
    assert out.startswith("sent 1201 messages to t")
    code, out, _ = cli("tail", url, "t", "g", "--ack", "--json", "--timeout", "0.3")
    assert len({r["id"] for r in lines(out)}) == 1201


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["not json"], "BODY is not JSON"),
        ([], "give exactly one body"),
        (["{}", "--file", "x"], "give exactly one body"),
        (["--file", "/nonexistent/file"], "cannot read --file"),
        (["{}", "--header", "novalue"], "expected NAME=VALUE"),
        (["{}", "--id", "a", "--count", "2"], "cannot go with --count"),
        (["{}", "--count", "0"], "--count must be at least 1"),
    ],
)
def test_send_refuses_bad_input_with_exit_2(url: str, argv: list[str], expected: str) -> None:
    code, out, err = cli("send", url, "t", *argv)
    assert code == 2
    assert expected in err
    assert out == ""


def test_tail_without_ack_needs_a_bounded_limit(url: str) -> None:
    code, _, err = cli("tail", url, "t", "g", "--limit", "0")
    assert code == 2
    assert "--limit from 1 to 10000" in err


def test_check_round_trips_and_prints_the_capabilities(url: str) -> None:
    code, out, _ = cli("check", url, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True
    assert report["transport"] == "MemoryTransport"
    assert report["round_trip_ms"] >= 0
    assert report["capabilities"]["fan_out"] is True
    assert set(report["capabilities"]) >= {"fan_out", "ordered", "native_delay", "max_message_size", "persistent"}

    code, out, _ = cli("check", url, "--topic", "smoke")
    assert code == 0
    assert "round trip" in out
    assert "max_message_size" in out
    assert "smoke/msgkit-check-" in out


def test_bench_reports_counts_that_match(url: str) -> None:
    code, out, _ = cli("bench", url, "--count", "500", "--size", "64", "--max-in-flight", "50", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["sent"] == report["received"] == 500
    assert report["duplicates"] == 0
    assert report["max_in_flight"] == 50
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["check", "nats://user:hunter2@host"], "unknown URL scheme 'nats'"),
        (["check", "redis://user:hunter2@host:port/0"], "malformed broker URL"),
        (["send", "memory://?nope=1&password=hunter2", "t", "{}"], "unknown option(s) nope"),
        (["tail", "memory://", "bad topic", "g"], "invalid topic name"),
        (["bench", "memory://", "--count", "0"], "--count and --max-in-flight must be at least 1"),
    ],
)
def test_bad_urls_and_names_exit_2_without_secrets(argv: list[str], expected: str) -> None:
    code, out, err = cli(*argv)
    assert code == 2
    assert expected in err
    assert "hunter2" not in err
    assert out == ""


def test_usage_errors_exit_2_from_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["tail", "memory://", "t"])  # GROUP missing
    assert info.value.code == 2
    assert "GROUP" in capsys.readouterr().err


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(((*path, name), sub))
                found += _commands(sub, (*path, name))
    return found


def test_every_command_has_a_description_examples_and_json() -> None:
    commands = _commands(build_parser())
    assert {c[0] for c in commands} >= {
        ("send",),
        ("tail",),
        ("check",),
        ("bench",),
        ("dlq", "list"),
        ("outbox", "relay"),
    }
    for path, parser in commands:
        text = parser.format_help()
        assert parser.description, path
        assert "examples:\n  msgkit " + path[0] in text, path
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        if leaf and path != ("outbox", "relay"):  # the relay runs until stopped and prints only logs
            assert "--json" in text, path
    assert "competing consumer" in build_parser()._subparsers._group_actions[0].choices["tail"].format_help()  # type: ignore[union-attr]


def test_rich_output_on_a_terminal_and_plain_text_without_rich(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    cli("send", url, "t", '{"x": 1}', "--group", "g")
    out, err = Terminal(), io.StringIO()
    assert main(["check", url], out=out, err=err) == 0
    assert "CAPABILITY" in out.getvalue()
    assert "│ fan_out" in out.getvalue()  # a rich table
    out = Terminal()
    assert main(["tail", url, "t", "g", "--timeout", "0.3"], out=out, err=err) == 0
    assert "attempt=1" in out.getvalue()
    assert '"x"' in out.getvalue()  # highlighted JSON (styles are escape codes around the tokens)
    out = Terminal()
    assert main(["bench", url, "--count", "50"], out=out, err=err) == 0
    assert "received  50 in" in out.getvalue()

    monkeypatch.setitem(sys.modules, "rich", None)  # as if the cli extra were not installed
    monkeypatch.setitem(sys.modules, "rich.console", None)
    out = Terminal()
    assert main(["check", url], out=out, err=err) == 0
    assert "CAPABILITY" in out.getvalue()
    assert "│" not in out.getvalue()
    out = Terminal()
    assert main(["tail", url, "t", "g", "--timeout", "0.3"], out=out, err=err) == 0
    assert '"x": 1' in out.getvalue()


def test_progress_on_a_terminal_uses_rich_when_there_and_a_plain_bar_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from msgkit.cli.output import Ui

    pytest.importorskip("rich")
    err = Terminal()
    with Ui(io.StringIO(), err, io.StringIO()).progress("sent", 10) as progress:
        assert progress is not None
        progress(10, 10)
    assert "10/10" in err.getvalue()
    monkeypatch.setitem(sys.modules, "rich.console", None)
    err = Terminal()
    with Ui(io.StringIO(), err, io.StringIO()).progress("sent", 10) as progress:
        assert progress is not None
        progress(5, 10)
    assert "sent [###############...............] 5/10" in err.getvalue()
    with Ui(io.StringIO(), io.StringIO(), io.StringIO()).progress("sent", 10) as progress:
        assert progress is None  # not a terminal: nothing


def test_importing_msgkit_does_not_import_rich() -> None:
    code = "import sys, msgkit, msgkit.cli; assert 'rich' not in sys.modules, 'rich imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dlq_show_prints_the_body(url: str) -> None:
    async def dead_letter_one() -> None:
        async with msgkit.Broker(url) as broker:
            await broker.declare("t", "g")
            await broker.send("t", b"\xffnot json")

            async def handle(body: dict[str, int]) -> None:
                raise AssertionError("never decoded")

            consumer = broker.consumer("t", "g", handle)
            dead = await broker.dead_letters("t", "g", wait=5)
            await consumer.start()
            infos = await dead.peek()
            await consumer.stop()
            assert len(infos) == 1

    asyncio.run(dead_letter_one())
    listed = json.loads(cli("dlq", "list", url, "t", "g", "--json", "--wait", "1")[1])
    code, out, _ = cli("dlq", "show", url, "t", "g", listed[0]["id"], "--wait", "1")
    assert code == 0
    assert "reason" in out
    assert "(binary, 9 bytes, base64) /25vdCBqc29u" in out


def _unread(url: str, topic: str, group: str) -> int:
    """Messages (topic, group) holds on the in-memory broker of ``url`` (declaring the group if gone)."""
    from msgkit.transports.memory import MemoryTransport

    return MemoryTransport.from_url(url).stats(topic, group).unread


def test_delete_asks_first_then_deletes_the_group_with_its_messages(url: str) -> None:
    async def seed() -> None:
        async with msgkit.Broker(url) as broker:
            await broker.declare("orders", "billing")
            await broker.send_batch("orders", [b"one", b"two"])

    asyncio.run(seed())
    code, _, err = cli("delete", url, "orders", "billing")  # no terminal, no --yes
    assert code == 2
    assert "--yes" in err
    code, _, err = cli("delete", url, "orders", "billing", stdin=Terminal("n\n"))
    assert code == 2
    assert "nothing deleted" in err
    assert _unread(url, "orders", "billing") == 2

    code, out, _ = cli("delete", url, "orders", "billing", "--yes", "--json")
    assert code == 0
    assert json.loads(out)["deleted"] == {"url": url, "topic": "orders", "group": "billing"}
    assert _unread(url, "orders", "billing") == 0, "the topic's messages survived the deletion"
    code, out, _ = cli("delete", url, "orders", "billing", stdin=Terminal("y\n"))  # gone already: fine
    assert code == 0
    assert "deleted group billing of orders" in out
    code, _, err = cli("delete", url, "orders", "bad group", "--yes")
    assert code == 2
    assert "invalid group name" in err


def test_check_and_bench_delete_their_throwaway_topic(url: str) -> None:
    from msgkit.transports.memory import _Namespace, _namespaces

    topics = _namespaces.setdefault(url.removeprefix("memory://"), _Namespace()).topics  # what the broker holds
    code, out, _ = cli("check", url, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["deleted"] is True
    assert report["topic"] not in topics
    code, out, _ = cli("check", url, "--topic", "smoke", "--json")
    assert json.loads(out)["deleted"] is False, "check deleted a topic it did not create"
    assert "smoke" in topics
    code, out, _ = cli("bench", url, "--count", "50", "--json")
    assert code == 0
    assert json.loads(out)["topic"] not in topics

"""The msgkit CLI against real brokers: send, tail (with and without --ack), check, bench, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

import msgkit
from msgkit.cli import main

BROKERS = ["rabbitmq", "redis", "kafka", "sqs"]


@pytest.fixture(params=BROKERS)
def url(request: pytest.FixtureRequest) -> str:
    value: str = request.getfixturevalue(f"msgkit_{request.param}_url")
    return value


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err, stdin=io.StringIO())
    return code, out.getvalue(), err.getvalue()


def records(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    return f"cli-{tag}", f"cli-g-{tag}"


def consume_ids(url: str, topic: str, group: str, count: int, timeout: float = 20) -> list[msgkit.Delivery]:
    """What a real consumer of (topic, group) receives: ``count`` deliveries within ``timeout``, else a
    failure. 20 s is shorter than the time after which brokers hand out what a vanished consumer held,
    so a tail that did not give its messages back fails here."""

    async def run() -> list[msgkit.Delivery]:
        got: list[msgkit.Delivery] = []
        done = asyncio.Event()

        async def handle(delivery: msgkit.Delivery) -> None:
            got.append(delivery)
            if len(got) >= count:
                done.set()

        async with msgkit.Broker(url) as broker:
            consumer = broker.consumer(topic, group, handle)
            await consumer.start()
            await asyncio.wait_for(done.wait(), timeout)
            await consumer.stop()
        return got

    return asyncio.run(run())


def test_send_then_tail_ack_sees_it_once(url: str) -> None:
    topic, group = names()
    code, out, _ = cli("send", url, topic, '{"n": 1}', "--group", group, "--key", "k", "--header", "a=b", "--json")
    assert code == 0
    [sent] = json.loads(out)["ids"]

    code, out, _ = cli("tail", url, topic, group, "--ack", "--limit", "1", "--timeout", "30", "--json")
    assert code == 0
    [got] = records(out)
    assert (got["id"], got["key"], got["headers"], got["body"]) == (sent, "k", {"a": "b"}, {"n": 1})

    [later] = json.loads(cli("send", url, topic, '{"n": 2}', "--json")[1])["ids"]
    code, out, _ = cli("tail", url, topic, group, "--ack", "--limit", "1", "--timeout", "30", "--json")
    assert code == 0
    assert [r["id"] for r in records(out)] == [later]  # the first was acknowledged: gone from the group


def test_tail_without_ack_leaves_the_messages_for_the_group(url: str) -> None:
    topic, group = names()
    code, out, _ = cli("send", url, topic, '"x"', "--group", group, "--count", "3", "--json")
    assert code == 0
    sent = json.loads(out)["ids"]

    code, out, err = cli("tail", url, topic, group, "--limit", "3", "--timeout", "30", "--json")
    assert code == 0, err
    assert sorted(r["id"] for r in records(out)) == sorted(sent)

    got = consume_ids(url, topic, group, 3)
    assert sorted(d.id for d in got) == sorted(sent)
    if not url.startswith("sqs"):  # SQS counts the tail's receive (in another process it could not know)
        assert all(d.attempt == 1 for d in got)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_tail_stopped_by_ctrl_c_gives_back_what_it_printed(broker: str, request: pytest.FixtureRequest) -> None:
    url: str = request.getfixturevalue(f"msgkit_{broker}_url")
    topic, group = names()
    sent = json.loads(cli("send", url, topic, "[1]", "--group", group, "--json")[1])["ids"]
    tail = subprocess.Popen(
        [sys.executable, "-m", "msgkit.cli", "tail", url, topic, group, "--limit", "5", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert tail.stdout is not None
        line = tail.stdout.readline()  # blocks until the message is printed
        assert json.loads(line)["id"] == sent[0]
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=30) == 0
    finally:
        tail.kill()
        tail.wait()
    assert [d.id for d in consume_ids(url, topic, group, 1)] == sent


def test_check_round_trips_and_prints_the_capabilities(url: str) -> None:
    code, out, err = cli("check", url, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] is True
    assert report["capabilities"] == asyncio.run(capabilities(url))
    assert report["round_trip_ms"] > 0
    assert report["deleted"] is True, err
    assert "guest:guest" not in out


async def capabilities(url: str) -> dict[str, object]:
    """The transport's capabilities once connected (some, like Redis persistence, are read from the broker)."""
    async with msgkit.Broker(url) as broker:
        return dataclasses.asdict(broker.capabilities)


def test_bench_reports_counts_that_match(url: str) -> None:
    code, out, err = cli("bench", url, "--count", "300", "--size", "100", "--max-in-flight", "50", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["sent"] == report["received"] == 300
    assert report["latency_ms"]["max"] > 0


def test_delete_removes_the_group_and_its_messages(url: str) -> None:
    topic, group = names()
    code, _, err = cli("send", url, topic, '{"n": 1}', "--group", group)
    assert code == 0, err
    code, out, err = cli("delete", url, topic, group, "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["deleted"]["topic"] == topic
    assert "guest:guest" not in out
    code, _, err = cli("send", url, topic, '{"n": 2}', "--group", group)  # a fresh group on a fresh topic
    assert code == 0, err
    assert [d.message.body for d in consume_ids(url, topic, group, 1)] == [b'{"n": 2}']
    code, _, err = cli("delete", url, topic, group, "--yes")
    assert code == 0, err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_unreachable_broker_exits_3_quickly_without_secrets(url: str) -> None:
    parts = urlsplit(url)
    netloc = f"user:hunter2@127.0.0.1:{_closed_port()}"
    dead = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    started = time.monotonic()
    code, out, err = cli("check", dead, "--connect-timeout", "3")
    assert code == 3
    assert time.monotonic() - started < 10
    assert "unreachable" in err
    assert "hunter2" not in err
    assert out == ""


def test_bad_option_in_a_real_url_exits_2(url: str) -> None:
    bad = f"{url}{'&' if '?' in url else '?'}no_such_option=1"
    code, _, err = cli("check", bad)
    assert code == 2
    assert "no_such_option" in err

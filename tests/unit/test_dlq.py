"""Dead-letter tooling on memory://: peek, show, replay, purge, through the API and the CLI."""

from __future__ import annotations

import asyncio
import io
import json
import uuid

import pytest
from pydantic import BaseModel

import msgkit
from msgkit.cli import main
from msgkit.message import DLQ_REASON, FIRST_FAILED_AT

from .conftest import eventually


class Order(BaseModel):
    id: int


async def _fill(url: str, good: int, poison: list[bytes]) -> list[int]:
    """Run a consumer over ``good`` orders with ``poison`` bodies among them; return the good ids handled."""
    handled: list[int] = []
    async with msgkit.Broker(url) as broker:
        await broker.declare("t", "g")
        bodies: list[object] = [Order(id=i) for i in range(good)]
        for n, body in enumerate(poison):
            bodies.insert((n + 1) * len(bodies) // (len(poison) + 1), body)
        await broker.send_batch("t", bodies)

        async def handle(order: Order) -> None:
            handled.append(order.id)

        consumer = broker.consumer("t", "g", handle, max_in_flight=32)
        await consumer.start()
        await eventually(lambda: len(handled) == good, what="good messages handled")
        await eventually(lambda: consumer.in_flight == 0, what="all settled")
        await consumer.stop()
    return handled


@pytest.mark.asyncio
async def test_a_poison_pill_costs_one_dead_letter_and_no_stall(memory_url: str) -> None:
    handled = await _fill(memory_url, 1000, [b"\xffpoison"])
    assert sorted(handled) == list(range(1000))
    async with msgkit.Broker(memory_url) as broker:
        dead = await broker.dead_letters("t", "g", wait=0.1)
        first = await dead.peek()
        again = await dead.peek()
    assert [i.body for i in first] == [b"\xffpoison"]
    assert first == again  # peeking leaves them in place, attempts untouched
    assert first[0].reason.startswith("undecodable body")
    assert first[0].attempts == 1
    assert (first[0].topic, first[0].group) == ("t", "g")


@pytest.mark.asyncio
async def test_replay_selected_restores_them_exactly_once(memory_url: str) -> None:
    await _fill(memory_url, 10, [b"p1", b"p2", b"p3"])
    async with msgkit.Broker(memory_url) as broker:
        dead = await broker.dead_letters("t", "g", wait=0.1)
        infos = await dead.peek()
        chosen = {i.id for i in infos if i.body in (b"p1", b"p3")}
        assert await dead.show(next(iter(chosen))) is not None
        assert await dead.show("no-such-id") is None

        got: list[msgkit.Delivery] = []

        async def raw(delivery: msgkit.Delivery) -> None:
            got.append(delivery)

        consumer = broker.consumer("t", "g", raw)
        await consumer.start()
        replayed = await dead.replay(chosen | {"missing"})
        await eventually(lambda: len(got) == 2, what="replayed messages consumed")
        await consumer.stop()
        left = await dead.peek()
    assert set(replayed) == chosen
    assert {d.id for d in got} == chosen  # same ids, exactly once each
    assert all(d.attempt == 1 for d in got)  # attempts start again
    assert all(not any(h.startswith("msgkit-dlq-") for h in d.headers) for d in got)
    assert all(FIRST_FAILED_AT not in d.headers for d in got)
    assert [i.body for i in left] == [b"p2"]


@pytest.mark.asyncio
async def test_purge_selected_and_all(memory_url: str) -> None:
    await _fill(memory_url, 3, [b"p1", b"p2", b"p3"])
    async with msgkit.Broker(memory_url) as broker:
        dead = await broker.dead_letters("t", "g", wait=0.1)
        infos = await dead.peek()
        one = infos[0].id
        assert await dead.purge([one]) == [one]
        assert len(await dead.peek()) == 2
        progress: list[tuple[int, int | None]] = []
        assert len(await dead.purge(progress=lambda done, total: progress.append((done, total)))) == 2
        assert await dead.peek() == []
        assert progress[-1] == (2, None)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--wait", "0.1"] if len(argv) > 2 else list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_list_show_replay_purge() -> None:
    url = f"memory://cli-{uuid.uuid4().hex[:8]}"
    asyncio.run(_fill(url, 5, [b"bad-1", b"bad-2"]))

    code, out, _ = _cli("dlq", "list", url, "t", "g")
    assert code == 0
    assert "undecodable body" in out
    assert out.splitlines()[0].split()[:2] == ["ID", "ATTEMPTS"]

    code, out, _ = _cli("dlq", "list", url, "t", "g", "--json")
    listed = json.loads(out)
    assert code == 0
    assert len(listed) == 2
    assert {item["error_type"] for item in listed} == {"DecodeError"}

    code, out, _ = _cli("dlq", "show", url, "t", "g", listed[0]["id"], "--json")
    shown = json.loads(out)
    assert code == 0
    assert shown["body"] in ("bad-1", "bad-2")
    assert shown["headers"][DLQ_REASON].startswith("undecodable body")
    assert _cli("dlq", "show", url, "t", "g", "nope")[0] == 1

    assert _cli("dlq", "replay", url, "t", "g")[0] == 2  # neither ids nor --all
    code, out, _ = _cli("dlq", "replay", url, "t", "g", listed[0]["id"], "--json")
    assert code == 0
    assert json.loads(out) == {"replayed": [listed[0]["id"]], "not_found": []}

    code, _, err = _cli("dlq", "purge", url, "t", "g", "--all")  # stdin is not a terminal under pytest
    assert code == 2
    assert "--yes" in err
    code, out, _ = _cli("dlq", "purge", url, "t", "g", "--all", "--yes")
    assert code == 0
    assert "purged 1 dead letter(s)" in out
    assert json.loads(_cli("dlq", "list", url, "t", "g", "--json")[1]) == []


def test_cli_errors_are_clear_and_secret_free() -> None:
    code, _, err = _cli("dlq", "list", "nats://user:hunter2@host", "t", "g")
    assert code == 2
    assert "unknown URL scheme 'nats'" in err
    assert "hunter2" not in err
    code, _, err = _cli("dlq", "list", "memory://x", "bad topic", "g")
    assert code == 2
    assert "invalid topic name" in err
    with pytest.raises(SystemExit) as info:
        _cli("dlq", "frobnicate")
    assert info.value.code == 2


def test_cli_progress_is_a_bar_on_a_terminal_and_silent_elsewhere() -> None:
    from msgkit.cli import _progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    show = _progress("replayed", err)
    show(5, 10)
    show(7, None)
    assert "replayed [###############...............] 5/10" in err.getvalue()
    assert "\rreplayed 7 (" in err.getvalue()
    assert _progress("replayed", io.StringIO()) is None

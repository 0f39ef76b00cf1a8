"""A relay SIGKILLed between publishing a batch and marking it sent: nothing is lost, the only
duplicates are that batch, and every key's messages stay in order.

The relay runs in a child process and publishes through a tiny ``jsonl://PATH`` transport that
appends each message to a file and, on its ``hang_after``-th publish call, writes a marker file and
hangs: the parent then kills the child at exactly that point. The helpers here are shared with
the PostgreSQL version in tests/integration/test_outbox_postgres.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import msgkit
from msgkit.outbox import Outbox, OutboxRelay, create_schema, engine_from_url
from msgkit.transports.base import Capabilities, Subscription, Transport

REPO = Path(__file__).resolve().parents[2]
TOPIC = "orders"
KEYS = ("k0", "k1", "k2", "k3")


class JsonlTransport(Transport):
    """Publishes by appending JSON lines to a file; hangs on the ``hang_after``-th publish call."""

    schemes = ("jsonl",)

    def __init__(self, path: str, hang_after: int = 0) -> None:
        self.path = path
        self.hang_after = hang_after
        self.calls = 0

    @classmethod
    def from_url(cls, url: str, settings: Any = None) -> JsonlTransport:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        return cls(parts.path, int(query.get("hang_after", ["0"])[0]))

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(False, False, True, False, 0.0, 1 << 20, 0.0, True)

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def declare(self, topic: str, group: str | None = None) -> None:
        pass

    def _append(self, messages: Sequence[msgkit.Message]) -> None:
        with open(self.path, "a") as f:
            for m in messages:
                line = {"pid": os.getpid(), "id": m.id, "key": m.key, "body": json.loads(m.body), "headers": m.headers}
                f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    async def publish(self, topic: str, messages: Sequence[msgkit.Message]) -> None:
        await asyncio.to_thread(self._append, messages)
        self.calls += 1
        if self.calls == self.hang_after:
            await asyncio.to_thread(Path(self.path + ".hung").write_text, str(os.getpid()))
            await asyncio.sleep(3600)

    async def subscribe(self, topic: str, group: str, *, prefetch: int) -> Subscription:
        raise NotImplementedError

    async def subscribe_dead_letters(self, topic: str, group: str, *, prefetch: int) -> Subscription:
        raise NotImplementedError


# The child: a relay on DB_URL (optionally in a PostgreSQL schema) publishing to jsonl://PATH.
CHILD = """
import asyncio, signal, sys
from msgkit.transports.registry import register_transport
from tests.unit.test_outbox_kill import JsonlTransport
from msgkit.outbox import OutboxRelay, engine_from_url

register_transport("jsonl", JsonlTransport)
db_url, broker_url, schema = sys.argv[1], sys.argv[2], sys.argv[3]

async def main():
    options = {"connect_args": {"server_settings": {"search_path": schema}}} if schema else {}
    relay = OutboxRelay(engine_from_url(db_url, **options), broker_url, batch_size=10, poll_interval=0.05,
                        publish_timeout=1.5, lock_lease=2.0)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, relay.request_stop)
    await relay.run()

asyncio.run(main())
"""


async def add_rows(engine: AsyncEngine, count: int) -> list[str]:
    """Add ``count`` messages over KEYS, round robin, in transactions of 7; return their ids."""
    sessions = async_sessionmaker(engine)
    outbox = Outbox()
    ids: list[str] = []
    for start in range(0, count, 7):
        async with sessions() as session, session.begin():
            for n in range(start, min(start + 7, count)):
                key = KEYS[n % len(KEYS)]
                headers = {"traceparent": f"00-{n:032x}-{n:016x}-01"}
                ids.append(await outbox.add(session, TOPIC, {"key": key, "n": n}, key=key, headers=headers))
    return ids


async def start_child(db_url: str, jsonl: Path, schema: str = "") -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    broker_url = f"jsonl://{jsonl}?hang_after=2"
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, db_url, broker_url, schema, cwd=REPO, env=env
    )


async def kill_at_hang(child: asyncio.subprocess.Process, jsonl: Path, timeout: float = 30) -> None:
    marker = Path(str(jsonl) + ".hung")
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(marker.exists):
        if child.returncode is not None:
            raise AssertionError(f"the relay child exited early with {child.returncode}")
        if time.monotonic() > deadline:
            child.kill()
            await child.wait()
            raise AssertionError("the relay child never reached its second batch")
        await asyncio.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    await asyncio.wait_for(child.wait(), 10)


async def finish_with_a_second_relay(engine: AsyncEngine, jsonl: Path, timeout: float = 30) -> OutboxRelay:
    relay = OutboxRelay(
        engine, msgkit.Broker(transport=JsonlTransport(str(jsonl))), poll_interval=0.05, lock_lease=2, publish_timeout=1
    )
    await relay.start()
    deadline = time.monotonic() + timeout
    while await relay.pending():
        assert time.monotonic() < deadline, "the second relay did not drain the outbox"
        await asyncio.sleep(0.05)
    await relay.stop()
    return relay


def check_published(jsonl: Path, ids: list[str], child_pid: int, batch_size: int = 10) -> None:
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    published = [line["id"] for line in lines]
    assert set(published) == set(ids), "a message was lost"
    seen: set[str] = set()
    duplicates = []
    for message_id in published:
        if message_id in seen:
            duplicates.append(message_id)
        seen.add(message_id)
    from_child = [line["id"] for line in lines if line["pid"] == child_pid]
    # the child's first batch was marked sent; its second was published and never marked: those
    # (and only those) come again
    assert duplicates == from_child[batch_size:]
    assert len(duplicates) == batch_size
    for key in KEYS:
        ns = [line["body"]["n"] for line in lines if line["key"] == key]
        first_seen = list(dict.fromkeys(ns))
        assert first_seen == sorted(first_seen), f"key {key} out of order: {ns}"
        for pid in {line["pid"] for line in lines}:
            mine = [line["body"]["n"] for line in lines if line["key"] == key and line["pid"] == pid]
            assert mine == sorted(set(mine)), f"publisher {pid} sent key {key} out of order: {mine}"
    for line in lines:  # headers (trace context) travel through the row unchanged
        n = line["body"]["n"]
        assert line["headers"] == {"traceparent": f"00-{n:032x}-{n:016x}-01"}


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_sqlite_relay_killed_mid_batch_loses_nothing_and_keeps_key_order(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'service.db'}"
    jsonl = tmp_path / "published.jsonl"
    engine = engine_from_url(db_url)
    try:
        await create_schema(engine)
        ids = await add_rows(engine, 60)
        child = await start_child(db_url, jsonl)
        await kill_at_hang(child, jsonl)
        relay = await finish_with_a_second_relay(engine, jsonl)  # takes over when the dead lock expires
        assert relay.published == 50
        check_published(jsonl, ids, child.pid)
    finally:
        await engine.dispose()

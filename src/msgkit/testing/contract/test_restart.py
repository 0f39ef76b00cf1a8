"""Broker restarts: producers and consumers recover on their own and nothing sent is lost.

Runs only with ``--msgkit-restart-command "CMD"`` (or ``$MSGKIT_<BROKER>_RESTART_COMMAND``).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

import msgkit
from msgkit.testing.contract.helpers import WAIT, Received, contract_run, eventually, require

PRODUCERS = 10
#: How long a producer keeps retrying one send while the broker is down, in seconds.
SEND_DEADLINE = 90.0


async def _restart(command: str) -> None:
    process = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, f"{command!r} exited with {process.returncode}:\n{output.decode(errors='replace')}"


@pytest.mark.timeout(300)
@pytest.mark.msgkit_capability("persistent")
@pytest.mark.asyncio
async def test_broker_restarts_under_load_lose_nothing(
    msgkit_contract_url: str, msgkit_restart_command: str | None
) -> None:
    if not msgkit_restart_command:
        pytest.skip("no broker restart command: pass --msgkit-restart-command CMD")
    async with contract_run(msgkit_contract_url) as run:
        require(run.capabilities.persistent, "persistent")
        topic, group = run.names()
        await run.broker.declare(topic, group)
        received = Received()
        await run.start(topic, group, received, max_in_flight=50)
        sent: set[str] = set()
        producing = True

        async def send_retrying(message_id: str) -> None:
            deadline = time.monotonic() + SEND_DEADLINE
            while True:
                try:
                    await run.broker.send(topic, message_id.encode(), message_id=message_id)
                    return
                except msgkit.MsgkitError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

        async def producer(number: int) -> None:
            while producing:
                message_id = f"p{number}-{uuid.uuid4().hex}"
                await send_retrying(message_id)
                sent.add(message_id)
                await asyncio.sleep(0.01)  # a steady stream, not a flood

        async def sent_another(count: int) -> None:
            goal = len(sent) + count
            await eventually(lambda: len(sent) >= goal, SEND_DEADLINE, lambda: f"producers stalled at {len(sent)}")

        producers = [asyncio.create_task(producer(n)) for n in range(PRODUCERS)]
        try:
            for _ in range(2):
                await sent_another(200)
                await _restart(msgkit_restart_command)
            await sent_another(200)  # the producers recovered
        finally:
            producing = False
            await asyncio.gather(*producers)
        await received.wait_for(sent, timeout=SEND_DEADLINE + WAIT)

"""Broker.run() stops every consumer gracefully on SIGTERM and SIGINT (in a real process)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

SERVICE = textwrap.dedent(
    """
    import asyncio, sys
    import msgkit

    async def main() -> None:
        broker = msgkit.Broker("memory://svc")
        handled = []

        @broker.subscriber("orders", "billing", max_in_flight=4)
        async def bill(body: bytes) -> None:
            print("started", body.decode(), flush=True)
            await asyncio.sleep(0.3)  # in flight when the signal arrives
            handled.append(body)

        @broker.subscriber("orders", "audit")
        async def audit(body: bytes) -> None:
            pass

        await broker.declare("orders", "billing")
        await broker.declare("orders", "audit")
        await broker.send("orders", b"o-1")
        await broker.run()
        stats = broker.transport.stats("orders", "billing")
        print("stopped", len(handled), stats.leased, stats.ready + stats.unread + stats.delayed, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_after_in_flight_work(sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVICE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == "started o-1", first + proc.stderr.read() if proc.stderr else ""
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    # the in-flight message finished and was acked: nothing leased, nothing left to deliver
    assert out.strip() == "stopped 1 0 0", err

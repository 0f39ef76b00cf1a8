"""Child processes of a run (consumers and producers), their output, and their memory."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO

_READY_TIMEOUT = 60.0


class Child:
    """One ``python -m chaos.<module>`` process; stderr goes to a log file, stdout is read by line."""

    def __init__(self, process: asyncio.subprocess.Process, log: IO[bytes], name: str) -> None:
        self.process = process
        self.name = name
        self.lines: list[str] = []
        self._log = log
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, module: str, args: list[str], log_path: Path, name: str) -> Child:
        log = log_path.open("ab")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, *args, stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True
        )
        return cls(process, log, name)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").strip())
            self._changed.set()
        self._changed.set()

    async def wait_for_line(self, prefix: str, timeout: float = _READY_TIMEOUT) -> str:
        """The first output line starting with ``prefix``; raise if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            if self._reader.done() or self.process.returncode is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}) before printing {prefix!r}")
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name} printed no {prefix!r} line in {timeout:.0f} s")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def last_number(self, prefix: str) -> int:
        """The number after ``prefix`` on the latest line that has it (0 if none)."""
        for line in reversed(self.lines):
            if line.startswith(prefix):
                return int(line.split()[1])
        return 0

    def kill(self) -> None:
        """SIGKILL, no goodbye."""
        if self.process.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    async def stop(self, timeout: float) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; return the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.kill()
            code = await self.process.wait()
        await self.close()
        return code

    async def close(self) -> None:
        await self.process.wait()
        await self._reader
        self._log.close()


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB, from /proc (Linux); None if unavailable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def run_shell(command: str, timeout: float = 180.0) -> tuple[int, str]:
    """Run ``command`` in a shell; return its exit code and output."""
    process = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace")

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

import msgkit


@pytest.fixture
def memory_url() -> str:
    """A private in-memory broker per test."""
    return f"memory://unit-{uuid.uuid4().hex[:10]}?visibility_timeout=0.5"


@pytest_asyncio.fixture
async def broker(memory_url: str) -> AsyncIterator[msgkit.Broker]:
    async with msgkit.Broker(memory_url) as b:
        yield b


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds, failing after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


async def wait_for(awaitable: Awaitable[object], timeout: float = 5.0) -> None:
    await asyncio.wait_for(awaitable, timeout)

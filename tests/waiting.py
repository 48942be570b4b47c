"""Waiting for a condition with a deadline (never a bare sleep-and-hope)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 60.0,  # noqa: ASYNC109 - a deadline, not a cancellation scope
    message: str = "condition",
    interval: float = 0.01,
) -> Any:
    """Poll a sync or async ``predicate`` until truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


class LoopTurns:
    """``async with LoopTurns() as turns``: ``turns.n`` counts how often the
    event loop ran a task that yields (after ``pause`` seconds each time)
    while the block runs; it stays put while something holds the loop."""

    def __init__(self, pause: float = 0.0) -> None:
        self.n = 0
        self.pause = pause
        self._task: asyncio.Task[None] | None = None

    async def _turn(self) -> None:
        while True:
            await asyncio.sleep(self.pause)
            self.n += 1

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.ensure_future(self._turn())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

"""Requests in flight, for the graceful shutdown: those whose client has gone too.

aiohttp's graceful shutdown waits for the requests of the connections it
still has, then cancels them. A request whose client went away is not one
of them any more: aiohttp lets its handler run on (``handler_cancellation``
is off, as it should be: the action and its record go on without the
client) but forgets it, so the shutdown closed the engine under it. A chat
whose provider had the document then lost its ``ai.interaction`` ("the
spool is closed"), and a login its ``auth.login_failed``. Here every
request is known until it ends, and the shutdown gives those still running
the time the others got, then cancels them (a chat cut off so is recorded
as ``cancelled``) before the engine closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

log = logging.getLogger("session_audit")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# How long a request still running once cancelled may take to end (a
# cancelled chat records its interaction on the way out).
CANCELLED_SECONDS = 5.0


class InFlight:
    """The tasks running a request now (a strong reference to each: aiohttp
    drops its own when the client goes)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.shutdown_began: float | None = None

    def __len__(self) -> int:
        return len(self._tasks)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - aiohttp runs handlers in tasks
            return await handler(request)
        self._tasks.add(task)
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self._tasks.discard(task)
            if not self._tasks:
                self._idle.set()

    async def on_shutdown(self, app: web.Application) -> None:
        self.shutdown_began = asyncio.get_running_loop().time()

    async def finish(self, allowed: float) -> None:
        """Wait for the requests still running until ``allowed`` seconds
        after the shutdown began, then cancel them and wait a little more."""
        if not self._tasks:
            return
        loop = asyncio.get_running_loop()
        began = self.shutdown_began if self.shutdown_began is not None else loop.time()
        log.info("shutting down: waiting up to %.0f s for %d requests still running (a"
                 " client gone away does not stop its request)",
                 max(0.0, began + allowed - loop.time()), len(self._tasks))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(began + allowed):
                await self._idle.wait()
        if not self._tasks:
            return
        log.warning("shutting down: cancelling %d requests still running after %.0f s",
                    len(self._tasks), allowed)
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCELLED_SECONDS):
                await self._idle.wait()


def requests_ctx(allowed: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` whose teardown is :meth:`InFlight.finish`; put after
    the engine's (torn down before it)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[IN_FLIGHT].finish(allowed)

    return ctx


IN_FLIGHT = web.AppKey("in_flight", InFlight)

"""Regressions of a hunt for what one logged-in user (or one client) can take
from everyone else: the spool's space, the writer, the event loop.

- ``spool_max_bytes`` was checked against the file as the last commit left
  it, so every job submitted while a commit ran was taken: one user sending
  ``POST /audit/events`` of 100 events of 4 KiB on 256 connections at once
  took a 64 MiB spool to 183 MB (on 64, to 87 MB), past the reserve that
  keeps ``GET /audit/status`` and ``POST /audit/flush`` answering, which
  then got 503 (21 of 24 polls). Now the jobs taken and not yet committed
  count too (a request of client events at its size).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from api_fixtures import MakeApi, make_api
from live_server import free_port
from waiting import wait_for

from audit.store import Writer
from handlers.admin import operational_reserve

__all__ = ["make_api"]

EVENTS = 100
DETAILS = 4000  # bytes of details an event, about API.md's 4 KiB


async def test_requests_taken_while_a_commit_runs_stay_within_the_spools_limit(
    make_api: MakeApi,
) -> None:
    # The sink is a closed port: nothing leaves the spool meanwhile.
    api = await make_api(
        audit={"spool_max_bytes": 4 << 20},
        sink={"type": "http", "http": {"url": f"http://127.0.0.1:{free_port()}"}},
    )
    spool = api.engine.spool
    alice, admin = await api.user("alice"), await api.admin()
    room = 2 << 20
    spool.max_bytes = spool.spool_bytes + room
    body = json.dumps([{"action": "client.big", "details": {"k": "x" * (DETAILS - 8)}}]
                      * EVENTS)
    request_bytes = EVENTS * (DETAILS + 200)  # what one request adds, at least
    n = 16  # (n * request_bytes is three times the room)

    entered, release = threading.Event(), threading.Event()

    def hold(w: Writer) -> None:  # the commit that runs while the requests come
        entered.set()
        assert release.wait(10)

    held = spool.submit_nowait(hold, needs_space=False)
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)

    async def post() -> int:
        resp = await api.client.post("/audit/events", data=body, headers={
            **alice.headers, "Content-Type": "application/json"})
        await resp.read()
        return resp.status

    posts = [asyncio.ensure_future(post()) for _ in range(n)]
    try:
        # Every request either queued behind the held commit or answered.
        await wait_for(lambda: len(spool._pending) + sum(p.done() for p in posts) == n,
                       message="every request queued or answered")
    finally:
        release.set()
    await held
    statuses = await asyncio.gather(*posts)
    taken = statuses.count(202)
    assert statuses.count(503) == n - taken
    # Taken while there was room, and at most one request past it.
    assert 0 < taken <= room // request_bytes + 1, statuses
    assert spool.spool_bytes < spool.max_bytes + operational_reserve(spool.max_bytes)
    # The way to see and clear a full spool still answers.
    resp = await api.client.get("/audit/status", headers=admin.headers)
    body_status: dict[str, Any] = await resp.json()
    assert resp.status == 200, body_status
    assert spool.full
    resp = await api.client.get("/readyz")
    assert resp.status == 503

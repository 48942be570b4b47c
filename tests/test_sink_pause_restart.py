"""A rate-limit pause outlives the process (real server subprocess, kill -9,
a real HTTP receiver on loopback): a sink billed per request that answered
429 with Retry-After is not written to again at once by a restarted server."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from live_server import Live, free_port
from receiver import Fault, Receiver, serve
from waiting import wait_for

pytestmark = pytest.mark.timeout(120)


def _saved_pause(spool: Path) -> str | None:
    with contextlib.closing(sqlite3.connect(f"file:{spool}?mode=ro", uri=True)) as c:
        row = c.execute("SELECT value FROM meta WHERE key = 'sink_pause'").fetchone()
    return row[0] if row else None


async def _status(live: Live) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        _, headers = await live.admin_login(http)
        async with http.get(live.base + "/audit/status", headers=headers) as r:
            assert r.status == 200
            status: dict[str, Any] = await r.json()
            return status


async def test_a_killed_server_waits_out_the_retry_after_its_sink_asked_for(
        tmp_path: Path) -> None:
    receiver = Receiver()
    receiver.script(Fault(429, {"Retry-After": "30"}))
    runner, port = await serve(receiver, "127.0.0.1", free_port())
    live = Live(tmp_path, {"sink": {"type": "http", "http": {
        "url": f"http://127.0.0.1:{port}"}}})
    try:
        await live.start()
        async with aiohttp.ClientSession() as http, http.post(  # a security event
                live.base + "/token", json={"username": "admin", "password": "wrong"}) as r:
            assert r.status == 401
        asked = time.time()
        spool = live.data_dir / "spool.db"
        await wait_for(lambda: _saved_pause(spool), message="the pause kept in the spool")
        assert receiver.stats["status_429"] == 1
        sent = sum(receiver.stats[k] for k in receiver.stats if k.startswith("status_"))
        await live.kill()

        await live.start()
        st = await _status(live)
        until = st["sink"]["backoff_until"]
        assert until is not None, st["sink"]
        left = datetime.fromisoformat(until.replace("Z", "+00:00")).timestamp() - asked
        assert 25 < left < 35, until
        assert st["pending_security_events"] >= 1
        assert sum(receiver.stats[k] for k in receiver.stats
                   if k.startswith("status_")) == sent
        await wait_for(lambda: "that has not ended" in live.log_tail(),
                       message="the resumed pause's log line")
        # ... with the sink open: a start took it for one not open yet (a
        # second's wait, "not open yet; serving anyway", the start's checks
        # against the sink skipped), and status and /metrics said it
        # unhealthy until the pause ended (rate limited, it is healthy).
        assert st["sink"]["healthy"] is True, st["sink"]
        assert await live.stop() == 0  # (its log is all out once it stopped)
        assert "not open yet" not in live.log_tail()
    finally:
        live.close()
        await runner.cleanup()
        receiver.close()


"""Crash storm, end to end: SIGKILL the server under concurrent users, lose nothing.

The server runs as a real subprocess, once on the embedded sqlite sink and once
on the http sink against ``tests/receiver.py`` (its own subprocess, rate
limited to 5 writes/s, failing 30 % of writes with 429 + Retry-After, 503 and
timeouts that store the write but answer too late). Simulated users log in,
create, open, update, chat, send client events and log out in loops while the
server is killed with SIGKILL at random moments and restarted; users keep their
tokens across restarts. Afterwards the oracle (tests/storm_client.py) checks
what the sink holds: every event promised by an answer is stored exactly once
and intact, chains verify, interrupted sessions are complete, nothing is
duplicated, and the server still serves a fresh login.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from live_server import AUDIT_KEY, Live, free_port
from storm_client import UNCERTAIN, Expect, Oracle, User

USERS = 7
KILLS = 4
PASSWORD = "storm-password"

pytestmark = pytest.mark.slow


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    lives: list[Live] = []

    def make(settings: dict[str, Any]) -> Live:
        lv = Live(tmp_path, settings)
        lives.append(lv)
        return lv

    yield make  # type: ignore[misc]
    for lv in lives:
        lv.close()


def _read_sqlite(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        parts = [json.loads(r[0]) for r in conn.execute("SELECT doc FROM parts")]
        sec = [json.loads(r[0]) for r in conn.execute("SELECT doc FROM security_events")]
    finally:
        conn.close()
    return parts, sec


async def _storm(lv: Live, seed: int, think: float = 0.0) -> tuple[Oracle, dict[str, float]]:
    rng = random.Random(seed)
    oracle = Oracle()
    stop = asyncio.Event()
    up = asyncio.Event()
    up.set()
    timings: dict[str, float] = {}

    async def wait_up() -> None:
        await asyncio.wait_for(up.wait(), 60)
        await lv.wait_healthy(60)

    async def killer() -> None:
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(1.5, 4.0))  # pacing a random kill moment
            up.clear()
            await lv.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            started = time.monotonic()
            await lv.start()
            timings.setdefault("restart_max", 0.0)
            timings["restart_max"] = max(timings["restart_max"], time.monotonic() - started)
            up.set()
        await asyncio.sleep(1.5)
        stop.set()

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        users = [User(f"user{i}", PASSWORD, lv.base, http, oracle, wait_up, seed * 100 + i,
                      think)
                 for i in range(USERS)]
        t0 = time.monotonic()
        await asyncio.gather(killer(), *(u.run(stop) for u in users))
        timings["storm"] = time.monotonic() - t0
        # After the storm: everyone is logged out; a fresh login and action work.
        fresh = User("user0", PASSWORD, lv.base, http, oracle, wait_up, seed)
        fresh.n = 1_000_000
        await fresh.login()
        assert fresh.token is not None
        rid, res = await fresh.call("POST", "/documents", json={"title": "after", "content": "x"})
        assert res is not UNCERTAIN and res[0] == 201, res
        oracle.expect(Expect(rid, "document.create", "user0", fresh.sid,
                             target_id=res[1]["id"]))
        await fresh.logout()
    assert not oracle.unexpected, oracle.unexpected[:20]
    return oracle, timings


async def _finish(lv: Live) -> dict[str, float]:
    """Graceful stop, then ``server.py drain``; returns timings."""
    assert await lv.stop() == 0, lv.log_tail()
    t0 = time.monotonic()
    r = await lv.cli("drain", timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    st = await lv.cli("status")
    status = json.loads(st.stdout)
    assert status["pending_parts"] == 0 and status["pending_security_events"] == 0, status
    assert status["dead_letter"] == 0, status
    return {"drain": time.monotonic() - t0, "active_sessions": status["active_sessions"]}


async def _setup_users(lv: Live) -> None:
    await asyncio.gather(*(lv.adduser(f"user{i}", PASSWORD) for i in range(USERS)))


@pytest.mark.timeout(300)
async def test_crash_storm_sqlite_sink(live: Any) -> None:
    lv: Live = live({
        "audit": {"part_max_events": 6},
        "flush": {"max_writes_per_second": 200.0, "burst": 50,
                  "backoff_base_seconds": 0.05, "backoff_max_seconds": 1.0},
    })
    await _setup_users(lv)
    await lv.start()
    oracle, timings = await _storm(lv, seed=11)
    assert lv.kills >= 3
    timings.update(await _finish(lv))
    r = await lv.cli("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    parts, sec = _read_sqlite(lv.data_dir / "audit.db")
    counts = oracle.check(AUDIT_KEY.encode(), parts, sec)
    # Logins cut by a kill may have opened sessions nobody holds a token for.
    assert timings["active_sessions"] <= oracle.unanswered_logins
    print(f"\nsqlite storm: {counts}, kills={lv.kills}, statuses={dict(oracle.statuses)},"
          f" timings={ {k: round(v, 2) for k, v in timings.items()} }")


@pytest.mark.timeout(300)
async def test_crash_storm_http_sink(live: Any, tmp_path: Path) -> None:
    rport = free_port()
    store = tmp_path / "received.db"
    lv: Live = live({
        "audit": {"part_max_events": 12},
        "flush": {"max_writes_per_second": 5.0, "burst": 5,
                  "backoff_base_seconds": 0.05, "backoff_max_seconds": 1.0},
        "sink": {"type": "http", "http": {"url": f"http://127.0.0.1:{rport}",
                                          "timeout_seconds": 1.0}},
    })
    await lv.start_receiver(rport, store, rate=5, fail_share=0.3, hang_seconds=2.0, seed=7)
    await _setup_users(lv)
    await lv.start()
    oracle, timings = await _storm(lv, seed=12, think=0.25)
    assert lv.kills >= 3
    timings.update(await _finish(lv))
    await lv.stop_receiver()
    parts, sec = _read_sqlite(store)
    counts = oracle.check(AUDIT_KEY.encode(), parts, sec)
    assert timings["active_sessions"] <= oracle.unanswered_logins
    conn = sqlite3.connect(store)
    stats = dict(conn.execute("SELECT key, n FROM stats").fetchall())
    conn.close()
    # The receiver really was hostile.
    assert stats.get("status_429", 0) + stats.get("status_503", 0) > 0, stats
    print(f"\nhttp storm: {counts}, kills={lv.kills}, statuses={dict(oracle.statuses)},"
          f" receiver={stats}, timings={ {k: round(v, 2) for k, v in timings.items()} }")

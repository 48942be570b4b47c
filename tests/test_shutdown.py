"""Graceful shutdown: a second SIGTERM or SIGINT during it does not stop it
half way (real server subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from live_server import Live
from waiting import wait_for


@pytest.fixture
def slow_sink_server(tmp_path: Path) -> Iterator[Live]:
    # A sink budget of one write a minute: the failed logins below are still
    # pending at shutdown, so the shutdown spends its whole flush window.
    lv = Live(tmp_path, {"flush": {"max_writes_per_second": 1 / 60, "burst": 1}})
    yield lv
    lv.close()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
async def test_a_second_signal_during_shutdown_does_not_cut_it_short(
    slow_sink_server: Live, second: signal.Signals
) -> None:
    lv = slow_sink_server
    await lv.start()
    async with aiohttp.ClientSession() as http:
        for i in range(3):
            async with http.post(lv.base + "/token",
                                 json={"username": f"nobody{i}", "password": "x" * 8}) as r:
                assert r.status == 401
    proc = lv.proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)

    async def shutting_down() -> bool:
        # The listening socket closes first: then the flush window has begun.
        try:
            async with aiohttp.ClientSession() as http, http.get(lv.base + "/healthz"):
                return False
        except aiohttp.ClientError:
            return True

    await wait_for(shutting_down, 20, "the server to begin shutting down", interval=0.02)
    proc.send_signal(second)
    try:
        # A guard against a hang (the bug: forever), not a timing.
        rc = await asyncio.to_thread(proc.wait, 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the server hung after a second signal:\n"
                             + lv.log_tail()) from None
    log = lv.log_tail(20_000)
    assert rc == 0, log
    assert "already shutting down" in log
    assert "Traceback" not in log
    # Closed, not abandoned: the last connection to close removes the WAL file.
    assert (lv.data_dir / "spool.db").exists()
    assert not (lv.data_dir / "spool.db-wal").exists(), log
    assert not (lv.data_dir / "audit.db-wal").exists(), log
    # What the flush window could not send is still pending for the next
    # start; nothing is lost.
    pending = json.loads((await lv.cli("status")).stdout)["pending_security_events"]
    with contextlib.closing(sqlite3.connect(lv.data_dir / "audit.db")) as sink:
        stored = sink.execute("SELECT COUNT(*) FROM security_events").fetchone()[0]
    assert pending >= 1 and pending + stored == 3, (pending, stored)

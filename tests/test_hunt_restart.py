"""Restarts with a changed config.toml over a spool that holds state (real
server subprocesses): a start that cannot serve touches nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from live_server import ADMIN_PASSWORD, SERVER, Live, merge, server_env, to_toml

pytestmark = pytest.mark.timeout(120)


def _reconfigure(live: Live, over: dict[str, object]) -> None:
    live.settings = merge(live.settings, over)
    live.config_path.write_text(to_toml(live.settings), encoding="utf-8")


def _digest(path: Path) -> str:
    """The spool's content (not its pages): what a start may not change."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as c:
        return hashlib.sha256("\n".join(c.iterdump()).encode()).hexdigest()


async def _open_session_with_events(live: Live, n: int) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(live.base + "/token",
                             json={"username": "admin", "password": ADMIN_PASSWORD}) as r:
            assert r.status == 200
            token = (await r.json())["access_token"]
        events = [{"action": "client.step", "details": {"n": i}} for i in range(n)]
        async with http.post(live.base + "/audit/events", json=events,
                             headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 202


async def test_a_start_that_cannot_listen_leaves_the_spool_and_sinks_alone(
        live: Live) -> None:
    # A session left open with 60 uncut events, then a config whose start
    # would cut them into parts (part_max_events lowered) and send them to a
    # new sink, on a port another process holds.
    await live.start()
    await _open_session_with_events(live, 60)
    assert await live.stop() == 0
    spool = live.data_dir / "spool.db"
    before = _digest(spool)
    jsonl = live.workdir / "new-sink"
    _reconfigure(live, {"audit": {"part_max_events": 10},
                        "sink": {"type": "jsonl", "jsonl": {"dir": str(jsonl)}}})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", live.port))
        taken.listen()
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(SERVER), "serve", "--config",
                             str(live.config_path)],
            cwd=live.workdir, env=server_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"session-audit: server.host / server.port: cannot listen on 127.0.0.1:{live.port}:"
    ), done.stderr
    # Nothing cut, marked, created or sent: the start never began.
    assert _digest(spool) == before
    assert not jsonl.exists()

    # The port free, the same config serves, and does what it had to.
    await live.start()
    assert live.proc is not None and live.proc.poll() is None
    assert await live.stop() == 0
    assert _digest(spool) != before
    assert jsonl.is_dir()

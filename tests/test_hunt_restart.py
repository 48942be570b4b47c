"""Restarts with a changed config.toml over a spool that holds state (real
server subprocesses): a start that cannot serve touches nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from live_server import SERVER, Live, merge, server_env, take_port, to_toml
from waiting import wait_for

from audit import queries
from audit.spool import connect

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
        _, headers = await live.admin_login(http)
        events = [{"action": "client.step", "details": {"n": i}} for i in range(n)]
        async with http.post(live.base + "/audit/events", json=events, headers=headers) as r:
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
    with take_port(live.port):
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


async def _failed_login(http: aiohttp.ClientSession, live: Live, name: str) -> None:
    async with http.post(live.base + "/token",
                         json={"username": name, "password": "wrong-password"}) as r:
        assert r.status == 401


async def _settled(live: Live, *, dead: int) -> None:
    """Until nothing is pending in the spool and ``dead`` items are dead letters
    (the counts ``server.py status`` shows, read here: a command's start per
    look took seconds of each test)."""
    def settled() -> bool:
        conn = connect(live.data_dir / "spool.db", "full", readonly=True)
        try:
            counts = queries.counts(conn, time.time())
        finally:
            conn.close()
        return bool(counts["pending_security_events"] == 0 and counts["pending_parts"] == 0
                    and counts["dead_letter"] == dead)

    await wait_for(settled, timeout=60, message=f"nothing pending, {dead} dead letters",
                   interval=0.05)


async def _three_failed_logins_the_second_dead_lettered(live: Live) -> None:
    """The sqlite sink takes auth.login_failed of "first" and "third" and
    refuses "refused"'s (a dead letter); the server stopped after."""
    await live.start()
    async with aiohttp.ClientSession() as http:
        await _failed_login(http, live, "first")
        await _settled(live, dead=0)
        with contextlib.closing(sqlite3.connect(live.data_dir / "audit.db")) as c, c:
            # A copy of it under its _id with another hash gets there first:
            # a conflict, the one refusal of an event as such (a trigger's
            # RAISE is the file's trouble, retried: see sinks/sqlite.py).
            c.execute("CREATE TRIGGER refuse BEFORE INSERT ON security_events"
                      " WHEN NEW.doc LIKE '%\"refused\"%' BEGIN"
                      " INSERT INTO security_events (id, ts, action, hash, doc)"
                      " VALUES (NEW.id, NEW.ts, NEW.action, 'another hash', NEW.doc); END")
        await _failed_login(http, live, "refused")
        await _settled(live, dead=1)
        await _failed_login(http, live, "third")
        await _settled(live, dead=1)
    assert await live.stop() == 0


async def _moved_to_jsonl_and_retried(live: Live) -> None:
    """The operator moves from the sqlite sink to the jsonl one, a fourth
    login fails, retry-dead; verify on each sink finds its two events whole."""
    _reconfigure(live, {"sink": {"type": "jsonl"}})
    await live.start()
    async with aiohttp.ClientSession() as http:
        await _failed_login(http, live, "fourth")
        r = await live.cli("retry-dead")
        assert r.returncode == 0, r.stderr
        # The command wakes nothing in the server, whose idle flusher looks
        # again within 5 s (test_flusher_poison): woken here, as an operator
        # can, instead of waiting those seconds out.
        _, headers = await live.admin_login(http)
        async with http.post(live.base + "/audit/flush", headers=headers) as f:
            assert f.status == 202
    await _settled(live, dead=0)
    assert await live.stop() == 0

    r = await live.cli("verify")  # the new sink: "refused" and "fourth"
    assert r.returncode == 0 and "2 security events" in r.stdout, r.stdout + r.stderr
    _reconfigure(live, {"sink": {"type": "sqlite"}})
    r = await live.cli("verify")  # the old one: "first" and "third"
    assert r.returncode == 0 and "2 security events" in r.stdout, r.stdout + r.stderr


async def test_a_security_dead_letter_retried_into_the_next_sink_is_no_break_in_either(
        live: Live) -> None:
    # The sqlite sink refuses one security event (it holds another event
    # under its _id): a dead letter. The operator moves to the jsonl sink and runs
    # retry-dead. The chain is whole across the two: the refused event is in
    # the new sink, its neighbours in the old one; verify on each said the
    # chain broke there, for good.
    await _three_failed_logins_the_second_dead_lettered(live)
    await _moved_to_jsonl_and_retried(live)

    # Still held: the event the new sink took alone, removed there, is found.
    _reconfigure(live, {"sink": {"type": "jsonl"}})
    jsonl = next((live.data_dir / "audit-jsonl").glob("audit-*.jsonl"))
    lines = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
    jsonl.write_text("".join(x for x in lines if '"refused"' not in x), encoding="utf-8")
    r = await live.cli("verify")
    assert r.returncode == 1 and "earlier stretch" in r.stdout, r.stdout


async def test_a_security_dead_letter_an_earlier_release_left_is_no_break_after_a_switch(
        live: Live) -> None:
    # As above, but the dead letter is an earlier release's: a spool from
    # before security_late (97b0b1d) has no note of its place in the chain.
    # Upgraded, moved to the jsonl sink and retry-dead: verify on the old
    # sink said its successor 'does not continue a security chain', for good.
    # (Its place is known while the event before it is in the spool: kept.)
    _reconfigure(live, {"audit": {"keep_stored_seconds": 3600}})
    await _three_failed_logins_the_second_dead_lettered(live)
    with contextlib.closing(sqlite3.connect(live.data_dir / "spool.db")) as c, c:
        assert c.execute("SELECT count(*) FROM security_late").fetchone() == (1,)
        c.execute("DROP TABLE security_late")  # the earlier release's spool:
        c.execute("DROP TABLE IF EXISTS sink_resumes")  # neither table
    await _moved_to_jsonl_and_retried(live)

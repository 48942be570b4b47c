"""Graceful shutdown: a second SIGTERM or SIGINT during it does not stop it
half way (real server subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from live_server import SERVER, Live, server_env
from openai_stub import OpenAIStub
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

    await wait_for(shutting_down, 60, "the server to begin shutting down", interval=0.02)
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


async def test_sighup_shuts_down_gracefully(tmp_path: Path) -> None:
    """A closed terminal's SIGHUP killed the server at once (exit 129, no
    shutdown: what the flush window would send, and the security events'
    counts not yet summarised, were left for the next start). Now it is the
    graceful shutdown SIGTERM starts."""
    lv = Live(tmp_path, {})
    try:
        await lv.start()
        async with aiohttp.ClientSession() as http, http.post(
                lv.base + "/token", json={"username": "nobody", "password": "x" * 8}) as r:
            assert r.status == 401
        proc = lv.proc
        assert proc is not None
        proc.send_signal(signal.SIGHUP)
        try:
            rc = await asyncio.to_thread(proc.wait, 60)  # a guard against a hang
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the server did not stop on SIGHUP:\n"
                                 + lv.log_tail()) from None
        log = lv.log_tail(20_000)
        assert rc == 0, log  # (killed by the signal: -1)
        assert "Traceback" not in log
        assert not (lv.data_dir / "spool.db-wal").exists(), log  # closed, not abandoned
    finally:
        lv.close()


async def test_sighup_ignored_by_nohup_stays_ignored(tmp_path: Path) -> None:
    """Started under `nohup` (SIGHUP ignored), the server must outlive the
    terminal: handling SIGHUP as a shutdown undid what nohup asked for."""

    class NoHup(Live):
        def spawn(self) -> None:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, str(SERVER), "serve", "--config", str(self.config_path)],
                    cwd=self.workdir, env=server_env(), stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
                )
            self.starts += 1

    lv = NoHup(tmp_path, {})
    try:
        await lv.start()
        proc = lv.proc
        assert proc is not None
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(2)
        assert proc.poll() is None, lv.log_tail()
        async with aiohttp.ClientSession() as http, http.get(lv.base + "/healthz") as r:
            assert r.status == 200
    finally:
        lv.close()


@contextlib.asynccontextmanager
async def _a_held_provider(
    tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[Live, OpenAIStub]]:
    """A server whose AI provider (a stub) holds every chat: answers only
    once its gate opens, never here; both stopped at the end."""
    stub = OpenAIStub()
    stub.mode = "held"
    base_url = await stub.start()
    lv = Live(tmp_path, {"ai": {"provider": "openai",
                                "openai": {"base_url": base_url, "timeout_seconds": 300}},
                         **settings})
    try:
        yield lv, stub
    finally:
        await stub.stop()
        lv.close()


async def _a_chat_held_by_the_provider(
    lv: Live, stub: OpenAIStub, http: aiohttp.ClientSession
) -> tuple[dict[str, Any], str, asyncio.Future[None]]:
    """alice logs in, creates a document and asks about it (request id
    ``cut-off``); returns her login, the document's id and the chat's
    request, once the provider holds it."""
    await lv.adduser("alice", "alice-password")
    await lv.start()
    async with http.post(lv.base + "/token", json={"username": "alice",
                                                    "password": "alice-password"}) as r:
        assert r.status == 200
        login = await r.json()
    auth = {"Authorization": f"Bearer {login['access_token']}"}
    async with http.post(lv.base + "/documents", headers=auth,
                         json={"title": "t", "content": "the document"}) as r:
        assert r.status == 201
        doc = (await r.json())["id"]

    async def chat() -> None:
        async with http.post(f"{lv.base}/documents/{doc}/chat", json={"message": "hi"},
                             headers={**auth, "X-Request-ID": "cut-off"}) as r:
            await r.read()

    asking = asyncio.ensure_future(chat())
    await asyncio.wait_for(stub.arrived.wait(), 30)
    return login, doc, asking


def _the_chats_event(lv: Live, session_id: str) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(lv.data_dir / "spool.db")) as spool:
        events = [json.loads(j) for (j,) in spool.execute(
            "SELECT json FROM events WHERE session_id = ? ORDER BY seq", (session_id,))]
        begun = spool.execute("SELECT key FROM meta WHERE key LIKE 'begun:%'").fetchall()
    assert begun == []  # (the note of the chat under way: gone with its event)
    (ev,) = [e for e in events if e["request_id"] == "cut-off"]
    assert (ev["action"], ev["outcome"]) == ("ai.interaction", "failure"), ev
    assert ev["details"]["prompt"]["length"] == 2 and ev["actor"]["user"] == "alice"
    return ev


async def test_a_chat_cut_off_by_the_shutdown_is_recorded(tmp_path: Path) -> None:
    """The provider holds the chat past the shutdown's wait for requests in
    flight: the server cancels it, and the interaction (the document was sent)
    is recorded all the same, as a failure with reason ``cancelled``. (A
    grace of 2 s, not serve's 20 s: the same path, 18 s less waiting.)"""
    async with _a_held_provider(tmp_path, server={"shutdown_grace_seconds": 2.0}) as (
            lv, stub), aiohttp.ClientSession() as http:
        login, doc, asking = await _a_chat_held_by_the_provider(lv, stub, http)
        assert await lv.stop(timeout=60) == 0, lv.log_tail()
        with contextlib.suppress(aiohttp.ClientError):
            await asking
    ev = _the_chats_event(lv, login["session_id"])
    assert ev["details"]["reason"] == "cancelled" and ev["target"]["id"] == doc
    assert "Traceback" not in lv.log_tail(50_000)


async def test_a_chat_cut_off_by_sigkill_is_recorded_at_the_next_start(tmp_path: Path) -> None:
    """The server is killed (SIGKILL: the OOM killer, a power cut) while the
    provider holds a chat: the document has left the machine, but its event
    was to be recorded only once the provider answered, and nothing recorded
    that it had been asked. The chat is noted before the document goes; the
    next start records it, outcome failure, reason ``interrupted``, in its
    session, with its request id and when it began; the chain verifies."""
    async with _a_held_provider(tmp_path) as (lv, stub):
        async with aiohttp.ClientSession() as http:
            login, doc, asking = await _a_chat_held_by_the_provider(lv, stub, http)
            await lv.kill()
            with contextlib.suppress(aiohttp.ClientError):
                await asking
        await lv.start()
        assert await lv.stop() == 0, lv.log_tail()
        assert "recorded as interrupted" in lv.log_tail(50_000)
        verify = await lv.cli("verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
    ev = _the_chats_event(lv, login["session_id"])
    assert ev["details"]["reason"] == "interrupted" and ev["target"]["id"] == doc
    assert ev["details"]["started_at"] < ev["ts"]
    assert "Traceback" not in lv.log_tail(50_000)


async def test_a_chat_cut_off_by_sigkill_does_not_wake_a_session_that_went_idle_since(
    tmp_path: Path
) -> None:
    """The server is killed while the provider holds a chat and comes back
    after the session's idle timeout has passed: the session ended idle
    while the server was down. The chat's record at the start (in the
    session) counted as its activity: the session was open again, and
    alice's token, which should get 401, was taken for another idle
    timeout. Now the session ends first, as the reaper ends it (at its idle
    deadline), and the chat goes to the security stream as
    ``auth.session_ended``; the token gets 401."""
    idle = 3.0
    async with _a_held_provider(tmp_path, audit={"idle_timeout_seconds": idle,
                                                 "keep_stored_seconds": 3600}) as (lv, stub):
        async with aiohttp.ClientSession() as http:
            login, doc, asking = await _a_chat_held_by_the_provider(lv, stub, http)
            await lv.kill()
            with contextlib.suppress(aiohttp.ClientError):
                await asking
            await asyncio.sleep(idle + 1)  # idle past its timeout while the server is down
            await lv.start()
            auth = {"Authorization": f"Bearer {login['access_token']}"}
            async with http.get(lv.base + "/me", headers=auth) as r:
                assert r.status == 401, (r.status, await r.text())
        assert await lv.stop() == 0, lv.log_tail()
        verify = await lv.cli("verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
    with contextlib.closing(sqlite3.connect(lv.data_dir / "spool.db")) as spool:
        assert spool.execute("SELECT key FROM meta WHERE key LIKE 'begun:%'").fetchall() == []
        (reason,) = spool.execute("SELECT seal_reason FROM sessions WHERE session_id = ?",
                                  (login["session_id"],)).fetchone()
        events = [json.loads(j) for (j,) in spool.execute(
            "SELECT json FROM events WHERE session_id = ? ORDER BY seq", (login["session_id"],))]
        security = [json.loads(j) for (j,) in spool.execute(
            "SELECT json FROM security_events ORDER BY id")]
    assert reason == "idle_timeout"
    assert [e for e in events if e["request_id"] == "cut-off"] == []
    (ev,) = [e for e in security if e["request_id"] == "cut-off"]
    assert (ev["action"], ev["session_id"]) == ("auth.session_ended", login["session_id"])
    assert ev["details"]["action"] == "ai.interaction" and ev["target"]["id"] == doc
    assert ev["details"]["action_details"]["reason"] == "interrupted"

"""Backups and restores as README's Backups paragraph has them (SQLite's online
backup of a running server's files, restored with the server stopped), with
real server subprocesses: a spool restored from a backup older than its sink."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from live_server import Live
from waiting import wait_for

import server
from audit.events import Draft
from audit.rollback import catch_up_security_chain
from sinks.sqlite import SqliteSink

pytestmark = pytest.mark.timeout(120)


def _backup(src: Path, dst: Path) -> None:
    """``sqlite3 src ".backup dst"`` (SQLite's online backup)."""
    with contextlib.closing(sqlite3.connect(src)) as s, contextlib.closing(
            sqlite3.connect(dst)) as d:
        s.backup(d)


def _restore(backup: Path, data_dir: Path, name: str) -> None:
    for suffix in ("-wal", "-shm"):
        (data_dir / (name + suffix)).unlink(missing_ok=True)
    (data_dir / name).write_bytes(backup.read_bytes())


async def _bad_token(live: Live) -> None:
    """One security event (auth.invalid_token)."""
    async with aiohttp.ClientSession() as http, http.get(
            live.base + "/me", headers={"Authorization": "Bearer not-a-token"}) as r:
        assert r.status == 401


def _pending_security(live: Live) -> int:
    with contextlib.closing(sqlite3.connect(live.data_dir / "spool.db")) as c:
        n: int = c.execute(
            "SELECT COUNT(*) FROM security_events WHERE state != 'stored'").fetchone()[0]
        return n


async def _security_stored(live: Live) -> None:
    await wait_for(lambda: _pending_security(live) == 0, 10, "security events stored")


async def test_a_spool_restored_older_than_its_sink_goes_on_with_the_sinks_security_chain(
        live: Live) -> None:
    # The spool is backed up, the server goes on (security events reach the
    # sink), then the spool alone is restored: the sink holds events after
    # the spool's chain head. The next security event used to continue that
    # head too, a second branch verify reported as a break for good, with
    # nothing said at start.
    await live.start()
    await _bad_token(live)
    await _security_stored(live)
    saved = live.workdir / "spool-backup.db"
    _backup(live.data_dir / "spool.db", saved)
    for _ in range(60):  # (more than the check's first page of the sink's newest)
        await _bad_token(live)
    await _security_stored(live)
    assert await live.stop() == 0

    _restore(saved, live.data_dir, "spool.db")
    await live.start()
    await _bad_token(live)
    await _security_stored(live)
    assert await live.stop() == 0
    r = await live.cli("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "62 security events: OK" in r.stdout
    log = live.log_tail(20000)
    assert "the spool is older than the sqlite sink: the sink holds 60 security event(s)" in log
    assert "The security chain goes on from the sink's newest" in log


async def test_a_spool_restored_with_its_sink_from_one_backup_is_not_taken_for_older(
        live: Live) -> None:
    # Both files of one moment (the usual restore): nothing is said, and the
    # chain simply goes on.
    await live.start()
    await _bad_token(live)
    await _security_stored(live)
    _backup(live.data_dir / "spool.db", live.workdir / "spool-backup.db")
    _backup(live.data_dir / "audit.db", live.workdir / "audit-backup.db")
    await _bad_token(live)
    await _security_stored(live)
    assert await live.stop() == 0
    _restore(live.workdir / "spool-backup.db", live.data_dir, "spool.db")
    _restore(live.workdir / "audit-backup.db", live.data_dir, "audit.db")
    await live.start()
    await _bad_token(live)
    await _security_stored(live)
    assert await live.stop() == 0
    assert "older than" not in live.log_tail(20000)
    r = await live.cli("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 security events: OK" in r.stdout


class _OddSink(SqliteSink):
    """A sink whose listing fails in a way no sink error names (a bug, or a
    document another writer left that the listing cannot take)."""

    async def list_security_events(self, **kwargs: Any) -> Any:
        raise ValueError("a document too odd to read")


async def test_a_start_check_that_fails_unexpectedly_does_not_stop_the_start(
    make_config: Any, engines: Any, audit_key: bytes, caplog: pytest.LogCaptureFixture,
) -> None:
    """The check for a spool older than its sink is a look at the sink before
    serving: a failure other than a sink error escaped into the start, and the
    server did not start at all (the shared-key check beside it catches all)."""
    config = make_config()
    engine = await engines.open(config)
    await engine.record_security(Draft("auth.login_failed", outcome="denied"))
    sink = _OddSink(config.sqlite_sink_path)
    await sink.open()
    try:
        assert await catch_up_security_chain(engine.spool, sink, audit_key) == 0
    finally:
        await sink.close()
    assert any("is not ahead of the spool" in r.getMessage() for r in caplog.records)


async def test_the_sinks_events_of_the_heads_own_millisecond_are_followed_whatever_their_ids(
    make_config: Any, engines: Any, audit_key: bytes, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The sink lists its security events newest first, those of one
    millisecond by their ids (random). The check looked only at the events
    listed before the spool's head: the next event of the chain, of the
    head's own millisecond (a burst of failed logins), with a smaller id, is
    listed after the head and was not seen. The chain was taken for not
    going on in the sink, nothing was adopted, and the next security event
    continued the head a second time: a fork verify reports for good. (An
    event of an earlier millisecond, listed after the head's, ends the look.)"""
    now = [1_799_999_999.0]
    config = make_config()
    engine = await engines.open(config, clock=lambda: now[0])
    await engine.record_security(Draft("auth.login_failed", outcome="denied"))
    now[0] = 1_800_000_000.0
    await engine.record_security(
        Draft("auth.login_failed", outcome="denied", event_id="f" * 32))
    await engines.drain(engine)
    saved = tmp_path / "spool-backup.db"
    _backup(config.spool_path, saved)
    for i in (1, 0, 2):  # the sink goes on, in the same millisecond, with smaller ids
        # (in no order of theirs: the chain is found in more than one pass)
        await engine.record_security(
            Draft("auth.login_failed", outcome="denied", event_id=f"{i}" * 32))
    await engines.drain(engine)
    await engines.close(engine)

    _restore(saved, config.spool_path.parent, config.spool_path.name)
    engine = await engines.open(config, clock=lambda: now[0])
    sink = SqliteSink(config.sqlite_sink_path)
    await sink.open()
    try:
        assert await catch_up_security_chain(engine.spool, sink, audit_key) == 3
    finally:
        await sink.close()
    # The spool's next security event continues the sink's newest: no fork.
    await engine.record_security(Draft("auth.login_failed", outcome="denied"))
    await engines.drain(engine)
    await engines.close(engine)
    monkeypatch.setenv(server.AUDIT_KEY_ENV, audit_key.decode())
    assert await server._verify(config) == 0
    assert "6 security events: OK" in capsys.readouterr().out


async def test_a_spool_head_the_sink_does_not_hold_yet_is_left_as_it_is(
    make_config: Any, engines: Any, audit_key: bytes,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The spool's newest security events not sent yet (a server killed
    before its flusher sent them): the sink does not hold the spool's head,
    nothing is adopted, and the start goes on."""
    config = make_config()
    engine = await engines.open(config)
    await engine.record_security(Draft("auth.login_failed", outcome="denied"))
    await engines.drain(engine)
    await engine.record_security(Draft("auth.login_failed", outcome="denied"))
    sink = SqliteSink(config.sqlite_sink_path)
    await sink.open()
    try:
        assert await catch_up_security_chain(engine.spool, sink, audit_key) == 0
    finally:
        await sink.close()
    await engines.drain(engine)
    await engines.close(engine)
    monkeypatch.setenv(server.AUDIT_KEY_ENV, audit_key.decode())
    assert await server._verify(config) == 0
    assert "2 security events: OK" in capsys.readouterr().out


async def test_a_restored_spools_chat_under_way_is_recorded_after_its_chain_caught_up(
        tmp_path: Path) -> None:
    """The spool is backed up while the provider holds a chat (its note is in
    the copy), the server goes on (the chat and security events reach the
    sink), the spool alone is restored later, when the chat's session is past
    its idle timeout. The start recorded the noted chat as
    ``auth.session_ended`` before it caught the security chain up with the
    sink's: the spool's head had moved past the one the sink continues, the
    catch-up found nothing, and the chain forked (verify: a break for good),
    with nothing said. The notes are recorded once the chain caught up."""
    from openai_stub import OpenAIStub
    from test_shutdown import _a_chat_held_by_the_provider

    idle = 3.0
    stub = OpenAIStub()
    stub.mode = "held"
    base_url = await stub.start()
    live = Live(tmp_path, {"ai": {"provider": "openai", "openai": {"base_url": base_url}},
                           "audit": {"idle_timeout_seconds": idle}})
    try:
        async with aiohttp.ClientSession() as http:
            _, _, asking = await _a_chat_held_by_the_provider(live, stub, http)
            await _bad_token(live)
            await _security_stored(live)
            saved = live.workdir / "spool-backup.db"
            _backup(live.data_dir / "spool.db", saved)
            stub.gate.set()
            await asking
        for _ in range(3):
            await _bad_token(live)
        await _security_stored(live)
        assert await live.stop() == 0

        _restore(saved, live.data_dir, "spool.db")
        await asyncio.sleep(idle + 1)
        await live.start()
        await _bad_token(live)
        await _security_stored(live)
        assert await live.stop() == 0
    finally:
        await stub.stop()
        live.close()
    log = live.log_tail(20000)
    assert "The security chain goes on from the sink's newest" in log, log
    assert "recorded as interrupted" in log
    r = await live.cli("verify")
    assert r.returncode == 0, r.stdout + r.stderr

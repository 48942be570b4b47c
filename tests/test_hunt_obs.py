"""What operators see (logs, /metrics, /audit/status, /readyz): regressions of
a hunt for what they showed otherwise than it was, through the real app."""

from __future__ import annotations

from api_fixtures import MakeApi, make_api, wait_for

__all__ = ["make_api"]


async def _metric(api, name: str) -> float:  # type: ignore[no-untyped-def]
    text = await (await api.client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_sink_that_opens_after_failing_to_is_healthy_with_nothing_pending(
    make_api: MakeApi, tmp_path
) -> None:
    """A sink that could not be opened at start (down, unreachable) and then
    opens stayed unhealthy in /audit/status and session_audit_sink_healthy 0
    (README's alert: "down") until some write went through: on an idle
    server, for as long as nothing was pending, though the sink was back."""
    sink_path = tmp_path / "sink.db"
    sink_path.mkdir()  # not a database file: the sqlite sink cannot open it
    api = await make_api(sink={"sqlite": {"path": str(sink_path)}},
                         flush={"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05})
    flusher = api.engine.flusher
    await wait_for(lambda: flusher.last_error is not None, message="the sink to fail to open")
    assert await _metric(api, "session_audit_sink_healthy") == 0.0
    sink_path.rmdir()
    await wait_for(lambda: flusher.sink_open, message="the sink to open")
    assert await _metric(api, "session_audit_sink_healthy") == 1.0
    admin = await api.admin()
    resp = await api.client.get("/audit/status", headers=admin.headers)
    assert (await resp.json())["sink"]["healthy"] is True


async def test_a_spool_that_cannot_commit_gets_one_reaper_line_not_one_a_session(
    make_config, engines, fake_clock, caplog
) -> None:
    """With the spool's disk full, the reaper's seals of the sessions due
    failed together, and each logged its own error line, on every pass (once
    a second): 1,000 idle sessions due made 1,000 lines a second, on a disk
    already full. Now one line a minute, like the spool's own."""
    import logging

    from audit.events import Source

    engine = await engines.open(make_config(), clock=fake_clock)
    src = Source(user="alice", role="user")
    for _ in range(50):
        await engine.start_session("alice", "user", src, 60)
    spool = engine.spool
    pages = await spool.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await spool.submit(lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages}"),
                       needs_space=False)  # a disk with no page left
    fake_clock.advance(120)  # every session's token has expired
    with caplog.at_level(logging.ERROR, logger="session_audit.engine"):
        for _ in range(3):
            assert await engine.reap_once() == 0
    assert len(spool.open_sessions()) == 50  # none sealed, all still due
    lines = [r.getMessage() for r in caplog.records if "reaper" in r.getMessage()]
    assert len(lines) == 1, [*lines[:3], f"... {len(lines)} lines"]
    assert "50 of 50 jobs failed: the audit spool could not commit" in lines[0]
    await spool.submit(lambda w: w.conn.execute("PRAGMA max_page_count = 1073741823"),
                       needs_space=False)
    assert await engine.reap_once() == 50


async def test_revoked_sessions_that_cannot_be_ended_get_one_line_not_one_each(
    make_api: MakeApi, caplog
) -> None:
    """``disable`` beside the server names the user's open sessions for it to
    end; while the spool cannot commit, the server's check (twice a second:
    its own task and the reaper) logged an error line for each of them on
    every pass. Now one line a minute."""
    import logging

    from audit.spool import connect
    from handlers.auth import change_user_sync
    from handlers.keys import ACCOUNTS

    api = await make_api()
    await api.add_user("alice")
    logins = [await api.login("alice") for _ in range(20)]
    accounts, spool = api.app[ACCOUNTS], api.engine.spool
    async with accounts._revoking:  # the server's checks wait meanwhile
        conn = connect(api.config.spool_path, "normal")  # the command line's
        try:
            assert change_user_sync(conn, "alice", disabled=True)
        finally:
            conn.close()
        pages = await spool.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await spool.submit(lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages}"),
                           needs_space=False)  # the server's disk with no page left
    with caplog.at_level(logging.ERROR, logger="session_audit.accounts"):
        for _ in range(3):
            assert await accounts.end_revoked_sessions() == 0
    lines = [r.getMessage() for r in caplog.records if "revoked" in r.getMessage()]
    assert len(lines) == 1, [*lines[:3], f"... {len(lines)} lines"]
    assert "20 revoked sessions not ended yet" in lines[0]
    # It names one of them and why it was not ended.
    named = lines[0].split("; ", 1)[1].split(" first: ")
    assert named[0] in {x.session_id for x in logins}
    assert named[1].startswith("the audit spool could not commit")
    await spool.submit(lambda w: w.conn.execute("PRAGMA max_page_count = 1073741823"),
                       needs_space=False)
    await wait_for(lambda: not any(spool.open_session(x.session_id) for x in logins),
                   message="the revoked sessions to end")


async def test_events_lost_under_ack_fast_get_one_line_a_minute_not_one_each(
    make_api: MakeApi, caplog
) -> None:
    """Under ``ack = "fast"`` a request is answered before its event commits;
    while the spool cannot commit, each lost event logged its own error line:
    one a request, from any logged-in client, onto a disk already full (a
    503 ``audit_unavailable`` says so once a minute). Now one line a minute
    too, counting the lines left out."""
    import logging

    api = await make_api(audit={"ack": "fast"})
    alice = await api.user("alice")
    engine = api.engine
    pages = await engine.spool.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await engine.spool.submit(lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages}"),
                              needs_space=False)  # a disk with no page left
    with caplog.at_level(logging.ERROR, logger="session_audit.engine"):
        for _ in range(20):  # bad input: refused, its attempt recorded (not awaited)
            resp = await api.client.post("/documents", data=b"{", headers={
                **alice.headers, "Content-Type": "application/json"})
            assert resp.status == 400
        await wait_for(lambda: not engine._inflight, message="the records to fail")
    lines = [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()]
    assert len(lines) == 1, [*lines[:3], f"... {len(lines)} lines"]



async def test_malformed_requests_are_one_warning_a_minute_not_one_each(tmp_path) -> None:
    """Anybody could make the server write a warning line per request: each
    request it could not parse logged one (at the default level and at
    ``warning``, where the access log is off). Now the first, then one a
    minute saying how many like it were left out, like the other lines a
    client can cause (503 audit_unavailable, dropped connections)."""
    import asyncio

    from live_server import Live, raw_request

    lv = Live(tmp_path)  # SESSION_AUDIT_LOG_LEVEL=warning
    try:
        await lv.start()
        for i in range(20):
            answer = await asyncio.to_thread(
                raw_request, lv.port, f"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header{i}: x"
                                    "\r\nConnection: close\r\n\r\n".encode())
            assert b" 400 " in answer.split(b"\r\n", 1)[0], answer[:80]
        await lv.stop()
    finally:
        lv.close()
    lines = [line for line in lv.log_path.read_text().splitlines()
             if "malformed HTTP request" in line]
    assert len(lines) == 1, [*lines[:3], f"... {len(lines)} lines"]


async def test_reaper_passes_failing_and_passing_by_turns_log_one_line_a_minute(
    make_config, engines, fake_clock, caplog
) -> None:
    """A nearly full disk: the reaper's pass fails, the next one passes, and
    so on. A pass that succeeded started the failure lines' minute over, and
    a hook's "succeeds again" did too: each turn logged its lines (a hook's
    with its traceback), every reaper interval, onto a disk in trouble. Now
    one line a minute for each, and no "succeeds again" for what was not said."""
    import logging

    from audit.events import Source

    engine = await engines.open(make_config(), clock=fake_clock)
    spool = engine.spool

    async def disk(full: bool) -> None:
        pages = await spool.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await spool.submit(lambda w: w.conn.execute(
            f"PRAGMA max_page_count = {pages if full else 1073741823}"), needs_space=False)

    async def hook() -> None:  # a hook writing to the spool (no page left: it fails)
        await spool.submit(lambda w: w.conn.execute(
            "INSERT OR REPLACE INTO meta VALUES ('hook', ?)", ("x" * 50_000,)),
            needs_space=False)

    engine.before_reap.append(hook)
    with caplog.at_level(logging.WARNING, logger="session_audit.engine"):
        for _ in range(10):
            for _ in range(20):
                await engine.start_session("alice", "user", Source(user="alice", role="user"),
                                           60)
            fake_clock.advance(120)  # their tokens expired: due
            await disk(full=True)
            assert await engine.reap_once() == 0
            await disk(full=False)
            assert await engine.reap_once() == 20
    lines = [r.getMessage() for r in caplog.records if "reaper" in r.getMessage()]
    assert len([x for x in lines if "jobs failed" in x]) == 1, lines
    assert len([x for x in lines if "hook failed" in x]) == 1, lines
    assert len([x for x in lines if "hook succeeds again, after 1 failed" in x]) == 1, lines
    assert len(lines) == 3, lines



async def test_a_sink_failing_every_other_write_logs_a_few_lines_not_two_a_write(
    make_config, engines, fake_monotonic, caplog
) -> None:
    """A receiver that answers 503 to every other write (overloaded, a
    flapping balancer): each write that went through started the throttle's
    minute over, so every failure logged its line and every write after it
    "writes succeed again": two lines a write, for as long as it lasted. Now
    one failure line a minute, counting those left out, and "succeed again"
    only after a failure line that was logged; status as before."""
    import logging

    from receiver import Fault, Receiver, engine_behind

    from audit.events import Source

    class Flapping(Receiver):
        writes = 0

        def _pick_fault(self) -> Fault | None:
            self.writes += 1
            return Fault(503) if self.writes % 2 else None  # (no Retry-After: a failure)

    receiver = Flapping()
    config = make_config(flush={"max_writes_per_second": 1000, "burst": 1000,
                                "backoff_base_seconds": 0.05, "backoff_max_seconds": 1.0})
    async with engine_behind(receiver, engines, config, fake_monotonic) as e:
        src = Source(user="alice", role="user")

        async def flap(n: int) -> None:
            for _ in range(n):
                s = await e.start_session("alice", "user", src, 3600)
                await e.end_session(s.session_id, src)
            await engines.drain(e, fake_monotonic)

        def lines(text: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if text in r.getMessage()]

        with caplog.at_level(logging.WARNING, logger="session_audit.flusher"):
            await flap(15)
            assert len(receiver.parts) == 15 and e.flusher.stats.writes_failed == 15
            assert len(lines("HTTP 503")) == 1, lines("HTTP 503")
            assert len(lines("writes succeed again, after 1 failed")) == 1, lines("succeed")
            fake_monotonic.advance(61)  # a minute later: said again, counting the rest
            await flap(15)
            failed = lines("HTTP 503")
            assert len(failed) == 2 and "(14 more like it since" in failed[1], failed
            assert len(lines("writes succeed again")) == 2
        assert len(receiver.parts) == 30
        status = await e.status()
        assert status["sink"]["healthy"] is True


async def test_a_spool_failing_every_other_flusher_step_logs_one_line_a_minute(
    make_config, engines, caplog, monkeypatch
) -> None:
    """A nearly full disk: marking a part stored fails, the next try goes
    through, and so on. A step that goes through resets the spool's backoff,
    and the flusher's "the spool failed" line had no throttle: a line at
    every other step, onto a disk in trouble. Now one a minute, counting
    those left out; the parts are all stored all the same."""
    import logging
    import sqlite3

    from audit import queries
    from audit.events import Source
    from audit.store import Writer

    config = make_config(flush={"backoff_base_seconds": 0.001, "backoff_max_seconds": 0.01})
    engine = await engines.open(config, background=True)
    src = Source(user="alice", role="user")
    real = Writer.mark_part_stored
    calls = [0]

    def flapping(self, *args):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] % 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, *args)

    monkeypatch.setattr(Writer, "mark_part_stored", flapping)

    async def flushed() -> bool:
        c = await engine.spool.read(lambda conn: queries.counts(conn, 0))
        return c["pending_parts"] == 0

    with caplog.at_level(logging.ERROR, logger="session_audit.flusher"):
        for _ in range(6):
            s = await engine.start_session("alice", "user", src, 3600)
            await engine.end_session(s.session_id, src)
            await wait_for(flushed, message="the part to be marked stored")
    assert calls[0] == 12  # each part failed once, then went through
    lines = [r.getMessage() for r in caplog.records if "the spool failed" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "database or disk is full" in lines[0]
    assert engine.ready and engine.task_failure is None


async def test_revoked_sessions_and_changes_failing_by_turns_log_one_line_a_minute(
    make_config, engines, caplog
) -> None:
    """A nearly full disk: the server's pass cannot end the sessions that
    ``passwd`` revoked, nor record the changes of accounts, and the next pass
    can. A pass that went through reset the lines' throttle: each pass that
    failed after one logged its line again (twice a second at worst). Now one
    line a minute each, and every session is ended, every change recorded."""
    import contextlib
    import logging

    from audit.events import Source
    from audit.spool import connect
    from handlers.auth import Accounts, add_user_sync, change_user_sync, hash_password

    config = make_config()
    engine = await engines.open(config)
    accounts = Accounts(engine, 4, record_changes=True)
    spool = engine.spool
    src = Source(user="alice", role="user")
    new_hash = hash_password("a-new-password-1", 4)
    with contextlib.closing(connect(config.spool_path, "normal")) as conn:
        add_user_sync(conn, "alice", "a-password-1", "user", 4)
    assert await accounts.record_account_changes() == 1  # (user.create)

    async def disk(full: bool) -> None:
        pages = await spool.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await spool.submit(lambda w: w.conn.execute(
            f"PRAGMA max_page_count = {pages if full else 1073741823}"), needs_space=False)

    with caplog.at_level(logging.ERROR, logger="session_audit.accounts"):
        for _ in range(5):
            for _ in range(20):
                await engine.start_session("alice", "user", src, 3600)
            with contextlib.closing(connect(config.spool_path, "normal")) as conn:
                for _ in range(20):  # (the command line's: its disk is not full)
                    assert change_user_sync(conn, "alice", password_hash=new_hash)
            await disk(full=True)
            assert await accounts.end_revoked_sessions() == 0
            assert await accounts.record_account_changes() == 0
            await disk(full=False)
            assert await accounts.end_revoked_sessions() == 20
            assert await accounts.record_account_changes() == 20
    assert not spool.open_sessions()
    lines = [r.getMessage() for r in caplog.records if r.name == "session_audit.accounts"]
    assert len([x for x in lines if "revoked sessions not ended yet" in x]) == 1, lines
    assert len([x for x in lines if "changes of accounts not recorded yet" in x]) == 1, lines
    assert len(lines) == 2, lines

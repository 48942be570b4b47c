"""Review findings on the writer's cache of session heads (audit/store.py)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from sqlite_conns import connect as _connect

from audit.events import Draft
from audit.store import SCHEMA, Append, Limits, Writer


class Boom(BaseException):
    """Stands for a COMMIT that fails (disk full): the whole batch rolls back."""


def _writer(tmp_path, audit_key) -> Writer:
    conn = _connect(tmp_path / "spool.db")
    conn.executescript(SCHEMA)
    return Writer(conn, audit_key, Limits(500, 1 << 20), clock=lambda: 1_800_000_000.0)


def test_failed_batch_restores_heads_after_a_failed_job(tmp_path, audit_key):
    """A job that fails after touching a session puts back its snapshot; the
    batch's own undo must not be that same (live) object, or a later job of
    the batch advances it and a failed COMMIT "restores" a head with a
    ``seq`` and chain hash that were never committed (a gap in the session
    and a broken chain for every later event)."""
    w = _writer(tmp_path, audit_key)
    w.run_batch([lambda w: w.start_session("u", "user", 1e12, [], session_id="s1")])
    before = w.sessions["s1"].copy()

    def fails_after_append(w: Writer) -> None:
        w.append("s1", Draft("document.list"))
        raise RuntimeError("a job that fails after its append")

    def commit_fails(w: Writer) -> None:
        raise Boom()

    with pytest.raises(Boom):
        w.run_batch([fails_after_append, Append("s1", Draft("document.list")), commit_fails])
    after = w.sessions["s1"]
    assert (after.next_seq, after.head, after.uncut_count) == (
        before.next_seq, before.head, before.uncut_count)
    assert w.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
    # The next event continues the committed chain.
    [(ok, event)] = w.run_batch([Append("s1", Draft("document.list"))])
    assert ok and json.loads(event)["seq"] == 1


async def test_jobs_queued_when_the_writer_fails_are_answered(tmp_path, audit_key, monkeypatch):
    """A writer loop that stops on a bug marks the spool failed; jobs queued
    behind the failing batch must hear so (503), not wait forever."""
    import asyncio
    import threading

    from audit.spool import Spool, SpoolUnavailable

    sp = Spool(tmp_path / "spool.db", audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    entered, release = threading.Event(), threading.Event()
    real = Writer.run_batch

    def buggy(self, jobs):
        entered.set()
        release.wait(5)
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(Writer, "run_batch", buggy)
    try:
        first = sp.submit_nowait(lambda w: None)
        await asyncio.to_thread(entered.wait, 5)
        queued = sp.submit_nowait(lambda w: None)  # waits behind the failing batch
        release.set()
        with pytest.raises(SpoolUnavailable):
            await asyncio.wait_for(first, 5)
        with pytest.raises(SpoolUnavailable):
            await asyncio.wait_for(queued, 5)
        assert sp.failure is not None
    finally:
        monkeypatch.setattr(Writer, "run_batch", real)
        await sp.close()


def test_failed_batch_reloads_security_head_and_keeps_seen_activity(tmp_path, audit_key):
    """A failed COMMIT reloads the cache from the committed state: the
    security chain head goes back to what is on disk (here: the genesis, no
    security event ever committed), and activity seen only in memory (a
    request that recorded nothing) is not forgotten."""
    w = _writer(tmp_path, audit_key)
    w.run_batch([lambda w: w.start_session("u", "user", 1e12, [], session_id="s1")])
    genesis_head = w.security_head
    w.sessions["s1"].last_activity = 1_900_000_000.0  # engine.touch(): memory only

    def commit_fails(w: Writer) -> None:
        raise Boom()

    denied = Draft("access.denied", outcome="denied")
    with pytest.raises(Boom):
        w.run_batch([lambda w: w.append_security(denied, "s1"), commit_fails])
    assert w.security_head == genesis_head
    assert w.sessions["s1"].last_activity == 1_900_000_000.0
    assert w.conn.execute("SELECT COUNT(*) FROM security_events").fetchone()[0] == 0
    [(ok, event)] = w.run_batch([lambda w: w.append_security(denied, "s1")])
    assert ok
    from audit.events import canonical_json, chain_hash

    body = {k: v for k, v in event.items() if k != "hash"}
    assert event["hash"] == chain_hash(audit_key, genesis_head, canonical_json(body))


def test_a_failed_reload_leaves_the_cache_stale_until_the_next_batch(
    tmp_path, audit_key, monkeypatch
):
    """If the error that broke COMMIT also breaks the reload, no job may run
    on the cache (it is ahead of the database): the next batch reloads it
    first, so the session goes on from its committed head, without a gap."""
    w = _writer(tmp_path, audit_key)
    w.run_batch([lambda w: w.start_session("u", "user", 1e12, [], session_id="s1")])
    real_load = Writer.load

    def broken_load(self):
        raise sqlite3.OperationalError("disk I/O error")

    def commit_fails(w: Writer) -> None:
        raise Boom()

    monkeypatch.setattr(Writer, "load", broken_load)
    with pytest.raises(Boom):
        w.run_batch([Append("s1", Draft("document.list")), commit_fails])
    assert w.sessions["s1"].next_seq == 2, "the cache kept the rolled-back event"
    with pytest.raises(sqlite3.OperationalError):  # still failing: the batch fails whole
        w.run_batch([Append("s1", Draft("document.list"))])
    monkeypatch.setattr(Writer, "load", real_load)
    [(ok, event)] = w.run_batch([Append("s1", Draft("document.list"))])
    assert ok and json.loads(event)["seq"] == 1
    assert w.conn.execute("SELECT seq FROM events").fetchall() == [(1,)]


def test_nested_savepoints_restore_independent_snapshots(tmp_path, audit_key):
    """An inner savepoint that fails and is caught, then the outer job
    failing: the outer rollback must restore the state before the job, not
    a snapshot object the inner restore put back live into the cache."""
    w = _writer(tmp_path, audit_key)
    w.run_batch([lambda w: w.start_session("u", "user", 1e12, [], session_id="s1")])

    def job(w: Writer) -> None:
        def inner() -> None:
            w.append("s1", Draft("document.list"))
            raise RuntimeError("inner")

        with pytest.raises(RuntimeError):
            w.atomic(inner)
        w.append("s1", Draft("document.list"))
        raise RuntimeError("outer")

    [(ok, _)] = w.run_batch([job])
    assert not ok
    s = w.sessions["s1"]
    assert (s.next_seq, s.uncut_count) == (1, 0)
    assert w.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0


def test_a_read_that_writes_fails_its_whole_batch(tmp_path, audit_key):
    """A Read job runs without a savepoint; if its read wrote anyway (a bug),
    the batch is rolled back whole rather than commit a write nobody meant."""
    from audit.store import Read, ReadOnlyViolation

    w = _writer(tmp_path, audit_key)
    w.run_batch([lambda w: w.start_session("u", "user", 1e12, [], session_id="s1")])

    def sneaky(conn: sqlite3.Connection, draft: Draft) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")

    with pytest.raises(ReadOnlyViolation):
        w.run_batch([Append("s1", Draft("document.list")),
                     Read("s1", Draft("document.access"), sneaky)])
    assert w.conn.execute("SELECT COUNT(*) FROM meta WHERE key = 'x'").fetchone()[0] == 0
    assert w.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
    assert w.sessions["s1"].next_seq == 1


def test_a_failed_cut_to_lowered_limits_whose_reload_fails_leaves_no_gap(tmp_path, audit_key):
    """At open, a session's uncut events are cut to lowered part limits
    (``_split_oversized``); a cut that fails rolls them all back, and the
    cache is reloaded. If that reload failed too (the same I/O error), the
    cache kept the cuts made before the failure: the session's next part was
    numbered after a part that was never committed and began after events
    that were in none, which never reached the sink. Both failures are SQLite's
    own here: a trigger refuses the second cut, an authorizer the reload."""
    from audit.spool import _split_oversized

    w = _writer(tmp_path, audit_key)
    w.run_batch([lambda w: w.start_session("u", "user", 1e12, [], session_id="s1")])
    w.run_batch([Append("s1", Draft("document.list")) for _ in range(6)])
    w.conn.close()

    conn = _connect(tmp_path / "spool.db")
    w = Writer(conn, audit_key, Limits(2, 1 << 20), clock=lambda: 1_800_000_000.0)
    w.load()
    conn.execute("CREATE TEMP TRIGGER second_cut BEFORE INSERT ON parts"
                 " WHEN NEW.part = 1 BEGIN SELECT RAISE(ABORT, 'a failing cut'); END")
    rolled_back = False

    def authorizer(action: int, arg1: object, *_: object) -> int:
        nonlocal rolled_back
        if action == sqlite3.SQLITE_TRANSACTION and arg1 == "ROLLBACK":
            rolled_back = True
        return sqlite3.SQLITE_DENY if rolled_back and action == sqlite3.SQLITE_SELECT \
            else sqlite3.SQLITE_OK

    conn.set_authorizer(authorizer)
    _split_oversized(conn, w)  # (logged: the sessions stay as they were)
    conn.set_authorizer(None)
    conn.execute("DROP TRIGGER second_cut")
    assert rolled_back
    assert conn.execute("SELECT COUNT(*) FROM parts").fetchone()[0] == 0

    w.run_batch([lambda w: w.seal("s1", "logout", Draft("session.end"))])
    parts = conn.execute(
        "SELECT part, first_seq, last_seq FROM parts ORDER BY part").fetchall()
    # Every event in a part, the parts numbered from 0 (the six uncut events
    # stay together, past the lowered limit, as when the cut fails alone).
    assert parts == [(0, 1, 6), (1, 7, 7)]

"""The writer's part cutting and session lifecycle, pinned exactly (gaps a
mutation run of audit/store.py found: boundaries, the lowered-limits split,
session times and keys)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from sqlite_conns import connect as _connect

from audit.events import Draft
from audit.store import SCHEMA, Append, Limits, Writer

T0 = 1_800_000_000.0


class Ticking:
    """A clock that moves on by ``step`` at every reading."""

    def __init__(self, step: float = 0.0) -> None:
        self.now, self.step = T0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _writer(conn: sqlite3.Connection, key: bytes, limits: Limits, clock=None) -> Writer:
    w = Writer(conn, key, limits, clock=clock or (lambda: T0))
    w.load()
    return w


def _conn(tmp_path) -> sqlite3.Connection:
    conn = _connect(tmp_path / "spool.db")
    conn.executescript(SCHEMA)
    return conn


def _start(w: Writer, sid: str, drafts: list[Draft] | None = None) -> None:
    [(ok, value)] = w.run_batch([lambda w: w.start_session("u", "user", 1e12, drafts or [],
                                                           session_id=sid)])
    assert ok, value


def _append(w: Writer, sid: str, n: int, details: dict | None = None) -> None:
    results = w.run_batch([Append(sid, Draft("document.list", details=details or {}))
                           for _ in range(n)])
    assert all(ok for ok, _ in results), results


def _parts(conn: sqlite3.Connection, sid: str) -> list[tuple[int, int, str]]:
    return conn.execute("SELECT first_seq, last_seq, seal_reason FROM parts"
                        " WHERE session_id = ? ORDER BY part", (sid,)).fetchall()


def _sizes(conn: sqlite3.Connection, sid: str) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT LENGTH(CAST(json AS BLOB)) FROM events WHERE session_id = ? ORDER BY seq",
        (sid,))]


def _event_size(tmp_path, key: bytes, details: dict) -> int:
    """The byte size of each event of ``_append(w, "s1", n, details)`` (all the
    same: one-digit seqs, one clock reading, ids of one length)."""
    conn = sqlite3.connect(tmp_path / "probe.db", isolation_level=None)
    conn.executescript(SCHEMA)
    w = _writer(conn, key, Limits(500, 1 << 20))
    _start(w, "s1")
    _append(w, "s1", 3, details)
    sizes = _sizes(conn, "s1")
    conn.close()
    assert len(set(sizes)) == 1, sizes
    return sizes[0]


@pytest.mark.parametrize("details", [{"b": "x" * 300}, {"b": "é" * 1000}],
                         ids=["ascii", "utf8"])
def test_part_max_bytes_counts_utf8_bytes_and_keeps_an_exact_fit(tmp_path, audit_key, details):
    """Two events fill part_max_bytes to the byte: they make one part (the
    limit is a maximum, not a bound to stay under), and the third goes to
    the next. The size is the event's UTF-8 bytes (what the sink gets), not
    its characters."""
    size = _event_size(tmp_path, audit_key, details)
    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(500, 2 * size))
    _start(w, "s1")
    _append(w, "s1", 5, details)
    assert _sizes(conn, "s1") == [size] * 5
    assert _parts(conn, "s1") == [(1, 2, "checkpoint"), (3, 4, "checkpoint")]
    s = w.sessions["s1"]
    assert (s.uncut_count, s.uncut_bytes, s.cut_seq, s.next_part) == (1, size, 4, 2)


def test_lowered_limits_split_each_oversized_session_exactly(tmp_path, audit_key):
    """At a start with lowered limits, the uncut events of every open
    session past them are cut into parts that fill the limits (an exact
    byte fit included); a session within them, whichever comes first, is
    left alone; the rest stays uncut, counted and aged from its own first
    event, and the next appends go on cutting from there."""
    big = {"b": "x" * 600}
    size = _event_size(tmp_path, audit_key, big)
    conn = _conn(tmp_path)
    clock = Ticking()
    w = _writer(conn, audit_key, Limits(500, 1 << 20), clock)
    _start(w, "s0")  # within the lowered limits: two events fill them to the byte
    _append(w, "s0", 2, big)
    clock.now += 1
    _start(w, "s1")  # small events, past part_max_events
    for _ in range(9):
        clock.now += 10
        _append(w, "s1", 1)
    clock.now += 1
    _start(w, "s2")  # past part_max_bytes
    _append(w, "s2", 5, big)
    ts = dict(conn.execute("SELECT seq, ts FROM events WHERE session_id = 's1'").fetchall())
    small = _sizes(conn, "s1")
    assert 5 * max(small) <= 2 * size  # s1 is cut by its count alone

    w = _writer(conn, audit_key, Limits(4, 2 * size), clock)
    assert list(w.sessions) == ["s0", "s1", "s2"]
    conn.execute("BEGIN IMMEDIATE")
    assert w.split_oversized() == 4
    conn.execute("COMMIT")
    assert _parts(conn, "s0") == []
    assert _parts(conn, "s1") == [(1, 4, "checkpoint"), (5, 8, "checkpoint")]
    assert _parts(conn, "s2") == [(1, 2, "checkpoint"), (3, 4, "checkpoint")]
    s1, s2 = w.sessions["s1"], w.sessions["s2"]
    assert (s1.uncut_count, s1.uncut_bytes, s1.uncut_first_ts) == (1, small[8], ts[9])
    assert (s2.uncut_count, s2.uncut_bytes, s2.uncut_first_ts) == (1, size, T0 + 92)
    assert (s1.cut_seq, s1.next_part, s1.event_count) == (8, 2, 9)

    _append(w, "s1", 4)  # 9..12 fill a part; the 13th cuts it
    assert _parts(conn, "s1")[2:] == [(9, 12, "checkpoint")]
    assert w.sessions["s1"].uncut_count == 1
    _append(w, "s2", 2, big)  # 5, 6 fill a part; the 7th cuts it
    assert _parts(conn, "s2")[2:] == [(5, 6, "checkpoint")]


def test_session_start_events_carry_the_start_time_and_seal_the_end_time(tmp_path, audit_key):
    """verify compares a session's start and end times with its first and
    last events: with a clock that moves at every reading, the start's
    events still carry the session's start time, and a seal ``at`` a
    deadline past carries that time in its event, its part and its row
    (never before the last activity)."""
    conn = _conn(tmp_path)
    clock = Ticking(step=0.25)
    w = _writer(conn, audit_key, Limits(500, 1 << 20), clock)
    _start(w, "s1", [Draft("session.start"), Draft("document.list")])
    [(start,)] = conn.execute("SELECT start_ts FROM sessions").fetchall()
    assert conn.execute("SELECT ts FROM events ORDER BY seq").fetchall() == [(start,), (start,)]
    _append(w, "s1", 1)
    last = w.sessions["s1"].last_activity
    assert last > start
    deadline = last + 5  # the reaper sees it late: the clock is past it
    clock.now = deadline + 100
    [(ok, _)] = w.run_batch([lambda w: w.seal("s1", "idle_timeout", Draft("session.end"),
                                              at=deadline)])
    assert ok
    assert conn.execute("SELECT ts FROM events WHERE seq = 4").fetchone() == (deadline,)
    assert conn.execute("SELECT end_ts, state, seal_reason FROM sessions").fetchone() == (
        deadline, "sealed", "idle_timeout")
    assert _parts(conn, "s1") == [(1, 4, "idle_timeout")]
    assert conn.execute("SELECT end_ts, final FROM parts").fetchone() == (deadline, 1)
    assert "s1" not in w.sessions

    _start(w, "s2")
    _append(w, "s2", 1)
    last = w.sessions["s2"].last_activity
    [(ok, _)] = w.run_batch([lambda w: w.seal("s2", "token_expired", Draft("session.end"),
                                              at=last - 60)])  # before its last activity
    assert ok
    assert conn.execute("SELECT end_ts FROM sessions WHERE session_id = 's2'").fetchone() == (
        last,)


def test_session_keys_stay_unique_across_a_restart_and_a_failed_start(tmp_path, audit_key):
    """Each session gets its own key (events find their session by it); a
    start rolled back leaves no session behind, in the file or the cache."""
    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(500, 1 << 20))
    _start(w, "s1")
    _start(w, "s2")

    def fails(w: Writer) -> None:
        w.start_session("u", "user", 1e12, [Draft("session.start")], session_id="gone")
        raise RuntimeError("a start that fails after its row")

    [(ok, err)] = w.run_batch([fails])
    assert not ok and isinstance(err, RuntimeError)
    assert "gone" not in w.sessions
    w = _writer(conn, audit_key, Limits(500, 1 << 20))  # a restart
    _start(w, "s3")
    _start(w, "s4")
    _start(w, "gone")  # the id is free: nothing of the failed start is left
    keys = [r[0] for r in conn.execute("SELECT sk FROM sessions ORDER BY start_ts, rowid")]
    assert len(set(keys)) == 5
    for sid in ("s1", "s2", "s3", "s4", "gone"):
        _append(w, sid, 1)
    assert conn.execute("SELECT COUNT(DISTINCT sk), COUNT(*) FROM events").fetchone() == (5, 5)


def _in_spool(conn: sqlite3.Connection, sid: str) -> tuple[list[int], int, int]:
    """The seqs of a session's events left, its event_keys rows, its session rows."""
    [(sk,)] = conn.execute("SELECT sk FROM sessions WHERE session_id = ?", (sid,)).fetchall() or [
        (None,)]
    seqs = [r[0] for r in conn.execute(
        "SELECT seq FROM events WHERE session_id = ? ORDER BY seq", (sid,))]
    keys = conn.execute("SELECT COUNT(*) FROM event_keys WHERE sk = ?", (sk,)).fetchone()[0]
    rows = conn.execute("SELECT COUNT(*) FROM sessions WHERE session_id = ?",
                        (sid,)).fetchone()[0]
    return seqs, keys, rows


def _run(w: Writer, job):
    [(ok, value)] = w.run_batch([job])
    assert ok, value
    return value


def test_stored_parts_go_kept_or_deleted_and_the_session_with_its_last(tmp_path, audit_key):
    """An acknowledged part is deleted at once (keep_stored_seconds 0) or
    marked stored and purged once acknowledged before the cut-off (strictly),
    its events and their keys with it; the sealed session's row goes with
    its last part, an open session's stays."""
    conn = _conn(tmp_path)
    clock = Ticking()
    w = _writer(conn, audit_key, Limits(4, 1 << 20), clock)
    _start(w, "s1")
    _append(w, "s1", 6)  # part 0: 1-4
    _run(w, lambda w: w.index_tail())  # 1-6 indexed, the rest in the tail
    _append(w, "s1", 3)  # part 1: 5-8
    _run(w, lambda w: w.seal("s1", "logout", Draft("session.end")))  # part 2: 9-10
    _start(w, "s2")
    _append(w, "s2", 5)  # part 0: 1-4, open
    assert _parts(conn, "s1") == [(1, 4, "checkpoint"), (5, 8, "checkpoint"), (9, 10, "logout")]

    _run(w, lambda w: w.mark_part_failed("s1", 1, "x" * 600, dead=False))
    assert conn.execute("SELECT state, attempts, LENGTH(last_error) FROM parts"
                        " WHERE session_id = 's1' AND part = 1").fetchone() == ("pending", 1, 500)
    sink = ("jsonl /sink", 3600.0)  # stored_sessions: sessions whose final part it took
    _run(w, lambda w: w.mark_part_stored("s1", 0, 0, remember=sink))
    assert _in_spool(conn, "s1") == (list(range(5, 11)), 6, 1)  # (the tail indexed first)
    assert conn.execute("SELECT COUNT(*) FROM stored_sessions").fetchone() == (0,)
    clock.now = t1 = T0 + 100
    _run(w, lambda w: w.mark_part_stored("s1", 1, 0.5))  # (kept for half a second)
    clock.now = t2 = T0 + 110
    _run(w, lambda w: w.mark_part_stored("s1", 2, 60, remember=sink))
    assert conn.execute("SELECT * FROM stored_sessions").fetchall() == [("s1", sink[0], t2)]
    assert conn.execute("SELECT part, state, stored_ts, last_error, attempts FROM parts"
                        " WHERE session_id = 's1' ORDER BY part").fetchall() == [
        (1, "stored", t1, None, 1), (2, "stored", t2, None, 0)]
    assert _in_spool(conn, "s1") == (list(range(5, 11)), 6, 1)

    assert _run(w, lambda w: w.purge_stored(t1)) == (0, False)
    assert _run(w, lambda w: w.purge_stored(t2)) == (1, False)
    assert _in_spool(conn, "s1") == ([9, 10], 2, 1)
    assert _run(w, lambda w: w.purge_stored(t2 + 1)) == (1, False)
    assert _in_spool(conn, "s1") == ([], 0, 0)

    _run(w, lambda w: w.mark_part_stored("s2", 0, 0))  # open: its row stays
    assert _in_spool(conn, "s2") == ([5], 1, 1)
    assert conn.execute("SELECT COUNT(*) FROM parts").fetchone()[0] == 0


def test_a_failed_part_counts_its_attempts_and_goes_dead_only_from_pending(tmp_path, audit_key):
    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(2, 1 << 20))
    _start(w, "s1")
    _append(w, "s1", 5)  # parts 0 and 1
    _run(w, lambda w: w.mark_part_stored("s1", 0, 60))
    for dead in (False, True, True):
        _run(w, lambda w, dead=dead: w.mark_part_failed("s1", 1, f"dead={dead}", dead=dead))
    _run(w, lambda w: w.mark_part_failed("s1", 0, "late", dead=True))  # stored: stays so
    assert conn.execute("SELECT part, state, attempts, last_error FROM parts"
                        " ORDER BY part").fetchall() == [
        (0, "stored", 0, None), (1, "dead", 2, "dead=True")]
    assert _run(w, lambda w: w.retry_dead()) == 1
    assert conn.execute("SELECT state, attempts, last_error FROM parts WHERE part = 1"
                        ).fetchone() == ("pending", 2, None)


def test_purge_stored_stops_at_its_bounds_and_says_more_waits(tmp_path, audit_key):
    """A purge deletes up to ``limit`` parts and stops before the part that
    would take it past ``max_events`` (an exact fit goes; a first part
    larger than that goes alone), and says whether more may wait."""
    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(4, 1 << 20))
    _start(w, "s1")
    _append(w, "s1", 21)  # parts 0-4 of 4 events each
    for part in range(5):
        _run(w, lambda w, part=part: w.mark_part_stored("s1", part, 60))
    later = T0 + 1
    assert _run(w, lambda w: w.purge_stored(later, max_events=8)) == (2, True)
    assert _run(w, lambda w: w.purge_stored(later, max_events=1)) == (1, True)
    assert _run(w, lambda w: w.purge_stored(later, limit=1)) == (1, True)
    assert _run(w, lambda w: w.purge_stored(later, max_events=4)) == (1, False)
    assert _run(w, lambda w: w.purge_stored(later)) == (0, False)
    assert _in_spool(conn, "s1")[0] == [21]


def test_a_cut_that_fails_fails_its_append_alone(tmp_path, audit_key):
    """A size cut runs inside a plain append (no savepoint of its own): when
    its SQL fails, the append fails with that error, nothing of it stays in
    the file or the cache, and the rest of the batch commits."""
    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(2, 1 << 20))
    _start(w, "s1")
    _append(w, "s1", 2)
    conn.execute("INSERT INTO parts (session_id, part, first_seq, last_seq, final, seal_reason,"
                 " prev_hash, hash, state, created_ts) VALUES ('s1', 0, 1, 1, 0, 'checkpoint',"
                 " '', '', 'stored', 0)")  # in the way of the cut
    before = w.sessions["s1"].copy()
    (ok1, err), (ok2, _) = w.run_batch([
        Append("s1", Draft("document.list")),
        lambda w: w.start_session("u", "user", 1e12, [], session_id="s2")])
    assert not ok1 and isinstance(err, sqlite3.IntegrityError), err
    assert ok2 and not conn.in_transaction
    assert w.sessions["s1"] == before
    assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*), MAX(seq) FROM events").fetchone() == (2, 2)
    conn.execute("DELETE FROM parts")
    _append(w, "s1", 1)
    assert _parts(conn, "s1") == [(1, 2, "checkpoint")]
    assert conn.execute("SELECT MAX(seq) FROM events").fetchone() == (3,)


async def test_events_recorded_counts_each_committed_event_once(tmp_path, audit_key):
    """The events_recorded metric: every event committed, once; none of a
    job that failed after appending (its savepoint undid them)."""
    from audit.spool import Spool

    sp = Spool(tmp_path / "spool.db", audit_key, limits=Limits(2, 1 << 20))
    await sp.open()
    try:
        s = await sp.submit(lambda w: w.start_session("u", "user", 1e12,
                                                      [Draft("session.start")]))
        for _ in range(3):
            await sp.submit(Append(s.session_id, Draft("document.list")))

        def fails(w: Writer) -> None:
            w.append(s.session_id, Draft("document.list"))
            w.append(s.session_id, Draft("document.list"))  # (and a cut)
            raise RuntimeError("after its appends")

        with pytest.raises(RuntimeError):
            await sp.submit(fails)
        assert sp.stats.events_recorded == 4
        events = await sp.read(lambda c: c.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        assert events == 4
    finally:
        await sp.close()


def test_a_denied_read_records_its_event_and_an_access_denied_with_its_target_and_source(
        tmp_path, audit_key):
    """A read refused as denied (another's document) is recorded in the
    caller's session with outcome ``denied`` and its reason, and as the
    security event ``access.denied``: outcome ``denied``, the caller's
    session, the document as its target, the caller's actor and address."""
    from audit.events import Source
    from audit.store import ActionError, Read

    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(500, 1 << 20))
    _start(w, "s1")
    src = Source(user="mallory", role="user", ip="10.0.0.9", user_agent="ua/1",
                 request_id="r-1")
    target = {"type": "document", "id": "d1"}

    def refuse(row, d):
        raise ActionError("not_owner", "denied", "no such document")

    draft = Draft("document.access", target=target, source=src)
    [(ok, err)] = w.run_batch([Read("s1", draft, refuse, document="d1")])
    assert ok and isinstance(err, ActionError) and err.reason == "not_owner"
    [(text,)] = conn.execute("SELECT json FROM events WHERE session_id = 's1'").fetchall()
    ev = json.loads(text)
    assert (ev["action"], ev["outcome"], ev["details"], ev["target"]) == (
        "document.access", "denied", {"reason": "not_owner"}, target)
    [(action, text)] = conn.execute("SELECT action, json FROM security_events").fetchall()
    sec = json.loads(text)
    assert (action, sec["action"], sec["outcome"], sec["session_id"]) == (
        "access.denied", "access.denied", "denied", "s1")
    assert sec["target"] == target
    assert sec["actor"] == {"user": "mallory", "role": "user"}
    assert sec["source"] == {"ip": "10.0.0.9", "user_agent": "ua/1"}
    assert sec["request_id"] == "r-1"
    assert sec["details"] == {"action": "document.access", "reason": "not_owner"}

    def fail(row, d):
        raise ActionError("not_found", message="no such document")

    [(ok, err)] = w.run_batch([Read("s1", Draft("document.access", target=target), fail,
                                    document="d1")])
    assert ok and isinstance(err, ActionError) and err.outcome == "failure"
    assert conn.execute("SELECT COUNT(*) FROM security_events").fetchone() == (1,)


def test_users_of_an_earlier_release_stay_enabled_after_the_upgrade(tmp_path):
    """A users table from before ``disabled`` gets the column with every
    existing user enabled (0): an upgrade locks no one out."""
    from audit.store import migrate

    conn = _connect(tmp_path / "spool.db")
    conn.executescript(
        "CREATE TABLE users (username TEXT PRIMARY KEY, password_hash TEXT NOT NULL,"
        " role TEXT NOT NULL, created_at TEXT NOT NULL);"
        "INSERT INTO users VALUES ('alice', 'h', 'user', '2026-11-26T00:00:00.000Z');"
        "INSERT INTO users VALUES ('root', 'h', 'admin', '2026-11-26T00:00:00.000Z');")
    migrate(conn)
    conn.executescript(SCHEMA)
    assert conn.execute("SELECT username, disabled FROM users ORDER BY username").fetchall() == [
        ("alice", 0), ("root", 0)]


def test_stored_security_events_go_kept_or_deleted(tmp_path, audit_key):
    """Security events the sink took are deleted at once (keep_stored_seconds
    0) or marked stored, their error cleared, for any time kept, even under
    a second, and purged once acknowledged before the cut-off (strictly)."""
    conn = _conn(tmp_path)
    clock = Ticking()
    w = _writer(conn, audit_key, Limits(500, 1 << 20), clock)
    for _ in range(4):
        _run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"), None))
    _run(w, lambda w: w.mark_security_aside(2, "x" * 600))
    assert conn.execute("SELECT LENGTH(last_error) FROM security_events WHERE id = 2"
                        ).fetchone() == (500,)
    _run(w, lambda w: w.mark_security_stored([1], 0))
    clock.now = t1 = T0 + 100
    _run(w, lambda w: w.mark_security_stored([2, 3], 0.5))
    assert conn.execute("SELECT id, state, stored_ts, last_error FROM security_events"
                        " ORDER BY id").fetchall() == [
        (2, "stored", t1, None), (3, "stored", t1, None), (4, "pending", None, None)]
    assert _run(w, lambda w: w.purge_stored_security(t1)) == 0
    assert _run(w, lambda w: w.purge_stored_security(t1 + 1, limit=1)) == 1
    assert _run(w, lambda w: w.purge_stored_security(t1 + 1)) == 1
    assert [r[0] for r in conn.execute("SELECT id FROM security_events")] == [4]


def test_the_security_chain_adopts_a_sinks_head_only_if_nothing_was_appended_since(
        tmp_path, audit_key):
    """A spool older than its sink goes on from the sink's newest hash, but
    not over a security event appended since the spool's head was read (its
    successor would chain to a hash that skips it): the adoption is refused
    and the chain goes on from that event. An adoption is in the file."""
    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(500, 1 << 20))
    old = w.security_head
    ev = _run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"),
                                             None))
    assert w.security_head == ev["hash"] != old
    assert _run(w, lambda w: w.adopt_security_head(old, "f" * 64)) is False
    assert w.security_head == ev["hash"]
    assert conn.execute("SELECT value FROM meta WHERE key = 'security_head'").fetchone() == (
        ev["hash"],)
    assert _run(w, lambda w: w.adopt_security_head(ev["hash"], "f" * 64)) is True
    assert _writer(conn, audit_key, Limits(500, 1 << 20)).security_head == "f" * 64


def test_a_failed_job_puts_back_the_security_head_and_the_sessions_it_changed(
        tmp_path, audit_key):
    """A job that fails after appending a security event leaves the chain's
    head where the committed chain ends (else the next event would chain to
    one rolled back: a break for verify), and one that started and sealed a
    session fails with its own error, leaving no session behind."""
    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(500, 1 << 20))
    first = _run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"),
                                                None))

    def fails_after_a_security_event(w: Writer) -> None:
        w.append_security(Draft("auth.login_failed", outcome="failure"), None)
        raise RuntimeError("after its security event")

    [(ok, err)] = w.run_batch([fails_after_a_security_event])
    assert not ok and isinstance(err, RuntimeError)
    assert w.security_head == first["hash"]
    second = _run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"),
                                                 None))
    assert _writer(conn, audit_key, Limits(500, 1 << 20)).security_head == second["hash"]
    assert w.security_head == second["hash"]

    def start_seal_fail(w: Writer) -> None:
        w.start_session("u", "user", 1e12, [Draft("session.start")], session_id="s9")
        w.seal("s9", "logout", Draft("session.end"))
        raise RuntimeError("after its seal")

    [(ok, err)] = w.run_batch([start_seal_fail])
    assert not ok and isinstance(err, RuntimeError), err
    assert "s9" not in w.sessions
    assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone() == (0,)


def test_a_sink_taking_the_chain_batch_by_batch_holds_one_stretch_of_it(tmp_path, audit_key):
    """Batches of security events stored in one sink extend one stretch,
    from where that sink began to its newest event: a stretch begun at each
    batch would let verify take a chain starting there, so the events
    before it could be removed from the sink unnoticed. A switch to another
    sink begins its stretch after the last event the first took; an event
    retried late does not move either back."""
    from audit.events import genesis
    from audit.store import SECURITY_STREAM

    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(500, 1 << 20))
    evs = [_run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"),
                                               None)) for _ in range(5)]
    h = [genesis(audit_key, SECURITY_STREAM)] + [e["hash"] for e in evs]
    a, b = "jsonl /a", "jsonl /b"

    def stretches():
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN"
                                 " ('security_stretch', 'security_taken')"))
        return (conn.execute("SELECT sink, took_from, took_to FROM sink_stretches"
                             " ORDER BY rowid").fetchall(),
                json.loads(meta["security_stretch"]), json.loads(meta["security_taken"]))

    _run(w, lambda w: w.mark_security_stored([1, 2], 60, sink=a))
    _run(w, lambda w: w.mark_security_stored([3], 60, sink=a))
    assert stretches() == ([(a, h[0], h[3])], [a, h[0]], [3, h[3]])
    _run(w, lambda w: w.mark_security_stored([4], 60, sink=b))
    _run(w, lambda w: w.mark_security_stored([5], 60, sink=b))
    assert stretches() == ([(a, h[0], h[3]), (b, h[3], h[5])], [b, h[3]], [5, h[5]])
    _run(w, lambda w: w.mark_security_stored([2], 60, sink=b))  # a dead letter retried late
    assert stretches() == ([(a, h[0], h[3]), (b, h[3], h[5])], [b, h[3]], [5, h[5]])


def test_dead_letters_stored_together_each_note_where_their_chain_resumes(tmp_path, audit_key):
    """Dead letters retried in one batch: one stored in the sink that refused
    it first fills its gap there (nothing to note), and one refused first
    by another sink still has its gap there and its place here noted, after
    the first as before it."""
    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(500, 1 << 20))
    evs = [_run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"),
                                               None)) for _ in range(5)]
    h = {i + 1: e["hash"] for i, e in enumerate(evs)}
    b, c = "jsonl /b", "jsonl /c"
    _run(w, lambda w: w.mark_security_dead([2], "refused", sink=b))
    _run(w, lambda w: w.mark_security_dead([4], "refused", sink=c))
    assert conn.execute("SELECT id, prev, sink FROM security_late ORDER BY id").fetchall() == [
        (2, h[1], b), (4, h[3], c)]
    _run(w, lambda w: w.mark_security_stored([2, 4], 60, sink=b))
    assert sorted(conn.execute("SELECT sink, took_from, took_to FROM sink_resumes")) == sorted(
        [(c, h[4], ""), (b, h[3], h[4])])
    assert conn.execute("SELECT COUNT(*) FROM security_late").fetchone() == (0,)


def test_a_reopened_spool_resumes_every_open_session_where_it_stood(tmp_path, audit_key):
    """At a restart the cache of open sessions is rebuilt from the file: for
    each session with events cut, indexed, in the unindexed tail, or none,
    it is what the writer had (its user, role and expiry, which requests
    are checked against; head, next seq, uncut events counted, sized
    and aged from the first, last activity from the newest event), and new
    event rows are numbered above every indexed one even after the newest
    were deleted (else a later restart would not find them: the session
    would resume from an older head, its next event forking the chain). A
    batch that fails whole reloads the cache the same way, keeping activity
    seen since in memory only (else an idle timeout would come early)."""
    from audit.store import Read, ReadOnlyViolation

    conn = _conn(tmp_path)
    clock = Ticking(step=1.0)
    limits = Limits(4, 1 << 20)
    w = _writer(conn, audit_key, limits, clock)
    _start(w, "s0")
    _append(w, "s0", 11)
    _run(w, lambda w: w.seal("s0", "logout", Draft("session.end")))  # parts 0-2
    for part in range(3):
        _run(w, lambda w, part=part: w.mark_part_stored("s0", part, 0))  # indexed, deleted
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (0,)

    w = _writer(conn, audit_key, limits, clock)  # a restart
    _start(w, "s1")
    _append(w, "s1", 6)  # part 0: 1-4; 5, 6 uncut
    _start(w, "s2")
    _append(w, "s2", 2)
    _run(w, lambda w: w.start_session("root", "admin", 2e12, [], session_id="s3"))  # no events
    _run(w, lambda w: w.index_tail())
    _append(w, "s1", 2)  # 7, 8 in the tail
    _start(w, "s4")
    _append(w, "s4", 3)  # all in the tail
    _start(w, "s5")
    _append(w, "s5", 4)
    _run(w, lambda w: w.checkpoint("s5"))  # all cut

    def state(w: Writer) -> dict:
        return {sid: (s.sk, s.user, s.role, s.expires_at, s.start_ts, s.last_activity,
                      s.next_seq, s.head, s.cut_seq, s.cut_hash, s.cut_events, s.next_part,
                      s.uncut_count, s.uncut_bytes, s.uncut_first_ts)
                for sid, s in w.sessions.items()}

    before = state(w)
    clock.now += 50
    w.touch("s2")  # activity without an event: kept in memory
    with pytest.raises(ReadOnlyViolation):  # a batch failing whole reloads the cache
        w.run_batch([Read("s1", Draft("document.list"),
                          lambda c, d: c.execute("INSERT INTO meta VALUES ('x', 'y')"))])
    touched = dict(before, s2=(*before["s2"][:5], clock.now, *before["s2"][6:]))
    assert state(w) == touched
    w2 = _writer(conn, audit_key, limits, clock)
    assert state(w2) == before
    assert w2.sessions["s1"].uncut_count == 4 and w2.sessions["s4"].uncut_count == 3
    assert w2.next_sk == w.next_sk
    for sid in ("s1", "s2", "s3", "s4", "s5"):
        _append(w2, sid, 1)
    w3 = _writer(conn, audit_key, limits, clock)  # once more: what w2 wrote is found
    assert state(w3) == state(w2)
    assert [s.next_seq for s in w3.sessions.values()] == [10, 4, 2, 5, 6]


def test_a_job_failing_in_a_batch_fails_alone_and_drops_no_other_event(tmp_path, audit_key):
    """A plain job failing (an append to a session not open, a denied read
    whose record fails in its part cut, a read of a damaged document that
    also spoils the batch's read-ahead) fails alone: the events the other
    jobs of its batch appended before and after it are all committed, and
    their sessions' heads go on from them."""
    from audit.events import event_hash, genesis
    from audit.store import ActionError, Read

    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(2, 1 << 20))
    _start(w, "s1")
    _start(w, "s2")
    _append(w, "s2", 2)
    conn.execute("INSERT INTO parts (session_id, part, first_seq, last_seq, final, seal_reason,"
                 " prev_hash, hash, state, created_ts) VALUES ('s2', 0, 1, 1, 0, 'checkpoint',"
                 " '', '', 'stored', 0)")  # in the way of s2's next cut
    conn.execute("INSERT INTO documents VALUES ('ok', 't', 'c', 'u', 1, 'x', 'x')")
    conn.execute("INSERT INTO documents VALUES ('bad', CAST(x'ff' AS TEXT), 'c', 'u', 1, 'x',"
                 " 'x')")  # not UTF-8: its own read fails, and so does the read-ahead

    def deny(row, d):
        raise ActionError("not_owner", "denied")

    results = w.run_batch([
        Append("s1", Draft("document.list")),
        Read("s1", Draft("document.read"), lambda row, d: row[0], document="ok"),
        Read("s1", Draft("document.read"), lambda row, d: row[0], document="bad"),
        Append("s1", Draft("document.list")),
        Append("gone", Draft("document.list")),
        Append("s1", Draft("document.list")),
        Read("s2", Draft("document.read"), deny),
        Append("s1", Draft("document.list")),
    ])
    assert [ok for ok, _ in results] == [True, True, False, True, False, True, False, True]
    assert results[1][1] == "ok"
    seqs = [r[0] for r in conn.execute("SELECT seq FROM events WHERE session_id = 's1'"
                                       " ORDER BY seq")]
    assert seqs == [1, 2, 3, 4, 5]
    assert w.sessions["s1"].next_seq == 6
    assert conn.execute("SELECT COUNT(*) FROM events WHERE session_id = 's2'").fetchone() == (2,)
    assert conn.execute("SELECT COUNT(*) FROM security_events").fetchone() == (0,)
    conn.execute("DELETE FROM parts")
    _append(w, "s1", 1)
    events = [json.loads(r[0]) for r in conn.execute(
        "SELECT json FROM events WHERE session_id = 's1' ORDER BY seq")]
    prev = genesis(audit_key, "s1")
    for ev in events:  # one unbroken chain: no event dropped under a head that moved on
        assert event_hash(audit_key, prev, ev) == ev["hash"]
        prev = ev["hash"]
    assert [ev["seq"] for ev in events] == [1, 2, 3, 4, 5, 6]


def test_an_upgraded_spool_knows_where_the_chain_stood_for_the_next_dead_letter(
        tmp_path, audit_key):
    """A spool an earlier release flushed (every security event stored and
    deleted, no stretch noted) notes at the upgrade where the chain stood:
    the newest id and hash. The next security event, dead-lettered before
    anything else is stored, then has its place noted (the hash before it),
    so that a sink switch and a retry leave no false break for verify."""
    from audit.store import note_earlier_stretch

    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(500, 1 << 20))
    evs = [_run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"),
                                               None)) for _ in range(3)]
    _run(w, lambda w: w.mark_security_stored([1, 2, 3], 0))  # deleted at once
    conn.execute("DELETE FROM meta WHERE key IN ('security_taken', 'security_stretch')")
    conn.execute("DELETE FROM sink_stretches")
    conn.execute("INSERT INTO meta VALUES ('sink_status', ?)",
                 (json.dumps({"type": "jsonl", "where": "/a", "healthy": True}),))
    note_earlier_stretch(conn)  # the upgrade
    assert conn.execute("SELECT sink, took_from, took_to FROM sink_stretches").fetchall() == [
        ("jsonl /a", "", evs[-1]["hash"])]
    w = _writer(conn, audit_key, Limits(500, 1 << 20))
    _run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"), None))
    _run(w, lambda w: w.mark_security_dead([4], "refused", sink="jsonl /a"))
    assert conn.execute("SELECT id, prev, sink FROM security_late").fetchall() == [
        (4, evs[-1]["hash"], "jsonl /a")]


def test_lowered_limits_split_after_a_sessions_earlier_parts(tmp_path, audit_key):
    """The split at a start with lowered limits begins after the session's
    last part: its parts fill the new limit from the first uncut event (the
    event already cut is neither counted nor sized again)."""
    conn = _conn(tmp_path)
    w = _writer(conn, audit_key, Limits(4, 1 << 20))
    _start(w, "s1")
    _append(w, "s1", 11)  # parts 1-4, 5-8; 9-11 uncut
    w = _writer(conn, audit_key, Limits(2, 1 << 20))
    conn.execute("BEGIN IMMEDIATE")
    assert w.split_oversized() == 1
    conn.execute("COMMIT")
    assert _parts(conn, "s1")[2:] == [(9, 10, "checkpoint")]
    s = w.sessions["s1"]
    assert (s.cut_seq, s.uncut_count, s.uncut_bytes) == (10, 1, _sizes(conn, "s1")[10])
    hashes = [json.loads(r[0])["hash"] for r in conn.execute(
        "SELECT json FROM events ORDER BY seq")]
    # Not final (the session goes on), and chained: from the part before to its last event.
    assert conn.execute("SELECT final, prev_hash, hash FROM parts WHERE part = 2").fetchone() == (
        0, hashes[7], hashes[9])
    assert s.cut_hash == hashes[9]

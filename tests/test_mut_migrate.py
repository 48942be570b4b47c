"""Upgrades of a spool an earlier release wrote, pinned end to end (gaps a
mutation run of audit/store.py's migrations found): each event comes out
once and unchanged, the chains go on where they stood, a second start
changes nothing, a migration cut off by SIGKILL is rolled back whole, and
the dead letters an earlier release left get their place in the security
chain noted where the spool can tell it, and no wrong one where it cannot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
from sqlite_conns import connect as _connect
from test_spool import _downgrade

from audit import queries
from audit.events import Draft, Source, genesis
from audit.spool import Spool
from audit.store import SCHEMA, SECURITY_STREAM, Append, Limits, Writer, shown_ms
from audit.verify import check_session

LIMITS = Limits(3, 1 << 20)  # parts of three events: checkpoints in a short session
_ROOT = Path(__file__).resolve().parent.parent


def _events(path: Path) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as c:
        return sorted(c.execute("SELECT session_id, seq, ts, json FROM events"))


def _dump(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as c:
        return list(c.iterdump())


def _as(user: str, action: str) -> Draft:
    details = {"reason": "logout"} if action == "session.end" else {}
    return Draft(action, details=details, source=Source(user=user, role="user"))


async def _old_spool(path: Path, key: bytes) -> tuple[str, str]:
    """A spool of one sealed session (two parts) and one open one (a
    checkpoint part and two uncut events), their events interleaved, and a
    security event: (sealed, open) session ids."""
    sp = Spool(path, key, limits=LIMITS)
    await sp.open()
    try:
        a = await sp.submit(lambda w: w.start_session("a", "user", 1e12,
                                                      [_as("a", "session.start")]))
        b = await sp.submit(lambda w: w.start_session("b", "user", 1e12,
                                                      [_as("b", "session.start")]))
        for _ in range(4):
            await sp.submit(Append(b.session_id, _as("b", "document.list")))
            await sp.submit(Append(a.session_id, _as("a", "document.list")))
        await sp.submit(lambda w: w.seal(a.session_id, "logout", _as("a", "session.end")))
        await sp.submit(lambda w: w.append_security(
            Draft("auth.login_failed", outcome="denied"), None))
    finally:
        await sp.close()
    return a.session_id, b.session_id


async def _check_upgraded(path: Path, key: bytes, before: list[tuple[object, ...]],
                          sealed: str, opened: str) -> None:
    """Every event of ``before`` once and unchanged, each in event_keys, a
    second start a no-op, and both sessions' parts verified (the open one
    sealed now: its end continues the chain from where it stood)."""
    sp = Spool(path, key, limits=LIMITS)
    await sp.open()
    await sp.close()
    assert _events(path) == before
    with contextlib.closing(sqlite3.connect(path)) as c:
        keyed = c.execute("SELECT COUNT(*) FROM event_keys k JOIN events e ON e.rowid = k.rid"
                          " AND e.sk = k.sk AND e.seq = k.seq").fetchone()[0]
        assert keyed == len(before)
        assert c.execute("SELECT COUNT(*) FROM session_events").fetchone()[0] == len(before)
        assert c.execute("SELECT name FROM sqlite_master WHERE name IN"
                         " ('events_old', 'events_sk_seq', 'events_session_seq')").fetchall() == []
    upgraded = _dump(path)
    sp = Spool(path, key, limits=LIMITS)
    await sp.open()
    await sp.close()
    assert _dump(path) == upgraded  # the second start converts nothing again

    sp = Spool(path, key, limits=LIMITS)
    await sp.open()
    try:
        assert sp.open_session(opened).next_seq == 6
        await sp.submit(lambda w: w.seal(opened, "logout", _as("b", "session.end")))
        parts: dict[str, list[dict[str, object]]] = {sealed: [], opened: []}
        while (part := await sp.read(lambda c: queries.load_part(
                c, skip=[(p["session_id"], p["part"]) for ps in parts.values() for p in ps]))):
            parts[str(part["session_id"])].append(part)
    finally:
        await sp.close()
    assert [len(ps) for ps in parts.values()] == [2, 2]
    for sid, ps in parts.items():
        assert check_session(key, sid, json.loads(json.dumps(ps))) == [], sid
        assert ps[-1]["final"]


@pytest.mark.parametrize("layout", ["clustered", "text_key", "sk_index"])
async def test_an_upgrade_keeps_every_event_once_and_the_chains_go_on(
        tmp_path, audit_key, layout):
    path = tmp_path / "spool.db"
    sealed, opened = await _old_spool(path, audit_key)
    before = _events(path)
    _downgrade(path, layout)
    assert _events(path) == before
    await _check_upgraded(path, audit_key, before, sealed, opened)


# Runs the start's layout step (spool.prepare) on an earlier layout and is
# killed (SIGKILL, by itself) when it is about to run the statement that
# begins with argv[2]. A small page cache: the migration's pages go to the
# -wal before its commit, as in a large spool.
_KILLED_AT = """
import os, signal, sqlite3, sys
from pathlib import Path
from audit.spool import prepare
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("PRAGMA cache_size = 2")
def trace(sql):
    if sql.lstrip().startswith(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
conn.set_trace_callback(trace)
prepare(conn, Path(sys.argv[1]))
print("not killed")
"""


@pytest.mark.parametrize("at", [
    "DROP TABLE events_old",          # the events copied, the old table still there
    "INSERT INTO meta (key, value) SELECT 'keys_mark'",  # all but the commit
    "PRAGMA user_version =",          # converted, committed; the layout not yet noted
])
async def test_an_upgrade_killed_half_way_is_undone_or_finished_by_the_next_start(
        tmp_path, audit_key, at):
    path = tmp_path / "spool.db"
    sealed, opened = await _old_spool(path, audit_key)
    before = _events(path)
    _downgrade(path, "text_key")
    with contextlib.closing(sqlite3.connect(path)) as c:
        c.execute("PRAGMA user_version = 0")  # (an earlier release's file)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_AT, str(path), at, cwd=_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -signal.SIGKILL, out
    with contextlib.closing(sqlite3.connect(path)) as c:
        converted = "sk" in [r[1] for r in c.execute("PRAGMA table_info(events)")]
    assert converted == (at == "PRAGMA user_version ="), at  # the conversion is one commit
    await _check_upgraded(path, audit_key, before, sealed, opened)


async def test_a_start_notes_the_dead_letters_an_earlier_release_left(tmp_path, audit_key):
    """The start (Spool.open) notes, in a commit of its own, the place of a
    dead letter a release before security_late left (the event before it
    kept by keep_stored_seconds); the next start changes nothing."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=LIMITS)
    await sp.open()
    try:
        evs = [await sp.submit(lambda w: w.append_security(
            Draft("auth.login_failed", outcome="denied"), None)) for _ in range(3)]
        await sp.submit(lambda w: w.mark_security_stored([1, 3], 60, sink="jsonl /a"))
        await sp.submit(lambda w: w.mark_security_dead([2], "refused"))
    finally:
        await sp.close()
    with contextlib.closing(sqlite3.connect(path)) as c:
        assert c.execute("SELECT 1 FROM sqlite_master WHERE name = 'security_late'").fetchone() \
            is None  # as that release left it
    for _ in range(2):
        sp = Spool(path, audit_key, limits=LIMITS)
        await sp.open()
        await sp.close()
        with contextlib.closing(sqlite3.connect(path)) as c:
            assert c.execute("SELECT id, prev, sink FROM security_late").fetchall() == [
                (2, evs[0]["hash"], "jsonl /a")]
            assert c.execute("SELECT id, state FROM security_events ORDER BY id").fetchall() \
                == [(1, "stored"), (2, "dead"), (3, "stored")]
    # Retried into another sink: where each sink's chain resumes is noted.
    sp = Spool(path, audit_key, limits=LIMITS)
    await sp.open()
    try:
        await sp.submit(lambda w: w.retry_dead())
        await sp.submit(lambda w: w.mark_security_stored([2], 60, sink="jsonl /b"))
    finally:
        await sp.close()
    with contextlib.closing(sqlite3.connect(path)) as c:
        assert sorted(c.execute("SELECT sink, took_from, took_to FROM sink_resumes")) == [
            ("jsonl /a", evs[1]["hash"], ""), ("jsonl /b", evs[0]["hash"], evs[1]["hash"])]
        assert c.execute("SELECT COUNT(*) FROM security_late").fetchone() == (0,)


async def test_a_damaged_stretch_note_leaves_the_earlier_dead_letters_unnoted_and_opens(
        tmp_path, audit_key, caplog):
    """A damaged ``security_stretch`` (not JSON) while an earlier release's
    dead letters wait to be noted: ValueError out of Spool.open, a start
    refused with a traceback. The start goes on, as after a cut to the part
    limits that cannot read a damaged text; the note waits."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=LIMITS)
    await sp.open()
    try:
        for _ in range(3):
            await sp.submit(lambda w: w.append_security(
                Draft("auth.login_failed", outcome="denied"), None))
        await sp.submit(lambda w: w.mark_security_stored([1, 3], 60, sink="jsonl /a"))
        await sp.submit(lambda w: w.mark_security_dead([2], "refused"))
    finally:
        await sp.close()
    with contextlib.closing(sqlite3.connect(path)) as c, c:
        c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('security_stretch', '[')")
    sp = Spool(path, audit_key, limits=LIMITS)
    with caplog.at_level(logging.WARNING, logger="session_audit.spool"):
        await sp.open()
    await sp.close()
    assert "could not be noted: JSONDecodeError" in caplog.text
    with contextlib.closing(sqlite3.connect(path)) as c:  # left as it was
        assert c.execute("SELECT id, state FROM security_events ORDER BY id").fetchall() == [
            (1, "stored"), (2, "dead"), (3, "stored")]
        assert c.execute("SELECT 1 FROM sqlite_master WHERE name = 'security_late'"
                         ).fetchone() is None


@pytest.mark.parametrize("left", ["no security event", "no sink_status"])
async def test_a_spool_whose_stretch_cannot_be_told_opens_and_notes_none(
        tmp_path, audit_key, left):
    """An earlier release's spool that flushed with no security event ever
    (sink_status, no security_head), or whose security events all went
    before sink_status was saved (security_head, no sink_status): the start
    notes no stretch, and opens."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=LIMITS)
    await sp.open()
    try:
        if left == "no sink_status":
            await sp.submit(lambda w: w.append_security(
                Draft("auth.login_failed", outcome="denied"), None))
            await sp.submit(lambda w: w.mark_security_stored([1], 0))
    finally:
        await sp.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        if left == "no security event":
            c.execute("INSERT INTO meta (key, value) VALUES ('sink_status', ?)",
                      (json.dumps({"type": "jsonl", "where": "/a", "healthy": True}),))
        keys = {r[0] for r in c.execute("SELECT key FROM meta")}
    assert ("sink_status" in keys, "security_head" in keys) == (
        left == "no security event", left == "no sink_status")
    sp = Spool(path, audit_key, limits=LIMITS)
    await sp.open()
    await sp.close()
    with contextlib.closing(sqlite3.connect(path)) as c:
        assert c.execute("SELECT key FROM meta WHERE key IN"
                         " ('security_taken', 'security_stretch')").fetchall() == []
        assert c.execute("SELECT COUNT(*) FROM sink_stretches").fetchone() == (0,)


async def test_security_events_an_earlier_release_wrote_since_get_their_shown_ms(
        tmp_path, audit_key):
    """A release before ts_ms run on the file again, writing only security
    events (failed logins; no session started): the next start fills their
    ts_ms though every session's start_ms is there, or a listing since a
    time, which pages by ts_ms, leaves them out."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=LIMITS)
    await sp.open()
    try:
        await sp.submit(lambda w: w.start_session("u", "user", 1e12, [_as("u", "session.start")]))
        for _ in range(2):
            await sp.submit(lambda w: w.append_security(
                Draft("auth.login_failed", outcome="denied"), None))
    finally:
        await sp.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute("UPDATE security_events SET ts_ms = NULL WHERE id = 2")  # the older release's
    sp = Spool(path, audit_key, limits=LIMITS)
    await sp.open()
    try:
        listed = await sp.read(lambda c: queries.list_security(c, since=0, kind=None, limit=10))
    finally:
        await sp.close()
    assert len(listed) == 2
    with contextlib.closing(sqlite3.connect(path)) as c:
        rows = c.execute("SELECT ts, ts_ms FROM security_events").fetchall()
    assert [ms for _, ms in rows] == [shown_ms(ts) for ts, _ in rows]


def _writer(path: Path, key: bytes) -> tuple[sqlite3.Connection, Writer]:
    conn = _connect(path)
    conn.executescript(SCHEMA)
    w = Writer(conn, key, Limits(500, 1 << 20), clock=lambda: 1_800_000_000.0)
    w.load()
    return conn, w


def _run(w: Writer, job):
    [(ok, value)] = w.run_batch([job])
    assert ok, value
    return value


def test_dead_letters_an_earlier_release_left_are_noted_where_the_spool_can_tell(
        tmp_path, audit_key):
    """Dead letters without a note of their place (dead-lettered by a release
    before security_late, or with no sink named): noted with the sink of the
    current stretch and the hash before each, which is the chain's start for
    the first event, the event before it while the spool holds it, or
    security_taken's hash when that is of the event before. Where the spool
    cannot tell (the event before is gone, or damaged), nothing is noted
    rather than a wrong place. A note made already stays; a second run
    notes nothing."""
    conn, w = _writer(tmp_path / "spool.db", audit_key)
    evs = [_run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"),
                                               None)) for _ in range(9)]
    h = {i + 1: e["hash"] for i, e in enumerate(evs)}
    a, b, c = "jsonl /a", "jsonl /b", "jsonl /c"
    _run(w, lambda w: w.mark_security_dead([1], "refused"))  # no sink: no note
    assert _run(w, lambda w: w.note_earlier_late()) == 0  # never stored: no sink to name
    _run(w, lambda w: w.mark_security_stored([2, 3], 0, sink=a))  # deleted at once
    _run(w, lambda w: w.mark_security_dead([4], "refused"))  # before it: gone, not taken last
    _run(w, lambda w: w.mark_security_stored([5], 0, sink=b))  # the switch: b's stretch
    _run(w, lambda w: w.mark_security_dead([6, 8], "refused"))  # 6 after taken 5; 8 after 7
    _run(w, lambda w: w.mark_security_dead([9], "refused", sink=c))  # noted: stays as it is
    conn.execute("UPDATE security_events SET json = 'not json' WHERE id = 7")  # damaged
    rows = conn.execute("SELECT * FROM security_events ORDER BY id").fetchall()
    assert _run(w, lambda w: w.note_earlier_late()) == 2
    noted = [(1, genesis(audit_key, SECURITY_STREAM), b), (6, h[5], b), (9, h[8], c)]
    assert conn.execute("SELECT id, prev, sink FROM security_late ORDER BY id").fetchall() \
        == noted
    assert _run(w, lambda w: w.note_earlier_late()) == 0
    assert conn.execute("SELECT id, prev, sink FROM security_late ORDER BY id").fetchall() \
        == noted
    assert conn.execute("SELECT * FROM security_events ORDER BY id").fetchall() == rows


def test_a_dead_letter_after_events_an_earlier_release_sent_notes_no_place(
        tmp_path, audit_key):
    """A spool an earlier release flushed: the event before a dead letter is
    gone, and security_taken is absent (events were still unsent at the
    upgrade) or a bare hash (one earlier build's, whose id is unknown: here
    the hash of event 3, taken past the refused 2). No place the spool can
    tell: nothing is noted, and the event is dead-lettered all the same."""
    conn, w = _writer(tmp_path / "spool.db", audit_key)
    evs = [_run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"),
                                               None)) for _ in range(3)]
    conn.execute("DELETE FROM security_events WHERE id IN (1, 3)")  # sent back then
    _run(w, lambda w: w.mark_security_dead([2], "refused", sink="jsonl /a"))
    assert conn.execute("SELECT id, state FROM security_events").fetchall() == [(2, "dead")]
    assert conn.execute("SELECT COUNT(*) FROM security_late").fetchone() == (0,)
    conn.execute("INSERT INTO meta (key, value) VALUES ('security_taken', ?)", (evs[2]["hash"],))
    _run(w, lambda w: w.retry_dead())
    _run(w, lambda w: w.mark_security_dead([2], "refused again", sink="jsonl /a"))
    assert conn.execute("SELECT id, state FROM security_events").fetchall() == [(2, "dead")]
    assert conn.execute("SELECT COUNT(*) FROM security_late").fetchone() == (0,)


def test_the_stretch_noted_at_an_upgrade_goes_on_in_the_same_sink(tmp_path, audit_key):
    """The stretch an earlier release's sink holds, noted at the upgrade from
    an unknown start ("") to the security head, is the one the same sink's
    next acknowledgement extends: one stretch, not a second beginning at the
    head (nor a failure to read the current stretch, which failed every
    acknowledgement of a security event)."""
    from audit.store import note_earlier_stretch

    conn, w = _writer(tmp_path / "spool.db", audit_key)
    evs = [_run(w, lambda w: w.append_security(Draft("auth.login_failed", outcome="failure"),
                                               None)) for _ in range(3)]
    _run(w, lambda w: w.mark_security_stored([1, 2, 3], 0))  # as that release: no stretch
    conn.execute("INSERT INTO meta (key, value) VALUES ('sink_status', ?)",
                 (json.dumps({"type": "jsonl", "where": "/a", "healthy": True}),))
    note_earlier_stretch(conn)  # the upgrade
    conn, w = _writer(tmp_path / "spool.db", audit_key)
    evs.append(_run(w, lambda w: w.append_security(
        Draft("auth.login_failed", outcome="failure"), None)))
    _run(w, lambda w: w.mark_security_stored([4], 0, sink="jsonl /a"))
    assert conn.execute("SELECT sink, took_from, took_to FROM sink_stretches").fetchall() == [
        ("jsonl /a", "", evs[3]["hash"])]
    meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN"
                             " ('security_stretch', 'security_taken')"))
    assert json.loads(meta["security_stretch"]) == ["jsonl /a", ""]
    assert json.loads(meta["security_taken"]) == [4, evs[3]["hash"]]


async def test_a_shown_ms_upgrade_that_cannot_write_says_why(tmp_path, audit_key):
    """As test_spool's migration with no room: the start_ms column and its
    values are one transaction, which SQLite rolls back itself when a write
    fails; what the start says is the disk's error (not a failed ROLLBACK),
    and the next start with room upgrades the file."""
    from test_spool import migrate_with_no_room

    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=LIMITS)
    await sp.open()
    try:
        await asyncio.gather(*(sp.submit(lambda w: w.start_session(
            "u", "user", 1e12, [_as("u", "session.start")])) for _ in range(200)))
    finally:
        await sp.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.executescript(
            "BEGIN; DROP INDEX sessions_start; DROP INDEX sessions_state_start;"
            " DROP INDEX sessions_user; ALTER TABLE sessions DROP COLUMN start_ms; COMMIT;"
            " PRAGMA wal_checkpoint(TRUNCATE);")
    out = await migrate_with_no_room(path)
    assert "in transaction: False" in out, out
    with contextlib.closing(sqlite3.connect(path)) as c:
        assert "start_ms" not in [r[1] for r in c.execute("PRAGMA table_info(sessions)")]
    sp = Spool(path, audit_key, limits=LIMITS)
    await sp.open()
    await sp.close()
    with contextlib.closing(sqlite3.connect(path)) as c:
        # (Compared in Python: SQLite's ROUND can differ from round() by one
        # ms near a half, as it did for one of 200 in a CI run.)
        rows = c.execute("SELECT start_ts, start_ms FROM sessions").fetchall()
    assert len(rows) == 200 and all(ms == shown_ms(ts) for ts, ms in rows)


async def test_a_sessions_table_without_head_ts_is_upgraded(tmp_path, audit_key):
    """A spool of the release before sessions.head_ts: the start adds the
    column, and the open session's chain goes on from where it stood, its
    newest event's time taken from its events (mutation review: without the
    migration such a spool was refused at the start, no such column)."""
    path = tmp_path / "spool.db"
    sealed, opened = await _old_spool(path, audit_key)
    before = _events(path)
    _downgrade(path, "sk_index")  # (a release before event_keys, and so before head_ts)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute("ALTER TABLE sessions DROP COLUMN head_ts")
    await _check_upgraded(path, audit_key, before, sealed, opened)
    with contextlib.closing(sqlite3.connect(path)) as c:
        assert "head_ts" in [r[1] for r in c.execute("PRAGMA table_info(sessions)")]

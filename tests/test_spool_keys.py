"""The events layout: an unindexed append-only table plus ``event_keys``
filled in bulk (audit/store.py, SCHEMA). Every read must see the events of
both halves, a delete must leave no row in either, and a rowid must never
fall under the mark."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from typing import Any

import pytest

from audit import queries, store
from audit.events import Draft, event_hash, format_ts
from audit.spool import Spool
from audit.store import Append, Limits


def _layout(path) -> tuple[int, int, int, int]:
    """(rows in events, rows in event_keys, rows in the tail, keys_mark)."""
    with contextlib.closing(sqlite3.connect(path)) as c:
        mark = c.execute(
            "SELECT COALESCE(MAX(CAST(value AS INTEGER)), 0) FROM meta WHERE key = 'keys_mark'"
        ).fetchone()[0]
        events = c.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        keyed = c.execute(
            "SELECT COUNT(*) FROM event_keys k JOIN events e ON e.rowid = k.rid"
            " AND e.sk = k.sk AND e.seq = k.seq"
        ).fetchone()[0]
        tail = c.execute("SELECT COUNT(*) FROM events WHERE rowid > ?", (mark,)).fetchone()[0]
    return events, keyed, tail, mark


def _check_layout(path) -> None:
    """Every event row is in event_keys (same sk, seq, rowid) or above the
    mark, and no key points at a missing row or above the mark."""
    with contextlib.closing(sqlite3.connect(path)) as c:
        mark = c.execute(
            "SELECT COALESCE(MAX(CAST(value AS INTEGER)), 0) FROM meta WHERE key = 'keys_mark'"
        ).fetchone()[0]
        lost = c.execute(
            "SELECT COUNT(*) FROM events e WHERE e.rowid <= ? AND NOT EXISTS (SELECT 1 FROM"
            " event_keys k WHERE k.rid = e.rowid AND k.sk = e.sk AND k.seq = e.seq)",
            (mark,),
        ).fetchone()[0]
        dangling = c.execute(
            "SELECT COUNT(*) FROM event_keys k WHERE k.rid > ?"
            " OR NOT EXISTS (SELECT 1 FROM events e WHERE e.rowid = k.rid)",
            (mark,),
        ).fetchone()[0]
    assert (lost, dangling) == (0, 0)


async def _all_parts(sp: Spool, session_id: str) -> list[list[int]]:
    def read(c: sqlite3.Connection) -> list[list[int]]:
        metas = c.execute(
            "SELECT p.first_seq, p.last_seq, s.sk FROM parts p JOIN sessions s USING (session_id)"
            " WHERE p.session_id = ? ORDER BY p.part",
            (session_id,),
        ).fetchall()
        return [
            [e["seq"] for e in queries.part_events(c, {"first_seq": a, "last_seq": b, "sk": sk})]
            for a, b, sk in metas
        ]

    return await sp.read(read)


async def test_reads_see_the_indexed_events_and_the_tail(tmp_path, audit_key, monkeypatch):
    monkeypatch.setattr(store, "KEYS_EVERY", 4)
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(3, 1 << 20))
    await sp.open()
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
    for _ in range(9):  # one batch each: the tail is indexed every 4 rows
        await sp.submit(Append(s.session_id, Draft("document.list")))
    events, keyed, tail, _ = _layout(path)
    assert events == 10 and keyed == 8 and tail == 2
    _check_layout(path)
    # Parts 1-3, 4-6, 7-9 are cut; 10 is uncut. The last part straddles.
    assert await _all_parts(sp, s.session_id) == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    summary = await sp.read(lambda c: queries.get_session(c, s.session_id))
    assert [e["seq"] for e in summary["events"]] == list(range(1, 11))
    assert summary["event_count"] == 10 and summary["parts"] == 4
    other = await sp.submit(lambda w: w.start_session("v", "user", 1e12, [Draft("session.start")]))
    listed = await sp.read(lambda c: queries.list_sessions(
        c, user=None, since=None, until=None, before=None, limit=10))
    assert {r["session_id"]: r["event_count"] for r in listed} == {
        s.session_id: 10, other.session_id: 1}
    head = sp.open_session(s.session_id)
    await sp.close()

    sp = Spool(path, audit_key, limits=Limits(3, 1 << 20))
    await sp.open()
    try:
        again = sp.open_session(s.session_id)
        assert (again.next_seq, again.head, again.uncut_count) == (11, head.head, 1)
        ev = json.loads(await sp.submit(Append(s.session_id, Draft("document.list"))))
        assert ev["seq"] == 11 and ev["hash"] == event_hash(audit_key, head.head, ev)
    finally:
        await sp.close()


async def _five_events(path, audit_key, part_max_events: int) -> tuple[Any, dict[str, Any]]:
    """A closed spool holding one open session of five events; (session, last event)."""
    sp = Spool(path, audit_key, limits=Limits(part_max_events, 1 << 20))
    await sp.open()
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
    for _ in range(4):
        last = json.loads(await sp.submit(Append(s.session_id, Draft("document.list"))))
    await sp.close()
    return s, last


async def _two_sessions(sp: Spool) -> tuple[Any, Any]:
    """Sessions "a" then "b", started (their session.start the newest rows)."""
    start = [Draft("session.start")]
    a = await sp.submit(lambda w: w.start_session("a", "user", 1e12, start))
    b = await sp.submit(lambda w: w.start_session("b", "user", 1e12, start))
    return a, b


async def test_a_session_resumes_from_the_tail_alone(tmp_path, audit_key):
    """Nothing indexed yet (the shipped KEYS_EVERY is far away): a new process
    finds the open session's uncut events, next seq and chain head in the tail."""
    path = tmp_path / "spool.db"
    s, last = await _five_events(path, audit_key, 500)
    assert _layout(path)[1:3] == (0, 5)
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        again = sp.open_session(s.session_id)
        assert (again.next_seq, again.head, again.uncut_count) == (6, last["hash"], 5)
    finally:
        await sp.close()


@pytest.mark.parametrize("keys_every", [1, 3, 10**9])
async def test_a_stored_part_leaves_no_row_in_either_half(
    tmp_path, audit_key, monkeypatch, keys_every
):
    monkeypatch.setattr(store, "KEYS_EVERY", keys_every)
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(4, 1 << 20))
    await sp.open()
    try:
        gone, kept = await _two_sessions(sp)
        for _ in range(5):
            await sp.submit(Append(gone.session_id, Draft("document.list")))
            await sp.submit(Append(kept.session_id, Draft("document.list")))
        await sp.submit(lambda w: w.seal(gone.session_id, "logout", Draft("session.end")))
        for part in range(2):
            await sp.submit(lambda w, p=part: w.mark_part_stored(gone.session_id, p, 0))
        events, keyed, tail, _ = _layout(path)
        assert (events, keyed + tail) == (6, 6)  # b's six events only
        _check_layout(path)
        with contextlib.closing(sqlite3.connect(path)) as c:
            assert c.execute("SELECT COUNT(*) FROM event_keys").fetchone()[0] == keyed
            assert {r[0] for r in c.execute("SELECT session_id FROM events")} == {kept.session_id}
        assert await _all_parts(sp, kept.session_id) == [[1, 2, 3, 4]]
    finally:
        await sp.close()


async def test_rowids_never_fall_under_the_mark(tmp_path, audit_key):
    """Deleting the newest rows lowers MAX(rowid) under the mark; a rowid
    SQLite chose would be reused there, and its event would be in neither
    event_keys nor the tail: invisible to every read, lost to the flusher."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    kept = await sp.submit(lambda w: w.start_session("b", "user", 1e12, [Draft("session.start")]))
    gone = await sp.submit(lambda w: w.start_session("a", "user", 1e12, [Draft("session.start")]))
    for _ in range(3):
        await sp.submit(Append(gone.session_id, Draft("document.list")))
    await sp.submit(lambda w: w.seal(gone.session_id, "logout", Draft("session.end")))
    await sp.submit(lambda w: w.mark_part_stored(gone.session_id, 0, 0))  # the newest rows
    events, _, tail, mark = _layout(path)
    assert events == 1 and tail == 0 and mark == 6
    await sp.close()

    for _ in range(2):  # in this process, and in the next one
        sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
        await sp.open()
        try:
            ev = json.loads(await sp.submit(Append(kept.session_id, Draft("document.list"))))
            summary = await sp.read(lambda c: queries.get_session(c, kept.session_id))
            assert summary["events"][-1]["event_id"] == ev["event_id"]
            assert summary["event_count"] == ev["seq"]
        finally:
            await sp.close()
    with contextlib.closing(sqlite3.connect(path)) as c:
        assert c.execute("SELECT MIN(rowid) FROM events WHERE seq > 1").fetchone()[0] > mark


async def test_a_spool_with_the_sk_seq_index_is_migrated(tmp_path, audit_key):
    """Files of the layout before event_keys (a unique (sk, seq) index on
    events): the index goes, event_keys holds every event, sessions resume."""
    path = tmp_path / "spool.db"
    s, last = await _five_events(path, audit_key, 3)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.executescript(
            "BEGIN; DROP VIEW session_events; DROP TABLE event_keys;"
            " DELETE FROM meta WHERE key = 'keys_mark';"
            " CREATE UNIQUE INDEX events_sk_seq ON events (sk, seq); COMMIT;"
        )
    sp = Spool(path, audit_key, limits=Limits(3, 1 << 20))
    await sp.open()
    try:
        events, keyed, tail, mark = _layout(path)
        assert (events, keyed, tail, mark) == (5, 5, 0, 5)
        with contextlib.closing(sqlite3.connect(path)) as c:
            index = c.execute("SELECT 1 FROM sqlite_master WHERE name = 'events_sk_seq'")
            assert index.fetchone() is None
        again = sp.open_session(s.session_id)
        assert (again.next_seq, again.head, again.uncut_count) == (6, last["hash"], 2)
        assert await _all_parts(sp, s.session_id) == [[1, 2, 3]]
        part = await sp.read(queries.load_part)
        assert [json.loads(json.dumps(e))["seq"] for e in part["events"]] == [1, 2, 3]
    finally:
        await sp.close()


async def _same_after_reload(sp: Spool) -> None:
    """The writer's cache is what a new process would load from the file."""
    def compare(w: store.Writer) -> None:
        live = {sid: (s.next_seq, s.head, s.uncut_count, s.uncut_bytes, s.cut_seq, s.sk)
                for sid, s in w.sessions.items()}
        w.load()
        again = {sid: (s.next_seq, s.head, s.uncut_count, s.uncut_bytes, s.cut_seq, s.sk)
                 for sid, s in w.sessions.items()}
        assert again == live

    await sp.submit(compare)


async def test_a_failed_index_step_leaves_the_tail_for_the_next_batch(
    tmp_path, audit_key, monkeypatch
):
    """SQLITE_FULL (or the like) while indexing at the end of a batch: the
    batch's appends still commit, and the next batch indexes the tail."""
    monkeypatch.setattr(store, "KEYS_EVERY", 3)
    real, calls = store.Writer.index_tail, []

    def failing_once(w: store.Writer) -> None:
        calls.append(1)
        if len(calls) == 1:
            w.conn.execute("INSERT INTO event_keys SELECT sk, seq, rowid FROM events")
            raise sqlite3.OperationalError("database or disk is full")
        real(w)

    monkeypatch.setattr(store.Writer, "index_tail", failing_once)
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
        for _ in range(2):
            await sp.submit(Append(s.session_id, Draft("document.list")))
        assert len(calls) == 1  # failed: its partial insert is rolled back
        _check_layout(path)
        assert _layout(path)[:3] == (3, 0, 3)
        await sp.submit(Append(s.session_id, Draft("document.list")))
        assert len(calls) == 2 and _layout(path)[:3] == (4, 4, 0)
        _check_layout(path)
        await _same_after_reload(sp)
    finally:
        await sp.close()


async def test_a_job_rolled_back_after_indexing_leaves_a_consistent_file(tmp_path, audit_key):
    """A flusher job that deletes a part (indexing the tail first) and then
    fails: both its delete and its indexing are undone, nothing is lost."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        gone, kept = await _two_sessions(sp)
        await sp.submit(lambda w: w.seal(gone.session_id, "logout", Draft("session.end")))
        await sp.submit(Append(kept.session_id, Draft("document.list")))

        def store_then_fail(w: store.Writer) -> None:
            w.mark_part_stored(gone.session_id, 0, 0)
            raise RuntimeError("the job fails after the delete")

        with pytest.raises(RuntimeError):
            await sp.submit(store_then_fail)
        assert _layout(path)[:3] == (4, 0, 4)
        _check_layout(path)
        await _same_after_reload(sp)
        await sp.submit(lambda w: w.mark_part_stored(gone.session_id, 0, 0))
        assert _layout(path)[:3] == (2, 2, 0)
        _check_layout(path)
        summary = await sp.read(lambda c: queries.get_session(c, kept.session_id))
        assert [e["seq"] for e in summary["events"]] == [1, 2]
    finally:
        await sp.close()


async def test_two_events_with_one_seq_are_kept_and_the_spool_still_drains(
    tmp_path, audit_key, monkeypatch, caplog
):
    """Not reachable through the writer's API (its cache gives each seq once):
    a row forced in by hand. Indexing stops with an error in the log; reads
    return both events; storing the part deletes both; appends go on."""
    monkeypatch.setattr(store, "KEYS_EVERY", 2)
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
        await sp.submit(Append(s.session_id, Draft("document.list")))  # indexed: seq 1-2

        def duplicate(w: store.Writer) -> None:
            rid, w.next_rid = w.next_rid, w.next_rid + 1
            row = w.conn.execute("SELECT sk, session_id, seq, ts, json FROM events"
                                 " WHERE seq = 2").fetchone()
            w.conn.execute("INSERT INTO events (rowid, sk, session_id, seq, ts, json)"
                           " VALUES (?, ?, ?, ?, ?, ?)", (rid, *row))
            w.tail += 1

        await sp.submit(duplicate)
        await sp.submit(Append(s.session_id, Draft("document.list")))  # seq 3: index fails
        assert "same session and seq" in caplog.text
        assert _layout(path)[:3] == (4, 2, 2)
        await sp.submit(lambda w: w.seal(s.session_id, "logout", Draft("session.end")))
        part = await sp.read(queries.load_part)
        assert [e["seq"] for e in part["events"]] == [1, 2, 2, 3, 4]
        await sp.submit(lambda w: w.mark_part_stored(s.session_id, 0, 0))
        assert _layout(path)[0] == 0
        s2 = await sp.submit(lambda w: w.start_session("u", "user", 1e12, []))
        ev = json.loads(await sp.submit(Append(s2.session_id, Draft("document.list"))))
        assert ev["seq"] == 1
    finally:
        await sp.close()


async def test_a_file_an_older_release_ran_on_again_gets_its_keys_rebuilt(tmp_path, audit_key):
    """After a downgrade, the release before event_keys puts its (sk, seq)
    index back, lets SQLite choose rowids (under the mark, once the newest
    rows are gone) and leaves event_keys stale. The next start rebuilds it."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    start = [Draft("session.start")]
    kept = await sp.submit(lambda w: w.start_session("b", "user", 1e12, start))
    gone = await sp.submit(lambda w: w.start_session("a", "user", 1e12, start))
    for _ in range(2):
        await sp.submit(Append(gone.session_id, Draft("document.list")))
    await sp.submit(lambda w: w.seal(gone.session_id, "logout", Draft("session.end")))
    await sp.submit(lambda w: w.index_tail())
    await sp.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        # What the older release does: its index, its deletes, its inserts.
        row = c.execute("SELECT sk, session_id, ts, json FROM events WHERE seq = 1"
                        " AND session_id = ?", (kept.session_id,)).fetchone()
        c.executescript(
            "CREATE UNIQUE INDEX events_sk_seq ON events (sk, seq);"
            f" DELETE FROM events WHERE session_id = '{gone.session_id}';"
        )
        c.execute("INSERT INTO events (sk, session_id, seq, ts, json) VALUES (?, ?, 2, ?, ?)",
                  row)  # a stand-in event: only its place is checked here
    assert _layout(path)[3] > 2  # the mark is above the reused rowid 2
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        _check_layout(path)
        seqs = await sp.read(lambda c: [r[0] for r in c.execute(
            "SELECT seq FROM session_events WHERE sk = ? ORDER BY seq", (kept.sk,))])
        assert seqs == [1, 2]
        with contextlib.closing(sqlite3.connect(path)) as c:
            assert c.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'events_sk_seq'").fetchone() is None
    finally:
        await sp.close()


async def test_a_spool_without_the_shown_ms_columns_gets_them(tmp_path, audit_key):
    """A file of the release before start_ms / ts_ms: the columns are added
    with their values in one step, and the listings page by them."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(100, 1 << 20))
    await sp.open()
    try:
        s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
        await sp.submit(lambda w: w.append_security(
            Draft("auth.login_failed", outcome="denied"), None))
    finally:
        await sp.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.executescript(
            "BEGIN; DROP INDEX sessions_start; DROP INDEX security_ts;"
            " DROP INDEX sessions_state_start; DROP INDEX sessions_user;"  # (later still)
            " ALTER TABLE sessions DROP COLUMN start_ms;"
            " ALTER TABLE security_events DROP COLUMN ts_ms; COMMIT;"
        )
    sp = Spool(path, audit_key, limits=Limits(100, 1 << 20))
    await sp.open()
    try:
        listed = await sp.read(lambda c: queries.list_sessions(
            c, user=None, since=None, until=None, before=None, limit=10))
        assert [r["session_id"] for r in listed] == [s.session_id]
        (ev,) = await sp.read(lambda c: queries.list_security(c, since=None, kind=None,
                                                              limit=10))
        with contextlib.closing(sqlite3.connect(path)) as c:
            start_ms, start_ts = c.execute("SELECT start_ms, start_ts FROM sessions").fetchone()
            ts_ms, ts = c.execute("SELECT ts_ms, ts FROM security_events").fetchone()
        assert (start_ms, ts_ms) == (store.shown_ms(start_ts), store.shown_ms(ts))
        assert listed[0]["session_start_time"] == format_ts(start_ms / 1000)
        assert ev["ts"] == format_ts(ts_ms / 1000)
    finally:
        await sp.close()
    # A release before the columns runs on the file again and leaves them NULL
    # in the rows it writes: the next start fills them in.
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute("UPDATE sessions SET start_ms = NULL")
        c.execute("UPDATE security_events SET ts_ms = NULL")
    sp = Spool(path, audit_key, limits=Limits(100, 1 << 20))
    await sp.open()
    try:
        listed = await sp.read(lambda c: queries.list_sessions(
            c, user=None, since=0, until=None, before=None, limit=10))
        assert [r["session_id"] for r in listed] == [s.session_id]
        assert len(await sp.read(lambda c: queries.list_security(c, since=0, kind=None,
                                                                  limit=10))) == 1
    finally:
        await sp.close()

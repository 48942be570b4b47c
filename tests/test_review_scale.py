"""Review findings on cost that grew with the audit history (scale and long life).

Each test counts SQLite's virtual machine steps (a progress handler), not
time: a page deep in the history, a rare kind of security event, the purge
of kept parts must cost about what the first page does, however much
history lies in front of them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import tracemalloc
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

from api_fixtures import MakeApi, make_api
from sqlite_conns import connect as _connect

import audit.verify as verify_module
from audit import queries
from audit.events import Draft, Source, format_ts, genesis, seal_text
from audit.store import SCHEMA, Limits, Writer, part_document
from audit.verify import SpoolAnchor, verify_sink
from sinks.base import RawJSON, dumps, encode_cursor
from sinks.sqlite import SqliteSink

__all__ = ["make_api"]

T = TypeVar("T")
T0 = 1_800_000_000.0
HISTORY = 3000  # rows in front of the deep page


class Steps:
    """Counts a connection's VM steps, a hundred at a time."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return 0


def steps(conn: sqlite3.Connection, fn: Callable[[], T]) -> tuple[int, T]:
    tick = Steps()
    conn.set_progress_handler(tick, 100)
    try:
        result = fn()
    finally:
        conn.set_progress_handler(None, 100)
    return tick.n, result


async def sink_steps(sink: SqliteSink, query: Any) -> tuple[int, Any]:
    tick = Steps()
    db = sink._conn()
    await db.set_progress_handler(tick, 100)
    try:
        result = await query
    finally:
        await db.set_progress_handler(None, 100)  # type: ignore[arg-type]
    return tick.n, result


async def _history_sink(path: Path) -> SqliteSink:
    """A sqlite sink with HISTORY sessions of one part and HISTORY security
    events, one a second; the oldest three security events are admin.denied."""
    sink = SqliteSink(path)
    await sink.open()
    await sink.close()
    parts, security = [], []
    for i in range(HISTORY):
        sid = f"{i:032x}"
        start = format_ts(T0 + i)
        doc = {"_id": f"{sid}:0", "session_id": sid, "part": 0, "final": True, "user": "u",
               "session_start_time": start, "hash": f"{i:064x}", "events": []}
        parts.append((doc["_id"], sid, 0, "u", start, 1, doc["hash"], json.dumps(doc)))
        ev = {"_id": f"e{i:031x}", "event_id": f"e{i:031x}", "ts": start, "hash": f"{i:064x}",
              "action": "admin.denied" if i < 3 else "auth.login_failed"}
        security.append((ev["_id"], start, ev["action"], ev["hash"], json.dumps(ev)))
    with closing(sqlite3.connect(path, isolation_level=None)) as c, c:
        c.execute("BEGIN")
        c.executemany("INSERT INTO parts (id, session_id, part, user, session_start_time,"
                      " final, hash, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", parts)
        c.executemany("INSERT INTO security_events (id, ts, action, hash, doc)"
                      " VALUES (?, ?, ?, ?, ?)", security)
        c.execute("COMMIT")
    c.close()
    sink = SqliteSink(path)
    await sink.open()
    return sink


async def test_the_sqlite_sink_pages_deep_in_its_history_at_the_cost_of_the_first_page(
        tmp_path: Path) -> None:
    """A cursor written as ``a < ? OR (a = ? AND b < ?)`` made SQLite scan the
    index from the newest row to the cursor: a page half way through a
    million sessions cost 0.1 s, reading every page of the history through
    the API a quadratic time. A row value is searched for."""
    sink = await _history_sink(tmp_path / "audit.db")
    try:
        first, (page, _) = await sink_steps(sink, sink.list_sessions(limit=20))
        assert page[0]["session_start_time"] == format_ts(T0 + HISTORY - 1)
        at = format_ts(T0 + 100)
        deep, (page, _) = await sink_steps(
            sink, sink.list_sessions(limit=20, cursor=encode_cursor(at, f"{100:032x}")))
        assert [p["session_start_time"] for p in page] == [
            format_ts(T0 + i) for i in range(99, 79, -1)]
        assert deep < 3 * first + 20, (first, deep)

        first, (evs, _) = await sink_steps(sink, sink.list_security_events(limit=20))
        deep, (evs, _) = await sink_steps(sink, sink.list_security_events(
            limit=20, cursor=encode_cursor(at, f"e{100:031x}")))
        assert [e["_id"] for e in evs] == [f"e{i:031x}" for i in range(99, 79, -1)]
        assert deep < 3 * first + 20, (first, deep)
    finally:
        await sink.close()


async def test_a_rare_kind_of_security_event_is_found_without_reading_the_others(
        tmp_path: Path) -> None:
    """``kind=`` had no index: the three oldest admin.denied among a million
    other events took 0.3-0.5 s to find, on the connection the sink's writes
    wait for."""
    sink = await _history_sink(tmp_path / "audit.db")
    try:
        first, _ = await sink_steps(sink, sink.list_security_events(limit=20))
        rare, (evs, cursor) = await sink_steps(
            sink, sink.list_security_events(limit=20, kind="admin.denied"))
        assert [e["_id"] for e in evs] == [f"e{i:031x}" for i in (2, 1, 0)]
        assert cursor is None
        assert rare < 3 * first + 20, (first, rare)
    finally:
        await sink.close()


def _writer(tmp_path: Path, audit_key: bytes, clock: Callable[[], float]) -> Writer:
    conn = _connect(tmp_path / "spool.db")
    conn.executescript(SCHEMA)
    return Writer(conn, audit_key, Limits(500, 1 << 20), clock=clock)


def _kept_sessions(w: Writer, n: int, keep: float) -> None:
    """``n`` sessions sealed and stored, kept ``keep`` seconds (in the
    caller's transaction, or one of their own)."""
    own = not w.conn.in_transaction
    if own:
        w.conn.execute("BEGIN")
    for _ in range(n):
        s = w.start_session("u", "user", 1e12, [Draft("session.start")])
        w.seal(s.session_id, "logout", Draft("session.end", details={"reason": "logout"}))
        w.mark_part_stored(s.session_id, 0, keep)
    if own:
        w.conn.execute("COMMIT")


def test_the_spools_listing_by_state_or_user_reads_only_its_page(tmp_path, audit_key):
    """``state=open`` read and sorted every open session for each page (the
    index was on (state, start_ts), the order is start_ms: 0.13 s with
    100,000 open), and ``user=`` scanned every session of the spool."""
    now = [T0]
    w = _writer(tmp_path, audit_key, lambda: now[0])
    w.conn.execute("BEGIN")
    for i in range(HISTORY):
        now[0] += 0.01
        w.start_session(f"user{i % 50}", "user", 1e12, [Draft("session.start")])
    w.conn.execute("COMMIT")
    kw: dict[str, Any] = {"since": None, "until": None, "before": None, "limit": 20}
    first, page = steps(w.conn, lambda: queries.list_sessions(w.conn, user=None, **kw))
    assert len(page) == 20
    for user, state in ((None, "open"), ("user7", None), ("user7", "open"), ("nobody", None)):
        cost, page = steps(w.conn, functools.partial(queries.list_sessions, w.conn,
                                                     user=user, state=state, **kw))
        assert len(page) == (0 if user == "nobody" else 20)
        assert cost < 3 * first + 20, (user, state, first, cost)


async def test_a_pending_session_behind_many_kept_ones_is_listed_on_the_first_page(
        make_api: MakeApi) -> None:
    """``state=pending`` asked the spool for its sealed sessions and dropped
    the stored ones after: behind sessions kept by keep_stored_seconds, a
    request read 20 pages of them (6 s at 200,000 kept) and answered an
    empty page with a cursor, as many times as the kept sessions took."""
    api = await make_api(audit={"keep_stored_seconds": 86400})
    admin = await api.admin()

    def dead(w: Writer) -> str:
        s = w.start_session("bob", "user", 1e12, [Draft("session.start")])
        w.seal(s.session_id, "logout", Draft("session.end", details={"reason": "logout"}))
        w.mark_part_failed(s.session_id, 0, "refused", dead=True)
        return s.session_id

    pending = await api.engine.spool.submit(dead)
    await asyncio.sleep(0.01)  # the kept sessions start later
    await api.engine.spool.submit(lambda w: _kept_sessions(w, 60, keep=86400))
    resp = await api.client.get("/audit/sessions", params={"state": "pending", "limit": "1"},
                                headers=admin.headers)
    body = await resp.json()
    assert resp.status == 200, body
    assert [s["session_id"] for s in body["sessions"]] == [pending]
    assert body["next_cursor"] is None
    assert body["sessions"][0]["state"] == "pending"


def test_the_purge_of_kept_parts_does_not_read_the_parts_it_keeps(tmp_path, audit_key):
    """With keep_stored_seconds, the flusher purges every few seconds (and
    after each write once nothing is pending): the purge found its rows on
    the (state, created_ts) index and read every kept part to learn that none
    was old enough (38 ms with 200,000 kept, on the writer thread)."""
    now = [T0]
    w = _writer(tmp_path, audit_key, lambda: now[0])
    _kept_sessions(w, 10, keep=600)
    now[0] += 1000
    _kept_sessions(w, HISTORY // 3, keep=600)
    w.conn.execute("BEGIN")
    for i in range(HISTORY):
        ev = w.append_security(Draft("auth.login_failed", outcome="denied"), None)
        w.conn.execute("UPDATE security_events SET state = 'stored', stored_ts = ?"
                       " WHERE event_id = ?", (now[0] - (1000 if i < 10 else 0),
                                               ev["event_id"]))
    w.conn.execute("COMMIT")
    cutoff = now[0] - 600
    n, more = w.purge_stored(cutoff, 500)
    assert n == 10 and not more
    none_old, (n, more) = steps(w.conn, lambda: w.purge_stored(cutoff, 500))
    assert n == 0 and not more and none_old <= 2, none_old
    n = w.purge_stored_security(cutoff, 5000)
    assert n == 10
    none_old, n = steps(w.conn, lambda: w.purge_stored_security(cutoff, 5000))
    assert n == 0 and none_old <= 2, none_old
    assert w.conn.execute("SELECT COUNT(*) FROM parts").fetchone()[0] == HISTORY // 3


def test_a_purge_job_deletes_a_bounded_number_of_events(tmp_path, audit_key):
    """A purge job ran up to 500 kept parts of any size: 500 parts of 500
    events held the writer (every audited request waiting on it) for 1.3 s
    and grew the WAL by 100 MB. It stops once its events pass the bound
    (always one part at least), says more may wait, and the next jobs go on."""
    now = [T0]
    w = _writer(tmp_path, audit_key, lambda: now[0])
    w.conn.execute("BEGIN")
    for _ in range(12):  # parts of 52 events: session.start, 50 actions, session.end
        s = w.start_session("u", "user", 1e12, [Draft("session.start")])
        for _ in range(50):
            w.append(s.session_id, Draft("document.list"))
        w.seal(s.session_id, "logout", Draft("session.end", details={"reason": "logout"}))
        w.mark_part_stored(s.session_id, 0, 60)
    w._insert_rows()
    w.conn.execute("COMMIT")
    assert w.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 12 * 52
    now[0] += 120
    cutoff = now[0] - 60
    runs = []
    while True:
        n, more = w.purge_stored(cutoff, 500, max_events=200)
        runs.append(n)
        if not more:
            break
    assert runs == [3, 3, 3, 3], runs
    assert w.purge_stored(cutoff, 500, max_events=10) == (0, False)
    assert w.conn.execute("SELECT COUNT(*) FROM parts").fetchone()[0] == 0
    assert w.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
    # A part larger than the bound alone still goes, one a job.
    s = w.start_session("u", "user", 1e12, [Draft("session.start")])
    w.seal(s.session_id, "logout", Draft("session.end", details={"reason": "logout"}))
    w.mark_part_stored(s.session_id, 0, 60)
    w._insert_rows()
    now[0] += 120
    assert w.purge_stored(now[0] - 60, 500, max_events=1) == (1, False)


KEY = b"k" * 32


async def _held_by_verify(path: Path, sessions: int) -> int:
    """Bytes that verify's own code (audit/verify.py) holds once it has listed
    ``sessions`` sessions: measured when the sink's listing ends, by what was
    allocated there (not a peak of the process, which its collector's timing
    and other threads move)."""
    sink = SqliteSink(path)
    await sink.open()
    await sink.close()
    rows = []
    for i in range(sessions):
        sid = f"{i:032x}"
        head, evs = genesis(KEY, sid), []
        for seq, action in ((1, "session.start"), (2, "session.end")):
            details = {"reason": "logout"} if seq == 2 else {}
            head, text = seal_text(KEY, head, Draft(action, details=details, source=Source()),
                                   sid, seq, T0 + i)
            evs.append(RawJSON(text))
        doc = part_document({"session_id": sid, "part": 0, "final": 1, "end_ts": T0 + i,
                             "start_ts": T0 + i, "user": None, "seal_reason": "logout",
                             "first_seq": 1, "last_seq": 2, "prev_hash": genesis(KEY, sid),
                             "hash": head}, evs)
        rows.append((doc["_id"], sid, 0, None, doc["session_start_time"], 1, head, dumps(doc)))
    with closing(sqlite3.connect(path, isolation_level=None)) as c, c:
        c.execute("BEGIN")
        c.executemany("INSERT INTO parts (id, session_id, part, user, session_start_time,"
                      " final, hash, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        c.execute("COMMIT")
    c.close()
    del rows
    sink = SqliteSink(path, readonly=True)
    await sink.open()
    anchor = SpoolAnchor(genesis(KEY, "security"), None, stored=frozenset({f"{7:032x}"}))
    listed = sink.session_ids
    held: list[int] = []

    async def listing() -> Any:
        async for sid in listed():
            yield sid
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, verify_module.__file__)])
        held.append(sum(stat.size for stat in snapshot.statistics("filename")))

    sink.session_ids = listing  # type: ignore[method-assign]
    tracemalloc.start()
    try:
        report = await verify_sink(sink, KEY, anchor)
    finally:
        tracemalloc.stop()
        await sink.close()
    assert report.ok and report.sessions == sessions, report.problems[:3]
    return held[0]


async def test_verify_does_not_keep_every_session_id_it_read(tmp_path: Path) -> None:
    """verify kept each session id it listed (about 100 bytes each: 100 MB
    for a million sessions) only to find the few the spool stored lately."""
    few = await _held_by_verify(tmp_path / "few.db", 500)
    many = await _held_by_verify(tmp_path / "many.db", 4500)
    # A set of 4,000 more ids would hold 128 KB more (its table alone).
    assert many - few < 32_000, (few, many)

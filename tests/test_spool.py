"""The spool on its own: lifecycle, job isolation in a batch, spool full."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest
from waiting import LoopTurns, wait_for

from audit import queries
from audit.events import Draft, Source, event_hash
from audit.spool import Spool, SpoolClosed, SpoolDamaged, SpoolFull, SpoolUnavailable, connect
from audit.store import SCHEMA, Append, Limits, SessionNotOpen, Writer


@pytest.fixture
async def spool(tmp_path, audit_key):
    sp = Spool(tmp_path / "spool.db", audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    yield sp
    await sp.close()


async def test_close_twice_is_safe_and_use_after_close_raises(tmp_path, audit_key):
    sp = Spool(tmp_path / "spool.db", audit_key, limits=Limits(500, 1 << 20))
    with pytest.raises(SpoolClosed):
        await sp.submit(lambda w: None)  # never opened
    await sp.open()
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, []))
    await asyncio.gather(sp.close(), sp.close())
    await sp.close()
    assert not sp.is_open and not sp.accepting
    with pytest.raises(SpoolClosed):
        await sp.submit(lambda w: w.append(s.session_id, Draft("document.list")))
    with pytest.raises(SpoolClosed):
        await sp.read(lambda c: c.execute("SELECT 1").fetchone())
    with pytest.raises(SpoolClosed):
        await sp.read_apart(lambda c: c.execute("SELECT 1").fetchone())
    with pytest.raises(SpoolClosed):
        await sp.open()  # a spool is opened once


async def test_close_commits_what_is_queued(tmp_path, audit_key):
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, []))
    futs = [
        sp.submit_nowait(lambda w: w.append(s.session_id, Draft("document.list")))
        for _ in range(20)
    ]
    await sp.close()
    assert all(f.done() and not f.exception() for f in futs)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 20


async def test_a_read_apart_holds_back_neither_the_writer_nor_the_reader(tmp_path, audit_key):
    """For long reads (a listing of every document): while one runs, appends
    commit and the reader (logins) answers; it reads committed data through a
    read-only connection of its own, which close() closes."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, []))
    entered, release = threading.Event(), threading.Event()

    def long_read(conn: sqlite3.Connection) -> int:
        entered.set()
        assert release.wait(10)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    held = asyncio.ensure_future(sp.read_apart(long_read))
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
    for _ in range(3):
        await asyncio.wait_for(
            sp.submit(lambda w: w.append(s.session_id, Draft("document.list"))), 10)
    assert await asyncio.wait_for(sp.read(lambda c: c.execute("SELECT 1").fetchone()), 10)
    assert not held.done()
    release.set()
    assert await held == 3  # what was committed when it read
    await sp.close()
    assert not path.with_name("spool.db-wal").exists()  # every connection closed


async def test_close_during_the_first_read_apart_closes_its_connection(
    tmp_path, audit_key, monkeypatch
):
    """close() while the first read_apart is still opening its connection:
    that connection is closed too (it was left open, with the WAL behind it,
    and close() waited for the read on the event loop's own thread)."""
    import audit.spool as spool_module

    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    opening, release = threading.Event(), threading.Event()
    real_connect = spool_module.connect

    def slow_connect(*args, **kwargs):
        if kwargs.get("readonly"):
            opening.set()
            assert release.wait(30)
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(spool_module, "connect", slow_connect)
    held = asyncio.ensure_future(sp.read_apart(lambda c: c.execute("SELECT 1").fetchone()))
    await asyncio.get_running_loop().run_in_executor(None, opening.wait, 10)
    async with LoopTurns(pause=0.01) as ticks:
        closing = asyncio.ensure_future(sp.close())
        # The event loop still turns while close() waits for the connection.
        await wait_for(lambda: ticks.n >= 5, message="the loop turning during close()")
        assert not closing.done()
        release.set()
        await asyncio.wait_for(closing, 10)
    assert await held == (1,)
    assert sp._bconn is None
    assert not path.with_name("spool.db-wal").exists()  # every connection closed


async def test_read_only_connections_find_a_path_with_percent_escapes_in_it(tmp_path, audit_key):
    """Read-only connections open the spool by a ``file:`` URI, where SQLite
    decodes ``%XX``: a directory named ``100%41`` must not be read as
    ``100A`` (another file, which SQLite would report missing or read as
    empty)."""
    odd = tmp_path / "at 100%41 #1?"
    odd.mkdir()
    sp = Spool(odd / "spool.db", audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        await sp.submit(lambda w: w.conn.execute(
            "INSERT INTO documents (id, title, content, owner, version, created_at, updated_at)"
            " VALUES ('d1', 't', 'c', 'alice', 1, 'x', 'x')"))
        rows = await sp.read_apart(lambda c: c.execute("SELECT id FROM documents").fetchall())
    finally:
        await sp.close()
    assert rows == [("d1",)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [odd.name]  # nothing made beside it


async def test_failing_job_is_rolled_back_alone(spool):
    s = await spool.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))

    def append_then_fail(w: Writer) -> None:
        w.append(s.session_id, Draft("document.list"))
        w.conn.execute("INSERT INTO meta (key, value) VALUES ('junk', 'x')")
        raise LookupError("boom")

    before = spool.stats.commits
    results = await asyncio.gather(
        spool.submit(lambda w: w.append(s.session_id, Draft("document.list"))),
        spool.submit(append_then_fail),
        spool.submit(lambda w: w.append("no-such-session", Draft("document.list"))),
        spool.submit(lambda w: w.append(s.session_id, Draft("document.list"))),
        return_exceptions=True,
    )
    assert spool.stats.commits - before == 1
    assert isinstance(results[1], LookupError) and isinstance(results[2], SessionNotOpen)
    first, last = json.loads(results[0]), json.loads(results[3])
    assert [first["seq"], last["seq"]] == [2, 3]  # no gap where the failure was
    assert last["hash"] == spool.open_session(s.session_id).head
    rows = await spool.read(
        lambda c: c.execute("SELECT seq FROM events ORDER BY seq").fetchall()
    )
    assert rows == [(1,), (2,), (3,)]
    junk = await spool.read(lambda c: c.execute("SELECT * FROM meta WHERE key='junk'").fetchall())
    assert junk == []


async def test_wal_mode_and_synchronous(tmp_path, audit_key):
    for sync, level in (("full", 2), ("normal", 1)):
        sp = Spool(tmp_path / f"{sync}.db", audit_key, limits=Limits(500, 1 << 20),
                   synchronous=sync)
        await sp.open()
        assert await sp.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        assert await sp.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == level
        await sp.close()


# -- spool full ----------------------------------------------------------------

BIG = {"blob": "x" * 2000}


async def _fill(engine, session_id: str) -> None:
    """Record large events in ``session_id`` until the spool is full."""
    with pytest.raises(SpoolFull):
        for _ in range(1000):
            await engine.record(session_id, Draft("document.list", details=BIG))


async def test_spool_full_rejects_under_reject(make_config, engines):
    config = make_config(audit={"spool_max_bytes": 262144, "on_spool_full": "reject"})
    engine = await engines.open(config)
    src = Source(user="u", role="user")
    s = await engine.start_session("u", "user", src, 3600)
    assert engine.ready
    accepted = 0
    with pytest.raises(SpoolFull):
        for _ in range(1000):
            await engine.record(s.session_id, Draft("document.list", details=BIG))
            accepted += 1
    assert accepted > 5
    assert engine.spool.spool_bytes >= 262144
    assert not engine.ready and not engine.spool.accepting
    with pytest.raises(SpoolFull):
        await engine.start_session("v", "user", src, 3600)
    # Ending a session and the flusher's bookkeeping still go through.
    assert await engine.end_session(s.session_id, src) == 2 + accepted + 1
    status = await engine.status()
    assert status["pending_parts"] == 1 and status["accepting"] is False


async def test_spool_full_goes_on_under_accept(make_config, engines):
    config = make_config(audit={"spool_max_bytes": 262144, "on_spool_full": "accept"})
    engine = await engines.open(config)
    s = await engine.start_session("u", "user", Source(), 3600)
    for _ in range(300):
        await engine.record(s.session_id, Draft("document.list", details=BIG))
    assert engine.spool.spool_bytes > 2 * 262144
    assert engine.ready


async def test_spool_full_clears_once_flushed(make_config, engines):
    config = make_config(
        audit={"spool_max_bytes": 262144},
        flush={"max_writes_per_second": 1000.0, "burst": 100},
    )
    engine = await engines.open(config)
    src = Source(user="u", role="user")
    s = await engine.start_session("u", "user", src, 3600)
    await _fill(engine, s.session_id)
    await engine.end_session(s.session_id, src)
    await engines.drain(engine)
    # The freed pages are reused: below the limit again after the next commit.
    s2 = await engine.start_session("u", "user", src, 3600)
    assert engine.spool.spool_bytes < 262144 and engine.ready
    await engine.record(s2.session_id, Draft("document.list"))


_UNKEY = (
    "DROP VIEW session_events; DROP TABLE event_keys; DELETE FROM meta WHERE key = 'keys_mark';"
)


def _downgrade(path, layout: str) -> None:
    """Rewrite a spool file into an earlier layout: ``sk_index`` (events with a
    unique (sk, seq) index and no ``event_keys``), or ``events`` keyed by the
    text session id, either ``clustered`` (WITHOUT ROWID) or ``text_key`` (a
    rowid table with a unique (session_id, seq) index), and no ``sessions.sk``."""
    if layout == "sk_index":
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.executescript(
                f"BEGIN; {_UNKEY} CREATE UNIQUE INDEX events_sk_seq ON events (sk, seq); COMMIT;"
            )
        return
    if layout == "clustered":
        create = (
            "CREATE TABLE events (session_id TEXT NOT NULL, seq INTEGER NOT NULL,"
            " ts REAL NOT NULL, json TEXT NOT NULL, PRIMARY KEY (session_id, seq)) WITHOUT ROWID;"
        )
    else:
        create = (
            "CREATE TABLE events (session_id TEXT NOT NULL, seq INTEGER NOT NULL,"
            " ts REAL NOT NULL, json TEXT NOT NULL);"
            " CREATE UNIQUE INDEX events_session_seq ON events (session_id, seq);"
        )
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript(
            f"BEGIN; {_UNKEY} ALTER TABLE events RENAME TO e2;"
            f" {create}"
            " INSERT INTO events SELECT session_id, seq, ts, json FROM e2 ORDER BY rowid;"
            " DROP TABLE e2;"
            " DROP INDEX sessions_sk; ALTER TABLE sessions DROP COLUMN sk; COMMIT;"
        )
        cols = [r[1] for r in conn.execute("PRAGMA table_info(sessions)")]
        assert "sk" not in cols


async def test_a_spool_of_the_clustered_layout_is_migrated(tmp_path, audit_key):
    """Files written before the events table became a rowid table still open."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
    await sp.submit(lambda w: w.append(s.session_id, Draft("document.list")))
    await sp.close()
    _downgrade(path, "clustered")
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        ev = json.loads(await sp.submit(lambda w: w.append(s.session_id, Draft("document.list"))))
        assert ev["seq"] == 3
        sql = await sp.read(
            lambda c: c.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()
        )
        assert "WITHOUT ROWID" not in sql[0]
        seqs = await sp.read(
            lambda c: c.execute("SELECT seq FROM events ORDER BY seq").fetchall()
        )
        assert seqs == [(1,), (2,), (3,)]
    finally:
        await sp.close()


async def test_a_spool_of_the_text_key_layout_is_migrated(tmp_path, audit_key):
    """Files written while events were indexed by (session_id, seq), before the
    integer session key: every session gets a key, its events keep their
    chain, pending parts still load, and a new session's key is a new one."""
    from audit import queries

    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(3, 1 << 20))
    await sp.open()
    sealed = await sp.submit(lambda w: w.start_session("a", "user", 1e12, [Draft("session.start")]))
    opened = await sp.submit(lambda w: w.start_session("b", "user", 1e12, [Draft("session.start")]))
    for _ in range(4):  # a checkpoint part (1-3) of "b", then two uncut events
        await sp.submit(Append(opened.session_id, Draft("document.list")))
    await sp.submit(Append(sealed.session_id, Draft("document.list")))
    await sp.submit(lambda w: w.seal(sealed.session_id, "logout", Draft("session.end")))
    before = await sp.read(lambda c: c.execute(
        "SELECT session_id, seq, ts, json FROM events ORDER BY rowid").fetchall())
    await sp.close()
    _downgrade(path, "text_key")

    sp = Spool(path, audit_key, limits=Limits(3, 1 << 20))
    await sp.open()
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()
            index = conn.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'events_sk_seq'").fetchone()
            keyed = conn.execute(
                "SELECT COUNT(*) FROM event_keys k JOIN events e ON e.rowid = k.rid"
                " AND e.sk = k.sk AND e.seq = k.seq").fetchone()[0]
            keys = dict(conn.execute("SELECT session_id, sk FROM sessions").fetchall())
        assert "sk INTEGER" in sql[0] and index is None and keyed == len(before)
        assert sorted(keys.values()) == [1, 2]
        after = await sp.read(lambda c: c.execute(
            "SELECT session_id, seq, ts, json FROM events ORDER BY rowid").fetchall())
        assert after == before
        head = sp.open_session(opened.session_id)
        assert head.sk == keys[opened.session_id] and head.next_seq == 6
        assert head.uncut_count == 2
        ev = json.loads(await sp.submit(Append(opened.session_id, Draft("document.list"))))
        last = [json.loads(r[3]) for r in before if r[0] == opened.session_id][-1]
        assert ev["seq"] == 6 and ev["hash"] == event_hash(audit_key, last["hash"], ev)
        new = await sp.submit(lambda w: w.start_session("c", "user", 1e12, []))
        assert new.sk == 3
        part = await sp.read(queries.load_part)
        assert part["session_id"] in keys and part["events"]
        assert [e["seq"] for e in part["events"]] == list(
            range(part["first_seq"], part["last_seq"] + 1))
        summary = await sp.read(lambda c: queries.get_session(c, opened.session_id))
        assert summary["event_count"] == 6 and [e["seq"] for e in summary["events"]] == [
            1, 2, 3, 4, 5, 6]
    finally:
        await sp.close()


async def test_failing_plain_appends_leave_no_trace_in_their_batch(tmp_path, audit_key):
    """Append jobs run without savepoints: a failure must still be only its own,
    also when the batch cuts checkpoint parts around it."""
    sp = Spool(tmp_path / "spool.db", audit_key, limits=Limits(2, 1 << 20))
    await sp.open()
    try:
        s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, []))
        sid = s.session_id
        before = sp.stats.commits
        jobs = [
            Append(sid, Draft("document.list")),  # seq 1
            Append(sid, Draft("document.list", details={"bad": object()})),  # TypeError
            Append(sid, Draft("document.list")),  # seq 2
            Append("no-such-session", Draft("document.list")),  # SessionNotOpen
            Append(sid, Draft("document.list")),  # seq 3: cuts part 0 (1-2) first
            Append(sid, Draft("document.list", details={"nan": float("nan")})),  # ValueError
            Append(sid, Draft("document.list")),  # seq 4
            Append(sid, Draft("document.list")),  # seq 5: cuts part 1 (3-4)
        ]
        results = await asyncio.gather(*(sp.submit(j) for j in jobs), return_exceptions=True)
        assert sp.stats.commits - before == 1
        assert isinstance(results[1], TypeError) and isinstance(results[3], SessionNotOpen)
        assert isinstance(results[5], ValueError)
        ok = [json.loads(r) for i, r in enumerate(results) if i not in (1, 3, 5)]
        assert [r["seq"] for r in ok] == [1, 2, 3, 4, 5]
        rows = await sp.read(
            lambda c: c.execute("SELECT seq, json FROM events ORDER BY seq").fetchall()
        )
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
        parts = await sp.read(
            lambda c: c.execute(
                "SELECT part, first_seq, last_seq, hash FROM parts ORDER BY part"
            ).fetchall()
        )
        assert [p[:3] for p in parts] == [(0, 1, 2), (1, 3, 4)]
        assert parts[1][3] == ok[3]["hash"]
        head = sp.open_session(sid)
        assert head.next_seq == 6 and head.head == ok[4]["hash"] and head.uncut_count == 1
    finally:
        await sp.close()


async def test_a_transaction_lost_to_a_full_disk_fails_the_whole_batch(tmp_path, audit_key):
    """On SQLITE_FULL (and IOERR, NOMEM) SQLite may roll back the whole
    transaction, not only the failing statement. The jobs after it must not go
    on outside any transaction (each SAVEPOINT would then commit on its own):
    the batch fails as a whole, nothing of it is stored, and the cached session
    heads are those of the committed state."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
        sid = s.session_id
        pages = await sp.submit(lambda w: w.conn.execute("PRAGMA page_count").fetchone()[0])

        def limit_disk(w: Writer) -> None:  # a disk with ~16 pages left
            w.conn.execute(f"PRAGMA max_page_count = {pages + 16}")

        await sp.submit(limit_disk, needs_space=False)

        def big_document(w: Writer) -> None:
            w.conn.execute("INSERT INTO documents VALUES ('d', 't', ?, 'u', 1, 'x', 'x')",
                           ("x" * (1 << 20),))  # SQLITE_FULL

        def small_change(w: Writer) -> dict:
            w.conn.execute("INSERT INTO meta VALUES ('probe', 'committed?')")
            return w.append(sid, Draft("document.create"))

        jobs = [
            Append(sid, Draft("document.list")),
            Append(sid, Draft("document.list")),
            big_document,
            Append(sid, Draft("document.list")),
            small_change,
        ]
        before = sp.stats.commit_failures
        results = await asyncio.gather(*(sp.submit(j) for j in jobs), return_exceptions=True)
        assert sp.stats.commit_failures == before + 1
        assert all(isinstance(r, Exception) for r in results), results

        def stored(c: sqlite3.Connection) -> tuple[list[int], int]:
            seqs = [r[0] for r in c.execute("SELECT seq FROM events ORDER BY seq")]
            probes = c.execute("SELECT COUNT(*) FROM meta WHERE key = 'probe'").fetchone()[0]
            return seqs, probes

        assert await sp.read(stored) == ([1], 0)  # nothing of the batch
        head = sp.open_session(sid)
        assert head is not None and head.next_seq == 2

        await sp.submit(lambda w: w.conn.execute("PRAGMA max_page_count = 1073741823"),
                        needs_space=False)
        ev = json.loads(await sp.submit(Append(sid, Draft("document.list"))))
        assert ev["seq"] == 2
        rows = await sp.read(lambda c: c.execute(
            "SELECT json FROM events ORDER BY seq").fetchall())
        events = [json.loads(r[0]) for r in rows]
        assert [e["seq"] for e in events] == [1, 2]
        assert events[1]["hash"] == event_hash(audit_key, events[0]["hash"], events[1])
    finally:
        await sp.close()


class _NoDbstat(sqlite3.Connection):
    """A real connection that behaves like a SQLite built without dbstat."""

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if "dbstat" in sql:
            raise sqlite3.OperationalError("no such table: dbstat")
        return super().execute(sql, *args)


def test_app_bytes_without_dbstat_counts_documents_as_audit_data(tmp_path, caplog, monkeypatch):
    from audit import spool
    from audit.spool import app_bytes

    # (the warning is said once a process: not yet in this one)
    monkeypatch.setattr(spool, "_no_dbstat_logged", False)

    path = tmp_path / "spool.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(SCHEMA)
        conn.execute("INSERT INTO documents VALUES ('d', 't', ?, 'u', 1, 'x', 'x')",
                     ("x" * 100_000,))
        conn.commit()
        assert app_bytes(conn) >= 100_000
    with contextlib.closing(sqlite3.connect(path, factory=_NoDbstat)) as conn:
        assert app_bytes(conn) == 0
    assert "no dbstat" in caplog.text


async def test_close_waits_for_a_measure_of_the_app_tables(tmp_path, audit_key):
    """The app tables are measured on a thread of their own with a connection
    of its own: close() waits for it, so the writer's connection is the last
    one and SQLite checkpoints and removes the WAL, as after any close."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    await sp.submit(lambda w: w.conn.execute(
        "INSERT INTO documents VALUES ('d', 't', ?, 'u', 1, 'x', 'x')", ("x" * 200_000,)))
    measured = asyncio.ensure_future(sp.measure_app_bytes(force=True))
    await asyncio.sleep(0)  # the measure has started
    await sp.close()
    assert await measured
    assert sp.app_bytes >= 200_000
    assert not (tmp_path / "spool.db-wal").exists()
    assert not await sp.measure_app_bytes(force=True)  # closed: nothing to measure


def test_prepare_brings_the_file_up_one_process_at_a_time(tmp_path, monkeypatch):
    """Commands run at once (adduser five times on a new data dir, the server
    starting beside them): one that looked at a file another was half way
    through creating took it for an earlier layout and failed converting it.
    prepare() holds a lock file around the check and the creation."""
    import threading

    from audit import spool as spool_module

    path = tmp_path / "spool.db"
    order: list[str] = []
    first_inside, release = threading.Event(), threading.Event()
    real_migrate = spool_module.migrate

    def held_migrate(conn):
        order.append("enter")
        if not first_inside.is_set():
            first_inside.set()
            assert release.wait(10)
        real_migrate(conn)
        order.append("leave")

    monkeypatch.setattr(spool_module, "migrate", held_migrate)

    def run():
        conn = spool_module.connect(path, "normal")
        try:
            spool_module.prepare(conn, path)
        finally:
            conn.close()

    first = threading.Thread(target=run)
    first.start()
    assert first_inside.wait(10)
    second = threading.Thread(target=run)  # its own lock file descriptor: it waits
    second.start()
    second.join(0.3)
    assert second.is_alive() and order == ["enter"]
    release.set()
    first.join(10)
    second.join(10)
    assert order == ["enter", "leave", "enter", "leave"]


async def test_a_committed_batch_is_success_even_if_the_size_check_after_it_fails(
        tmp_path, audit_key):
    """The spool's size is read after each commit. If that read fails, the
    batch is committed all the same: its callers must hear success (a 503
    for a committed document change invites the client to do it twice)."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, []))
        size = sp.used_bytes

        def deny_pragmas(action: int, *args: object) -> int:  # the size check reads pragmas
            return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_PRAGMA else sqlite3.SQLITE_OK

        def change_and_break_the_size_check(w: Writer) -> str:
            w.conn.execute("INSERT INTO meta (key, value) VALUES ('probe', 'committed')")
            w.conn.set_authorizer(deny_pragmas)
            return w.append(s.session_id, Draft("document.create"))

        before = sp.stats.commit_failures
        text = await sp.submit(change_and_break_the_size_check)
        assert json.loads(text)["seq"] == 1
        assert sp.stats.commit_failures == before
        assert sp.used_bytes == size  # kept until the next measure
        await sp.submit(lambda w: w.conn.set_authorizer(None))
        assert await sp.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM meta WHERE key = 'probe'").fetchone()[0]) == 1
        assert await sp.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM events").fetchone()[0]) == 1
    finally:
        await sp.close()


async def test_flood_counts_are_recorded_at_shutdown_even_by_a_full_spool(make_config, engines):
    """Security events past an IP's budget are counted, and the counts become
    summary events every 10 s; a full spool refuses those (they are tried
    again), but at shutdown there is no next time: the counts of requests
    already answered were only logged, and lost. The last call's summaries
    are taken by a full spool (a bounded batch)."""
    config = make_config(audit={"spool_max_bytes": 262144, "on_spool_full": "reject",
                                "security_events_per_ip_per_second": 0.001,
                                "security_events_per_ip_burst": 1})
    engine = await engines.open(config)
    src = Source(user="u", role="user")
    s = await engine.start_session("u", "user", src, 3600)
    await _fill(engine, s.session_id)
    bad = Source(ip="203.0.113.9")
    with pytest.raises(SpoolFull):  # within the budget: recorded one by one, or refused
        await engine.record_security(Draft("auth.invalid_token", outcome="denied",
                                           source=bad, details={"reason": "malformed"}))
    for _ in range(4):  # past it: counted
        await engine.record_security(Draft("auth.invalid_token", outcome="denied",
                                           source=bad, details={"reason": "malformed"}))
    with pytest.raises(SpoolFull):  # while running, a full spool keeps them for later
        await engine.record_summaries()
    await engine.close(flush_window=0.2)
    with contextlib.closing(sqlite3.connect(config.spool_path)) as conn:
        rows = [json.loads(r[0]) for r in conn.execute("SELECT json FROM security_events")]
    (summary,) = [e for e in rows if e["action"] == "auth.invalid_token"]
    assert summary["details"]["reason"] == "over_budget"
    assert summary["details"]["count"] == 4
    assert summary["source"]["ip"] == "203.0.113.9"


_ROOT = Path(__file__).resolve().parent.parent
_MIGRATE_WITH_NO_ROOM = """
import resource, signal, sqlite3, sys
from audit.store import migrate
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # the -wal and -shm opened
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # the -wal cannot grow
try:
    migrate(conn)
except sqlite3.Error as exc:
    print(exc, "| in transaction:", conn.in_transaction)
"""


async def migrate_with_no_room(path: Path) -> str:
    """Open the spool at ``path`` in a subprocess whose disk is full
    (:data:`_MIGRATE_WITH_NO_ROOM`): it says the disk's error, not a failed
    ROLLBACK. Returns what it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MIGRATE_WITH_NO_ROOM, str(path), cwd=_ROOT,
        stdout=asyncio.subprocess.PIPE)
    raw, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    out = raw.decode()
    assert "cannot rollback" not in out
    assert "disk I/O error" in out or "full" in out, out
    return out


async def test_a_migration_that_cannot_write_says_why(tmp_path, audit_key):
    """A layout upgrade runs in one transaction. When its writes fail (a full
    disk) SQLite rolls it back itself, and the migration's own ROLLBACK then
    failed with "cannot rollback - no transaction is active": that, not the
    write error, was what the start said. The file stays as it was and is
    upgraded once the writes succeed."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
    for _ in range(20):
        await asyncio.gather(*(sp.submit(Append(s.session_id, Draft("document.list", details=BIG)))
                               for _ in range(50)))
    await sp.close()
    _downgrade(path, "sk_index")
    await migrate_with_no_room(path)
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()  # upgraded now
    try:
        ev = json.loads(await sp.submit(Append(s.session_id, Draft("document.list"))))
        assert ev["seq"] == 1002
        assert await sp.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM event_keys").fetchone()[0]) >= 1001
    finally:
        await sp.close()


def test_connections_opened_together_on_a_new_spool_all_open(tmp_path: Path) -> None:
    """Eight connections opened at once on a spool file that does not exist
    yet (``adduser`` run in parallel before the first start, or beside the
    first ``serve``): the change to WAL mode is answered SQLITE_BUSY without
    the busy handler, and some of them failed with "database is locked"
    (3-13 % of such rounds here). Each now waits for its turn, as
    busy_timeout says."""
    failures: list[str] = []
    for trial in range(150):
        path = tmp_path / f"spool-{trial}.db"
        start = threading.Barrier(8)

        def open_one(path: Path = path, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                conn = connect(path, "full")
            except sqlite3.Error as exc:
                failures.append(f"{path.name}: {exc!r}")
                return
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            finally:
                conn.close()
            if mode != "wal":
                failures.append(f"{path.name}: journal_mode {mode}")

        threads = [threading.Thread(target=open_one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


# A first event's text as a bad disk or copy leaves it: not UTF-8 (the
# bytes of a document title, cut), or not the JSON of an event.
_DAMAGED_FIRST_EVENT = {
    # (" with text " in it: the column's name ends at the first one)
    "not_utf8": ("CAST(X'7B227469746C65223A2022706179726F6C6C2077697468207465787420"
                 "32303236FF' AS TEXT)"),
    "not_json": "'payroll 2026 (written over)'",
    "not_an_object": "'[\"payroll 2026\"]'",
}


@pytest.mark.parametrize("how", sorted(_DAMAGED_FIRST_EVENT))
async def test_a_damaged_first_event_in_a_spool_from_before_the_key_check(
        tmp_path, audit_key, how):
    """A spool from before the key check is held to its first event at the
    first open of a release with the check. With that event's text damaged
    the start stopped with a JSONDecodeError or AttributeError traceback (not
    the one line naming the file README promises for damage in what a start
    reads), or with the damaged text quoted (what damage() never does: a
    document's title). It is SpoolDamaged, in words, and the file is left as
    it was."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
    await sp.submit(Append(s.session_id, Draft("document.list")))
    await sp.close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DELETE FROM meta WHERE key = 'key_check'")
        conn.execute(f"UPDATE events SET json = {_DAMAGED_FIRST_EVENT[how]} WHERE seq = 1")
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    with pytest.raises(SpoolDamaged) as err:
        await sp.open()
    assert str(err.value).startswith(f"the audit spool {path} is damaged: "), err.value
    assert "payroll" not in str(err.value)
    assert not sp.is_open
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2
        assert conn.execute("SELECT COUNT(*) FROM meta WHERE key = 'key_check'"
                            ).fetchone()[0] == 0


async def test_a_damaged_page_is_noted_once_by_name_and_the_rest_goes_on(
        tmp_path, audit_key, caplog):
    """A page SQLite cannot read, found by a read: that read is SpoolDamaged
    naming the file (the log names it; /readyz and status put <path> in its
    place), the spool is noted damaged by the first damage found (kept, and
    logged once, however often it is found again), and what it can still
    read and write goes on: the session's events are taken and read."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
    await sp.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executemany("INSERT INTO documents VALUES (?, 't', ?, 'u', 1, 'x', 'x')",
                         [(f"d{i}", "c" * 3000) for i in range(8)])
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [r[0] for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'documents'")]
    with path.open("r+b") as f:
        for page in pages:
            f.seek((page - 1) * size)
            f.write(bytes(size))
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()  # (a start does not read the documents)
    try:
        assert sp.damaged is None
        said = f"the audit spool {path} is damaged: database disk image is malformed"
        caplog.set_level(logging.ERROR, logger="session_audit.spool")
        for read in (sp.read, sp.read_apart, sp.read):
            with pytest.raises(SpoolDamaged) as err:
                await read(lambda c: c.execute("SELECT * FROM documents").fetchall())
            assert str(err.value) == said
            assert isinstance(err.value.__cause__, sqlite3.DatabaseError)
        assert sp.damaged == said
        logged = [r for r in caplog.records if "is damaged" in r.getMessage()]
        assert len(logged) == 1 and logged[0].getMessage().startswith(said), logged
        # The rest of the spool works: taken, committed, read.
        ev = json.loads(await sp.submit(Append(s.session_id, Draft("document.list"))))
        assert ev["seq"] == 2 and sp.accepting
        assert await sp.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM events").fetchone()[0]) == 2
        assert sp.damaged == said
    finally:
        await sp.close()


async def test_a_damaged_text_a_query_finds_is_noted(tmp_path, audit_key):
    """SpoolDamaged raised by a query itself (a part's event text that is
    not JSON, found by queries.part_events) notes the spool damaged as
    SQLite's own damage does: /readyz then says so."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        s = await sp.submit(lambda w: w.start_session("u", "user", 1e12,
                                                      [Draft("session.start")]))
        await sp.submit(lambda w: w.seal(s.session_id, "logout", Draft("session.end")))
        await sp.submit(lambda w: w.conn.execute(
            "UPDATE events SET json = 'written over' WHERE seq = 1"), needs_space=False)
        meta = await sp.read(queries.next_pending_part)
        with pytest.raises(SpoolDamaged, match=r"event 1 of part .* is not JSON"):
            await sp.read(lambda c: queries.part_events(c, meta))
        assert sp.damaged is not None and "event 1 of part" in sp.damaged
    finally:
        await sp.close()


async def test_a_file_that_is_not_a_spool_is_refused_and_left_as_it_is(tmp_path, audit_key):
    """A spool file SQLite cannot take for a database (written over, a bad
    copy) is refused in words naming it, and never made anew: its bytes are
    what they were (what was in it may yet be recovered)."""
    path = tmp_path / "spool.db"
    junk = bytes(range(256)) * 64
    path.write_bytes(junk)
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    with pytest.raises(SpoolUnavailable) as err:
        await sp.open()
    assert str(err.value) == f"the spool {path} cannot be opened: file is not a database"
    assert isinstance(err.value.__cause__, sqlite3.DatabaseError)
    assert not sp.is_open
    await sp.close()  # (safe after a failed open)
    assert path.read_bytes() == junk


async def test_a_text_that_is_not_utf8_stops_the_open_without_being_quoted(tmp_path, audit_key):
    """A damaged text the open reads (an open session's user, a flipped
    byte) refuses the spool in words naming the column: SQLite's own error
    quoted the row's text ("... with text '...'") into the start's last line."""
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    await sp.submit(lambda w: w.start_session("u", "user", 1e12, []))
    await sp.close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE sessions SET user = CAST(? AS TEXT)", (b"Q3 layoffs \xff",))
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    with pytest.raises(SpoolUnavailable) as err:
        await sp.open()
    assert "layoffs" not in str(err.value)
    assert str(err.value).endswith("cannot be opened: a text in column 'user' is not UTF-8")
    await sp.close()

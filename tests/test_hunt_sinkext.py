"""The sinks while something outside the server interferes with them (found
by a hunt that ran the server beside other processes touching its sink):
a sink file whose tables another program made or someone changed, parts
another process put in the sink."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import MakeApi, expect_error, make_api, plant_part
from receiver import sample_part, sample_security_event
from waiting import wait_for

from audit.config import Config, sink_identity
from audit.events import Draft, Source
from audit.logthrottle import LogThrottle
from audit.verify import Report, spool_anchor, verify_sink
from handlers import admin as admin_handlers
from sinks import create_sink, jsonl
from sinks.base import SinkUnavailable
from sinks.jsonl import JsonlSink
from sinks.sqlite import SqliteSink

__all__ = ["make_api"]

_COLUMNS = ("id TEXT PRIMARY KEY, session_id TEXT, part INTEGER, user TEXT,"
            " session_start_time TEXT, final INTEGER, hash TEXT, doc TEXT")
_UNIQUE_ID = _COLUMNS.replace("id TEXT PRIMARY KEY", "id TEXT UNIQUE")


@pytest.mark.parametrize(("schema", "said"), [
    # Another program's table of that name: a column the sink does not fill.
    (f"CREATE TABLE parts ({_COLUMNS}, tenant TEXT NOT NULL)", "tenant must be filled"),
    # A key of its own, which SQLite does not fill (only a rowid table's
    # INTEGER PRIMARY KEY is filled): NOT NULL, or in a WITHOUT ROWID table.
    (f"CREATE TABLE parts ({_UNIQUE_ID}, k TEXT NOT NULL PRIMARY KEY)", "k must be filled"),
    (f"CREATE TABLE parts ({_UNIQUE_ID}, k TEXT, PRIMARY KEY (k)) WITHOUT ROWID",
     "k must be filled"),
    # An INTEGER PRIMARY KEY is the rowid only in a rowid table.
    (f"CREATE TABLE parts (n INTEGER PRIMARY KEY, {_UNIQUE_ID}) WITHOUT ROWID",
     "n must be filled"),
    # Nor one declared DESC on the column (SQLite's quirk): it has an index.
    (f"CREATE TABLE parts (n INTEGER PRIMARY KEY DESC NOT NULL, {_UNIQUE_ID})",
     "n must be filled"),
    (f"CREATE TABLE parts ({_COLUMNS.replace('doc TEXT', 'body TEXT')})", "lacks the column"),
    # Constraints the sink never made: each fails every row alike.
    (f"CREATE TABLE parts ({_COLUMNS.replace('id TEXT', 'id INTEGER')})", "datatype mismatch"),
    (f"CREATE TABLE parts ({_COLUMNS}, CHECK (part > 5))", "CHECK constraint failed"),
    (f"CREATE TABLE parts ({_COLUMNS}); CREATE TRIGGER no_insert BEFORE INSERT ON parts"
     " BEGIN SELECT RAISE(ABORT, 'an archive: read only'); END", "an archive: read only"),
    (f"CREATE TABLE parts ({_COLUMNS}); CREATE UNIQUE INDEX one_a_user ON parts (user)",
     "UNIQUE constraint failed"),
])
async def test_a_sink_table_that_is_not_the_sinks_own_is_unavailable_not_a_dead_letter(
    tmp_path: Path, schema: str, said: str,
) -> None:
    """Every row such a table refused was an IntegrityError, which the sink
    took for the verdict on the document: the flusher dead-lettered every
    part in turn (``NOT NULL constraint failed: parts.tenant``), each one
    needing ``retry-dead`` once the file was mended. It is the file's
    trouble: unavailable, retried, nothing dead-lettered; a table that
    cannot take the sink's rows at all is named at open."""
    path = tmp_path / "audit.db"
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(schema)
    sink = SqliteSink(path)
    try:
        with pytest.raises(SinkUnavailable, match=said):
            await sink.open()
            await sink.write_part(sample_part("s1"))  # stored once, the second refused
            await sink.write_part(sample_part("s2"))
    finally:
        await sink.close()
    with closing(sqlite3.connect(path)) as db, db:  # mended: the same file takes the parts
        db.executescript("DROP TABLE parts")
    sink = SqliteSink(path)
    await sink.open()
    try:
        await sink.write_part(sample_part("s2"))
        assert [p["_id"] for p in await sink.get_session_parts("s2")] == ["s2:0"]
    finally:
        await sink.close()


async def test_a_security_events_table_of_another_shape_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE security_events (id TEXT PRIMARY KEY, ts TEXT, action TEXT,"
                   " hash TEXT, doc TEXT, source TEXT NOT NULL)")
    sink = SqliteSink(path)
    try:
        with pytest.raises(SinkUnavailable, match="source must be filled"):
            await sink.open()
    finally:
        await sink.close()


async def test_a_table_with_a_column_of_its_own_that_may_be_left_empty_takes_the_rows(
    tmp_path: Path,
) -> None:
    """An operator's own column (nullable, or with a default, or the rowid as
    an INTEGER PRIMARY KEY, which SQLite fills) is no reason to stop."""
    path = tmp_path / "audit.db"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(f"CREATE TABLE parts ({_COLUMNS}, note TEXT,"
                   " checked INTEGER NOT NULL DEFAULT 0)")
        db.execute("CREATE TABLE security_events (n INTEGER PRIMARY KEY NOT NULL,"
                   " id TEXT UNIQUE, ts TEXT, action TEXT, hash TEXT, doc TEXT)")
    sink = SqliteSink(path)
    await sink.open()
    try:
        await sink.write_part(sample_part("s1"))
        await sink.write_security_events([sample_security_event("e1")])
        assert [p["_id"] for p in await sink.get_session_parts("s1")] == ["s1:0"]
    finally:
        await sink.close()


def _no_seq(part: dict[str, Any]) -> None:
    part["events"] = [{"action": "document.access"}]


def _text_events(part: dict[str, Any]) -> None:
    part["events"] = "see the other system"


def _no_number(part: dict[str, Any]) -> None:
    del part["part"]


@pytest.mark.parametrize(("kind", "forge", "listing"), [
    ("sqlite", _no_seq, 200), ("sqlite", _text_events, 200), ("sqlite", _no_number, 503),
    ("jsonl", _no_seq, 200), ("jsonl", _text_events, 200),
])
async def test_a_part_another_writer_put_in_the_sink_is_a_503_not_a_500(
    make_api: MakeApi, kind: str, forge: Callable[[dict[str, Any]], None], listing: int,
) -> None:
    """A part another process appended to a day file or inserted into
    audit.db, whose events are not events with a seq (or, in audit.db,
    whose document has no part number), made GET /audit/sessions/{id} a 500
    with a traceback in the log (TypeError, KeyError: 'seq' where the
    events are merged), and the sqlite sink's listings too ("KeyError:
    'part'" where the parts are summarised). The mongodb sink already
    answered such a document with 503 sink_unavailable; so do these now,
    and verify reports the session."""
    api = await make_api(sink={"type": kind})
    admin = await api.admin()
    part = sample_part("forged")
    forge(part)
    plant_part(api.config, kind, part)
    r = await api.client.get("/audit/sessions/forged", headers=admin.headers)
    await expect_error(r, 503, "sink_unavailable")
    r = await api.client.get("/audit/sessions", headers=admin.headers)
    assert r.status == listing, await r.text()
    sink = create_sink(api.config, readonly=True)
    await sink.open()
    try:
        report = await verify_sink(sink, b"k" * 32)  # (the sink holds no part of ours)
    finally:
        await sink.close()
    # (Beside a part without a number, verify also finds audit.db's column
    # "part" unlike its document.)
    assert {(p.session_id, p.kind) for p in report.problems} == {("forged", "bad_part")}


@pytest.mark.parametrize(("forged", "query"), [
    ([1, 2], ""),  # no object at all
    ({"_id": "ev1", "action": "auth.login_failed"}, "?limit=1"),  # no ts, a page ends at it
    ({"ts": "2026-11-26T14:00:01.000Z", "action": "auth.login_failed"}, "?limit=1"),  # no _id
])
async def test_a_security_event_another_writer_put_in_audit_db_is_no_500(
    make_api: MakeApi, forged: Any, query: str,
) -> None:
    """A row of security_events another process inserted whose document is
    no object was a 500 for every listing reaching it (AttributeError where
    the admin API merges the events), and one whose document lacks its ts
    or _id a 500 whenever a page ended at it with more to follow (the
    cursor was taken from the document: KeyError). The cursor is now where
    the page ends in the columns the rows are read by; a document that is
    no object is 503 sink_unavailable."""
    api = await make_api()
    admin = await api.admin()
    with closing(sqlite3.connect(api.config.sqlite_sink_path)) as db, db:
        for i, doc in enumerate([sample_security_event("ev0", ts="2026-11-26T14:00:00.000Z"),
                                 forged,
                                 sample_security_event("ev2", ts="2026-11-26T14:00:02.000Z")]):
            db.execute("INSERT INTO security_events VALUES (?, ?, ?, ?, ?)",
                       (f"ev{i}", f"2026-11-26T14:00:0{i}.000Z", "auth.login_failed", "h",
                        json.dumps(doc)))
    seen: list[Any] = []
    path = "/audit/security-events" + query
    while True:
        r = await api.client.get(path, headers=admin.headers)
        if not isinstance(forged, dict):
            await expect_error(r, 503, "sink_unavailable")
            return
        body = await r.json()
        assert r.status == 200, body
        seen.extend(e.get("_id") for e in body["events"])
        if body["next_cursor"] is None:
            break
        path = f"/audit/security-events?limit=1&cursor={body['next_cursor']}"
    # (Where the forged one shows, if at all, is the admin API's order of
    # documents, not the columns': verify reports the row as changed.)
    assert seen[0] == "ev2" and "ev0" in seen, seen


async def test_a_jsonl_directory_removed_while_the_sink_runs_is_made_anew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Every write after the directory was removed (``rm -rf`` of shipped
    files gone one level too far) failed with "cannot lock audit-jsonl:
    [Errno 2] No such file or directory", for as long as the server ran,
    though a restart made the directory again at open. The next write now
    makes it (0700, as open does) and goes through."""
    d = tmp_path / "data" / "audit-jsonl"
    sink = JsonlSink(d)
    await sink.open()
    try:
        await sink.write_part(sample_part("s1"))
        shutil.rmtree(d)
        await sink.write_part(sample_part("s2"))
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert "audit-jsonl was removed; making it anew" in caplog.text
        lines = [json.loads(line) for f in sorted(d.glob("audit-*.jsonl"))
                 for line in f.read_text().splitlines()]
        assert [line["_id"] for line in lines] == ["s2:0"]
        assert await sink.get_session_parts("s1") == []
        assert [p["_id"] for p in await sink.get_session_parts("s2")] == ["s2:0"]
    finally:
        await sink.close()


async def test_admin_queries_while_the_sink_is_down_log_once_not_per_request(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Each admin query answered 503 sink_unavailable logged a warning of its
    own: a dashboard polling a page every few seconds through a sink outage
    wrote one a poll, where the flusher's warnings for the same outage come
    once a minute. Now so do these, saying how many were left out."""
    monkeypatch.setattr(admin_handlers, "_QUERY_LOG", LogThrottle(), raising=False)
    api = await make_api(sink={"type": "jsonl"})
    admin = await api.admin()
    (api.config.jsonl_dir / "audit-2026-11-26.jsonl").mkdir()  # not a regular file
    for _ in range(5):
        r = await api.client.get("/audit/security-events", headers=admin.headers)
        await expect_error(r, 503, "sink_unavailable")
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("admin query: the jsonl sink cannot be queried")]
    assert len(lines) == 1, lines
    assert "audit-2026-11-26.jsonl is a symbolic link or not a regular file" in lines[0]


README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_resend_sql() -> str:
    """The SQL README.md gives to send again what the spool keeps."""
    block = re.search(r'sqlite3 data/spool.db "(UPDATE parts SET state = .pending.[^"]*)"',
                      README.read_text())
    assert block is not None, "README.md no longer shows the statements"
    return block.group(1)


async def _verify(engine: Any, config: Config, key: bytes) -> Report:
    anchor = await engine.spool.read(lambda c: spool_anchor(c, key, sink_identity(config)))
    return await verify_sink(engine.sink, key, anchor)


async def test_a_sink_restored_from_an_older_backup_is_said_and_mended_as_readme_says(
    make_config: Callable[..., Config], engines: Any, audit_key: bytes,
) -> None:
    """audit.db restored from a backup older than the spool lacks the parts
    and security events stored since, which the spool marked stored and
    sends no more. Nothing said what verify reports then, nor whether they
    can be sent again: README.md now does, with the statements that make
    what keep_stored_seconds kept pending again. This holds it to them."""
    config = make_config(audit={"keep_stored_seconds": 3600},
                         flush={"max_writes_per_second": 1000.0, "burst": 100})
    src = Source(user="alice", role="user", ip="127.0.0.1")
    engine = await engines.open(config)
    sids = []
    backup = config.sqlite_sink_path.with_name("backup.db")
    for i in range(2):
        s = await engine.start_session("alice", "user", src, 3600)
        await engine.end_session(s.session_id, src)
        await engine.record_security(Draft("auth.login_failed", outcome="denied", source=src,
                                           details={"username": f"u{i}"}), happened=True)
        sids.append(s.session_id)
        await engines.drain(engine)
        if i == 0:
            with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as live, \
                    contextlib.closing(sqlite3.connect(backup)) as copy:
                live.backup(copy)
    await engines.close(engine)
    for suffix in ("", "-wal", "-shm"):
        config.sqlite_sink_path.with_name(config.sqlite_sink_path.name + suffix).unlink(
            missing_ok=True)
    shutil.copy(backup, config.sqlite_sink_path)

    engine = await engines.open(config)
    await engines.drain(engine)  # (opens the sink; nothing is pending)
    report = await _verify(engine, config, audit_key)
    assert {(p.session_id, p.kind) for p in report.problems} == {
        (sids[1], "missing_part"), ("security", "security_chain")}, report.problems
    await engines.close(engine)  # (stopped, as README.md says)

    with contextlib.closing(sqlite3.connect(config.spool_path)) as spool, spool:
        spool.executescript(_readme_resend_sql())
    engine = await engines.open(config)
    await engines.drain(engine)
    report = await _verify(engine, config, audit_key)
    assert report.ok, report.problems
    for sid in sids:
        assert len(await engine.sink.get_session_parts(sid)) == 1


@contextlib.contextmanager
def _append_only(path: Path) -> Any:
    """``chattr +a``: the file opens for appending only and takes no truncate."""
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+a", str(path)],
                                        capture_output=True).returncode != 0:
        pytest.skip("the file cannot be made append-only here (chattr +a needs root)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-a", str(path)], check=True)


async def test_a_torn_line_in_an_append_only_day_file_is_ended_not_a_sink_down_for_good(
    tmp_path: Path,
) -> None:
    """Append-only day files (``chattr +a``, a common hardening of audit
    logs) open for appending only: the repair of a torn last line (a crash
    during a write) opened the file read-write to truncate it, and failed
    with "[Errno 1] Operation not permitted", at open and before every
    write, for as long as the attribute stayed: no part reached the sink
    again. The torn line is now ended with a newline instead (it stays, as
    a line that is not JSON, which verify reports) and writing goes on."""
    d = tmp_path / "audit-jsonl"
    sink = JsonlSink(d)
    await sink.open()
    await sink.write_part(sample_part("s1"))
    await sink.close()
    (day,) = d.glob("audit-*.jsonl")
    with day.open("a") as f:
        f.write('{"_id": "s2:0", "type": "session_pa')  # the crash
    with _append_only(day):
        sink = JsonlSink(d)
        await sink.open()
        try:
            await sink.write_part(sample_part("s2"))
        finally:
            await sink.close()
    lines = day.read_bytes().split(b"\n")
    assert lines[1] == b'{"_id": "s2:0", "type": "session_pa' and lines[-1] == b""
    assert [json.loads(line)["_id"] for line in (lines[0], lines[2])] == ["s1:0", "s2:0"]
    reader = JsonlSink(d, readonly=True)
    await reader.open()
    try:
        assert [p["_id"] for p in await reader.get_session_parts("s2")] == ["s2:0"]
        (unchecked,) = await reader.unchecked_records()
        assert "a line that is not JSON" in unchecked
    finally:
        await reader.close()


async def test_admin_queries_read_the_sink_file_at_its_path_not_one_renamed_away(
    tmp_path: Path,
) -> None:
    """audit.db renamed away (an archive) went on answering the admin API's
    queries, as if the sink held it, until the flusher's next write noticed
    (hours later on a quiet server), while verify, reading the path, found
    none of it. A query now notices as a write does: it reads the file at
    the path (made anew), and the renamed file keeps what it had."""
    path = tmp_path / "audit.db"
    sink = SqliteSink(path)
    await sink.open()
    try:
        await sink.write_part(sample_part("s1"))
        await sink.write_security_events([sample_security_event("e1")])
        archive = path.with_name("audit-2026-11.db")
        path.rename(archive)
        assert await sink.get_session_parts("s1") == []
        assert await sink.list_sessions() == ([], None)
        assert await sink.list_security_events() == ([], None)
    finally:
        await sink.close()
    with contextlib.closing(sqlite3.connect(archive)) as db:
        assert db.execute("SELECT id FROM parts").fetchall() == [("s1:0",)]


async def test_closing_the_jsonl_sink_does_not_wait_out_another_processs_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write waits up to LOCK_WAIT_SECONDS (10 s) for the directory's lock
    while another process holds it (a drain, a `flock` by hand); a SIGTERM
    meanwhile cancelled the flusher after its 2 s window, but the sink's
    close waited for the write's thread, which waited out the lock: the
    server took 9 s to stop here. close() now makes the wait give up."""
    monkeypatch.setattr(jsonl, "LOCK_WAIT_SECONDS", 3600.0)  # without the fix: a hang
    d = tmp_path / "audit-jsonl"
    sink = JsonlSink(d)
    await sink.open()
    await sink.write_part(sample_part("s1"))
    other = os.open(d / jsonl.LOCK_NAME, os.O_RDWR)  # another open file: another holder
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        write = asyncio.ensure_future(sink.write_part(sample_part("s2")))
        await wait_for(sink._writing.locked)  # its thread is waiting for the lock
        write.cancel()  # the engine's shutdown cancels the flusher
        await asyncio.wait_for(sink.close(), timeout=10)
        with pytest.raises(asyncio.CancelledError):
            await write
    finally:
        os.close(other)
    assert [json.loads(line)["_id"] for f in d.glob("audit-*.jsonl")
            for line in f.read_text().splitlines()] == ["s1:0"]


@pytest.mark.parametrize("doc", ["[1, 2]", '"a part"', "not json"])
async def test_a_part_row_of_audit_db_that_is_no_object_is_a_503_for_its_detail(
    make_api: MakeApi, doc: str,
) -> None:
    """The streamed detail reads a session's parts without their events
    first (``session_part_heads``): a row another writer put in audit.db
    whose document is no JSON object is found there, before the answer
    begins, and is 503 sink_unavailable, not a 500."""
    api = await make_api()
    admin = await api.admin()
    part = sample_part("forged")
    plant_part(api.config, "sqlite", part, doc)
    r = await api.client.get("/audit/sessions/forged", headers=admin.headers)
    await expect_error(r, 503, "sink_unavailable")

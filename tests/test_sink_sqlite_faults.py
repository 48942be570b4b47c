"""The sqlite sink's answers when the file, not the document, is at fault."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from receiver import sample_part, sample_security_event

from sinks import sqlite as sqlite_sink
from sinks.base import SinkRejected, SinkUnavailable
from sinks.sqlite import SqliteSink


async def test_a_corrupt_sink_file_is_unavailable_not_a_dead_letter_per_write(
    tmp_path: Path,
) -> None:
    """SQLITE_CORRUPT is a plain sqlite3.DatabaseError, which the sink took
    for a refusal of the document: the flusher dead-lettered every part and
    security event, one after another, until an operator repaired the file."""
    path = tmp_path / "audit.db"
    sink = SqliteSink(path)
    await sink.open()
    for i in range(300):  # pages enough that one in the middle is a table's
        await sink.write_part(sample_part(f"s{i}"))
    await sink.close()
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = 4096
    with path.open("r+b") as f:
        f.seek(3 * page)
        f.write(b"\xff" * page)
    sink = SqliteSink(path)
    await sink.open()
    try:
        with pytest.raises(SinkUnavailable, match="malformed"):
            await sink.write_part(sample_part("new"))
    finally:
        await sink.close()


async def test_what_is_wrong_with_the_document_is_still_rejected(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "audit.db")
    await sink.open()
    try:
        part = sample_part("s1")
        part["session_id"] = None  # NOT NULL: IntegrityError
        with pytest.raises(SinkRejected):
            await sink.write_part(part)
        part = sample_part("s2")
        part["user"] = {"not": "bindable"}  # ProgrammingError
        with pytest.raises(SinkRejected):
            await sink.write_part(part)
    finally:
        await sink.close()


def _stored(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as db, db:
        return {row[0] for row in db.execute("SELECT id FROM parts")}


def _sidecars(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]


@pytest.mark.parametrize("with_sidecars", [True, False])
async def test_a_sink_file_deleted_while_open_is_started_anew_and_written(
    tmp_path: Path, with_sidecars: bool
) -> None:
    """Found by a sink hunt: SQLite writes on into a deleted file, so parts
    written after an `rm audit.db` were acknowledged, marked stored in the
    spool, and gone. The JSONL sink checked for this; the sqlite one did not."""
    path = tmp_path / "audit.db"
    sink = SqliteSink(path)
    await sink.open()
    try:
        await sink.write_part(sample_part("before"))
        path.unlink()
        if with_sidecars:
            for side in _sidecars(path):
                side.unlink(missing_ok=True)
        await sink.write_part(sample_part("after"))
        await sink.write_security_events([{"_id": "sec-1", "ts": "2026-11-26T14:00:00.000Z",
                                           "action": "auth.login_failed", "hash": "h1"}])
    finally:
        await sink.close()
    assert _stored(path) == {sample_part("after")["_id"]}
    with closing(sqlite3.connect(path)) as db, db:
        assert [r[0] for r in db.execute("SELECT id FROM security_events")] == ["sec-1"]


async def test_a_sink_file_renamed_while_open_keeps_its_parts_and_a_new_one_takes_the_next(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.db"
    old = tmp_path / "audit-2026.db"
    sink = SqliteSink(path)
    await sink.open()
    try:
        await sink.write_part(sample_part("before"))
        path.rename(old)
        await sink.write_part(sample_part("after"))
    finally:
        await sink.close()
    assert _stored(path) == {sample_part("after")["_id"]}
    assert _stored(old) == {sample_part("before")["_id"]}  # closed first: checkpointed into it


async def test_a_sink_file_deleted_during_a_write_fails_the_write_which_goes_again(
    tmp_path: Path,
) -> None:
    """Deleted between the check before the write and its commit: the write
    is not taken as stored (the flusher sends it again, into the new file)."""

    class DeletedMidWrite(SqliteSink):
        deleted = False

        async def _insert_part(self, db: Any, part: Any, doc: str) -> None:
            await super()._insert_part(db, part, doc)
            if not self.deleted:
                self.deleted = True
                self.path.unlink()  # the operator's rm, at the worst moment

    path = tmp_path / "audit.db"
    sink = DeletedMidWrite(path)
    await sink.open()
    try:
        with pytest.raises(SinkUnavailable, match="deleted or replaced during a write"):
            await sink.write_part(sample_part("victim"))
        await sink.write_part(sample_part("victim"))  # the flusher's retry
    finally:
        await sink.close()
    assert _stored(path) == {sample_part("victim")["_id"]}


async def test_a_sink_file_that_cannot_be_started_anew_is_unavailable_until_it_can(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.db"
    sink = SqliteSink(path)
    await sink.open()
    try:
        path.unlink()
        path.mkdir()  # in the way of the new file
        with pytest.raises(SinkUnavailable):
            await sink.write_part(sample_part("waits"))
        with pytest.raises(SinkUnavailable):
            await sink.write_part(sample_part("waits"))
        path.rmdir()
        await sink.write_part(sample_part("waits"))
    finally:
        await sink.close()
    assert _stored(path) == {sample_part("waits")["_id"]}


async def test_a_sink_file_renamed_while_another_connection_reads_it_keeps_its_parts(
    tmp_path: Path,
) -> None:
    """A reader on an older snapshot (a sqlite3 shell, a backup) stops the
    checkpoint short (busy): closing then lost what the renamed file had in
    its WAL (acknowledged parts; the file came out malformed). The sink
    stays unavailable until the checkpoint can finish, then starts anew."""
    path = tmp_path / "audit.db"
    old = tmp_path / "audit-2026.db"
    sink = SqliteSink(path)
    await sink.open()
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        await sink.write_part(sample_part("a"))
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM parts").fetchone()  # holds this snapshot
        await sink.write_part(sample_part("b"))
        await sink.write_part(sample_part("c"))
        assert sink._db is not None
        await sink._db.execute("PRAGMA busy_timeout=50")  # (the test need not wait 5 s)
        path.rename(old)
        with pytest.raises(SinkUnavailable, match="cannot be checkpointed"):
            await sink.write_part(sample_part("d"))
        reader.execute("COMMIT")
        await sink.write_part(sample_part("d"))  # the flusher's retry
    finally:
        reader.close()
        await sink.close()
    assert _stored(old) == {sample_part(k)["_id"] for k in "abc"}
    assert _stored(path) == {sample_part("d")["_id"]}


async def test_admin_queries_beside_a_write_that_starts_the_file_anew_are_answered(
    tmp_path: Path,
) -> None:
    """The admin API's queries took the connection without the lock: a write
    that found the file deleted closed it under them (sqlite3's
    ProgrammingError 'Cannot operate on a closed database', a 500)."""
    import asyncio

    path = tmp_path / "audit.db"
    sink = SqliteSink(path)
    await sink.open()
    try:
        queries = [
            lambda: sink.list_sessions(limit=50),
            lambda: sink.get_session_parts(sample_part("s01")["session_id"]),
            lambda: sink.list_security_events(limit=10),
        ]
        for n, query in enumerate(queries):
            for i in range(60):
                await sink.write_part(sample_part(f"s{i:02}"))
            await sink.write_security_events([{"_id": "sec-1", "ts": "2026-11-26T14:00:00.000Z",
                                               "action": "auth.login_failed", "hash": "h1"}])
            async def rm_and_write(n: int = n) -> None:
                path.unlink()
                await sink.write_part(sample_part(f"new{n}"))

            answer, _ = await asyncio.gather(query(), rm_and_write())
            assert answer  # from the file as it was when the query began
    finally:
        await sink.close()
    assert _stored(path) == {sample_part("new2")["_id"]}


async def test_a_full_sink_file_says_so_for_a_security_batch(tmp_path: Path) -> None:
    """Found by the full-disk hunt (a real tmpfs and ext4 image): SQLite rolls
    the batch's transaction back itself on SQLITE_FULL, and the sink's own
    ROLLBACK then failed with "cannot rollback - no transaction is active":
    that, not the full disk, was the flusher's error, its log line and
    /audit/status's ``last_error``. (``max_page_count`` stands in for the disk.)
    The batch is not stored, is retryable, and goes in once there is room."""
    path = tmp_path / "audit.db"
    sink = SqliteSink(path)
    await sink.open()
    try:
        db = sink._conn()
        await db.execute("PRAGMA max_page_count = 12")
        events = [{"_id": f"sec-{i}", "ts": "2026-11-26T14:00:00.000Z",
                   "action": "auth.login_failed", "hash": f"h{i}", "pad": "x" * 3000}
                  for i in range(20)]
        with pytest.raises(SinkUnavailable, match="full") as caught:
            await sink.write_security_events(events)
        assert "rollback" not in str(caught.value)
        assert not db.in_transaction
        await db.execute("PRAGMA max_page_count = 1073741823")
        await sink.write_security_events(events)
    finally:
        await sink.close()
    with closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("SELECT count(*) FROM security_events").fetchone()[0] == 20


async def test_a_security_batch_cancelled_during_its_commit_stays_cancelled(
    tmp_path: Path,
) -> None:
    """Ctrl-C on ``drain`` (or the shutdown's end of the flush window)
    cancels a write that may be in its COMMIT, in aiosqlite's thread: the
    transaction still looked open, so the sink queued a ROLLBACK behind the
    COMMIT, which then failed ("cannot rollback - no transaction is
    active"). That error replaced the cancellation: the write counted as
    failed though its COMMIT landed, and drain went on sending after its
    Ctrl-C. The cancellation goes on, and the batch is stored."""
    path = tmp_path / "audit.db"
    sink = SqliteSink(path)
    await sink.open()
    in_commit, release = threading.Event(), threading.Event()

    def trace(sql: str) -> None:  # (in aiosqlite's thread, as each statement starts)
        if sql.strip().upper() == "COMMIT":
            in_commit.set()
            release.wait(10)

    try:
        await sink._conn().set_trace_callback(trace)
        events = [sample_security_event(f"c-{i}") for i in range(3)]
        task = asyncio.create_task(sink.write_security_events(events))
        assert await asyncio.to_thread(in_commit.wait, 10)
        task.cancel()
        for _ in range(5):  # the task handles its cancellation, the COMMIT still held
            await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sink._conn().set_trace_callback(None)
        assert not sink._conn().in_transaction
        await sink.write_security_events(events)  # the next try: duplicates, same hash
    finally:
        release.set()
        await sink.close()
    with closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("SELECT count(*) FROM security_events").fetchone()[0] == 3


@pytest.mark.parametrize("readonly", [False, True])
async def test_a_sink_path_the_system_refuses_to_look_at_is_unavailable_not_a_sink_bug(
    tmp_path: Path, readonly: bool,
) -> None:
    """The look at the path before opening (is it a directory, a file) let an
    OSError through, where the path cannot even be looked up: a name longer
    than the file system takes, or (as a user other than root) a directory on
    the way that may not be searched. The flusher took it for a bug of the
    sink and logged a traceback at every attempt; verify ended with it."""
    sink = SqliteSink(tmp_path / ("a" * 300 + ".db"), readonly=readonly)
    try:
        with pytest.raises(SinkUnavailable, match="File name too long"):
            await sink.open()
    finally:
        await sink.close()


async def test_a_new_sink_file_held_past_the_wait_is_unavailable_then_opens_once_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another connection holding the new file's write lock makes SQLite answer
    ``journal_mode=WAL`` "database is locked" at once; the open tries again
    until WAL_WAIT_SECONDS have passed (tests/test_hunt_multi.py: a lock let go
    in time), then says unavailable: not a hang, nor an error of another kind.
    Closed after that failed open (twice), the same sink opens once free."""
    monkeypatch.setattr(sqlite_sink, "WAL_WAIT_SECONDS", 0.05)
    path = tmp_path / "audit.db"
    sink = SqliteSink(path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(SinkUnavailable, match=r"audit\.db: database is locked"):
            await asyncio.wait_for(sink.open(), 10)
        await sink.close()
        await sink.close()
        other.execute("COMMIT")
    await sink.open()
    try:
        await sink.write_part(sample_part("s1"))
        assert [p["_id"] for p in await sink.get_session_parts("s1")] == ["s1:0"]
    finally:
        await sink.close()
        await sink.close()

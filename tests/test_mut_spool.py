"""The spool's promises a mutation run of audit/spool.py found unpinned: the
spool-full accounting of jobs taken and not yet committed (at its exact
boundary), the pragmas of every connection it opens, what a failed commit
and the one after it leave, the accounting of each commit, and a job that
fails alone among others."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from audit import spool as spool_mod
from audit.events import Draft
from audit.spool import JOB_BYTES, Spool, SpoolFull, SpoolUnavailable
from audit.store import Limits, Writer


@pytest.fixture
async def sp(tmp_path: Path, audit_key: bytes) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool.db", audit_key, limits=Limits(500, 1 << 20))
    await s.open()
    yield s
    await s.close()


class Gate:
    """A job that holds the writer (its batch committing) until released."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, w: Writer) -> str:
        self.entered.set()
        assert self.release.wait(10)
        return "held"

    async def wait_entered(self) -> None:
        assert await asyncio.get_running_loop().run_in_executor(None, self.entered.wait, 10)


async def test_full_is_at_the_limit_and_counts_jobs_taken_until_their_commit(sp: Spool) -> None:
    await sp.submit(lambda w: w.start_session("u", "user", 1e12, []))
    base = sp.spool_bytes
    assert base > 0
    # Nothing queued or committing: one byte under the limit is not full, at it is.
    sp.max_bytes = base + 1
    assert not sp.full and sp.accepting
    sp.max_bytes = base
    assert sp.full and not sp.accepting
    with pytest.raises(SpoolFull):
        sp.submit_nowait(lambda w: None)
    # What need no space is taken all the same, and counts for nothing.
    assert await sp.submit(lambda w: "bookkeeping", needs_space=False) == "bookkeeping"

    gate = Gate()
    sp.max_bytes = base + 5000
    held = sp.submit_nowait(gate, size=2000)  # committing: counted as 2000 bytes
    try:
        await _held_full(sp, gate)
    finally:
        gate.release.set()
    assert await held == "held"
    # All committed: nothing counted beyond the file any more.
    sp.max_bytes = sp.spool_bytes + 1
    assert not sp.full and sp.accepting


async def _held_full(sp: Spool, gate: Gate) -> None:
    await gate.wait_entered()
    base = sp.spool_bytes  # (the gate's commit has not measured the file yet)
    assert not sp.full
    sp.max_bytes = base + 2000
    assert sp.full
    sp.max_bytes = base + 2001
    assert not sp.full
    sp.max_bytes = base + 4000 + JOB_BYTES
    queued = [sp.submit_nowait(lambda w: None, size=1000) for _ in range(2)]
    others = [sp.submit_nowait(lambda w: None, needs_space=False) for _ in range(5)]
    assert not sp.full  # 2000 committing + 2000 queued
    queued.append(sp.submit_nowait(lambda w: None))  # JOB_BYTES more: now at the limit
    assert sp.full
    with pytest.raises(SpoolFull):
        sp.submit_nowait(lambda w: None, size=1)
    sp.max_bytes += 1
    assert not sp.full
    gate.release.set()
    assert await asyncio.gather(*queued, *others) == [None] * 8


async def test_a_failed_commit_counts_nothing_beyond_the_file_and_is_said_once(
        sp: Spool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, []))
    pages = await sp.submit(lambda w: w.conn.execute("PRAGMA page_count").fetchone()[0])
    await sp.submit(lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages + 2}"),
                    needs_space=False)  # a disk with 2 pages left

    def big(w: Writer) -> None:
        w.conn.execute("INSERT INTO meta VALUES ('big', ?)", ("x" * 100_000,))

    before = sp.stats.commit_failures
    with caplog.at_level(logging.WARNING, logger="session_audit.spool"):
        for _ in range(2):
            results = await asyncio.gather(
                sp.submit(big, size=5000),
                sp.submit(lambda w: w.append(s.session_id, Draft("document.list"))),
                return_exceptions=True)
            # Every job of the batch hears that nothing was recorded, in the
            # spool's words (a 503 audit_unavailable), not SQLite's.
            assert [type(r) for r in results] == [SpoolUnavailable] * 2, results
            assert "could not commit" in str(results[0])
        assert sp.stats.commit_failures == before + 2
        assert sp.commit_error is not None and "rolled back" in sp.commit_error
        assert not sp.accepting
        sp.max_bytes = sp.spool_bytes + 1
        assert not sp.full  # the failed batches' bytes are not counted on
        failed = [r for r in caplog.records if "spool commit failed" in r.getMessage()]
        assert len(failed) == 1  # said once, not once a commit
        # with SQLite's cause, not only "rolled back" (/readyz says it too)
        assert "database or disk is full" in failed[0].getMessage()
        assert "database or disk is full" in sp.commit_error
        await sp.submit(lambda w: w.conn.execute("PRAGMA max_page_count = 1073741823"),
                        needs_space=False)
    assert sp.commit_error is None and sp.accepting
    again = [r.getMessage() for r in caplog.records if "succeed again" in r.getMessage()]
    assert len(again) == 1 and "after 2 failed" in again[0], again
    ev = json.loads(await sp.submit(lambda w: w.append(s.session_id, Draft("document.list"))))
    assert ev["seq"] == 1  # nothing of the failed batches was kept
    assert sp.stats.commit_failures == before + 2

    # A later run of failures (a minute later) is counted from none.
    later = time.monotonic() + 61
    monkeypatch.setattr(sp._log, "clock", lambda: later)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="session_audit.spool"):
        await sp.submit(lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages + 2}"),
                        needs_space=False)
        with pytest.raises(SpoolUnavailable):
            await sp.submit(big)
        await sp.submit(lambda w: w.conn.execute("PRAGMA max_page_count = 1073741823"),
                        needs_space=False)
    again = [r.getMessage() for r in caplog.records if "succeed again" in r.getMessage()]
    assert len(again) == 1 and "after 1 failed" in again[0], again


async def test_commits_failing_and_passing_by_turns_log_a_few_lines_not_two_a_turn(
        sp: Spool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A nearly full disk: big batches fail with SQLITE_FULL, small ones
    pass. Each turn logged "commit failed" and "succeed again" (the second
    reset the first's throttle): a flood while the disk is in trouble. Now
    one line a minute for the failures, counting those left out, and a
    "succeed again" only for a run of failures that was said."""
    # The throttle's clock stands still but where the test moves it: on a
    # loaded machine, 30 turns took more than the 0.2 s of real time left
    # below, and the failure was said at once instead of left out.
    now = [time.monotonic()]
    monkeypatch.setattr(sp._log, "clock", lambda: now[0])
    pages = await sp.submit(lambda w: w.conn.execute("PRAGMA page_count").fetchone()[0])
    await sp.submit(lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages + 2}"),
                    needs_space=False)  # a disk with 2 pages left

    def big(w: Writer) -> None:
        w.conn.execute("INSERT INTO meta VALUES ('big', ?)", ("x" * 100_000,))

    def small(w: Writer) -> None:
        w.conn.execute("INSERT OR REPLACE INTO meta VALUES ('small', 'x')")

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    async def turns(n: int) -> None:
        for _ in range(n):
            with pytest.raises(SpoolUnavailable):
                await sp.submit(big)
            assert sp.commit_error is not None and not sp.accepting  # 503 while failing
            await sp.submit(small)
            assert sp.commit_error is None and sp.accepting

    before = sp.stats.commit_failures
    with caplog.at_level(logging.WARNING, logger="session_audit.spool"):
        await turns(30)
        assert sp.stats.commit_failures == before + 30  # each one counted all the same
        assert len(lines("spool commit failed")) == 1, lines("spool commit failed")
        again = lines("succeed again")
        assert len(again) == 1 and again[0].startswith(
            "spool commits succeed again, after 1 failed: "), again

        now[0] += 61  # a minute later: the next failure is said, counting the rest
        await turns(30)
        failed = lines("spool commit failed")
        assert len(failed) == 2 and "(29 more like it since the last such line)" in failed[1]
        assert len(lines("succeed again")) == 2

        # A failure left out, and no commit after it: said all the same once
        # its minute is out (the log's last word is not "succeed again").
        now[0] += 60 - 0.2
        with pytest.raises(SpoolUnavailable):
            await sp.submit(big)
        assert len(lines("spool commit failed")) == 2
        now[0] += 0.2  # its minute is out (the spool looks again when it said it would)
        for _ in range(200):
            if len(lines("spool commit failed")) == 3:
                break
            await asyncio.sleep(0.025)
        failed = lines("spool commit failed")
        assert len(failed) == 3 and "(30 more like it" in failed[2], failed
        assert sp.commit_error is not None and not sp.accepting
        await sp.submit(small)
        assert len(lines("succeed again")) == 3


async def test_each_commit_is_counted_with_its_batch_and_what_it_recorded(sp: Spool) -> None:
    s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
    stats = sp.stats
    commits, batches, events = stats.commits, stats.batch_sizes.n, stats.events_recorded
    assert events >= 1
    calls: list[tuple[int, int]] = []
    sp.on_commit = lambda parts, sec: calls.append((parts, sec))

    seconds = stats.commit_seconds.total
    started = time.perf_counter()
    gate = Gate()
    held = sp.submit_nowait(gate)
    try:
        await gate.wait_entered()
        jobs = [sp.submit_nowait(lambda w: w.append(s.session_id, Draft("document.list")))
                for _ in range(3)]
        jobs.append(sp.submit_nowait(lambda w: w.append("no-such-session", Draft("x"))))
    finally:
        gate.release.set()
    results = await asyncio.gather(held, *jobs, return_exceptions=True)
    # The two commits' own durations, within the time they took between them.
    assert 0 < stats.commit_seconds.total - seconds <= time.perf_counter() - started
    assert [json.loads(r)["seq"] for r in results[1:4]] == [2, 3, 4]
    assert isinstance(results[4], Exception) and not isinstance(results[4], SpoolUnavailable)
    assert stats.commits == commits + 2 and stats.batch_sizes.n == batches + 2
    # The second batch carried the 4 jobs queued behind the first (bucket "4").
    assert stats.batch_sizes.counts[stats.batch_sizes.buckets.index(4)] == 1
    assert stats.commit_seconds.n == stats.commits and stats.commit_seconds.total > 0
    assert stats.events_recorded == events + 3
    assert calls == []  # no part sealed, no security event: the flusher is not woken

    # A session ended seals a part: the flusher hears of it.
    await sp.submit(lambda w: w.seal(s.session_id, "logout", Draft("session.end")))
    assert calls and calls[-1][0] >= 1


async def test_every_connection_has_the_pragmas_of_the_spool(tmp_path: Path, audit_key: bytes
                                                             ) -> None:
    def pragmas(c: sqlite3.Connection) -> dict[str, object]:
        names = ("journal_mode", "synchronous", "busy_timeout", "secure_delete",
                 "journal_size_limit")
        return {n: c.execute(f"PRAGMA {n}").fetchone()[0] for n in names}

    for sync, level in (("full", 2), ("normal", 1)):
        s = Spool(tmp_path / f"{sync}.db", audit_key, limits=Limits(500, 1 << 20),
                  synchronous=sync)
        await s.open()
        try:
            writer = await s.submit(lambda w: pragmas(w.conn))
            reader = await s.read(pragmas)
            apart = await s.read_apart(pragmas)
        finally:
            await s.close()
        assert writer == {"journal_mode": "wal", "synchronous": level, "busy_timeout": 10000,
                          "secure_delete": 1, "journal_size_limit": spool_mod.WAL_SIZE_LIMIT}
        for conn in (reader, apart):
            assert conn["journal_mode"] == "wal"
            assert conn["synchronous"] == level and conn["busy_timeout"] == 10000


async def test_a_second_close_returns_only_once_the_spool_is_closed(tmp_path: Path,
                                                                    audit_key: bytes) -> None:
    """Two closes at once (the server's shutdown and a signal's): neither
    returns before the connections are closed, SQLite has checkpointed and
    removed the -wal, and every job queued before them is committed."""
    path = tmp_path / "spool.db"
    s = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await s.open()
    opened = await s.submit(lambda w: w.start_session("u", "user", 1e12, []))
    jobs = [s.submit_nowait(lambda w: w.append(opened.session_id, Draft("document.list")))
            for _ in range(5)]
    closes = [asyncio.ensure_future(s.close()) for _ in range(2)]
    await asyncio.wait(closes, return_when=asyncio.FIRST_COMPLETED)
    assert not (tmp_path / "spool.db-wal").exists()
    assert [json.loads(j.result())["seq"] for j in jobs] == [1, 2, 3, 4, 5]
    await asyncio.gather(*closes)


async def test_a_close_cancelled_still_commits_what_is_queued_and_closes(
        tmp_path: Path, audit_key: bytes) -> None:
    """Cancelling a close (a shutdown given up on) cancelled the writer in
    the middle of its batch: the jobs of that batch and those queued behind
    it were never answered, and the connections stayed open. The close goes
    on: every job queued is committed and answered, and the spool closes."""
    path = tmp_path / "spool.db"
    s = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await s.open()
    opened = await s.submit(lambda w: w.start_session("u", "user", 1e12, []))
    gate = Gate()
    held = s.submit_nowait(gate)
    try:
        await gate.wait_entered()
        jobs = [s.submit_nowait(lambda w: w.append(opened.session_id, Draft("document.list")))
                for _ in range(3)]
        closing = asyncio.ensure_future(s.close())
        await asyncio.sleep(0)  # (the close is under way)
        closing.cancel()
    finally:
        gate.release.set()
    # (a deadline against a hang, not a timing)
    assert await asyncio.wait_for(held, 10) == "held"
    answered = await asyncio.wait_for(asyncio.gather(*jobs), 10)
    assert [json.loads(a)["seq"] for a in answered] == [1, 2, 3]
    await asyncio.wait_for(s.close(), 10)
    assert not (tmp_path / "spool.db-wal").exists()
    assert not s.is_open


async def test_a_commit_failing_of_another_cause_within_the_minute_is_said_at_once(
        sp: Spool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk full (said), then, within the minute, another process holding
    the spool's write lock (SQLITE_BUSY): the second cause was left out as
    the first one's repeat, and with no commit after it never said. Each
    cause is said at once; its repeats once a minute."""
    now = [time.monotonic()]
    monkeypatch.setattr(sp._log, "clock", lambda: now[0])
    pages = await sp.submit(lambda w: w.conn.execute("PRAGMA page_count").fetchone()[0])
    await sp.submit(lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages + 2}"),
                    needs_space=False)  # a disk with 2 pages left
    await sp.submit(lambda w: w.conn.execute("PRAGMA busy_timeout = 0"), needs_space=False)

    def big(w: Writer) -> None:
        w.conn.execute("INSERT INTO meta VALUES ('big', ?)", ("x" * 100_000,))

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("spool commit failed")]

    with caplog.at_level(logging.WARNING, logger="session_audit.spool"):
        for _ in range(2):
            with pytest.raises(SpoolUnavailable):
                await sp.submit(big)
        assert len(lines()) == 1, lines()
        other = sqlite3.connect(sp.path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process writing
            now[0] += 1
            for _ in range(2):
                with pytest.raises(SpoolUnavailable):
                    await sp.submit(lambda w: None, needs_space=False)
        finally:
            other.close()
        assert len(lines()) == 2 and "locked" in lines()[1], lines()

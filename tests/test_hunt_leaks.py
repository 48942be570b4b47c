"""State that must not grow without bound in a long-running server."""

from __future__ import annotations

import asyncio
import os

from conftest import FakeClock

from audit.events import Draft, Source
from handlers.auth import LoginThrottle


def _size(path: str) -> int:
    return os.path.getsize(path)


def test_login_throttle_forgets_pairs_whose_failures_left_the_window() -> None:
    """Each failed login keeps a key for its (username, client IP) and one for
    its IP. Keys out of the window were dropped only when the same pair came
    back, or past MAX_KEYS (100,000): a soak of failed logins from 50,000
    addresses left 100,000 keys and 120 MB of RSS, for good."""
    clock = FakeClock(1000.0)
    throttle = LoginThrottle(5, 300.0, clock=clock)
    for i in range(2000):
        throttle.failed(f"nobody-{i}", f"10.0.{i // 250}.{i % 250}")
    assert len(throttle._fails) == 4000
    clock.advance(200)
    throttle.failed("alice", "10.9.9.9")  # within the window of the others: all kept
    assert len(throttle._fails) == 4002
    clock.advance(101)  # the first 2000 failures are out of the window now
    assert throttle.retry_after("bob", "10.8.8.8") is None  # any attempt prunes
    assert len(throttle._fails) == 2
    # What is in the window still counts.
    for _ in range(4):
        throttle.failed("alice", "10.9.9.9")
    assert throttle.retry_after("alice", "10.9.9.9") is not None
    clock.advance(301)
    throttle.failed("carol", "10.7.7.7")
    assert set(throttle._fails) == {("carol", "10.7.7.7"), ("", "10.7.7.7")}


async def test_spool_wal_shrinks_back_after_a_large_purge(make_config, engines, fake_clock):
    """A purge of kept parts deletes them in one transaction (up to
    PURGE_BATCH parts): with secure_delete every page it frees goes through
    the WAL. Without a journal_size_limit the -wal file kept that size for
    good, whatever the spool held afterwards (500 parts of 200 kB: a
    107 MB -wal beside 266 kB of data, for the life of the server)."""
    from audit import spool as spool_mod

    config = make_config(audit={"keep_stored_seconds": 60, "part_max_events": 50},
                         flush={"max_writes_per_second": 10000.0, "burst": 1000})
    engine = await engines.open(config, clock=fake_clock)
    src = Source(user="alice", role="user")
    pad = "x" * 15_000
    sessions = (spool_mod.WAL_SIZE_LIMIT * 3 // 2) // (10 * len(pad)) + 1
    for _ in range(sessions):
        s = await engine.start_session("alice", "user", src, 3600)
        await asyncio.gather(*(engine.record(s.session_id, Draft("document.list",
                                                                 details={"p": pad}))
                               for _ in range(10)))
        await engine.end_session(s.session_id, src)
    await engines.drain(engine)
    fake_clock.advance(61)
    while await engine.flusher._purge():
        pass
    wal = str(engine.spool.path) + "-wal"
    assert _size(wal) > spool_mod.WAL_SIZE_LIMIT  # the purge went through the WAL
    for _ in range(3):  # later commits: checkpointed, the WAL restarts and is cut back
        s = await engine.start_session("alice", "user", src, 3600)
        await engine.end_session(s.session_id, src)
    assert _size(wal) <= spool_mod.WAL_SIZE_LIMIT


async def test_sqlite_sink_wal_shrinks_back_after_a_reader_held_it(tmp_path):
    """While another connection reads the sink (a backup, a sqlite3 shell,
    ``verify`` beside the server), the WAL cannot start over and grows with
    every part written meanwhile. Without a journal_size_limit it kept that
    size once the reader had gone, for the life of the sink."""
    import sqlite3

    from receiver import sample_part

    from sinks import sqlite as sink_mod

    path = tmp_path / "audit.db"
    sink = sink_mod.SqliteSink(path)
    await sink.open()
    try:
        await sink.write_part(sample_part("s-first"))
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM parts").fetchone()  # holds its snapshot
        n = 0
        while _size(f"{path}-wal") <= sink_mod.WAL_SIZE_LIMIT:
            part = sample_part(f"s{n}", events=40)
            for e in part["events"]:
                e["details"] = {"p": "x" * 10_000}
            await sink.write_part(part)
            n += 1
        reader.execute("COMMIT")
        reader.close()
        for i in range(3):  # checkpointed now; the WAL starts over and is cut back
            await sink.write_part(sample_part(f"later{i}"))
        assert _size(f"{path}-wal") <= sink_mod.WAL_SIZE_LIMIT
    finally:
        await sink.close()

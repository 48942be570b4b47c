"""Group commit: concurrent appends share transactions, and nobody is answered early."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading

from audit.events import Draft, Source


async def test_concurrent_appends_are_grouped_and_acknowledged_after_commit(
    make_config, engines
):
    config = make_config()
    engine = await engines.open(config)
    n = 200
    sessions = [
        await engine.start_session(f"user{i}", "user", Source(ip="10.0.0.1"), 3600)
        for i in range(8)
    ]
    # A connection of our own: it sees only what is committed to the file.
    probe = sqlite3.connect(config.spool_path, isolation_level=None)
    probe.execute("PRAGMA busy_timeout = 10000")
    commits_before = engine.stats.commits
    seen_after_ack: list[bool] = []

    async def append(i: int) -> None:
        s = sessions[i % len(sessions)]
        draft = Draft("document.access", target={"type": "document", "id": str(i)})
        event = json.loads(await engine.record(s.session_id, draft))
        # Right after the await returns, before anything else runs on the loop.
        row = probe.execute(
            "SELECT json FROM events WHERE session_id = ? AND seq = ?",
            (s.session_id, event["seq"]),
        ).fetchone()
        seen_after_ack.append(row is not None and draft.event_id in row[0])

    try:
        await asyncio.gather(*(append(i) for i in range(n)))
    finally:
        probe.close()
    commits = engine.stats.commits - commits_before
    assert len(seen_after_ack) == n and all(seen_after_ack)
    assert commits <= n // 10, f"{commits} commits for {n} concurrent appends"
    # Batch-size histogram: some commit carried many jobs.
    assert engine.stats.batch_sizes.n == engine.stats.commits
    hist = engine.stats.batch_sizes
    largest = max(b for b, c in zip(hist.buckets, hist.counts, strict=False) if c)
    assert largest >= 32
    # Each session's events got gapless seqs in the order they were committed.
    with contextlib.closing(sqlite3.connect(config.spool_path)) as conn:
        for s in sessions:
            seqs = [
                r[0]
                for r in conn.execute(
                    "SELECT seq FROM events WHERE session_id = ? ORDER BY seq", (s.session_id,)
                )
            ]
            assert seqs == list(range(1, 3 + n // len(sessions)))


async def test_lone_append_commits_alone(make_config, engines, monkeypatch):
    """With an empty queue the writer commits a single job at once: no batching
    timer. The loop's clock is stopped, so that no timer (``asyncio.sleep``,
    ``call_later``) can fire: appends that waited for one would never return."""
    engine = await engines.open(make_config())
    s = await engine.start_session("alice", "user", Source(), 3600)
    before = engine.stats.commits
    loop = asyncio.get_running_loop()

    async def appends() -> None:
        for i in range(5):
            await engine.record(s.session_id, Draft("document.list", details={"i": i}))

    task = asyncio.ensure_future(appends())
    # A watchdog that needs no timer of the loop's: a thread cancels after 10 s.
    watchdog = threading.Timer(10, lambda: loop.call_soon_threadsafe(task.cancel))
    frozen = loop.time()
    monkeypatch.setattr(loop, "time", lambda: frozen)
    watchdog.start()
    try:
        await task
    except asyncio.CancelledError:
        raise AssertionError("the appends waited for a timer of the loop's") from None
    finally:
        watchdog.cancel()
        monkeypatch.undo()
    assert engine.stats.commits - before == 5

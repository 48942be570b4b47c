"""Review findings: the flusher must survive transient spool failures."""

from __future__ import annotations

import asyncio
import json
import sqlite3

from audit import queries
from audit.events import Draft, Source
from audit.store import Writer


async def test_flusher_survives_a_transient_spool_failure(
    make_config, engines, wait_until, monkeypatch
):
    """A disk error while marking a part stored (the spool's commit fails and
    "may pass") must not kill the flusher for the rest of the process: once
    the disk recovers, the part is marked stored and the server stays ready."""
    config = make_config(flush={"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05})
    engine = await engines.open(config, background=True)
    src = Source(user="alice", role="user")

    real = Writer.mark_part_stored
    failures = {"left": 1}

    def flaky(self, session_id, part, keep_seconds):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, session_id, part, keep_seconds)

    monkeypatch.setattr(Writer, "mark_part_stored", flaky)
    s = await engine.start_session("alice", "user", src, 3600)
    await engine.record(s.session_id, Draft("document.list"))
    await engine.end_session(s.session_id, src)

    async def flushed() -> bool:
        c = await engine.spool.read(lambda conn: queries.counts(conn, 0))
        return c["pending_parts"] == 0

    await wait_until(flushed, timeout=5, message="the part to be marked stored")
    assert failures["left"] == 0
    assert engine.task_failure is None
    assert engine.ready


async def test_drain_beside_a_running_flusher_writes_each_part_once(make_config, engines):
    """``server.py drain`` works while the server runs (API.md): its flusher and
    the server's share the spool file. Both must not send the same pending
    part: a JSONL sink (whose index is per process) would append it twice,
    and a billed cloud sink would be paid twice."""
    from sinks.jsonl import JsonlSink

    config = make_config()
    release = asyncio.Event()
    started: list[str] = []

    class SlowJsonl(JsonlSink):
        async def write_part(self, part):
            started.append(part["_id"])
            await release.wait()
            await super().write_part(part)

    server = await engines.open(config, SlowJsonl(config.jsonl_dir))
    cli = await engines.open(config, SlowJsonl(config.jsonl_dir))
    src = Source(user="alice", role="user")
    s = await server.start_session("alice", "user", src, 3600)
    await server.end_session(s.session_id, src)

    first = asyncio.ensure_future(server.flusher.step())
    second = asyncio.ensure_future(cli.flusher.drain())
    for _ in range(200):
        if started:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 10)

    lines = [
        json.loads(line)
        for path in sorted(config.jsonl_dir.glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    ids = [d["_id"] for d in lines if d["type"] == "session_part"]
    assert ids == [f"{s.session_id}:0"]


async def test_spool_failures_back_off_exponentially_and_reset(
    make_config, engines, wait_until, monkeypatch
):
    """A part the sink took but the spool could not mark stored is sent again at
    every retry: those retries back off exponentially (the sink write that
    succeeded in between does not reset the spool's backoff), and a step that
    goes through resets it."""
    config = make_config(flush={"backoff_base_seconds": 0.001, "backoff_max_seconds": 0.01})
    engine = await engines.open(config, background=True)
    src = Source(user="alice", role="user")
    real = Writer.mark_part_stored
    seen: list[int] = []

    def flaky(self, session_id, part, keep_seconds):
        if len(seen) < 4:
            seen.append(engine.flusher.spool_backoff.attempt)
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, session_id, part, keep_seconds)

    monkeypatch.setattr(Writer, "mark_part_stored", flaky)
    s = await engine.start_session("alice", "user", src, 3600)
    await engine.end_session(s.session_id, src)

    async def flushed() -> bool:
        c = await engine.spool.read(lambda conn: queries.counts(conn, 0))
        return c["pending_parts"] == 0

    await wait_until(flushed, timeout=5, message="the part to be marked stored")
    assert seen == [0, 1, 2, 3]  # one more doubling at each failure in a row
    await wait_until(lambda: engine.flusher.spool_backoff.attempt == 0, timeout=5,
                     message="the backoff to reset")

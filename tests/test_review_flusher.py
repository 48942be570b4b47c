"""Review findings: the flusher must survive transient spool failures."""

from __future__ import annotations

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

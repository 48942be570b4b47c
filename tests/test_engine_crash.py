"""Crash, simulated: an engine abandoned without closing; a new one over the same file."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from audit.events import Draft, Source
from audit.verify import verify_sink
from sinks.base import SinkUnavailable
from sinks.sqlite import SqliteSink


class AckLostSink(SqliteSink):
    """Stores the part, then answers as if the write had timed out (the peer's
    ack was lost): the spool still has the part pending."""

    def __init__(self, path, lose: int) -> None:
        super().__init__(path)
        self.lose = lose

    async def write_part(self, part):
        await super().write_part(part)
        if self.lose > 0:
            self.lose -= 1
            raise SinkUnavailable("timeout after the write landed")


async def stored_events(sink: SqliteSink) -> list[dict]:
    out = []
    sessions, cursor = await sink.list_sessions(limit=1000)
    assert cursor is None
    for s in sessions:
        for part in await sink.get_session_parts(s["session_id"]):
            out.extend(part["events"])
    return out


async def test_abandoned_engine_loses_nothing_acknowledged(
    make_config, engines, audit_key, fake_monotonic
):
    config = make_config(audit={"part_max_events": 4})
    sink1 = AckLostSink(config.sqlite_sink_path, lose=1)
    e1 = await engines.open(config, sink1, monotonic=fake_monotonic)
    acked: list[str] = []
    src = Source(user="alice", role="user")

    a = await e1.start_session("alice", "user", src, 3600)
    b = await e1.start_session("bob", "user", src, 3600)
    for _ in range(6):
        for s in (a, b):
            stored = await e1.record(s.session_id, Draft("document.list"))
            acked.append(json.loads(stored)["event_id"])
    await e1.end_session(a.session_id, src)  # a: sealed, 3 parts pending
    await e1.record_security(Draft("auth.login_failed", outcome="denied"))

    # The flusher writes the security event first, then a part whose ack is lost.
    assert await e1.flusher.step() == 0.0
    assert await e1.flusher.step() > 0  # stored in the sink, still pending in the spool
    assert sink1.lose == 0
    # Jobs still queued when the process dies are not acknowledged.
    unacked = [
        asyncio.ensure_future(e1.record(b.session_id, Draft("document.list")))
        for _ in range(3)
    ]
    await engines.abandon(e1)
    for t in unacked:
        t.cancel()
    await asyncio.gather(*unacked, return_exceptions=True)

    sink2 = SqliteSink(config.sqlite_sink_path)
    e2 = await engines.open(config, sink2, monotonic=fake_monotonic)
    status = await e2.status()
    assert status["active_sessions"] == 1
    assert status["pending_parts"] >= 3  # a's sealed parts (one maybe already in the sink)
    # Session b resumes where it was: seq continues and the chain head matches.
    resumed = e2.session(b.session_id)
    assert resumed is not None
    next_seq = resumed.next_seq
    assert 2 + 6 + 1 <= next_seq <= 2 + 6 + 3 + 1  # the unacked three may have committed
    ev = json.loads(await e2.record(b.session_id, Draft("document.list")))
    acked.append(ev["event_id"])
    assert ev["seq"] == next_seq
    await e2.end_session(b.session_id, src)
    await engines.drain(e2, fake_monotonic)

    events = await stored_events(sink2)
    counts = Counter(e["event_id"] for e in events)
    assert not [k for k, v in counts.items() if v > 1], "duplicated events"
    assert set(acked) <= set(counts)
    report = await verify_sink(sink2, audit_key)
    assert report.ok, report.problems
    assert report.sessions == 2
    for sid in (a.session_id, b.session_id):
        seqs = sorted(e["seq"] for e in events if e["session_id"] == sid)
        assert seqs == list(range(1, len(seqs) + 1))
    sec, _ = await sink2.list_security_events()
    assert [e["action"] for e in sec] == ["auth.login_failed"]
    final = await e2.status()
    assert final["pending_parts"] == 0 and final["active_sessions"] == 0


async def test_reopen_requeues_sealed_unflushed_parts(make_config, engines, audit_key):
    config = make_config(audit={"part_max_events": 3})
    sink = SqliteSink(config.sqlite_sink_path)
    e1 = await engines.open(config, sink)
    src = Source(user="carol", role="user")
    sids = []
    for _ in range(3):
        s = await e1.start_session("carol", "user", src, 3600)
        for _ in range(4):
            await e1.record(s.session_id, Draft("document.list"))
        await e1.end_session(s.session_id, src)  # 7 events -> parts of 3, 3, 1
        sids.append(s.session_id)
    await engines.abandon(e1)

    e2 = await engines.open(config, SqliteSink(config.sqlite_sink_path))
    assert (await e2.status())["pending_parts"] == 9
    await engines.drain(e2)
    report = await verify_sink(e2.sink, audit_key)
    assert report.ok and report.sessions == 3 and report.parts == 9 and report.events == 21

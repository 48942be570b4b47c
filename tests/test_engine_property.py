"""Property: random interleavings of appends, seals, sink answers and reopenings.

Whatever happens, every acknowledged event ends up in the sink exactly once,
in ``seq`` order, the chain verifies, and a session of n events (with no
checkpoint time passing) has exactly ceil(n / part_max_events) parts.

The sink is a scripted in-process peer (a real :class:`Sink` subclass that
stores to a dict and answers as told); the engine, spool and flusher are real,
driven step by step with fake clocks.
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
from collections import Counter, deque
from typing import Any

from conftest import AUDIT_KEY, Engines, FakeClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit import store
from audit.config import parse_config
from audit.events import Draft, Source, event_hash, genesis
from audit.store import SECURITY_STREAM
from audit.verify import check_session
from sinks.base import Sink, SinkConflict, SinkRateLimited, SinkRejected, SinkUnavailable

ANSWERS = ("ok", "rate_limited", "unavailable", "rejected", "duplicate")


class ScriptedSink(Sink):
    """Answers each write as scripted; ``duplicate`` = stored, but the ack is lost."""

    type = "scripted"

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, Any]] = {}
        self.security: dict[str, dict[str, Any]] = {}
        self.answers: deque[str] = deque()
        self.writes = 0

    def _write(self, table: dict[str, dict[str, Any]], docs: list[dict[str, Any]]) -> None:
        self.writes += 1
        answer = self.answers.popleft() if self.answers else "ok"
        if answer == "rate_limited":
            raise SinkRateLimited(retry_after=1.5)
        if answer == "unavailable":
            raise SinkUnavailable("connection reset")
        if answer == "rejected":
            raise SinkRejected("document too large")
        for d in docs:
            old = table.get(d["_id"])
            if old is not None and old["hash"] != d["hash"]:
                raise SinkConflict(f"{d['_id']} stored with another hash")
        for d in docs:
            table[d["_id"]] = json.loads(json.dumps(d))
        if answer == "duplicate":
            raise SinkUnavailable("timed out (but the write landed)")

    async def write_part(self, part: dict[str, Any]) -> None:
        self._write(self.parts, [part])

    async def write_security_events(self, events: list[dict[str, Any]]) -> None:
        self._write(self.security, events)


OPS = st.one_of(
    st.tuples(st.just("start")),
    st.tuples(st.just("append"), st.lists(st.integers(0, 7), min_size=1, max_size=10)),
    st.tuples(st.just("seal"), st.integers(0, 7)),
    st.tuples(st.just("security"), st.integers(1, 3)),
    st.tuples(st.just("answers"), st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=6)),
    st.tuples(st.just("flush"), st.integers(1, 8)),
    st.tuples(st.just("reopen"), st.booleans(), st.integers(0, 3)),
)


class Model:
    def __init__(self) -> None:
        self.open: list[str] = []
        self.acked: dict[str, list[tuple[int, str]]] = {}  # sid -> (seq, event_id)
        self.security: list[str] = []  # acked security event ids, in order


async def scenario(data_dir: str, part_max_events: int, ops: list[tuple[Any, ...]]) -> None:
    wall, mono = FakeClock(), FakeClock(start=1000.0)
    config = parse_config(
        {
            "server": {"data_dir": data_dir},
            "audit": {"part_max_events": part_max_events, "synchronous": "normal"},
            "flush": {
                "max_writes_per_second": 50.0,
                "burst": 4,
                "backoff_base_seconds": 0.5,
                "backoff_max_seconds": 8.0,
            },
        }
    )
    sink = ScriptedSink()
    engines = Engines(AUDIT_KEY)
    src = Source(user="u", role="user", ip="127.0.0.1")
    m = Model()

    async def open_engine() -> Any:
        return await engines.open(config, sink, clock=wall, monotonic=mono)

    async def flush(engine: Any, steps: int, *, until_idle: bool = False) -> None:
        for _ in range(steps):
            delay = await engine.flusher.step()
            if delay is None:
                return
            mono.advance(delay)
        assert not until_idle, "the flusher did not become idle"

    try:
        engine = await open_engine()
        for op in ops:
            kind = op[0]
            if kind == "start":
                s = await engine.start_session("u", "user", src, 3600)
                m.open.append(s.session_id)
                m.acked[s.session_id] = []
            elif kind == "append" and m.open:
                sids = [m.open[i % len(m.open)] for i in op[1]]
                events = await asyncio.gather(
                    *(engine.record(sid, Draft("document.list")) for sid in sids)
                )
                for sid, ev in zip(sids, events, strict=True):
                    assert ev["session_id"] == sid
                    m.acked[sid].append((ev["seq"], ev["event_id"]))
            elif kind == "seal" and m.open:
                sid = m.open.pop(op[1] % len(m.open))
                await engine.end_session(sid, src)
            elif kind == "security":
                drafts = [Draft("auth.login_failed", outcome="denied") for _ in range(op[1])]
                for d in drafts:  # one at a time: the acked order is the chain order
                    await engine.record_security(d)
                    m.security.append(d.event_id)
            elif kind == "answers":
                sink.answers.extend(op[1])
            elif kind == "flush":
                await flush(engine, op[1])
            elif kind == "reopen":
                crash, inflight = op[1], op[2]
                if crash:
                    # Unacknowledged work in flight when the process dies.
                    tasks = [
                        asyncio.ensure_future(engine.record(sid, Draft("document.list")))
                        for sid in m.open[:inflight]
                    ]
                    await asyncio.sleep(0)
                    await engines.abandon(engine)
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                else:
                    await engine.close(flush_window=0)
                engine = await open_engine()
                assert {s.session_id for s in engine.spool.open_sessions()} == set(m.open)

        # The end: every session ends, the sink recovers, dead letters are retried.
        for sid in m.open:
            await engine.end_session(sid, src)
        sink.answers.clear()
        await flush(engine, 5_000, until_idle=True)
        await engine.retry_dead_letters()
        await flush(engine, 5_000, until_idle=True)
        status = await engine.status()
        assert status["pending_parts"] == 0
        assert status["pending_security_events"] == 0
        assert status["dead_letter"] == 0
        assert status["active_sessions"] == 0

        check(sink, m, part_max_events)
    finally:
        await engines.aclose()


def check(sink: ScriptedSink, m: Model, part_max_events: int) -> None:
    by_session: dict[str, list[dict[str, Any]]] = {}
    for doc in sink.parts.values():
        by_session.setdefault(doc["session_id"], []).append(doc)
    assert set(by_session) == set(m.acked)
    all_ids: Counter[str] = Counter()
    for sid, parts in by_session.items():
        parts.sort(key=lambda p: p["part"])
        assert check_session(AUDIT_KEY, sid, parts) == []
        events = [e for p in parts for e in p["events"]]
        n = len(events)
        assert [e["seq"] for e in events] == list(range(1, n + 1))
        all_ids.update(e["event_id"] for e in events)
        stored = {(e["seq"], e["event_id"]) for e in events}
        assert set(m.acked[sid]) <= stored
        # Exactly ceil(n / part_max_events) parts: full checkpoints, then the final one.
        assert [p["part"] for p in parts] == list(range(math.ceil(n / part_max_events)))
        for p in parts[:-1]:
            assert not p["final"] and p["seal_reason"] == "checkpoint"
            assert p["event_count"] == part_max_events
            assert p["session_end_time"] is None
        assert parts[-1]["final"] and parts[-1]["seal_reason"] == "logout"
        assert events[0]["action"] == "session.start" and events[-1]["action"] == "session.end"
    assert max(all_ids.values(), default=1) == 1, "an event is stored twice"

    # Security events: every acknowledged one once, and the stream's chain verifies.
    assert set(sink.security) == set(m.security)
    head = genesis(AUDIT_KEY, SECURITY_STREAM)
    for eid in m.security:
        ev = {k: v for k, v in sink.security[eid].items() if k != "_id"}
        assert event_hash(AUDIT_KEY, head, ev) == ev["hash"]
        head = ev["hash"]


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    part_max_events=st.integers(1, 5),
    keys_every=st.sampled_from([1, 3, store.KEYS_EVERY]),
    ops=st.lists(OPS, max_size=30),
)
def test_every_acknowledged_event_is_stored_exactly_once(part_max_events, keys_every, ops):
    """``keys_every``: how often the spool indexes its events (every commit,
    every few events, or as shipped: then most reads go through the tail)."""
    saved, store.KEYS_EVERY = store.KEYS_EVERY, keys_every
    try:
        with tempfile.TemporaryDirectory() as d:
            asyncio.run(scenario(d, part_max_events, ops))
    finally:
        store.KEYS_EVERY = saved

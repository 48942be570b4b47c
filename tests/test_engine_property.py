"""Property: random interleavings of appends, seals, sink answers and reopenings.

Whatever happens, every acknowledged event ends up in the sink exactly once,
in ``seq`` order, the chain verifies, and a session of n events (with no
checkpoint time passing) has exactly ceil(n / part_max_events) parts.

The sink is a scripted in-process peer (a real :class:`Sink` subclass that
stores to a dict and answers as told); the engine, spool and flusher are real,
driven step by step with fake clocks.

Scripts are built in rounds (a few ops of any kind, appends, a seal, answers
for the next parts, a short flush, a retry of dead letters, a reopening) so
that most examples write parts and many restart while a part's write has
failed; the explicit examples pin those cases. Run with
``--hypothesis-show-statistics`` to see how often they occur.
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
from collections import Counter, deque
from typing import Any

from conftest import AUDIT_KEY, Engines, FakeClock
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from audit import store
from audit.config import parse_config
from audit.events import Draft, Source, event_hash, genesis
from audit.store import SECURITY_STREAM
from audit.verify import check_session
from sinks.base import Sink, SinkConflict, SinkRateLimited, SinkRejected, SinkUnavailable

ANSWERS = ("ok", "rate_limited", "unavailable", "rejected", "duplicate")


class ScriptedSink(Sink):
    """Answers each write as scripted; ``duplicate`` = stored, but the ack is lost.

    Parts and security batches each follow a script of their own: the flusher
    sends security events first, so with one script they would take most answers.
    """

    type = "scripted"

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, Any]] = {}
        self.security: dict[str, dict[str, Any]] = {}
        self.answers: deque[str] = deque()  # for parts
        self.security_answers: deque[str] = deque()  # for security batches
        self.answered: list[str] = []  # the answers given to parts, in order
        self.security_answered: list[str] = []  # and to security batches
        self.writes = 0

    def _write(
        self, table: dict[str, dict[str, Any]], script: deque[str], docs: list[dict[str, Any]]
    ) -> None:
        self.writes += 1
        answer = script.popleft() if script else "ok"
        (self.answered if table is self.parts else self.security_answered).append(answer)
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
        self._write(self.parts, self.answers, [part])

    async def write_security_events(self, events: list[dict[str, Any]]) -> None:
        self._write(self.security, self.security_answers, events)


# The ops. ``answers`` script the sink's next answers to parts,
# ``security_answers`` those to security batches.
START = st.tuples(st.just("start"))
APPEND = st.tuples(st.just("append"), st.lists(st.integers(0, 7), min_size=1, max_size=10))
SEAL = st.tuples(st.just("seal"), st.integers(0, 7))
SECURITY = st.tuples(st.just("security"), st.integers(1, 3))
PART_ANSWERS = st.tuples(
    st.just("answers"), st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=6)
)
SECURITY_ANSWERS = st.tuples(
    st.just("security_answers"), st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=3)
)
FLUSH = st.tuples(st.just("flush"), st.integers(1, 8))
REOPEN = st.tuples(st.just("reopen"), st.booleans(), st.integers(0, 3))
RETRY_DEAD = st.tuples(st.just("retry_dead"))

OPS = st.one_of(
    START, APPEND, SEAL, SECURITY, PART_ANSWERS, SECURITY_ANSWERS, FLUSH, REOPEN, RETRY_DEAD
)
# A round: a few ops of any kind, appends (often cutting parts), maybe a seal,
# maybe answers for the next parts, a short flush (failures may outlast it),
# maybe a retry of dead letters and maybe a reopening: the shape of a failed
# write followed by a restart. A script starts sessions first (more may start
# later), maybe records security events, then runs one to three rounds.
ROUND = st.tuples(
    st.lists(OPS, max_size=3),
    APPEND.map(lambda op: [op]),
    st.lists(SEAL, max_size=1),
    st.lists(PART_ANSWERS, max_size=1),
    st.integers(1, 4).map(lambda n: [("flush", n)]),
    st.lists(RETRY_DEAD, max_size=1),
    st.lists(REOPEN, max_size=1),
).map(lambda r: [op for ops in r for op in ops])
SCRIPTS = st.tuples(
    st.lists(START, min_size=1, max_size=3),
    st.lists(SECURITY, max_size=1),
    st.lists(ROUND, min_size=1, max_size=3),
).map(lambda t: [*t[0], *t[1], *(op for r in t[2] for op in r)])


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

    answered = 0  # parts answered before the last reopening
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
                for sid, text in zip(sids, events, strict=True):
                    ev = json.loads(text)
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
            elif kind == "security_answers":
                sink.security_answers.extend(op[1])
            elif kind == "retry_dead":
                await engine.retry_dead_letters()
            elif kind == "flush":
                await flush(engine, op[1])
            elif kind == "reopen":
                crash, inflight = op[1], op[2]
                for a in sorted(set(sink.answered[answered:]) - {"ok"}):
                    event(f"{'crash' if crash else 'close'} after a part was answered {a}")
                answered = len(sink.answered)
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

        if sink.parts:
            event("parts in the sink before the final drain")
        # The end: every session ends, the sink recovers, dead letters are retried.
        for sid in m.open:
            await engine.end_session(sid, src)
        sink.answers.clear()
        sink.security_answers.clear()
        await flush(engine, 5_000, until_idle=True)
        # Only a rejection dead-letters (a rate limit, a timeout or a write that
        # landed does not), once at most.
        status = await engine.status()
        assert status["dead_letter_parts"] <= sink.answered.count("rejected")
        assert status["dead_letter_security_events"] <= sink.security_answered.count("rejected")
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
    max_examples=400,
    deadline=None,
    # One bug, shrunk: shrinking several at once can outlast pytest's timeout.
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    part_max_events=st.integers(1, 5),
    keys_every=st.sampled_from([1, 3, store.KEYS_EVERY]),
    ops=SCRIPTS,
)
# A part's write failed, then the process dies (or stops) before it is sent again:
# the part is still pending, however many times it was tried.
@example(  # unavailable
    part_max_events=1,
    keys_every=store.KEYS_EVERY,
    ops=[("start",), ("seal", 0), ("answers", ["unavailable"]), ("flush", 1), ("reopen", True, 0)],
)
@example(  # unavailable, a checkpoint part, a second session open, a clean stop
    part_max_events=2,
    keys_every=1,
    ops=[
        ("start",),
        ("start",),
        ("append", [0, 0, 1]),
        ("seal", 0),
        ("answers", ["unavailable", "unavailable"]),
        ("flush", 3),
        ("reopen", False, 0),
    ],
)
@example(  # rate limited (also the bucket's pause dies with the process)
    part_max_events=2,
    keys_every=3,
    ops=[
        ("start",),
        ("append", [0, 0, 0]),
        ("answers", ["rate_limited", "rate_limited"]),
        ("flush", 2),
        ("reopen", True, 1),
        ("flush", 1),
    ],
)
@example(  # rate limited, then unavailable, with work in flight at the crash
    part_max_events=1,
    keys_every=1,
    ops=[
        ("start",),
        ("start",),
        ("seal", 1),
        ("answers", ["rate_limited", "unavailable"]),
        ("flush", 2),
        ("reopen", True, 3),
    ],
)
@example(  # duplicate: the write landed, its ack was lost; the same part is sent again
    part_max_events=3,
    keys_every=store.KEYS_EVERY,
    ops=[
        ("start",),
        ("append", [0, 0, 0, 0]),
        ("seal", 0),
        ("answers", ["duplicate"]),
        ("flush", 1),
        ("reopen", True, 0),
    ],
)
@example(  # duplicate twice, then a rate limit, across a clean stop and a crash
    part_max_events=1,
    keys_every=3,
    ops=[
        ("start",),
        ("append", [0]),
        ("answers", ["duplicate", "duplicate", "rate_limited"]),
        ("flush", 3),
        ("reopen", False, 0),
        ("flush", 1),
        ("reopen", True, 1),
    ],
)
@example(  # rejected: dead-lettered, retried (pending again, attempts > 0), then a crash
    part_max_events=2,
    keys_every=store.KEYS_EVERY,
    ops=[
        ("start",),
        ("seal", 0),
        ("answers", ["rejected"]),
        ("flush", 1),
        ("retry_dead",),
        ("reopen", True, 0),
    ],
)
@example(  # rejected, retried, unavailable, then a clean stop; a security event too
    part_max_events=1,
    keys_every=1,
    ops=[
        ("start",),
        ("security", 1),
        ("append", [0]),
        ("answers", ["rejected", "unavailable"]),
        ("flush", 2),
        ("retry_dead",),
        ("flush", 1),
        ("reopen", False, 0),
    ],
)
@example(  # unavailable three times: the part is put aside, a later one goes first
    part_max_events=1,
    keys_every=1,
    ops=[
        ("start",),
        ("start",),
        ("seal", 0),
        ("answers", ["unavailable", "unavailable", "unavailable"]),
        ("flush", 3),
        ("seal", 0),
        ("flush", 2),
    ],
)
@example(  # security batches: unavailable, then duplicate, then a crash
    part_max_events=2,
    keys_every=store.KEYS_EVERY,
    ops=[
        ("start",),
        ("security", 3),
        ("security_answers", ["unavailable", "duplicate"]),
        ("flush", 2),
        ("reopen", True, 0),
        ("security", 1),
        ("flush", 1),
    ],
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

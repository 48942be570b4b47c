"""Property: the flusher against a sink whose every document answers its own way.

Sessions (with parts) and security events are recorded over time while the
flusher runs step by step on a fake clock; the sink (a scripted in-process
:class:`Sink`) answers each write by the behaviour drawn for each document
in it, in the order it first sees them: ok; unavailable for its first k
writes; stored but unavailable (the ack lost) for its first k writes;
unavailable until the heal (a poison document); rejected (a dead letter);
rate limited with a hint for its first k writes. A batch failing for some
of its events stores the others (an unordered bulk insert). The whole sink
may be down for a stretch, the process may crash (between steps or in a
write, landed or not) or stop and start again. The engine, spool and flusher
are real; the flusher's wall clock is the fake one too.

Invariants, checked as it goes and at the end:

* safety: no ``_id`` is stored twice with different content; every
  acknowledged event ends up stored (or dead-lettered, by a rejection only);
  a rate-limit answer pauses every write until its hint has passed; the
  token bucket is never exceeded in any window, across restarts;
* liveness: once the sink is up again, everything but its poison documents
  is stored within a bounded number of steps and of fake time (the delays
  the flusher returns); after the heal, with no new work, everything is,
  and the flusher never says idle while something is pending. The bounds
  are generous: a count of steps per document and per failure left, and
  DEFER_MAX_SECONDS more per failure left (a document put aside fails again:
  put aside again at once, its pause doubled up to DEFER_MAX_SECONDS);
* priority: while the sink works (the last write went through), a part goes
  before a pending security event (but one put aside, waiting its pause)
  only in the one part's turn a stored (or refused) security batch gives.

Checked for teeth by breaking the flusher on purpose (no part's turn taken
back, a hint not honoured, the bucket's write in flight not counted at a
restart, no search in halves): each fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import tempfile
import types
from collections import deque
from dataclasses import dataclass
from typing import Any

from conftest import AUDIT_KEY, Engines, FakeClock
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_engine_property import Model, check

from audit import flusher as flusher_mod
from audit import queries
from audit.config import parse_config
from audit.events import Draft, Source
from sinks.base import Sink, SinkRateLimited, SinkRejected, SinkUnavailable

RATE, BURST = 2.0, 3
BACKOFF_BASE, BACKOFF_MAX = 0.5, 8.0
HINTS = (0.5, 5.0, 30.0)

OK: tuple[Any, ...] = ("ok",)
BEHAVIOUR = st.one_of(
    st.just(OK),
    st.just(OK),
    st.tuples(st.just("transient"), st.integers(1, 4)),
    st.tuples(st.just("landed"), st.integers(1, 2)),
    st.just(("poison",)),
    st.just(("reject",)),
    st.tuples(st.just("rate"), st.sampled_from(HINTS), st.integers(1, 2)),
)


class Clock:
    """The fake wall and monotonic clocks, moving together."""

    def __init__(self) -> None:
        self.wall = FakeClock()
        self.mono = FakeClock(start=1000.0)

    def advance(self, seconds: float) -> None:
        self.wall.advance(seconds)
        self.mono.advance(seconds)


@dataclass
class Write:
    at: float  # fake monotonic time
    kind: str  # "part" or "security"
    ids: list[str]
    answer: str  # ok, landed, partly, unavailable, rate_limited, rejected, hung


class PerDocSink(Sink):
    """Answers each write by the behaviours of the documents in it."""

    type = "scripted"

    def __init__(self, clock: Clock, plan: list[tuple[Any, ...]]) -> None:
        self.clock = clock
        self.plan = deque(plan)
        self.behaviour: dict[str, list[Any]] = {}
        self.parts: dict[str, dict[str, Any]] = {}
        self.security: dict[str, dict[str, Any]] = {}
        self.healed = False  # poison documents are taken
        self.accept_all = False  # and rejected ones (the end's fix)
        self.outage = False
        self.writes: list[Write] = []
        self.prev: Write | None = None  # the last write of the running process
        self.paused_until = -math.inf
        self.errors: list[str] = []
        self.engine: Any = None
        self.hang: bool | None = None  # the next write hangs (landed or not): a crash in it
        self.hung = asyncio.Event()

    def _of(self, doc_id: str) -> list[Any]:
        b = self.behaviour.get(doc_id)
        if b is None:
            b = self.behaviour[doc_id] = list(self.plan.popleft() if self.plan else OK)
        return b

    def _failing(self, b: list[Any]) -> bool:
        return (b[0] in ("transient", "landed", "rate") and b[-1] > 0) or (
            b[0] == "poison" and not self.healed)

    def _answer(self, ids: list[str]) -> tuple[str, float, set[str]]:
        """The answer, a rate limit's hint, and the documents a partly
        applied batch stores."""
        if self.outage:
            return "unavailable", 0.0, set()
        bs = [self._of(i) for i in ids]
        rate = [b for b in bs if b[0] == "rate" and b[2] > 0]
        if rate:
            for b in rate:
                b[2] -= 1
            return "rate_limited", max(b[1] for b in rate), set()
        refused = any(b[0] == "reject" for b in bs) and not self.accept_all
        failing = [b for b in bs if self._failing(b)]
        fine = {i for i, b in zip(ids, bs, strict=True) if b[0] != "reject"
                and not self._failing(b)}
        if failing:
            for b in failing:
                if b[0] != "poison":
                    b[1] -= 1
            landed = all(b[0] == "landed" for b in failing) and not refused
            # Else a partly applied batch (an unordered bulk insert): the
            # others are stored.
            return ("landed" if landed else "partly"), 0.0, fine
        return ("rejected" if refused else "ok"), 0.0, set()

    async def _priority(self, kind: str) -> None:
        """A part goes before a pending security event (but one put aside and
        waiting its pause) only in its turn, once a security write was
        answered (stored or refused)."""
        engine, prev = self.engine, self.prev
        if kind != "part" or engine is None:
            return
        if prev is not None and prev.answer not in ("ok", "rejected"):
            return  # the sink does not work: not asked
        now = self.clock.mono()
        held = {k for k, (until, _) in engine.flusher._deferred.items()
                if isinstance(k, int) and until > now}
        pending = [rid for (rid,) in await engine.spool.read(lambda c: c.execute(
            "SELECT id FROM security_events WHERE state = 'pending'").fetchall())
            if rid not in held]
        if pending and (prev is None or prev.kind != "security"):
            self.errors.append(f"a part went before {len(pending)} pending security events"
                               f" (the write before: {prev})")

    def _store(self, kind: str, docs: list[dict[str, Any]]) -> None:
        table = self.parts if kind == "part" else self.security
        for d in docs:
            old = table.get(d["_id"])
            if old is not None and old["hash"] != d["hash"]:
                self.errors.append(f"{d['_id']} stored twice with different content")
        for d in docs:
            table[d["_id"]] = json.loads(json.dumps(d))

    async def _write(self, kind: str, docs: list[dict[str, Any]]) -> None:
        now = self.clock.mono()
        ids = [str(d["_id"]) for d in docs]
        if now < self.paused_until - 1e-6:
            self.errors.append(f"a write at {now} in a rate-limit pause until"
                               f" {self.paused_until}")
        await self._priority(kind)
        if self.hang is not None:
            landed, self.hang = self.hang, None
            self.writes.append(Write(now, kind, ids, "hung"))
            if landed and not self.outage and not any(
                    self._failing(self._of(i)) or self._of(i)[0] == "reject" for i in ids):
                self._store(kind, docs)
            self.hung.set()
            await asyncio.Future()  # the process dies in it
        answer, hint, partly = self._answer(ids)
        w = Write(now, kind, ids, answer)
        self.writes.append(w)
        self.prev = w
        if answer == "rate_limited":
            self.paused_until = max(self.paused_until, now + hint)
            raise SinkRateLimited(retry_after=hint)
        if answer == "unavailable":
            raise SinkUnavailable("connection reset")
        if answer == "partly":
            self._store(kind, [d for d in docs if d["_id"] in partly])
            raise SinkUnavailable("some writes of the batch failed")
        if answer == "rejected":
            raise SinkRejected("document refused")
        self._store(kind, docs)
        if answer == "landed":
            raise SinkUnavailable("timed out (but the write landed)")

    async def write_part(self, part: dict[str, Any]) -> None:
        await self._write("part", [part])

    async def write_security_events(self, events: list[dict[str, Any]]) -> None:
        await self._write("security", events)


def over_budget(times: list[float]) -> list[tuple[int, float]]:
    """Windows of writes holding more than the token bucket allows."""
    out = []
    for i in range(len(times)):
        for j in range(i, len(times)):
            n, span = j - i + 1, times[j] - times[i]
            if n > BURST + RATE * span + 1e-6:
                out.append((n, round(span, 3)))
    return out


def failures_left(sink: PerDocSink) -> int:
    """The failures the documents (seen or not yet) still have to give."""
    return sum(b[-1] for b in [*sink.behaviour.values(), *map(list, sink.plan)]
               if b[0] in ("transient", "landed", "rate"))


# -- the script ---------------------------------------------------------------

START = st.tuples(st.just("start"))
APPEND = st.tuples(st.just("append"), st.lists(st.integers(0, 7), min_size=1, max_size=6))
SEAL = st.tuples(st.just("seal"), st.integers(0, 7))
SECURITY = st.tuples(st.just("security"), st.integers(1, 12))
FLUSH = st.tuples(st.just("flush"), st.integers(1, 60))
ADVANCE = st.tuples(st.just("advance"), st.sampled_from([0.3, 2.0, 20.0, 400.0]))
OUTAGE = st.tuples(st.just("outage"), st.booleans())
RESTART = st.one_of(
    st.tuples(st.just("crash")),
    st.tuples(st.just("close")),
    st.tuples(st.just("crash_in_write"), st.booleans()),
)
OTHER = st.one_of(
    START, APPEND, SEAL, SECURITY, ADVANCE, OUTAGE,
    st.tuples(st.just("flush_now")), st.tuples(st.just("retry_dead")),
)
ROUND = st.tuples(
    st.lists(OTHER, max_size=3),
    APPEND.map(lambda op: [op]),
    st.lists(SEAL, max_size=1),
    st.lists(SECURITY, max_size=1),
    FLUSH.map(lambda op: [op]),
    st.lists(RESTART, max_size=1),
).map(lambda r: [op for ops in r for op in ops])
SCRIPTS = st.tuples(
    st.lists(START, min_size=1, max_size=3),
    st.lists(SECURITY, max_size=1),
    st.lists(ROUND, min_size=1, max_size=6),
).map(lambda t: [*t[0], *t[1], *(op for r in t[2] for op in r)])


async def scenario(data_dir: str, part_max_events: int, plan: list[tuple[Any, ...]],
                   ops: list[tuple[Any, ...]], security_batch: int = 100) -> None:
    clock = Clock()
    flusher_mod.SECURITY_BATCH = security_batch
    # The flusher's wall clock (a saved pause, the saved bucket) is the fake one.
    flusher_mod.time = types.SimpleNamespace(time=clock.wall, monotonic=clock.mono)
    config = parse_config({
        "server": {"data_dir": data_dir},
        "audit": {"part_max_events": part_max_events, "synchronous": "normal"},
        "flush": {"max_writes_per_second": RATE, "burst": BURST,
                  "backoff_base_seconds": BACKOFF_BASE, "backoff_max_seconds": BACKOFF_MAX},
    })
    sink = PerDocSink(clock, plan)
    engines = Engines(AUDIT_KEY)
    src = Source(user="u", role="user", ip="127.0.0.1")
    m = Model()

    async def open_engine() -> Any:
        engine = await engines.open(config, sink, clock=clock.wall, monotonic=clock.mono)
        sink.engine, sink.prev = engine, None
        return engine

    async def step(engine: Any) -> float | None:
        delay: float | None = await engine.flusher.step()
        if delay:
            clock.advance(delay)
        return delay

    try:
        engine = await open_engine()
        for op in ops:
            kind = op[0]
            if kind == "start":
                s = await engine.start_session("u", "user", src, 10**7)
                m.open.append(s.session_id)
                m.acked[s.session_id] = []
            elif kind == "append" and m.open:
                for i in op[1]:
                    sid = m.open[i % len(m.open)]
                    ev = json.loads(await engine.record(sid, Draft("document.list")))
                    m.acked[sid].append((ev["seq"], ev["event_id"]))
            elif kind == "seal" and m.open:
                await engine.end_session(m.open.pop(op[1] % len(m.open)), src)
            elif kind == "security":
                for _ in range(op[1]):
                    d = Draft("auth.login_failed", outcome="denied")
                    await engine.record_security(d)
                    m.security.append(d.event_id)
            elif kind == "flush":
                for _ in range(op[1]):
                    if await step(engine) is None:
                        break
            elif kind == "advance":
                clock.advance(op[1])
            elif kind == "outage":
                sink.outage = op[1]
            elif kind == "flush_now":
                engine.flusher.flush_now()
            elif kind == "retry_dead":
                await engine.retry_dead_letters()
            elif kind == "crash":
                await engines.abandon(engine)
                engine = await open_engine()
            elif kind == "close":
                await engines.close(engine)
                engine = await open_engine()
            elif kind == "crash_in_write":
                sink.hang, sink.hung = op[1], asyncio.Event()
                task = asyncio.ensure_future(engine.flusher.step())
                hung = asyncio.ensure_future(sink.hung.wait())
                await asyncio.wait({task, hung}, return_when=asyncio.FIRST_COMPLETED)
                hung.cancel()
                sink.hang = None
                if task.done():  # no write in this step (a pause, nothing pending)
                    if delay := task.result():
                        clock.advance(delay)
                else:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await engines.abandon(engine)
                engine = await open_engine()

        for w in sink.writes:
            event(f"{w.kind} {w.answer}")
        if any(isinstance(k, int) for k in engine.flusher._deferred):
            event("a security event put aside at the heal")
        if engine.flusher._halving:
            event("halving at the heal")
        # The sink works again, but for its poison documents: all the rest goes.
        for sid in m.open:
            await engine.end_session(sid, src)
        m.open.clear()
        sink.outage = False

        def not_poison(c: Any) -> list[str]:
            ids = [*(f"{sid}:{part}" for sid, part in c.execute(
                "SELECT session_id, part FROM parts WHERE state = 'pending'")),
                *(json.loads(t)["event_id"] for (t,) in c.execute(
                    "SELECT json FROM security_events WHERE state = 'pending'"))]
            return [i for i in ids if sink.behaviour.get(i, OK)[0] != "poison"]

        pending = len(await engine.spool.read(not_poison))
        failures = failures_left(sink)
        poison = sum(b[0] == "poison" for b in [*sink.behaviour.values(), *sink.plan])
        # Each document: its write, and the waits for a token, a backoff or a
        # hint; each failure left: the same, and a pause of its own if put
        # aside again (DEFER_MAX_SECONDS at most); each poison document: its
        # search (a few halvings), and its retries meanwhile.
        max_steps = 100 + 10 * (pending + failures) + 30 * poison
        max_time = (flusher_mod.DEFER_MAX_SECONDS * (1 + failures)
                    + (pending + failures + poison + 1) * (1 / RATE + BACKOFF_MAX + max(HINTS)))
        t0, steps = clock.mono(), 0
        while await engine.spool.read(not_poison):
            await step(engine)
            steps += 1
            assert steps <= max_steps, f"{pending} documents not stored in {steps} steps"
        spent = clock.mono() - t0
        assert spent <= max_time, f"{pending} stored in {spent:.0f} s of fake time"

        # The heal: the sink takes the poison documents too (but for what each
        # document still has to fail), no new work arrives.
        sink.healed = True
        counts = await engine.spool.read(lambda c: queries.counts(c, 0))
        pending = counts["pending_parts"] + counts["pending_security_events"]
        failures = failures_left(sink)
        max_steps = 50 + 10 * (pending + failures)
        # (With only what was put aside pending, the first of it goes
        # BACKOFF_MAX after the last write at most: no DEFER_MAX_SECONDS.)
        max_time = (pending + failures + 1) * (1 / RATE + 2 * BACKOFF_MAX + max(HINTS))
        t0, steps = clock.mono(), 0
        while await step(engine) is not None:
            steps += 1
            assert steps <= max_steps, f"not drained in {max_steps} steps ({pending} pending)"
        spent = clock.mono() - t0
        assert spent <= max_time, f"drained in {spent:.0f} s of fake time, > {max_time:.0f}"
        counts = await engine.spool.read(lambda c: queries.counts(c, 0))
        assert counts["pending_parts"] == 0, "idle with parts pending"
        assert counts["pending_security_events"] == 0, "idle with security events pending"

        # Only a rejection dead-letters.
        dead = await engine.spool.read(lambda c: [
            *(f"{sid}:{part}" for sid, part in c.execute(
                "SELECT session_id, part FROM parts WHERE state = 'dead'")),
            *(json.loads(t)["event_id"] for (t,) in c.execute(
                "SELECT json FROM security_events WHERE state = 'dead'"))])
        for doc_id in dead:
            assert sink.behaviour.get(doc_id, OK)[0] == "reject", f"{doc_id} dead-lettered"

        # Nothing lost: once the sink takes the refused ones too, all is stored, once.
        sink.accept_all = True
        await engine.retry_dead_letters()
        await engines.drain(engine, clock.mono, steps=max_steps)
        assert sink.errors == []
        assert over_budget([w.at for w in sink.writes]) == []
        check(sink, m, part_max_events)  # type: ignore[arg-type]
    finally:
        await engines.aclose()


@settings(
    max_examples=100,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    part_max_events=st.integers(1, 4),
    plan=st.lists(BEHAVIOUR, max_size=40),
    ops=SCRIPTS,
    security_batch=st.sampled_from([2, 5, flusher_mod.SECURITY_BATCH]),
)
# A poison security event among a batch (searched in halves, put aside) while a
# part waits; then the heal.
@example(
    part_max_events=2,
    plan=[OK, OK, ("poison",), OK, OK, OK],
    ops=[("start",), ("security", 6), ("append", [0, 0]), ("seal", 0), ("flush", 40)],
    security_batch=5,
)
# The whole sink down while two parts fail (put aside, an outage): due again
# once a write goes through.
@example(
    part_max_events=1,
    plan=[],
    ops=[("start",), ("start",), ("outage", True), ("seal", 0), ("seal", 0), ("flush", 40),
         ("outage", False), ("start",), ("seal", 0), ("flush", 10)],
    security_batch=flusher_mod.SECURITY_BATCH,
)
# A rate limit, then a crash in a write that landed: the pause and the bucket
# outlive the process.
@example(
    part_max_events=1,
    plan=[("rate", 30.0, 1), ("landed", 1)],
    ops=[("start",), ("start",), ("seal", 0), ("seal", 0), ("flush", 1),
         ("crash_in_write", True), ("flush", 5), ("crash",), ("flush", 5)],
    security_batch=flusher_mod.SECURITY_BATCH,
)
# A refused batch (sent one by one) gives a waiting part its turn.
@example(
    part_max_events=3,
    plan=[OK, ("reject",), OK],
    ops=[("start",), ("seal", 0), ("security", 3), ("flush", 12)],
    security_batch=flusher_mod.SECURITY_BATCH,
)
def test_flusher_is_safe_live_and_puts_security_first(part_max_events, plan, ops, security_batch):
    """``security_batch``: the most security events in one write (as shipped,
    or a few: then the backlog takes several batches)."""
    saved = flusher_mod.time, flusher_mod.SECURITY_BATCH
    try:
        with tempfile.TemporaryDirectory() as d:
            asyncio.run(scenario(d, part_max_events, plan, ops, security_batch))
    finally:
        flusher_mod.time, flusher_mod.SECURITY_BATCH = saved

"""Token bucket and backoff arithmetic with an injected clock; the global pause."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import FakeClock
from receiver import Fault, Receiver, engine_behind
from waiting import wait_for

from audit.config import sink_identity
from audit.events import Draft, Source
from audit.ratelimit import MAX_HINT, Backoff, TokenBucket, backoff_delay
from sinks.base import Sink, SinkRateLimited, SinkUnavailable


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- token bucket ------------------------------------------------------------


def test_bucket_starts_full_and_allows_a_burst():
    clock = Clock()
    bucket = TokenBucket(rate=5.0, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    assert bucket.delay() == pytest.approx(0.2)


def test_bucket_refills_at_rate_and_caps_at_burst():
    clock = Clock()
    bucket = TokenBucket(rate=4.0, burst=2, clock=clock)
    assert bucket.try_take() and bucket.try_take()
    clock.t += 0.125  # half a token
    assert not bucket.try_take()
    assert bucket.delay() == pytest.approx(0.125)
    clock.t += 0.125
    assert bucket.delay() == 0.0 and bucket.try_take()
    clock.t += 1000.0  # a long idle time saves up only `burst` tokens
    assert [bucket.try_take() for _ in range(3)] == [True, True, False]


def test_bucket_float_rounding_does_not_ask_for_sub_resolution_waits():
    clock = Clock(1000.0)
    bucket = TokenBucket(rate=50.0, burst=1, clock=clock)
    for _ in range(100):
        assert bucket.try_take()
        clock.t += bucket.delay() or 0.02  # 1000.02 - 1000.0 is not exactly 0.02
        assert bucket.delay() == 0.0


def test_bucket_clock_going_backwards_adds_nothing():
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    assert bucket.try_take()
    clock.t -= 10
    assert not bucket.try_take()


@pytest.mark.parametrize("level", [0.0, 0.5, 1.0 - 1e-6, 1.0 - 1e-9, 1.0 - 1e-12, 1.0, 1.5])
def test_bucket_delay_is_zero_exactly_when_a_token_can_be_taken(level):
    """The flusher waits ``delay()`` and then takes a token: the two must
    agree, also at the rounding tolerance (a level within 1e-9 of a token is
    a token), or it either spins on a zero wait or waits for nothing."""
    bucket = TokenBucket(rate=2.0, burst=2, clock=Clock())
    bucket.resume(level, 0.0, in_flight=False)
    wait = bucket.delay()
    assert (wait == 0.0) is bucket.try_take() is (level >= 1.0 - 1e-9)
    if wait:
        assert wait == pytest.approx((1.0 - level) / 2.0)


@pytest.mark.parametrize(
    ("tokens", "elapsed", "in_flight", "level"),
    [
        (0.0, 0.0, True, 0.0),  # killed right after its last write: empty, not below
        (0.0, 0.0, False, 0.0),
        (2.0, 0.25, False, 3.0),  # refilled by the time it was down, rate 4
        (2.0, 0.25, True, 2.0),  # ... less a write it may have sent unsaved
        (2.0, 10.0, True, 3.0),  # down long enough: full but for that write
        (2.0, 10.0, False, 4.0),  # a clean exit: full
        (2.5, -100.0, True, 1.5),  # the wall clock stepped back: no refill
        (-3.0, 0.0, False, 0.0),
    ],
)
def test_bucket_resumes_from_another_process_s_level(tokens, elapsed, in_flight, level):
    bucket = TokenBucket(rate=4.0, burst=4, clock=Clock())
    bucket.resume(tokens, elapsed, in_flight=in_flight)
    assert bucket.level() == pytest.approx(level)


def test_a_resumed_bucket_refills_from_where_it_went_on_and_never_waits_past_a_token():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=5, clock=clock)
    bucket.resume(0.0, 0.0)
    assert bucket.delay() == pytest.approx(0.5)  # 1 / rate, not burst / rate
    clock.t += 0.5
    assert bucket.try_take() and not bucket.try_take()
    clock.t += 100.0
    assert [bucket.try_take() for _ in range(6)] == [True] * 5 + [False]


def test_a_resume_never_adds_tokens():
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=3, clock=clock)
    assert bucket.try_take() and bucket.try_take()
    bucket.resume(3.0, 1000.0, in_flight=False)
    assert bucket.level() == pytest.approx(1.0)


def test_a_resumed_level_is_the_budget_from_now_on():
    """What :meth:`resume` sets is the level now: the time the bucket stood
    before it (drained) must not refill it on top, or a restarted server
    writes more than ``level + rate * t`` in its first ``t`` seconds. The
    level saved for the next run is refilled up to the moment it is read.
    And by default a write may have been in flight (the safe side)."""
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=4, clock=clock)
    assert all(bucket.try_take() for _ in range(4))
    clock.t += 10.0  # long enough to refill the whole burst
    bucket.resume(1.0, 0.0, in_flight=False)
    assert [bucket.try_take() for _ in range(2)] == [True, False]
    clock.t += 0.75  # 1.5 tokens
    assert bucket.level() == pytest.approx(1.5)
    default = TokenBucket(rate=2.0, burst=4, clock=clock)
    default.resume(3.0, 0.0)
    assert default.level() == pytest.approx(2.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_bucket_rejects_bad_parameters(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


# -- backoff -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (0, 0.5, 0.0),  # no failure, no wait
        (1, 1.0, 0.5),  # ceiling = base
        (2, 1.0, 1.0),
        (3, 1.0, 2.0),
        (4, 0.5, 2.0),  # full jitter: uniform below the ceiling of 4
        (4, 0.0, 0.5),  # ... but never below base
        (8, 1.0, 60.0),  # 0.5 * 2**7 = 64 -> capped
        (10_000, 1.0, 60.0),  # no overflow for huge attempt counts
        (10_000, 0.25, 15.0),
    ],
)
def test_backoff_delay_table(attempt, rand, expected):
    assert backoff_delay(attempt, 0.5, 60.0, lambda: rand) == pytest.approx(expected)


def test_backoff_doubles_resets_and_honours_a_larger_hint():
    clock = Clock()
    b = Backoff(1.0, 30.0, clock, rand=lambda: 1.0)
    assert [b.failed() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert b.remaining() == 30.0
    clock.t += 30.0
    assert b.remaining() == 0.0
    b.succeeded()
    assert b.failed() == 1.0
    assert b.failed(hint=7.0) == 7.0  # hint larger than backoff (2.0)
    assert b.remaining() == pytest.approx(7.0)
    assert b.failed(hint=0.1) == 4.0  # backoff larger than hint


def test_a_new_backoff_does_not_pause_whatever_the_clock():
    b = Backoff(0.5, 60.0, Clock(0.0), rand=lambda: 1.0)
    assert b.remaining() == 0.0 and b.attempt == 0


def test_backoff_deadline_never_moves_earlier():
    clock = Clock()
    b = Backoff(0.5, 60.0, clock, rand=lambda: 0.0)
    b.failed(hint=20.0)
    b.failed()  # 0.5 s would end sooner; the pause stays
    assert b.remaining() == pytest.approx(20.0)


# -- the global pause ----------------------------------------------------------


class CountingSink(Sink):
    """A peer that answers from a script and counts every write attempt."""

    type = "counting"

    def __init__(self) -> None:
        self.script: deque[BaseException | None] = deque()
        self.calls: list[str] = []

    def _answer(self, what: str) -> None:
        self.calls.append(what)
        exc = self.script.popleft() if self.script else None
        if exc is not None:
            raise exc

    async def write_part(self, part: dict[str, Any]) -> None:
        self._answer("part")

    async def write_security_events(self, events: list[dict[str, Any]]) -> None:
        self._answer("security")


@pytest.fixture
async def paused_setup(make_config, engines, fake_monotonic):
    config = make_config(
        flush={"max_writes_per_second": 100.0, "burst": 10, "backoff_base_seconds": 0.5}
    )
    sink = CountingSink()
    engine = await engines.open(config, sink, monotonic=fake_monotonic)
    engine.flusher.backoff.rand = lambda: 1.0
    src = Source(user="alice", role="user")
    s = await engine.start_session("alice", "user", src, 3600)
    await engine.end_session(s.session_id, src)  # one pending part
    return engine, sink


async def test_rate_limit_pauses_security_events_and_parts_until_the_hint(
    paused_setup, fake_monotonic
):
    engine, sink = paused_setup
    await engine.record_security(Draft("auth.login_failed", outcome="denied"))
    sink.script.append(SinkRateLimited(retry_after=7))
    assert await engine.flusher.step() == pytest.approx(7.0)  # hint 7 > backoff 0.5
    assert sink.calls == ["security"]
    assert engine.stats.rate_limited == 1
    assert engine.sink_status()["backoff_until"] is not None
    for waited in (2.0, 4.0, 6.0):  # nothing goes out during the pause, neither kind
        fake_monotonic.advance(2.0)
        assert await engine.flusher.step() == pytest.approx(7.0 - waited)
    assert sink.calls == ["security"]
    fake_monotonic.advance(1.0)
    assert await engine.flusher.step() == 0.0  # the security event, first
    assert await engine.flusher.step() == 0.0  # then the part
    assert sink.calls == ["security", "security", "part"]
    assert await engine.flusher.step() is None


async def test_a_restart_goes_on_with_the_pause_a_rate_limit_answer_asked_for(
    make_config, engines, fake_monotonic
):
    """A sink billed per request answered 429 with Retry-After: 60, and the
    server crashed (or was restarted) a moment later. The new process wrote
    to it again at once, and a crash loop would have written at every start:
    the pause is kept in the spool, and a new process waits out what is left
    of it, for security events and parts alike, as long as the same sink
    asked."""
    config = make_config(
        flush={"max_writes_per_second": 100.0, "burst": 10, "backoff_base_seconds": 0.5}
    )
    sink = CountingSink()
    first = await engines.open(config, sink, monotonic=fake_monotonic)
    src = Source(user="alice", role="user")
    s = await first.start_session("alice", "user", src, 3600)
    await first.end_session(s.session_id, src)
    sink.script.append(SinkRateLimited(retry_after=60))
    assert await first.flusher.step() == pytest.approx(60.0)
    await engines.abandon(first)  # kill -9

    again = FakeClock(start=50.0)  # a new process: its own monotonic clock
    sink = CountingSink()
    second = await engines.open(config, sink, monotonic=again)
    await second.record_security(Draft("auth.login_failed", outcome="denied"))
    assert await second.flusher.step() == pytest.approx(60.0, abs=5.0)
    assert sink.calls == []
    assert second.sink_status()["backoff_until"] is not None
    # POST /audit/flush ends a failure's backoff, not this pause (found by
    # mutation testing: the pause kept from before the start was ended).
    second.flusher.flush_now()
    assert await second.flusher.step() == pytest.approx(60.0, abs=5.0)
    assert sink.calls == []
    again.advance(60.0)
    assert await second.flusher.step() == 0.0
    assert await second.flusher.step() == 0.0
    assert sink.calls == ["security", "part"]
    await engines.close(second)

    # The pause has ended: a third start waits for nothing.
    sink = CountingSink()
    third = await engines.open(config, sink, monotonic=FakeClock(start=10.0))
    await third.record_security(Draft("auth.login_failed", outcome="denied"))
    assert await third.flusher.step() == 0.0
    assert sink.calls == ["security"]


async def test_a_saved_pause_binds_only_the_sink_that_asked_and_is_bounded(
    make_config, engines, fake_monotonic
):
    """Another sink configured since is not paused for the old one's answer,
    and a pause ending far off (the wall clock stepped back since) waits no
    longer than a hint may ask for."""
    config = make_config(flush={"backoff_base_seconds": 0.5, "backoff_max_seconds": 30.0})
    sink = CountingSink()
    first = await engines.open(config, sink, monotonic=fake_monotonic)
    await first.record_security(Draft("auth.login_failed", outcome="denied"))
    sink.script.append(SinkRateLimited(retry_after=120))
    assert await first.flusher.step() == pytest.approx(120.0)
    await engines.close(first)

    other = make_config(flush={"backoff_base_seconds": 0.5},
                        sink={"type": "jsonl"})
    sink = CountingSink()
    moved = await engines.open(other, sink, monotonic=FakeClock(start=10.0))
    assert await moved.flusher.step() == 0.0
    assert sink.calls == ["security"]
    await engines.close(moved)

    far = json.dumps({"until": time.time() + 10**7, "sink": sink_identity(config)})
    back = await engines.open(config, CountingSink(), monotonic=FakeClock(start=10.0))
    await back.spool.submit(lambda w: w.conn.execute(
        "UPDATE meta SET value = ? WHERE key = 'sink_pause'", (far,)))
    await back.record_security(Draft("auth.login_failed", outcome="denied"))
    await engines.close(back)
    sink = CountingSink()
    bounded = await engines.open(config, sink, monotonic=FakeClock(start=10.0))
    assert await bounded.flusher.step() == pytest.approx(MAX_HINT)
    assert sink.calls == []


class _WallTime:
    """The ``time`` module as the flusher sees it, its wall clock a fake one."""

    def __init__(self, wall: FakeClock) -> None:
        self.time = wall

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def frozen_wall(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The wall time the saved bucket is refilled by stands still: the time a
    restart takes (engines opened and closed, fsyncs on a shared machine; some
    50 ms idle, more under load) refilled it, and the waits asserted came
    out that much shorter."""
    import audit.flusher

    wall = FakeClock()
    monkeypatch.setattr(audit.flusher, "time", _WallTime(wall))
    return wall


async def _parts(engine: Any, n: int) -> None:
    src = Source(user="alice", role="user")
    for _ in range(n):
        s = await engine.start_session("alice", "user", src, 3600)
        await engine.end_session(s.session_id, src)


async def test_a_crash_loop_goes_on_with_the_token_bucket_not_a_full_one(
    make_config, engines, fake_monotonic, frozen_wall
):
    """A server killed and restarted at once, again and again (a crash loop
    under a supervisor), started with a full bucket each time: ``burst``
    writes at every start, past the sink's rate limit (burst 10, rate 5, a
    restart a second: 10 writes a second). The bucket's level is kept in the
    spool with each write's outcome, and a start goes on from it, less one
    token for a write that may have gone out unsaved: security events and
    parts alike wait."""
    config = make_config(flush={"max_writes_per_second": 1.0, "burst": 3})
    sink = CountingSink()
    first = await engines.open(config, sink, monotonic=fake_monotonic)
    await _parts(first, 6)
    assert [await first.flusher.step() for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]
    assert sink.calls == ["part"] * 3
    await engines.abandon(first)  # kill -9

    for _ in range(3):  # restarted at once, again and again
        sink = CountingSink()
        again = await engines.open(config, sink, monotonic=FakeClock(start=10.0))
        await again.record_security(Draft("auth.login_failed", outcome="denied"))
        assert await again.flusher.step() == pytest.approx(1.0)
        assert sink.calls == []
        await engines.abandon(again)

    clock = FakeClock(start=10.0)
    sink = CountingSink()
    last = await engines.open(config, sink, monotonic=clock)
    assert await last.flusher.step() == pytest.approx(1.0)
    clock.advance(1.0)
    assert await last.flusher.step() == 0.0
    assert await last.flusher.step() == pytest.approx(1.0)
    assert sink.calls == ["security"]


async def test_a_write_killed_before_its_outcome_was_saved_counts_as_sent(
    make_config, engines, fake_monotonic, frozen_wall
):
    """The process died between the sink's write and the spool's commit of
    its outcome: that write counts as sent (1 + 2 writes for a burst of 3,
    not 1 + 3)."""

    class Hanging(CountingSink):
        async def write_part(self, part: dict[str, Any]) -> None:
            self.calls.append("part")
            await asyncio.Event().wait()  # sent; the answer never comes

    config = make_config(flush={"max_writes_per_second": 1.0, "burst": 3})
    hanging = Hanging()
    first = await engines.open(config, hanging, monotonic=fake_monotonic)
    await _parts(first, 5)
    step = asyncio.ensure_future(first.flusher.step())
    await wait_for(lambda: hanging.calls == ["part"], message="the write sent")
    step.cancel()
    await asyncio.gather(step, return_exceptions=True)
    await engines.abandon(first)  # kill -9

    sink = CountingSink()
    second = await engines.open(config, sink, monotonic=FakeClock(start=10.0))
    assert [await second.flusher.step() for _ in range(3)] == [0.0, 0.0, 1.0]
    assert sink.calls == ["part", "part"]


async def test_failed_writes_count_against_the_bucket_across_a_restart(
    make_config, engines, fake_monotonic, frozen_wall
):
    """A write that failed (a 503, a timeout: billed all the same) is not
    followed by a commit of the bucket; the next write is preceded by one,
    so that a kill after it counts both."""
    config = make_config(flush={"max_writes_per_second": 1.0, "burst": 3,
                                "backoff_base_seconds": 0.5})
    sink = CountingSink()
    first = await engines.open(config, sink, monotonic=fake_monotonic)
    first.flusher.backoff.rand = lambda: 1.0
    await _parts(first, 3)
    sink.script.extend([None, SinkUnavailable("down"), SinkUnavailable("down")])
    assert await first.flusher.step() == 0.0
    assert await first.flusher.step() == 0.5
    fake_monotonic.advance(0.5)
    assert await first.flusher.step() == 1.0
    assert sink.calls == ["part"] * 3  # 3 - 3 + 0.5 tokens left
    await engines.abandon(first)  # kill -9

    sink = CountingSink()
    second = await engines.open(config, sink, monotonic=FakeClock(start=10.0))
    assert await second.flusher.step() == pytest.approx(0.5, abs=0.05)
    assert sink.calls == []


def _age_saved_bucket(spool: Path, seconds: float) -> None:
    with contextlib.closing(sqlite3.connect(spool)) as c:
        saved = json.loads(c.execute(
            "SELECT value FROM meta WHERE key = 'sink_bucket'").fetchone()[0])
        saved["at"] -= seconds
        c.execute("UPDATE meta SET value = ? WHERE key = 'sink_bucket'", (json.dumps(saved),))
        c.commit()


async def test_a_stopped_server_s_bucket_refills_while_it_is_down(
    make_config, engines, fake_monotonic, frozen_wall
):
    """A clean stop leaves the bucket as it is (no write under way: none
    counts as sent unsaved); a server down long enough for it to refill
    sends its first writes at once, a whole burst after a clean stop, all
    but one after a crash. Another sink does not spend this one's."""
    config = make_config(flush={"max_writes_per_second": 1.0, "burst": 3})
    sink = CountingSink()
    first = await engines.open(config, sink, monotonic=fake_monotonic)
    await _parts(first, 20)
    assert [await first.flusher.step() for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]
    await engines.close(first)

    sink = CountingSink()
    second = await engines.open(config, sink, monotonic=FakeClock(start=10.0))
    assert await second.flusher.step() == pytest.approx(1.0, abs=0.05)
    assert sink.calls == []
    await engines.close(second)

    _age_saved_bucket(config.spool_path, 3600.0)  # down an hour
    sink = CountingSink()
    third = await engines.open(config, sink, monotonic=FakeClock(start=10.0))
    assert [await third.flusher.step() for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]
    await engines.abandon(third)  # kill -9

    _age_saved_bucket(config.spool_path, 3600.0)
    sink = CountingSink()
    fourth = await engines.open(config, sink, monotonic=FakeClock(start=10.0))
    assert [await fourth.flusher.step() for _ in range(3)] == [0.0, 0.0, 1.0]
    await engines.close(fourth)

    other = make_config(flush={"max_writes_per_second": 1.0, "burst": 3},
                        sink={"type": "jsonl"})
    sink = CountingSink()
    moved = await engines.open(other, sink, monotonic=FakeClock(start=10.0))
    assert [await moved.flusher.step() for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]


async def test_a_process_that_wrote_nothing_leaves_the_saved_bucket_as_it_was(
    make_config, engines, fake_monotonic, frozen_wall
):
    """A ``drain`` beside a running server (or any process that sent
    nothing) saved its own level at its clean exit, marked clean: read when
    it started, it missed the writes the server made since, and the mark
    hid the server's write under way. The server killed after that, the
    next start went on from a bucket with tokens already spent: 3 + 1
    writes at once for a burst of 3. A process that wrote nothing leaves
    the row as it found it."""

    class Gated(CountingSink):
        def __init__(self) -> None:
            super().__init__()
            self.gates: deque[asyncio.Event] = deque()

        async def write_part(self, part: dict[str, Any]) -> None:
            self.calls.append("part")
            if self.gates:
                await self.gates.popleft().wait()

    config = make_config(flush={"max_writes_per_second": 1.0, "burst": 3})
    server_sink = Gated()
    server = await engines.open(config, server_sink, monotonic=fake_monotonic)
    await _parts(server, 5)
    assert await server.flusher.step() == 0.0  # 1 written, saved: 2 left
    held, hung = asyncio.Event(), asyncio.Event()
    server_sink.gates.extend([held, hung])
    second = asyncio.ensure_future(server.flusher.step())
    await wait_for(lambda: len(server_sink.calls) == 2, message="the second write sent")

    drain = await engines.open(config, CountingSink(), monotonic=FakeClock(start=10.0))
    assert await drain.flusher.step() > 0  # went on from 2 saved; the server flushes
    held.set()
    assert await second == 0.0  # saved: 1 left
    third = asyncio.ensure_future(server.flusher.step())
    await wait_for(lambda: len(server_sink.calls) == 3, message="the third write sent")
    await engines.close(drain)  # a clean exit, nothing written
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    await engines.abandon(server)  # kill -9, the third write's outcome unsaved

    sink = CountingSink()
    restarted = await engines.open(config, sink, monotonic=FakeClock(start=10.0))
    assert await restarted.flusher.step() == pytest.approx(1.0)
    assert sink.calls == []


@pytest.mark.parametrize(("key", "saved"), [
    ("sink_bucket", '{"tokens": 1%s, "at": 0, "sink": "counting"}' % ("0" * 400)),
    ("sink_bucket", '{"tokens": 1, "at": -1%s, "sink": "counting"}' % ("0" * 400)),
    ("sink_pause", '{"until": 1%s, "sink": "counting"}' % ("0" * 400)),
])
async def test_a_damaged_saved_bucket_or_pause_is_ignored_not_a_crash(
    make_config, engines, fake_monotonic, key, saved
):
    """The spool's meta row of the bucket (or of a pause) holding a number
    too large for a float (a damaged or hand-edited spool): float() raised
    OverflowError, which no handler expected, and every step failed with it:
    the flusher task crashed at each start, and ``drain`` with a traceback.
    Such a row is ignored, as one that is not JSON is."""
    config = make_config(flush={"max_writes_per_second": 1.0, "burst": 3})
    sink = CountingSink()
    engine = await engines.open(config, sink, monotonic=fake_monotonic)
    await engine.spool.submit(lambda w: w.conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, saved)))
    await engine.record_security(Draft("auth.login_failed", outcome="denied"))
    assert await engine.flusher.step() == 0.0
    assert sink.calls == ["security"]


async def test_pause_is_the_backoff_when_it_is_later_than_the_hint(
    paused_setup, fake_monotonic
):
    engine, sink = paused_setup
    sink.script.extend([SinkUnavailable("down"), SinkUnavailable("down")])
    assert await engine.flusher.step() == 0.5  # attempt 1: ceiling 0.5
    fake_monotonic.advance(0.5)
    assert await engine.flusher.step() == 1.0  # attempt 2: ceiling 1.0
    fake_monotonic.advance(1.0)
    sink.script.append(SinkRateLimited(retry_after=0.25))
    assert await engine.flusher.step() == 2.0  # attempt 3: backoff 2.0 > hint 0.25
    # A security event recorded during a part's rate-limit pause waits too.
    await engine.record_security(Draft("auth.invalid_token", outcome="denied"))
    fake_monotonic.advance(1.9)
    assert await engine.flusher.step() == pytest.approx(0.1)
    assert sink.calls == ["part", "part", "part"]
    fake_monotonic.advance(0.1)
    assert await engine.flusher.step() == 0.0
    assert await engine.flusher.step() == 0.0
    assert await engine.flusher.step() is None
    assert sink.calls == ["part", "part", "part", "security", "part"]
    assert engine.flusher.backoff.attempt == 0
    assert engine.stats.rate_limited == 1 and engine.stats.writes_failed == 2


async def _one_part_and_a_trickle(engine: Any, monotonic: FakeClock) -> str:
    """One session's part pending, then a security event of another session
    recorded before each step, one a token (5 a second): always one pending.
    Returns the part's session id."""
    src = Source(user="alice", role="user")
    s = await engine.start_session("alice", "user", src, 3600)
    await engine.end_session(s.session_id, src)  # one pending part
    mallory = await engine.start_session("mallory", "user", src, 3600)
    for _ in range(3):
        await engine.record_security(
            Draft("auth.session_mismatch", outcome="denied"), mallory.session_id)
        assert await engine.flusher.step() == 0.0
        monotonic.advance(0.2)
    return s.session_id


async def test_a_trickle_of_security_events_does_not_starve_parts(
    make_config, engines, fake_monotonic
):
    """Review (a hostile logged-in user): security events went first whenever
    one was pending, one batch per token, so a caller whose denied requests
    (``access.denied``, ``auth.session_mismatch``: never summarised) came a
    little faster than ``max_writes_per_second`` kept every session part out
    of the sink for as long as it went on (measured against a live server:
    6 requests/s held another user's logged-out session back for the whole
    30 s run). A stored security batch now lets one waiting part go next."""
    config = make_config(flush={"max_writes_per_second": 5.0, "burst": 1})
    sink = CountingSink()
    engine = await engines.open(config, sink, monotonic=fake_monotonic)
    await _one_part_and_a_trickle(engine, fake_monotonic)
    assert sink.calls == ["security", "part", "security"]
    assert await engine.flusher.step() is None  # nothing left: the part is stored


class PartsOnlyReceiver(Receiver):
    """A receiver that takes parts and has no ``/security-events`` route: every
    security event is answered 404, refused for good."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/sessions", self._sessions)
        return app


async def test_a_trickle_of_refused_security_events_does_not_starve_parts(
    make_config, engines, fake_monotonic
):
    """A security event dead-lettered took a token as one stored does, but
    gave no part its turn: behind a receiver refusing security events, a
    caller whose denied requests came a little faster than
    ``max_writes_per_second`` kept every session part out of the sink for as
    long as it went on, each of its events written and dead-lettered in turn."""
    receiver = PartsOnlyReceiver()
    config = make_config(flush={"max_writes_per_second": 5.0, "burst": 1})
    async with engine_behind(receiver, engines, config, fake_monotonic) as engine:
        session_id = await _one_part_and_a_trickle(engine, fake_monotonic)
        assert [p["session_id"] for p in receiver.parts.values()] == [session_id]
        assert engine.stats.parts_written == 1 and engine.stats.dead_lettered >= 1


async def test_security_events_take_their_tokens_from_the_bucket(
    make_config, engines, fake_monotonic
):
    """Every sink write takes a token, a batch of security events as a part
    does (found by mutation testing: security batches could skip the bucket
    with the suite passing, and a stream of them would then write to a
    rate-limited sink as fast as they came)."""
    receiver = Receiver()
    config = make_config(flush={"max_writes_per_second": 0.5, "burst": 1})
    async with engine_behind(receiver, engines, config, fake_monotonic) as engine:
        src = Source(user="mallory", role="user")
        s = await engine.start_session("mallory", "user", src, 3600)
        for n in (1, 2):
            await engine.record_security(
                Draft("auth.session_mismatch", outcome="denied", source=src), s.session_id)
            if n == 2:  # the burst's one token went to the first batch
                assert await engine.flusher.step() == pytest.approx(2.0)
                assert len(receiver.security_events) == 1
                fake_monotonic.advance(2.0)
            assert await engine.flusher.step() == 0.0
            assert len(receiver.security_events) == n


async def test_a_rate_limit_hint_of_a_day_pauses_at_most_max_hint(
    make_config, engines, fake_monotonic
):
    """A receiver asking for a day's pause (Retry-After: 86400) is honoured up
    to MAX_HINT (or the backoff cap if larger), not for a day: the flusher
    never gives up, and a bad hint must not hold the trail back that long
    (found by mutation testing: the bound could go, the suite passing)."""
    receiver = Receiver()
    config = make_config(flush={"backoff_max_seconds": 60.0})
    async with engine_behind(receiver, engines, config, fake_monotonic) as engine:
        src = Source(user="alice", role="user")
        s = await engine.start_session("alice", "user", src, 3600)
        await engine.end_session(s.session_id, src)
        receiver.script(Fault(429, {"Retry-After": "86400"}))
        assert await engine.flusher.step() == MAX_HINT
        assert receiver.parts == {}
        fake_monotonic.advance(MAX_HINT)
        assert await engine.flusher.step() == 0.0
        assert list(receiver.parts) == [f"{s.session_id}:0"]


async def test_a_sink_that_cannot_open_is_not_tried_again_within_its_backoff(
    make_config, engines, fake_monotonic, tmp_path
):
    """A wake-up during the backoff after a failed open (a commit wakes the
    flusher) does not open the sink again before the backoff has passed
    (found by mutation testing: the check could go, the suite passing; a busy
    server would then try a down sink on every commit)."""
    from sinks.sqlite import SqliteSink

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the sink's directory should be")
    config = make_config(flush={"backoff_base_seconds": 0.5})
    engine = await engines.open(config, SqliteSink(blocker / "audit.db"),
                                monotonic=fake_monotonic)
    engine.flusher.backoff.rand = lambda: 1.0
    assert await engine.flusher.step() == 0.5
    assert engine.stats.writes_failed == 1
    fake_monotonic.advance(0.25)
    assert await engine.flusher.step() == pytest.approx(0.25)  # woken early: waits on
    assert engine.stats.writes_failed == 1
    fake_monotonic.advance(0.25)
    assert await engine.flusher.step() == 1.0  # tried again: backoff doubles
    assert engine.stats.writes_failed == 2


# -- the flood guard on security events --------------------------------------


def test_flood_guard_admits_a_burst_per_ip_then_counts():
    from audit.ratelimit import FloodGuard

    clock = Clock()
    guard = FloodGuard(rate=1.0, burst=3, clock=clock)
    assert [guard.admit("10.0.0.1", "auth.invalid_token", 50.0 + i) for i in range(5)] == [
        True, True, True, False, False]
    assert guard.admit("10.0.0.2", "auth.invalid_token", 60.0)  # another IP: its own budget
    assert not guard.admit("10.0.0.1", "auth.login_failed", 61.0)
    clock.t += 1.0  # one token back
    assert guard.admit("10.0.0.1", "auth.invalid_token", 62.0)
    assert not guard.admit("10.0.0.1", "auth.invalid_token", 63.0)
    assert guard.suppressed == 4
    assert [(c.ip, c.action, c.count, c.first, c.last) for c in guard.take_summaries()] == [
        ("10.0.0.1", "auth.invalid_token", 3, 53.0, 63.0),
        ("10.0.0.1", "auth.login_failed", 1, 61.0, 61.0),
    ]
    assert guard.take_summaries() == []  # counted once


def test_flood_guard_budgets_an_ipv6_client_by_its_64():
    """One host is usually given a whole /64: with a budget per address it
    could take as many budgets as it likes, drain the shared one, and have
    every other client's security events counted instead of recorded. Its
    events are counted by the /64 too, naming the addresses they came from."""
    from audit.ratelimit import FloodGuard

    guard = FloodGuard(rate=1.0, burst=3, clock=Clock())
    admitted = [guard.admit(f"2001:db8:1:2::{i}", "auth.invalid_token", 10.0 + i)
                for i in range(1, 7)]
    assert admitted == [True, True, True, False, False, False]
    assert guard.admit("2001:db8:1:3::1", "auth.invalid_token", 20.0)  # another /64
    assert guard.admit("192.0.2.1", "auth.invalid_token", 21.0)
    assert [(c.ip, c.count, c.addresses, c.more_addresses)
            for c in guard.take_summaries()] == [
        ("2001:db8:1:2::4", 3, {f"2001:db8:1:2::{i}" for i in (4, 5, 6)}, False)]


def test_flood_guard_counts_one_64_spraying_addresses_as_one_client(monkeypatch):
    """Counted per address, a host spraying the addresses of its /64 made a
    count (and a summary event every 10 s) of each, filled the table, and
    every other client's counts went under "*", their address lost."""
    from audit.ratelimit import FloodGuard

    monkeypatch.setattr(FloodGuard, "MAX_KEYS", 100)
    guard = FloodGuard(rate=1.0, burst=1, clock=Clock())
    for i in range(1, 1001):
        guard.admit(f"2001:db8:7:7::{i:x}", "auth.invalid_token", float(i))
    guard.admit("192.0.2.9", "auth.invalid_token", 2000.0)
    guard.admit("192.0.2.9", "auth.invalid_token", 2001.0, "victim")
    summaries = guard.take_summaries()
    assert [(c.ip, c.count) for c in summaries] == [
        ("2001:db8:7:7::2", 999), ("192.0.2.9", 1)]
    spray, other = summaries
    assert len(spray.addresses) == FloodGuard.MAX_USERS and spray.more_addresses
    assert other.users == {"victim"} and other.addresses == {"192.0.2.9"}
    guard.restore(summaries)  # put back (a refused commit): merged by the same keys
    assert [(c.ip, c.count) for c in guard.take_summaries()] == [
        ("2001:db8:7:7::2", 999), ("192.0.2.9", 1)]


def test_flood_guard_keeps_a_bounded_set_of_usernames(monkeypatch):
    from audit.ratelimit import FloodGuard

    monkeypatch.setattr(FloodGuard, "MAX_USERS", 3)
    guard = FloodGuard(rate=1.0, burst=1, clock=Clock())
    assert guard.admit("ip", "auth.login_failed", 1.0, "first")
    for name in ["bob", "alice", "bob", None, "carol", "dave"]:
        assert not guard.admit("ip", "auth.login_failed", 2.0, name)
    (c,) = guard.take_summaries()
    assert c.count == 6 and c.users == {"bob", "alice", "carol"} and c.more_users


def test_flood_guard_shared_budget_and_bounded_memory(monkeypatch):
    from audit.ratelimit import FloodGuard

    monkeypatch.setattr(FloodGuard, "MAX_KEYS", 50)
    clock = Clock()
    guard = FloodGuard(rate=1.0, burst=2, clock=clock)  # all IPs together: 20
    admitted = sum(guard.admit(f"10.0.{i}.1", "auth.invalid_token", 1.0) for i in range(30))
    assert admitted == 20, "the shared budget is ten times one IP's"
    for i in range(200):  # many clients (/64s), each over the shared budget
        assert not guard.admit(f"2001:db8:{i:x}::1", "auth.invalid_token", 2.0)
    assert len(guard._buckets) <= 50
    summaries = guard.take_summaries()
    assert len(summaries) <= 51
    assert sum(c.count for c in summaries) == 10 + 200, "every refused event is counted"
    assert any(c.ip == FloodGuard.MANY for c in summaries)


def test_flood_guard_restore_puts_counts_back():
    from audit.ratelimit import FloodGuard

    guard = FloodGuard(rate=1.0, burst=1, clock=Clock())
    guard.admit("ip", "a", 1.0)
    guard.admit("ip", "a", 2.0, "u1")
    taken = guard.take_summaries()
    guard.admit("ip", "a", 3.0, "u2")
    guard.restore(taken)
    (c,) = guard.take_summaries()
    assert (c.count, c.first, c.last, c.users) == (2, 2.0, 3.0, {"u1", "u2"})



def test_flood_guard_restore_stays_bounded(monkeypatch):
    from audit.ratelimit import FloodGuard

    monkeypatch.setattr(FloodGuard, "MAX_KEYS", 10)
    guard = FloodGuard(rate=1.0, burst=1, clock=Clock())
    guard._all.tokens = 0.0
    guard._all.rate = 1e-9  # the shared budget is spent: everything is counted
    for round_ in range(5):
        for i in range(10):
            guard.admit(f"10.{round_}.0.{i}", "auth.invalid_token", float(round_))
        taken = guard.take_summaries()
        for i in range(10):
            guard.admit(f"10.{round_}.1.{i}", "auth.invalid_token", float(round_))
        guard.restore(taken)  # a failed commit, every round
    left = guard.take_summaries()
    assert len(left) <= 11
    assert sum(c.count for c in left) == 5 * 20


async def test_flush_now_ends_a_failure_s_backoff_not_a_rate_limit_s_pause(
    paused_setup, fake_monotonic
):
    """POST /audit/flush "wakes the flusher now": after failures, the next
    try waited out the backoff (up to backoff_max_seconds, 60 s by default)
    however the operator had mended the sink. It is tried at once now; a
    pause a rate-limit answer asked for still stands (it pauses all
    sending)."""
    engine, sink = paused_setup
    sink.script.extend([SinkUnavailable("down"), SinkUnavailable("down")])
    assert await engine.flusher.step() == 0.5
    fake_monotonic.advance(0.5)
    assert await engine.flusher.step() == 1.0
    assert await engine.flusher.step() == 1.0  # waiting out the backoff
    engine.flusher.flush_now()
    assert await engine.flusher.step() == 0.0  # tried at once, and stored
    assert sink.calls == ["part", "part", "part"]
    assert await engine.flusher.step() is None

    await engine.record_security(Draft("auth.login_failed", outcome="denied"))
    sink.script.append(SinkRateLimited(retry_after=7))
    assert await engine.flusher.step() == pytest.approx(7.0)
    engine.flusher.flush_now()
    assert await engine.flusher.step() == pytest.approx(7.0)  # the pause stands
    assert sink.calls[3:] == ["security"]
    fake_monotonic.advance(7.0)
    assert await engine.flusher.step() == 0.0
    assert sink.calls[3:] == ["security", "security"]


async def test_flush_now_tries_parts_put_aside(paused_setup, fake_monotonic):
    """A part that failed again and again is put aside (later parts go
    first); a flush tries it at once too."""
    from audit.flusher import DEFER_AFTER

    engine, sink = paused_setup
    sink.script.extend([SinkUnavailable("down")] * DEFER_AFTER)
    for _ in range(DEFER_AFTER):
        await engine.flusher.step()
        fake_monotonic.advance(engine.flusher.backoff.remaining())
    assert engine.flusher._deferred, "the part was put aside"
    assert await engine.flusher.step() > 0  # nothing else pending: it waits
    engine.flusher.flush_now()
    assert await engine.flusher.step() == 0.0
    assert sink.calls == ["part"] * (DEFER_AFTER + 1)
    assert await engine.flusher.step() is None


async def test_flush_now_keeps_how_often_a_part_was_put_aside(
    make_config, engines, fake_monotonic
):
    """Review: flush_now forgot how many times a part had been put aside
    (its escalating pause, up to DEFER_MAX_SECONDS). A part the sink still
    cannot take (too large to write within the timeout) was then tried
    DEFER_AFTER times in a row again, every later part waiting behind it,
    and its pause started over from the shortest. A flush tries it once:
    failing again, it is put aside again at once, for longer."""
    from audit.flusher import DEFER_AFTER

    config = make_config(
        flush={"max_writes_per_second": 100.0, "burst": 10, "backoff_base_seconds": 0.5}
    )
    src = Source(user="alice", role="user")

    class OnePartFails(CountingSink):
        bad = ""

        async def write_part(self, part: dict[str, Any]) -> None:
            self.calls.append(part["session_id"])
            if part["session_id"] == self.bad:
                raise SinkUnavailable("no answer within 10 s")

    sink = OnePartFails()
    engine = await engines.open(config, sink, monotonic=fake_monotonic)
    engine.flusher.backoff.rand = lambda: 1.0
    big = await engine.start_session("alice", "user", src, 3600)
    await engine.end_session(big.session_id, src)
    sink.bad = big.session_id
    for _ in range(DEFER_AFTER):
        await engine.flusher.step()
        fake_monotonic.advance(engine.flusher.backoff.remaining())
    (until, times), = engine.flusher._deferred.values()
    assert times == 1
    later = await engine.start_session("bob", "user", src, 3600)
    await engine.end_session(later.session_id, src)
    assert await engine.flusher.step() == 0.0  # the later part goes first
    assert sink.calls[-1] == later.session_id
    other = await engine.start_session("carol", "user", src, 3600)
    await engine.end_session(other.session_id, src)

    engine.flusher.flush_now()
    await engine.flusher.step()  # the part put aside, tried at once: fails again
    assert sink.calls[-1] == big.session_id
    fake_monotonic.advance(engine.flusher.backoff.remaining())
    assert await engine.flusher.step() == 0.0
    assert sink.calls[-1] == other.session_id  # not the failing part again
    (until, times), = engine.flusher._deferred.values()
    assert times == 2 and until - fake_monotonic() > 0.5 * 2 ** DEFER_AFTER


def test_flood_guard_forgets_the_buckets_of_clients_gone_quiet():
    """A client quiet for burst / rate seconds has its whole budget back: its
    bucket is one a new client would get. They were kept until MAX_KEYS
    (10,000) pushed them out: a spray of failed logins from many addresses,
    one each, left 10,000 buckets (some 3 MB) for the rest of the process,
    and a flooding client's spent bucket could be pushed out by them (its
    budget whole again). The table holds the clients of the last burst /
    rate seconds."""
    from audit.ratelimit import FloodGuard

    clock = Clock()
    guard = FloodGuard(rate=1.0, burst=5, clock=clock)
    guard._all = TokenBucket(1e6, 10**6, clock)  # the shared budget is not under test
    for i in range(1000):  # a spray: each address once
        guard.admit(f"10.1.{i // 250}.{i % 250}", "auth.login_failed", clock.t)
    clock.t += 0.5
    for _ in range(5):  # a client spends its budget
        assert guard.admit("192.0.2.7", "auth.invalid_token", clock.t)
    assert not guard.admit("192.0.2.7", "auth.invalid_token", clock.t)
    clock.t += 4.7  # the spray's buckets are whole again, the spender's not yet
    guard.admit("192.0.2.8", "auth.invalid_token", clock.t)
    assert set(guard._buckets) == {"192.0.2.7", "192.0.2.8"}
    assert guard._buckets["192.0.2.7"].delay() == 0.0  # 4.7 tokens back, of 5
    assert guard._buckets["192.0.2.7"].tokens < 5
    clock.t += 5.0
    assert guard.admit("192.0.2.9", "auth.invalid_token", clock.t)
    assert set(guard._buckets) == {"192.0.2.9"}


def test_flood_guard_shared_budget_refills_at_ten_times_the_rate_and_keeps_an_ips_token():
    """The shared budget refills at ten times one IP's rate, on the guard's
    clock; an event refused by it alone is counted without spending its
    IP's token (that client is not made to wait for others' flood)."""
    from audit.ratelimit import FloodGuard

    clock = Clock()
    guard = FloodGuard(rate=2.0, burst=3, clock=clock)  # shared: 20 a second, 30 saved
    k = "192.0.2.1"
    assert guard.admit(k, "auth.invalid_token", 1.0)  # k: 2 tokens left
    admitted = sum(guard.admit(f"10.0.{i}.1", "auth.invalid_token", 1.0)
                   for i in range(10) for _ in range(3))
    assert admitted == 29, "the shared budget is spent"
    assert not guard.admit(k, "auth.invalid_token", 1.0)
    assert not guard.admit(k, "auth.invalid_token", 1.0)
    clock.t += 0.25  # shared: 5 tokens back; k: 2 kept + 0.5
    assert [guard.admit(k, "auth.invalid_token", 2.0) for _ in range(3)] == [True, True, False]
    clock.t += 0.5  # shared: 3 left + 10
    fresh = sum(guard.admit(f"10.1.{i}.1", "auth.invalid_token", 3.0)
                for i in range(10) for _ in range(3))
    assert fresh == 13
    assert guard.suppressed == 1 + 2 + 1 + 30 - 13


def test_flood_guard_past_max_keys_forgets_the_least_recently_seen(monkeypatch):
    """Past MAX_KEYS buckets the least recently seen client's goes (its
    budget whole again), never the newcomer's: a client whose bucket were
    dropped at once would get a whole budget with every event."""
    from audit.ratelimit import FloodGuard

    monkeypatch.setattr(FloodGuard, "MAX_KEYS", 2)
    clock = Clock()
    guard = FloodGuard(rate=1.0, burst=2, clock=clock)
    guard._all = TokenBucket(1e6, 10**6, clock)  # the shared budget is not under test
    assert [guard.admit("10.0.0.1", "a", 1.0) for _ in range(3)] == [True, True, False]
    assert guard.admit("10.0.0.2", "a", 1.0)
    assert [guard.admit("10.0.0.3", "a", 1.0) for _ in range(3)] == [True, True, False]
    assert list(guard._buckets) == ["10.0.0.2", "10.0.0.3"]
    assert guard.admit("10.0.0.1", "a", 1.0)  # forgotten: a new bucket


def test_flood_guard_counts_up_to_max_users_and_merges_what_was_left_out(monkeypatch):
    """Exactly MAX_USERS names (users, sessions, addresses) are all kept and
    nothing is marked left out; a restored summary that had more, or that
    overflows the count it is merged into, keeps saying so."""
    from audit.ratelimit import FloodGuard

    monkeypatch.setattr(FloodGuard, "MAX_USERS", 3)
    guard = FloodGuard(rate=1.0, burst=1, clock=Clock())
    assert guard.admit("2001:db8::9", "a", 1.0)
    for i in (1, 2, 3):
        assert not guard.admit(f"2001:db8::{i}", "a", 2.0, f"u{i}", f"s{i}")
    (c,) = guard.take_summaries()
    assert c.users == {"u1", "u2", "u3"} and c.sessions == {"s1", "s2", "s3"}
    assert c.addresses == {"2001:db8::1", "2001:db8::2", "2001:db8::3"}
    assert not (c.more_users or c.more_sessions or c.more_addresses)
    assert not guard.admit("2001:db8::4", "a", 3.0, "u4", "s4")
    guard.restore([c])  # merged into the count of u4: four of each
    (m,) = guard.take_summaries()
    assert m.count == 4 and len(m.users) == len(m.sessions) == len(m.addresses) == 3
    assert m.more_users and m.more_sessions and m.more_addresses
    guard.restore([m])  # into an empty table: nothing overflows, the flags stay
    (again,) = guard.take_summaries()
    assert again.count == 4 and again.more_users and again.more_sessions
    assert again.more_addresses


def test_flood_guard_counts_events_without_an_address_under_a_dash():
    from audit.ratelimit import FloodGuard

    guard = FloodGuard(rate=1.0, burst=1, clock=Clock())
    assert guard.admit(None, "auth.invalid_token", 1.0)
    assert not guard.admit(None, "auth.invalid_token", 2.0)
    assert not guard.admit(None, "auth.invalid_token", 3.0, reason="bad_signature")
    (c,) = guard.take_summaries()
    assert (c.ip, c.count, c.addresses) == ("-", 2, set())
    assert c.reasons == {"-": 1, "bad_signature": 1}


async def test_rate_limit_answers_do_not_split_a_security_batch(
    paused_setup, fake_monotonic
):
    """A rate-limit answer pauses all sending; it is not the batch's fault:
    a batch answered 429 again and again goes whole once the pauses end,
    not in halves as one that keeps failing does (found by mutation
    testing: counted as the batch's failures, it was halved after three,
    each half a write more under the sink's rate limit)."""
    engine, sink = paused_setup
    sizes: list[int] = []
    write = sink.write_security_events

    async def counted(events: list[dict[str, Any]]) -> None:
        sizes.append(len(events))
        await write(events)

    sink.write_security_events = counted  # type: ignore[method-assign]
    for _ in range(2):
        await engine.record_security(Draft("auth.login_failed", outcome="denied"))
    sink.script.extend([SinkRateLimited(retry_after=5)] * 4)
    for _ in range(4):
        assert await engine.flusher.step() > 0
        fake_monotonic.advance(engine.flusher.backoff.remaining())
    assert await engine.flusher.step() == 0.0
    assert sizes == [2] * 5
    assert engine.stats.security_written == 2

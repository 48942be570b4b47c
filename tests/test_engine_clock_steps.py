"""The wall clock stepping (NTP, a VM resumed) under a running engine: the
times of a session's events do not go backwards, and the session's end is
not before its events; a throttled login is let in when its Retry-After
says. Real spool and sink files; the clocks are the test's."""

from __future__ import annotations

from typing import Any

from conftest import FakeClock

from audit.events import Draft, Source, parse_ts
from audit.verify import verify_sink
from handlers.auth import LoginThrottle

SRC = Source(user="alice", role="user", ip="127.0.0.1")
FAST = {"max_writes_per_second": 1000.0, "burst": 1000}


async def parts_of(engines: Any, engine: Any, session_id: str) -> list[dict[str, Any]]:
    await engines.drain(engine)
    parts: list[dict[str, Any]] = await engine.sink.get_session_parts(session_id)
    return parts


async def test_a_wall_clock_stepped_back_does_not_send_event_times_backwards(
    make_config, engines, fake_clock, audit_key
):
    """Found by the clock hunt: each event took the wall clock as it was, so
    after NTP stepped it back an hour the next events (and the logout's
    session.end) were an hour older than the ones before them in the chain,
    and the session lasted a negative time. They now take the session's
    last activity when the clock reads earlier."""
    engine = await engines.open(make_config(flush=FAST), clock=fake_clock)
    s = await engine.start_session("alice", "user", SRC, 3 * 3600)
    fake_clock.advance(10)
    await engine.record(s.session_id, Draft("document.list"))
    fake_clock.now -= 3600  # NTP steps the wall clock back an hour
    await engine.record(s.session_id, Draft("document.list"))
    fake_clock.advance(5)
    await engine.end_session(s.session_id, SRC)
    (part,) = await parts_of(engines, engine, s.session_id)
    times = [parse_ts(e["ts"]) for e in part["events"]]
    assert times == sorted(times), [e["ts"] for e in part["events"]]
    assert part["session_duration_seconds"] >= 0
    assert parse_ts(part["session_end_time"]) >= parse_ts(part["session_start_time"])
    assert (await verify_sink(engine.sink, audit_key)).ok


def test_a_throttled_login_may_try_again_when_its_retry_after_says() -> None:
    """Found by the clock hunt: Retry-After was the wait rounded as
    int(wait + 0.999), so a wait of 299.0005 s said 299, and a client that
    came back after exactly those 299 s was refused again (429, Retry-After
    1). It is rounded up now: coming back then is let in."""
    clock = FakeClock(1000.0005)
    throttle = LoginThrottle(5, 300.0, clock=clock)
    for _ in range(5):
        throttle.failed("alice", "10.0.0.1")
    clock.now = 1001.0
    wait = throttle.retry_after("alice", "10.0.0.1")
    assert wait is not None
    clock.advance(wait)
    assert throttle.retry_after("alice", "10.0.0.1") is None


async def test_a_restart_with_the_clock_stepped_back_keeps_event_times_after_the_uncut_ones(
    make_config, engines, fake_clock
):
    """An event at t + 40 not yet cut into a part, the server restarted with
    the wall clock stepped back to t + 10: the next event and the logout's
    session.end come no earlier than t + 40 (mutation review: the start
    read the newest time from the sessions row, the login's, and they came
    at t + 10, before the event in the chain)."""
    config = make_config(flush=FAST)
    engine = await engines.open(config, clock=fake_clock)
    s = await engine.start_session("alice", "user", SRC, 3 * 3600)
    t = fake_clock()
    fake_clock.advance(40)
    await engine.record(s.session_id, Draft("document.list"))
    await engines.close(engine)
    fake_clock.now = t + 10
    engine = await engines.open(config, clock=fake_clock)
    await engine.record(s.session_id, Draft("document.list"))
    await engine.end_session(s.session_id, SRC)
    (part,) = await parts_of(engines, engine, s.session_id)
    times = [parse_ts(e["ts"]) for e in part["events"]]
    assert times == sorted(times), [e["ts"] for e in part["events"]]

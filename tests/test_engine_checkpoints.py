"""Parts: size/count checkpoints, and the reaper's seals and time checkpoints."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import pytest

from audit.events import Draft, Source, canonical_json
from audit.verify import verify_sink

SRC = Source(user="alice", role="user", ip="127.0.0.1")
FAST = {"max_writes_per_second": 1000.0, "burst": 100}


async def parts_of(engines, engine, session_id: str) -> list[dict]:
    await engines.drain(engine)
    return await engine.sink.get_session_parts(session_id)


async def test_part_max_events_cuts_checkpoint_parts(make_config, engines, audit_key):
    engine = await engines.open(make_config(audit={"part_max_events": 4}, flush=FAST))
    s = await engine.start_session("alice", "user", SRC, 3600)
    for _ in range(7):
        await engine.record(s.session_id, Draft("document.list"))
    assert await engine.end_session(s.session_id, SRC) == 10
    parts = await parts_of(engines, engine, s.session_id)
    assert [(p["part"], p["event_count"], p["final"], p["seal_reason"]) for p in parts] == [
        (0, 4, False, "checkpoint"),
        (1, 4, False, "checkpoint"),
        (2, 2, True, "logout"),
    ]
    assert [p["session_end_time"] for p in parts[:2]] == [None, None]
    assert parts[2]["session_end_time"] is not None
    assert [(p["first_seq"], p["last_seq"]) for p in parts] == [(1, 4), (5, 8), (9, 10)]
    assert parts[1]["prev_hash"] == parts[0]["hash"] == parts[0]["events"][-1]["hash"]
    assert len({p["_id"] for p in parts}) == 3 == engine.stats.parts_written


async def test_exactly_one_part_at_the_limit(make_config, engines):
    engine = await engines.open(make_config(audit={"part_max_events": 5}, flush=FAST))
    s = await engine.start_session("alice", "user", SRC, 3600)
    for _ in range(2):
        await engine.record(s.session_id, Draft("document.list"))
    await engine.end_session(s.session_id, SRC)  # 5 events
    parts = await parts_of(engines, engine, s.session_id)
    assert [(p["event_count"], p["final"]) for p in parts] == [(5, True)]


async def test_part_max_bytes_cuts_checkpoint_parts(make_config, engines):
    engine = await engines.open(make_config(audit={"part_max_bytes": 4096}, flush=FAST))
    s = await engine.start_session("alice", "user", SRC, 3600)
    for _ in range(6):
        await engine.record(s.session_id, Draft("document.list", details={"b": "x" * 1500}))
    await engine.end_session(s.session_id, SRC)
    parts = await parts_of(engines, engine, s.session_id)
    assert len(parts) >= 3
    for p in parts[:-1]:
        assert p["seal_reason"] == "checkpoint" and not p["final"]
        size = sum(len(engine_json(e)) for e in p["events"])
        assert size <= 4096
    assert parts[-1]["final"] and parts[-1]["seal_reason"] == "logout"
    assert sum(p["event_count"] for p in parts) == 9


def engine_json(event: dict) -> bytes:
    return canonical_json(event).encode()


@pytest.mark.parametrize(
    ("audit", "ttl", "steps", "reason"),
    [
        # idle: no activity for idle_timeout_seconds
        ({"idle_timeout_seconds": 60}, 3600, [59, "record", 59.5, 0.5], "idle_timeout"),
        # token expiry comes first even when also idle
        ({"idle_timeout_seconds": 60}, 30, [29, 1], "token_expired"),
        # active all along, but over max_session_seconds
        ({"idle_timeout_seconds": 60, "max_session_seconds": 100}, 3600,
         [50, "record", 49, "record", 1], "max_duration"),
    ],
)
async def test_reaper_seals_with_the_right_reason(
    make_config, engines, fake_clock, audit, ttl, steps, reason
):
    engine = await engines.open(make_config(audit=audit, flush=FAST), clock=fake_clock)
    s = await engine.start_session("alice", "user", SRC, ttl)
    for step in steps[:-1]:
        if step == "record":
            await engine.record(s.session_id, Draft("document.list"))
        else:
            fake_clock.advance(step)
            assert await engine.reap_once() == 0, f"sealed too early at +{step}"
            assert engine.session(s.session_id) is not None
    fake_clock.advance(steps[-1])
    assert engine.session(s.session_id) is None  # past its deadline already
    assert await engine.reap_once() == 1
    assert engine.spool.open_session(s.session_id) is None
    parts = await parts_of(engines, engine, s.session_id)
    assert [(p["final"], p["seal_reason"]) for p in parts] == [(True, reason)]
    end = parts[0]["events"][-1]
    assert end["action"] == "session.end" and end["details"] == {"reason": reason}
    assert end["actor"] == {"user": "alice", "role": "user"}
    assert await engine.reap_once() == 0


async def test_reaper_cuts_a_time_checkpoint(make_config, engines, fake_clock):
    config = make_config(audit={"checkpoint_seconds": 900}, flush=FAST)
    engine = await engines.open(config, clock=fake_clock)
    s = await engine.start_session("alice", "user", SRC, 7200)
    fake_clock.advance(600)
    await engine.record(s.session_id, Draft("document.list"))
    fake_clock.advance(299)
    assert await engine.reap_once() == 0  # the oldest uncut event is 899 s old
    fake_clock.advance(1)
    assert await engine.reap_once() == 1
    assert engine.session(s.session_id) is not None  # still open
    assert await engine.reap_once() == 0  # nothing uncut: no empty part
    fake_clock.advance(100)
    await engine.record(s.session_id, Draft("document.list"))
    await engine.end_session(s.session_id, SRC)
    parts = await parts_of(engines, engine, s.session_id)
    assert [(p["event_count"], p["final"], p["seal_reason"]) for p in parts] == [
        (3, False, "checkpoint"),
        (2, True, "logout"),
    ]
    assert parts[0]["session_end_time"] is None


async def test_open_session_checkpoint_reaches_the_sink_and_survives_restart(
    make_config, engines, fake_clock, audit_key
):
    """A checkpointed open session continues in a new process with the next part."""
    config = make_config(audit={"checkpoint_seconds": 10}, flush=FAST)
    e1 = await engines.open(config, clock=fake_clock)
    s = await e1.start_session("alice", "user", SRC, 7200)
    fake_clock.advance(10)
    assert await e1.reap_once() == 1
    await engines.drain(e1)
    await e1.close()
    e2 = await engines.open(config, clock=fake_clock)
    ev = json.loads(await e2.record(s.session_id, Draft("document.list")))
    assert ev["seq"] == 3
    await e2.end_session(s.session_id, SRC)
    parts = await parts_of(engines, e2, s.session_id)
    assert [p["part"] for p in parts] == [0, 1]
    assert (await verify_sink(e2.sink, audit_key)).ok


@pytest.mark.parametrize("lowered", [{"part_max_events": 5}, {"part_max_bytes": 4096}])
async def test_lowered_part_limits_cut_the_sessions_in_progress_at_start(
    make_config, engines, audit_key, lowered
):
    """Found by a review: restarted with smaller part limits (say to fit a
    receiver's size limit), a session's 43 events appended under the old
    ones went out as one part of 43 events and 22 KB, one write past what
    the limits promise, which such a receiver would refuse for good."""
    engine = await engines.open(make_config(flush=FAST))
    s = await engine.start_session("alice", "user", SRC, 3600)
    for _ in range(41):
        await engine.record(s.session_id, Draft("document.list", details={"b": "x" * 400}))
    await engine.close()

    engine = await engines.open(make_config(audit=lowered, flush=FAST))
    await engine.record(s.session_id, Draft("document.list"))  # the chain goes on
    assert await engine.end_session(s.session_id, SRC) == 45
    parts = await parts_of(engines, engine, s.session_id)
    assert [p["part"] for p in parts] == list(range(len(parts))) and len(parts) > 2
    assert sum(p["event_count"] for p in parts) == 45
    for p in parts:
        assert p["event_count"] <= lowered.get("part_max_events", 500)
        assert sum(len(engine_json(e)) for e in p["events"]) <= lowered.get(
            "part_max_bytes", 1 << 20)
    assert [p["final"] for p in parts] == [False] * (len(parts) - 1) + [True]
    report = await verify_sink(engine.sink, audit_key)
    assert report.ok, report.problems


@pytest.mark.parametrize("damaged", ["{not json", "[1, 2]", '{"seq": 5}',
                                     b'{"title": "Q3 layoffs \xff"}'])
async def test_a_damaged_event_where_lowered_limits_cut_does_not_stop_the_start(
    make_config, engines, damaged, caplog
):
    """Found by the spool review: the cut to lowered limits reads the hash of
    the last event before each cut. A damaged text there (not JSON, not an
    object, no hash) escaped as a raw ValueError, TypeError or KeyError and
    stopped the start with a traceback; the cut's docstring promises that a
    failure leaves the sessions as they were. The start goes on, uncut, and
    no event is lost from the spool. A text that is not UTF-8 was logged
    quoted whole (sqlite3's "Could not decode ... with text '...'"): the
    event's details, a document's title, in the server's log."""
    engine = await engines.open(make_config(flush=FAST))
    s = await engine.start_session("alice", "user", SRC, 3600)
    for _ in range(11):
        await engine.record(s.session_id, Draft("document.list"))
    spool = engine.config.spool_path
    held = await engine.spool.read(lambda c: c.execute(
        "SELECT COUNT(*) FROM events WHERE session_id = ?", (s.session_id,)).fetchone()[0])
    await engine.close()
    with closing(sqlite3.connect(spool)) as conn, conn:  # seq 5 ends the first part of 5 events
        # (bytes: a text that is not UTF-8, stored as TEXT as a flipped bit leaves it)
        assert conn.execute("UPDATE events SET json = CAST(? AS TEXT)"
                            " WHERE session_id = ? AND seq = 5",
                            (damaged, s.session_id)).rowcount == 1
    conn.close()

    engine = await engines.open(make_config(audit={"part_max_events": 5}, flush=FAST))
    assert "could not be cut to the part limits" in caplog.text
    # Never the event's text (sqlite3's "Could not decode ... with text '...'")
    assert "layoffs" not in caplog.text and str(damaged) not in caplog.text
    counts = await engine.spool.read(lambda c: (
        c.execute("SELECT COUNT(*) FROM events WHERE session_id = ?",
                  (s.session_id,)).fetchone()[0],
        c.execute("SELECT COUNT(*) FROM parts WHERE session_id = ?",
                  (s.session_id,)).fetchone()[0]))
    assert counts == (held, 0)  # kept, and uncut
    # The session goes on and ends; its part holding the damaged event is
    # the flusher's to dead-letter, as any part with a damaged event.
    assert await engine.end_session(s.session_id, SRC) == held + 1


async def test_a_command_beside_the_server_leaves_its_sessions_uncut(
    make_config, engines, audit_key
):
    """Found by a review of the cut above: drain or retry-dead, run beside the
    server with lowered limits in the file, cut the server's sessions; the
    server's cache of them went stale, its next part 0 (another range, another
    hash) was dead-lettered for good and 29 acknowledged events never left."""
    server = await engines.open(make_config(flush=FAST))
    s = await server.start_session("alice", "user", SRC, 3600)
    for _ in range(31):
        await server.record(s.session_id, Draft("document.list"))
    beside = await engines.open(make_config(audit={"part_max_events": 10}, flush=FAST),
                                beside_server=True)
    assert await beside.spool.read(
        lambda c: c.execute("SELECT COUNT(*) FROM parts").fetchone()[0]) == 0
    await beside.close()
    assert await server.end_session(s.session_id, SRC) == 34
    parts = await parts_of(engines, server, s.session_id)
    assert [(p["first_seq"], p["last_seq"], p["final"]) for p in parts] == [(1, 34, True)]
    assert (await verify_sink(server.sink, audit_key)).ok


async def test_a_clock_stepped_back_does_not_hold_a_time_checkpoint_back(
    make_config, engines, fake_clock, fake_monotonic
):
    """Found by a review: the checkpoint's age was wall time only. With the
    clock stepped back an hour (NTP) after an open session's first uncut
    event, its events waited an hour plus checkpoint_seconds for the sink,
    not at most checkpoint_seconds (API.md). They are aged by the monotonic
    clock too now."""
    config = make_config(audit={"checkpoint_seconds": 900}, flush=FAST)
    engine = await engines.open(config, clock=fake_clock, monotonic=fake_monotonic)
    s = await engine.start_session("alice", "user", SRC, 3 * 3600)
    assert await engine.reap_once() == 0  # seen: uncut since now
    fake_clock.now -= 3600  # NTP steps the wall clock back an hour
    fake_clock.advance(899)
    fake_monotonic.advance(899)
    assert await engine.reap_once() == 0
    fake_clock.advance(1)
    fake_monotonic.advance(1)
    assert await engine.reap_once() == 1
    assert engine.session(s.session_id) is not None  # a checkpoint, still open


async def test_a_clock_stepped_back_around_the_reapers_first_look_ages_from_the_events(
    make_config, engines, fake_clock, fake_monotonic
):
    """The reaper first sees a session's uncut events late (a busy loop, a
    paused VM): they are aged from when they began, whatever the wall clock
    does afterwards; and a wall clock stepped back before that first look
    does not age them less than the time since it."""
    config = make_config(audit={"checkpoint_seconds": 900}, flush=FAST)
    engine = await engines.open(config, clock=fake_clock, monotonic=fake_monotonic)
    late = await engine.start_session("alice", "user", SRC, 3 * 3600)
    fake_clock.advance(850)
    fake_monotonic.advance(850)
    assert await engine.reap_once() == 0  # first seen 850 s old
    fake_clock.now -= 3600  # NTP steps the wall clock back an hour
    early = await engine.start_session("bob", "user", SRC, 3 * 3600)
    fake_clock.now -= 3600  # and again, before the reaper has looked at bob's
    assert await engine.reap_once() == 0  # bob's first seen: 0 s old, not -3600
    fake_clock.advance(50)
    fake_monotonic.advance(50)
    assert await engine.reap_once() == 1  # alice's: 900 s old
    assert [p["first_seq"] for p in await parts_of(engines, engine, late.session_id)] == [1]
    fake_clock.advance(850)
    fake_monotonic.advance(850)
    assert await engine.reap_once() == 1  # bob's: 900 s since first seen
    assert [p["first_seq"] for p in await parts_of(engines, engine, early.session_id)] == [1]


async def test_events_after_a_time_checkpoint_wait_their_own_checkpoint_seconds(
    make_config, engines, fake_clock, fake_monotonic
):
    """The reaper ages a session's uncut events from when they began, per cut:
    once a time checkpoint is cut, the events recorded after it start a new
    age. (Keyed by the session alone, the age of the first uncut events would
    carry over and every later event would be cut into a part of its own at
    the next pass, one sink write a second.)"""
    config = make_config(audit={"checkpoint_seconds": 900}, flush=FAST)
    engine = await engines.open(config, clock=fake_clock, monotonic=fake_monotonic)
    s = await engine.start_session("alice", "user", SRC, 3 * 3600)
    assert await engine.reap_once() == 0  # seen: uncut since now
    fake_clock.advance(900)
    fake_monotonic.advance(900)
    assert await engine.reap_once() == 1  # the time checkpoint
    await engine.record(s.session_id, Draft("document.list"))  # uncut again, from now
    for _ in range(3):
        fake_clock.advance(1)
        fake_monotonic.advance(1)
        assert await engine.reap_once() == 0  # 1-3 s old: not due
    fake_clock.advance(897)
    fake_monotonic.advance(897)
    assert await engine.reap_once() == 1  # 900 s old: the next checkpoint
    assert await engine.end_session(s.session_id, SRC) == 4
    parts = await parts_of(engines, engine, s.session_id)
    assert [(p["first_seq"], p["last_seq"], p["seal_reason"]) for p in parts] == [
        (1, 2, "checkpoint"), (3, 3, "checkpoint"), (4, 4, "logout")]

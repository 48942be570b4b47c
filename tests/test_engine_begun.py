"""Actions noted before they act beyond the process (a chat: the document
goes to the AI provider), their event recorded only once they end: a crash
in between records them at the next start, as interrupted (AuditEngine.begin)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from typing import Any

import pytest

from audit.events import Draft, Source, format_ts
from audit.spool import SpoolUnavailable
from audit.store import SessionNotOpen

SRC = Source(user="alice", role="user", ip="192.0.2.1", request_id="req-chat")


def _chat() -> Draft:
    return Draft("ai.interaction", target={"type": "document", "id": "d1"}, source=SRC,
                 details={"model": "m", "prompt": {"sha256": "ab", "length": 2}})


async def _chat_begun(e: Any, draft: Draft | None = None) -> tuple[Any, Draft, str]:
    """alice's session, and a chat begun in it (the provider has it): the
    session, the chat's draft and its note's key."""
    s = await e.start_session("alice", "user", SRC, 3600)
    draft = draft or _chat()
    key: str = await e.begin(s.session_id, draft)
    return s, draft, key


async def _begun_notes(e: Any) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = await e.spool.read(lambda c: c.execute(
        "SELECT key, value FROM meta WHERE key LIKE 'begun:%'").fetchall())
    return rows


async def _events(e: Any, session_id: str) -> list[dict[str, Any]]:
    rows = await e.spool.read(lambda c: c.execute(
        "SELECT json FROM events WHERE session_id = ? ORDER BY seq", (session_id,)).fetchall())
    return [json.loads(j) for (j,) in rows]


async def test_an_action_done_deletes_its_note_with_its_event(make_config, engines) -> None:
    e = await engines.open(make_config())
    s, draft, key = await _chat_begun(e)
    assert [k for k, _ in await _begun_notes(e)] == [key]
    await e.record_done(s.session_id, draft, key)
    assert await _begun_notes(e) == []
    assert [ev["action"] for ev in await _events(e, s.session_id)][-1] == "ai.interaction"


async def test_an_action_under_way_at_a_crash_is_recorded_at_the_next_start(
    make_config, engines, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    e = await engines.open(config)
    s, draft, _ = await _chat_begun(e)
    await engines.abandon(e)  # killed while the provider had the document
    with caplog.at_level(logging.WARNING, logger="session_audit.engine"):
        e = await engines.open(config)
    assert "recorded as interrupted" in caplog.text
    assert draft.event_id in caplog.text and s.session_id in caplog.text
    assert await _begun_notes(e) == []
    ev = (await _events(e, s.session_id))[-1]
    assert (ev["event_id"], ev["action"], ev["outcome"]) == (
        draft.event_id, "ai.interaction", "failure")
    assert ev["details"]["reason"] == "interrupted"
    assert ev["details"]["prompt"] == {"sha256": "ab", "length": 2}
    assert ev["details"]["started_at"] <= ev["ts"]
    assert ev["request_id"] == "req-chat" and ev["source"]["ip"] == "192.0.2.1"
    assert ev["actor"] == {"user": "alice", "role": "user"}
    # Once: a later start finds nothing more to record.
    await engines.close(e)
    e = await engines.open(config)
    assert [x["event_id"] for x in await _events(e, s.session_id)].count(draft.event_id) == 1


async def test_an_interrupted_action_of_a_session_ended_since_goes_to_the_security_stream(
    make_config, engines
) -> None:
    config = make_config()
    e = await engines.open(config)
    s, _, _ = await _chat_begun(e)
    await e.end_session(s.session_id, SRC)  # a logout while the provider had it
    await engines.abandon(e)
    e = await engines.open(config)
    assert await _begun_notes(e) == []
    rows = await e.spool.read(lambda c: c.execute(
        "SELECT json FROM security_events ORDER BY id").fetchall())
    (ev,) = [json.loads(j) for (j,) in rows]
    assert (ev["action"], ev["session_id"]) == ("auth.session_ended", s.session_id)
    assert (ev["outcome"], ev["target"]) == ("failure", {"type": "document", "id": "d1"})
    assert ev["details"]["reason"] == "session_ended_during_action"
    assert ev["details"]["action"] == "ai.interaction"
    assert ev["details"]["action_outcome"] == "failure"
    assert ev["details"]["action_details"]["reason"] == "interrupted"
    # And a chat ending normally after its session did: the same, and raised.
    s2 = await e.start_session("alice", "user", SRC, 3600)
    draft2 = _chat()
    key = await e.begin(s2.session_id, draft2)
    await e.end_session(s2.session_id, SRC)
    with pytest.raises(SessionNotOpen) as raised:
        await e.record_done(s2.session_id, draft2, key)
    assert raised.value.recorded
    assert await _begun_notes(e) == []


async def test_a_command_beside_the_server_leaves_its_actions_under_way_alone(
    make_config, engines
) -> None:
    """drain or retry-dead beside a running server: the server's chats under
    way are not interrupted, their notes are not its to record."""
    config = make_config()
    e = await engines.open(config)
    s = await e.start_session("alice", "user", SRC, 3600)
    await e.begin(s.session_id, _chat())
    beside = await engines.open(config, beside_server=True)
    assert len(await _begun_notes(beside)) == 1
    assert "ai.interaction" not in [ev["action"] for ev in await _events(beside, s.session_id)]


async def test_a_damaged_note_is_left_and_said(
    make_config, engines, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    e = await engines.open(config)
    s = await e.start_session("alice", "user", SRC, 3600)
    draft = asdict(_chat())
    notes = [
        ("begun:x", "not json"),
        ("begun:y", json.dumps({"draft": {}})),
        # A session id that is not a string; details that are not an object.
        ("begun:z", json.dumps({"session_id": 7, "started": 1.0, "draft": draft})),
        ("begun:w", json.dumps({"session_id": s.session_id, "started": 1.0,
                                "draft": {**draft, "details": ["not", "an", "object"]}})),
    ]
    await e.spool.submit(lambda w: w.conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)", notes))
    await engines.close(e)
    with caplog.at_level(logging.ERROR, logger="session_audit.engine"):
        e = await engines.open(config)
    lines = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(lines) == 4
    for key in ("begun:z", "begun:w"):
        (line,) = [x for x in lines if repr(key) in x]
        assert "not a session id and details" in line
    assert sorted(await _begun_notes(e)) == sorted(notes)
    assert [ev["action"] for ev in await _events(e, s.session_id)] == [
        "session.start", "token.issue"]
    assert await e.spool.read(lambda c: c.execute(
        "SELECT COUNT(*) FROM security_events").fetchone()[0]) == 0


async def test_a_damaged_note_is_said_without_quoting_its_text(
    make_config, engines, caplog: pytest.LogCaptureFixture
) -> None:
    """A note whose start time or draft field is damaged: the log line
    quoted float()'s or Draft()'s words, the stored value or an unknown
    field's name with them. It names what is wrong instead. A note holding
    NaN or Infinity (Python's json reads them, the records' canonical JSON
    refuses them) raised ValueError out of the start, at every start: it is
    a note that cannot be read."""
    config = make_config()
    e = await engines.open(config)
    s = await e.start_session("alice", "user", SRC, 3600)
    draft = asdict(_chat())
    notes = [
        ("begun:a", json.dumps({"session_id": s.session_id, "started": "secret payroll",
                                "draft": draft})),
        ("begun:b", json.dumps({"session_id": s.session_id, "started": 1.0,
                                "draft": {**draft, "salaries 2027": 1}})),
        ("begun:n", json.dumps({"session_id": s.session_id, "started": 1.0,
                                "draft": {**draft, "details": {"latency_ms": float("nan")}}})),
        ("begun:i", json.dumps({"session_id": s.session_id, "started": float("inf"),
                                "draft": draft})),
    ]
    await e.spool.submit(lambda w: w.conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)", notes))
    await engines.close(e)
    with caplog.at_level(logging.ERROR, logger="session_audit.engine"):
        e = await engines.open(config)
    lines = sorted(r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage())
    assert lines == [
        "the spool's note 'begun:a' of an action under way cannot be read (its started is"
        " missing or not a time, ValueError): its event is not recorded",
        "the spool's note 'begun:b' of an action under way cannot be read (its draft is not"
        " one this release can read, TypeError): its event is not recorded",
        "the spool's note 'begun:i' of an action under way cannot be read (not JSON,"
        " ValueError): its event is not recorded",
        "the spool's note 'begun:n' of an action under way cannot be read (not JSON,"
        " ValueError): its event is not recorded",
    ]
    assert "payroll" not in caplog.text and "salaries" not in caplog.text
    assert sorted(await _begun_notes(e)) == sorted(notes)


async def test_an_action_cut_off_while_its_note_commits_leaves_no_note(
    make_config, engines
) -> None:
    """The shutdown cancels a chat while its note is committing: the chat
    never asks the provider, so its note must not outlive it (the next start
    would record an interrupted chat that sent nothing)."""
    config = make_config()
    e = await engines.open(config)
    s = await e.start_session("alice", "user", SRC, 3600)
    for _ in range(20):  # cut off at each point of the commit it can be
        task = asyncio.ensure_future(e.begin(s.session_id, _chat()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.gather(*e._inflight)
        assert await _begun_notes(e) == []
    await engines.close(e)
    e = await engines.open(config)
    assert "ai.interaction" not in [ev["action"] for ev in await _events(e, s.session_id)]


async def test_an_interrupted_action_of_a_session_past_its_deadline_meanwhile_ends_it_first(
    make_config, engines, fake_clock
) -> None:
    """A crash while a chat was under way, and the server down past the
    session's idle deadline: at the next start the session ends at that
    deadline, idle_timeout, as the reaper would have ended it (the late
    record must not take an idle session, and its token, back to life);
    the interrupted chat goes to the security stream. A full spool takes
    both: they are the record of what has happened."""
    config = make_config(audit={"idle_timeout_seconds": 60, "spool_max_bytes": 200_000})
    e = await engines.open(config, clock=fake_clock)
    s, draft, _ = await _chat_begun(e)
    pad = {"pad": "p" * 4000}
    for _ in range(200):
        if e.spool.full:
            break
        await e.record(s.session_id, Draft("document.list", details=pad))
    assert e.spool.full
    await engines.abandon(e)  # killed while the provider had the document
    fake_clock.advance(3600)
    e = await engines.open(config, clock=fake_clock)
    assert e.spool.full
    assert await _begun_notes(e) == []
    assert e.spool.open_session(s.session_id) is None
    events = await _events(e, s.session_id)
    end = events[-1]
    assert (end["action"], end["details"]) == ("session.end", {"reason": "idle_timeout"})
    assert draft.event_id not in [ev["event_id"] for ev in events]
    rows = await e.spool.read(lambda c: c.execute(
        "SELECT json FROM security_events ORDER BY id").fetchall())
    (ev,) = [json.loads(j) for (j,) in rows]
    assert (ev["action"], ev["session_id"]) == ("auth.session_ended", s.session_id)
    assert ev["details"]["action"] == "ai.interaction"
    assert ev["details"]["action_details"]["reason"] == "interrupted"


async def test_an_interrupted_action_the_spool_cannot_take_waits_for_the_next_start(
    make_config, engines, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    e = await engines.open(config)
    draft = _chat()
    draft.details["pad"] = "p" * 50_000  # (its event needs pages of its own)
    s, draft, key = await _chat_begun(e, draft)
    spool = e.spool
    pages = await spool.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await spool.submit(lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages}"),
                       needs_space=False)  # a disk with no page left
    for size in (50_000, 5_000, 500):  # what free pages it had are taken
        with pytest.raises(SpoolUnavailable):
            for _ in range(100):
                await e.record(s.session_id, Draft("document.list", details={"p": "p" * size}))
    with caplog.at_level(logging.ERROR, logger="session_audit.engine"):
        await e.record_interrupted()
    (line,) = [r.getMessage() for r in caplog.records if "cannot be recorded yet" in r.getMessage()]
    assert f"the interrupted ai.interaction (event {draft.event_id})" in line
    assert "could not commit" in line
    assert [k for k, _ in await _begun_notes(e)] == [key]
    await spool.submit(lambda w: w.conn.execute("PRAGMA max_page_count = 1073741823"),
                       needs_space=False)
    await e.record_interrupted()
    assert await _begun_notes(e) == []
    ev = (await _events(e, s.session_id))[-1]
    assert (ev["event_id"], ev["outcome"], ev["details"]["reason"]) == (
        draft.event_id, "failure", "interrupted")


async def _reopen(engines: Any, e: Any, config: Any, clock: Any, *, crash: bool = False) -> Any:
    if crash:
        await engines.abandon(e)
    else:
        await engines.close(e)
    return await engines.open(config, clock=clock)


async def _sealed_idle_at(e: Any, sid: str, clock: Any, deadline: float) -> None:
    """The session is open a second before ``deadline`` and sealed
    idle_timeout at it (the reaper's passes a second before and after)."""
    clock.advance(deadline - 1 - clock())
    await e.reap_once()
    assert e.session(sid) is not None
    clock.advance(2)
    await e.reap_once()
    end = (await _events(e, sid))[-1]
    assert (end["action"], end["details"]) == ("session.end", {"reason": "idle_timeout"})
    assert end["ts"] == format_ts(deadline)


async def _chat_after_50s(make_config: Any, engines: Any,
                          clock: Any) -> tuple[Any, Any, str, float, Draft]:
    """idle_timeout_seconds 60; alice logs in at t and a chat begins at
    t + 50: (config, engine, session id, t, the chat's draft)."""
    config = make_config(audit={"idle_timeout_seconds": 60})
    e = await engines.open(config, clock=clock)
    s = await e.start_session("alice", "user", SRC, 3600)
    t = clock()
    clock.advance(50)
    draft = _chat()
    await e.begin(s.session_id, draft)
    return config, e, s.session_id, t, draft


async def test_an_interrupted_action_recorded_at_a_start_is_not_activity(
    make_config, engines, fake_clock
) -> None:
    """The record of a chat a crash interrupted, made by the next start, is
    the server's, not the user's: the session idle since the chat began
    (at t) ends idle_timeout at t + idle_timeout_seconds, as it would have
    without the crash, not that long after the start (the downtime added).
    Not after a second start either, the record then read back from the
    spool (uncut, then cut into a checkpoint part)."""
    config = make_config(audit={"idle_timeout_seconds": 60})
    e = await engines.open(config, clock=fake_clock)
    s, draft, _ = await _chat_begun(e)
    sid, t = s.session_id, fake_clock()
    fake_clock.advance(40)
    e = await _reopen(engines, e, config, fake_clock, crash=True)  # killed; started at t + 40
    ev = (await _events(e, sid))[-1]
    assert (ev["event_id"], ev["details"]["reason"]) == (draft.event_id, "interrupted")
    assert e.spool.open_session(sid).last_activity == t
    fake_clock.advance(5)
    e = await _reopen(engines, e, config, fake_clock)  # the record uncut in the spool
    assert e.spool.open_session(sid).last_activity == t
    assert await e.spool.submit(lambda w: w.checkpoint(sid))
    fake_clock.advance(5)
    e = await _reopen(engines, e, config, fake_clock)  # and cut into a part
    assert e.spool.open_session(sid).last_activity == t
    fake_clock.advance(9)  # t + 59
    await e.reap_once()
    assert e.session(sid) is not None
    fake_clock.advance(2)  # t + 61: past t + 60, long before t + 40 + 60
    await e.reap_once()
    assert e.spool.open_session(sid) is None
    events = await _events(e, sid)
    end = events[-1]
    assert (end["action"], end["details"]) == ("session.end", {"reason": "idle_timeout"})
    assert end["ts"] == format_ts(t + 60)
    times = [ev["ts"] for ev in events]
    assert times == sorted(times)  # (the record, at t + 40, before the end)


async def test_an_interrupted_action_counts_as_activity_when_it_began(
    make_config, engines, fake_clock
) -> None:
    """The chat's request was the user's activity, though nothing was
    recorded then: a session whose last event is older than the idle
    timeout at the next start, and whose chat began within it, stays open
    until idle_timeout_seconds after the chat began, through a second start;
    a user's action after the start moves the deadline on, as ever."""
    config, e, sid, t, draft = await _chat_after_50s(make_config, engines, fake_clock)
    began = t + 50
    fake_clock.advance(30)  # 80 s after the login, 30 s after the chat began
    e = await _reopen(engines, e, config, fake_clock, crash=True)
    assert e.session(sid) is not None
    assert (await _events(e, sid))[-1]["event_id"] == draft.event_id
    assert e.spool.open_session(sid).last_activity == began
    fake_clock.advance(10)
    e = await _reopen(engines, e, config, fake_clock)
    assert e.spool.open_session(sid).last_activity == began
    fake_clock.advance(10)  # began + 50: the user acts
    await e.record(sid, Draft("document.list", source=SRC))
    e = await _reopen(engines, e, config, fake_clock)
    await _sealed_idle_at(e, sid, fake_clock, began + 50 + 60)


@pytest.mark.parametrize(("chat_at", "revoked_at", "down_for"),
                         [(0, 600, 900), (0, 600, 3 * 86400), (1500, 2000, 3 * 86400)])
async def test_a_session_revoked_while_down_ends_as_revoked_and_its_interrupted_chat_is_kept(
    make_config, engines, fake_clock, chat_at, revoked_at, down_for
) -> None:
    """A crash while alice's chat was under way; ``disable alice`` 600 s
    into her session while the server was down (idle_timeout 1800 s). At
    the next start the session ends as the revocation's pass says: a logout
    with the cause, at the revocation's time. The interrupted chat's record
    was appended first: back at 900 s the seal came at the restart's time
    (the record's), not the revocation's; three days later the session was
    sealed idle_timeout at 1800 s before the pass came, the cause lost. The
    record is kept once, in the security stream (the session ended before
    it was made), and the chain's times do not go back. A chat begun 1500 s
    in kept the session open past 1800 s (its request was activity): a
    revocation at 2000 s is the logout, not the idle deadline at 1800 s."""
    import contextlib

    from audit.spool import connect
    from handlers.auth import Accounts, add_user_sync, change_user_sync

    config = make_config(audit={"idle_timeout_seconds": 1800})
    e = await engines.open(config, clock=fake_clock)
    t = fake_clock()
    s = await e.start_session("alice", "user", SRC, 3600)
    fake_clock.advance(chat_at)
    draft = _chat()
    await e.begin(s.session_id, draft)
    await engines.abandon(e)  # killed while the provider had the document
    with contextlib.closing(connect(config.spool_path, "normal")) as conn:
        add_user_sync(conn, "alice", "a-password-1", "user", 4)
        assert change_user_sync(conn, "alice", disabled=True)
        with conn:  # the command ran 600 s into the session
            conn.execute("UPDATE revocations SET created_ts = ?", (t + revoked_at,))
    fake_clock.advance(down_for)
    e = await engines.open(config, clock=fake_clock, prepare=lambda e: e.before_reap.append(
        Accounts(e, 4).end_revoked_sessions))
    await Accounts(e, 4).end_revoked_sessions()  # (the server's pass at its start)
    assert e.spool.open_session(s.session_id) is None
    assert await _begun_notes(e) == []
    events = await _events(e, s.session_id)
    end = events[-1]
    assert (end["action"], end["details"]) == (
        "session.end", {"reason": "logout", "cause": "user_disabled"})
    assert end["ts"] == format_ts(t + revoked_at)
    assert draft.event_id not in [ev["event_id"] for ev in events]
    times = [ev["ts"] for ev in events]
    assert times == sorted(times)
    rows = await e.spool.read(lambda c: c.execute(
        "SELECT json FROM security_events ORDER BY id").fetchall())
    kept = [ev for j, in rows if (ev := json.loads(j))["action"] == "auth.session_ended"]
    assert [(ev["session_id"], ev["details"]["action"]) for ev in kept] == [
        (s.session_id, "ai.interaction")]
    assert kept[0]["details"]["action_details"]["reason"] == "interrupted"
    assert kept[0]["details"]["action_details"]["started_at"] == format_ts(t + chat_at)


async def test_a_cut_interrupted_record_keeps_later_times_after_it_through_a_restart(
    make_config, engines, fake_clock
) -> None:
    """The record of an interrupted chat, made at a start (t + 40), then cut
    into a checkpoint part: at the next start the session's newest event is
    still at t + 40, though its activity (sessions.last_ts, from the cut) is
    t. With the wall clock stepped back at that start (to t + 10), the next
    events and the session's end came at t + 10, before the record in the
    chain: its newest time was read back as the activity's."""
    config = make_config(audit={"idle_timeout_seconds": 600})
    e = await engines.open(config, clock=fake_clock)
    s, draft, _ = await _chat_begun(e)
    sid, t = s.session_id, fake_clock()
    fake_clock.advance(40)
    e = await _reopen(engines, e, config, fake_clock, crash=True)  # the record at t + 40
    assert await e.spool.submit(lambda w: w.checkpoint(sid))
    fake_clock.now = t + 10  # NTP steps the wall clock back 30 s before the next start
    e = await _reopen(engines, e, config, fake_clock)
    assert e.spool.open_session(sid).last_activity == t
    await e.record(sid, Draft("document.list", source=SRC))
    await e.end_session(sid, SRC)
    events = await _events(e, sid)
    assert [ev["event_id"] for ev in events].count(draft.event_id) == 1
    times = [ev["ts"] for ev in events]
    assert times == sorted(times), times


async def test_the_reaper_before_the_servers_record_of_interrupted_chats_counts_them(
    make_config, engines, fake_clock
) -> None:
    """The server opens the engine (its reaper running) and records the
    interrupted chats only once the sink was tried (up to a second or
    more): a reaper pass in between judged the idle deadline from the last
    recorded event, not the chat begun since, and sealed a session the
    chat kept open (idle_timeout 60 s; the login at t, the chat at t + 50,
    the start at t + 80: it ended at t + 60, before the chat began)."""
    config, e, sid, t, draft = await _chat_after_50s(make_config, engines, fake_clock)
    await engines.abandon(e)
    fake_clock.advance(30)
    passes = 0

    async def counted() -> None:
        nonlocal passes
        passes += 1

    e = await engines.open(config, clock=fake_clock, background=True, interrupted=False,
                           reaper_interval=0.001,
                           prepare=lambda e: e.before_reap.append(counted))
    for _ in range(2000):  # a whole reaper pass (the second begun)
        if passes >= 2:
            break
        await asyncio.sleep(0.005)
    assert passes >= 2
    assert e.spool.open_session(sid) is not None, (await _events(e, sid))[-1]
    await e.record_interrupted()
    ev = (await _events(e, sid))[-1]
    assert (ev["event_id"], ev["details"]["reason"]) == (draft.event_id, "interrupted")
    assert e.spool.open_session(sid).last_activity == t + 50


async def test_a_users_action_while_a_chat_was_under_way_stays_the_activity(
    make_config, engines, fake_clock
) -> None:
    """A chat begun at t + 50, a document listed at t + 60 while it ran, a
    crash: the interrupted chat's record (activity t + 50) does not take the
    session's activity back from t + 60, neither when the start makes it
    nor when a later start reads it back from the spool, where the walk
    back from the record meets the listing (mutation review: either step
    undone ended the session idle at t + 110, 10 s early)."""
    config, e, sid, t, draft = await _chat_after_50s(make_config, engines, fake_clock)
    fake_clock.advance(10)
    await e.record(sid, Draft("document.list", source=SRC))
    fake_clock.advance(20)
    e = await _reopen(engines, e, config, fake_clock, crash=True)  # the record at t + 80
    assert (await _events(e, sid))[-1]["event_id"] == draft.event_id
    assert e.spool.open_session(sid).last_activity == t + 60
    e = await _reopen(engines, e, config, fake_clock)
    assert e.spool.open_session(sid).last_activity == t + 60
    await _sealed_idle_at(e, sid, fake_clock, t + 120)


async def test_an_interrupted_chat_after_a_cut_is_the_activity_read_back(
    make_config, engines, fake_clock
) -> None:
    """The session's events cut into a checkpoint part (activity t), a chat
    begun at t + 50, a crash: after the start that records the chat, the
    spool's uncut events are that record alone; a later start reads the
    activity back as t + 50, when the chat began, not the cut's t
    (mutation review: the walk back that found no event of the user's
    answered nothing, and the session ended idle 50 s early)."""
    config = make_config(audit={"idle_timeout_seconds": 60})
    e = await engines.open(config, clock=fake_clock)
    s = await e.start_session("alice", "user", SRC, 3600)
    sid, t = s.session_id, fake_clock()
    assert await e.spool.submit(lambda w: w.checkpoint(sid))
    fake_clock.advance(50)
    await e.begin(sid, _chat())
    fake_clock.advance(30)
    e = await _reopen(engines, e, config, fake_clock, crash=True)
    assert e.spool.open_session(sid).last_activity == t + 50
    e = await _reopen(engines, e, config, fake_clock)
    assert e.spool.open_session(sid).last_activity == t + 50


@pytest.mark.parametrize("first_begun_first", [True, False])
async def test_two_interrupted_chats_count_the_later_begun_read_back(
    make_config, engines, fake_clock, first_begun_first
) -> None:
    """Two chats of a session interrupted by one crash, begun at t + 40 and
    t + 50, recorded at the next start in either order: a later start reads
    the activity back as t + 50, the later of the two (mutation review:
    the walk back kept the older record's time, t + 40 when it was
    recorded first)."""
    config = make_config(audit={"idle_timeout_seconds": 60})
    e = await engines.open(config, clock=fake_clock)
    s = await e.start_session("alice", "user", SRC, 3600)
    sid, t = s.session_id, fake_clock()
    ids = ["0" * 32, "f" * 32] if first_begun_first else ["f" * 32, "0" * 32]
    for event_id in ids:  # the notes, and so the records, in the order of their keys
        fake_clock.advance(10 if event_id == ids[1] else 40)
        draft = _chat()
        draft.event_id = event_id
        await e.begin(sid, draft)
    fake_clock.advance(20)
    e = await _reopen(engines, e, config, fake_clock, crash=True)
    assert {ev["event_id"] for ev in (await _events(e, sid))[-2:]} == set(ids)
    e = await _reopen(engines, e, config, fake_clock)
    assert e.spool.open_session(sid).last_activity == t + 50


async def test_a_logout_after_an_interrupted_record_and_a_clock_step_back_ends_after_it(
    make_config, engines, fake_clock
) -> None:
    """The interrupted chat's record made at the start (t + 40; the
    session's activity t), then NTP steps the wall clock back to t + 10 and
    the user logs out: session.end is not before the record in the chain
    (mutation review: the end was bounded by the activity, not the newest
    event, and came at t + 10)."""
    config = make_config(audit={"idle_timeout_seconds": 600})
    e = await engines.open(config, clock=fake_clock)
    s, _, _ = await _chat_begun(e)
    sid, t = s.session_id, fake_clock()
    fake_clock.advance(40)
    e = await _reopen(engines, e, config, fake_clock, crash=True)
    fake_clock.now = t + 10
    await e.end_session(sid, SRC)
    events = await _events(e, sid)
    assert [ev["action"] for ev in events][-2:] == ["ai.interaction", "session.end"]
    times = [ev["ts"] for ev in events]
    assert times == sorted(times), times

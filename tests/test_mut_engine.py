"""The engine's promises a mutation review of audit/engine.py found unpinned:
what close() waits for (records answered before their commit under
``ack = "fast"``, and those that go on in a task of their own), what a full
spool still takes (the security record of an action whose session ended,
the deletion of a note) or refuses (a begin), and the start time an
interrupted action's record carries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any

import pytest
from test_config_effects import _hold_writer
from waiting import wait_for

from audit.events import Draft, Source, format_ts
from audit.spool import SpoolFull

SRC = Source(user="alice", role="user", ip="192.0.2.1", request_id="req-1")


async def _security(e: Any) -> list[dict[str, Any]]:
    rows = await e.spool.read(lambda c: c.execute(
        "SELECT json FROM security_events ORDER BY id").fetchall())
    return [json.loads(j) for (j,) in rows]


async def _shut_down_held(engines: Any, e: Any, gate: threading.Event, held: Any,
                          *queued: Any) -> None:
    """The shutdown (``engines.close``) at once, the writer held: it goes as
    far as it can in a few turns of the loop (no time waited), then the
    writer is freed; waits for the held job, ``queued`` and the close."""
    closing = asyncio.ensure_future(engines.close(e))
    try:
        for _ in range(20):
            await asyncio.sleep(0)  # a turn of the loop, not a wait
    finally:
        gate.set()
    await held
    for fut in queued:
        await fut
    await closing


async def test_close_keeps_a_fast_record_whose_session_ended_before_its_commit(
    make_config, engines
) -> None:
    """Under ack = "fast" a request answered 2xx before its commit, whose
    session was logged out ahead of it, goes to the security stream
    (auth.session_ended) in a commit of its own, after the first failed.
    A shutdown right then must wait for that second commit: the spool
    closed first, and the action was recorded nowhere."""
    config = make_config(audit={"ack": "fast"})
    e = await engines.open(config)
    s = await e.start_session("alice", "user", SRC, 3600)
    gate, held = await _hold_writer(e.spool)
    try:
        logout = asyncio.ensure_future(e.end_session(s.session_id, SRC))
        await wait_for(lambda: bool(e.spool._pending), message="the logout queued")
        draft = Draft("document.list", source=SRC)
        assert await e.record(s.session_id, draft) is None  # answered before the commit
        await _shut_down_held(engines, e, gate, held, logout)
    finally:
        gate.set()
    e = await engines.open(config)
    (ev,) = await _security(e)
    assert (ev["action"], ev["session_id"]) == ("auth.session_ended", s.session_id)
    assert ev["details"]["action"] == "document.list"
    assert ev["request_id"] == "req-1"


async def test_a_full_spool_takes_a_fast_record_whose_session_ended_before_its_commit(
    make_config, engines
) -> None:
    """README: the auth.session_ended record of an action done while its
    session ended is taken by a full spool. Under ack = "fast" the action
    was answered before its commit; the spool was filled meanwhile (here by
    another session's large record in the same commit): its second commit,
    to the security stream, must not be refused for room."""
    config = make_config(audit={"ack": "fast", "spool_max_bytes": 200_000})
    e = await engines.open(config)
    s = await e.start_session("alice", "user", SRC, 3600)
    other = await e.start_session("bob", "user", SRC, 3600)
    gate, held = await _hold_writer(e.spool)
    try:
        logout = asyncio.ensure_future(e.end_session(s.session_id, SRC))
        await wait_for(lambda: bool(e.spool._pending), message="the logout queued")
        assert await e.record(s.session_id, Draft("document.list", source=SRC)) is None
        big = asyncio.ensure_future(e.record(
            other.session_id, Draft("document.list", details={"pad": "p" * 300_000}),
            needs_space=False, durable=True))
        await wait_for(lambda: len(e.spool._pending) == 3, message="the records queued")
    finally:
        gate.set()
    await held
    await logout
    await big
    assert e.spool.full
    await wait_for(lambda: not e._inflight, message="the records committed")
    (ev,) = await _security(e)
    assert (ev["action"], ev["session_id"]) == ("auth.session_ended", s.session_id)
    assert ev["details"]["action"] == "document.list"


async def test_a_note_cut_off_while_it_commits_is_deleted_by_a_full_spool(
    make_config, engines
) -> None:
    """A chat cut off (the shutdown) while its begin note commits never asks
    the provider: the note is deleted once committed. The spool filled in
    that commit (another session's large record): the deletion must still
    be taken, or the next start records a chat that sent nothing as
    interrupted."""
    config = make_config(audit={"spool_max_bytes": 200_000})
    e = await engines.open(config)
    s = await e.start_session("alice", "user", SRC, 3600)
    other = await e.start_session("bob", "user", SRC, 3600)
    chat = Draft("ai.interaction", target={"type": "document", "id": "d1"}, source=SRC,
                 details={"model": "m"})
    gate, held = await _hold_writer(e.spool)
    try:
        begin = asyncio.ensure_future(e.begin(s.session_id, chat))
        await wait_for(lambda: bool(e.spool._pending), message="the note queued")
        begin.cancel()
        big = asyncio.ensure_future(e.record(
            other.session_id, Draft("document.list", details={"pad": "p" * 300_000}),
            needs_space=False))
        await wait_for(lambda: len(e.spool._pending) == 2, message="the record queued")
    finally:
        gate.set()
    await held
    await big
    with contextlib.suppress(asyncio.CancelledError):
        await begin
    assert e.spool.full
    await wait_for(lambda: not e._inflight, message="the note's deletion")
    assert await e.spool.read(lambda c: c.execute(
        "SELECT key FROM meta WHERE key LIKE 'begun:%'").fetchall()) == []
    await engines.close(e)
    e = await engines.open(config)
    rows = await e.spool.read(lambda c: c.execute(
        "SELECT COUNT(*) FROM events WHERE json LIKE '%ai.interaction%'").fetchone())
    assert rows == (0,)


async def test_an_interrupted_action_says_when_it_was_noted(
    make_config, engines, fake_clock
) -> None:
    """README: an action under way at a crash is recorded at the next start
    with ``details.started_at``, when it was noted: not when it is recorded,
    nor any other time."""
    config = make_config()
    e = await engines.open(config, clock=fake_clock)
    s = await e.start_session("alice", "user", SRC, 3600)
    noted = fake_clock()
    chat = Draft("ai.interaction", target={"type": "document", "id": "d1"}, source=SRC,
                 details={"model": "m"})
    await e.begin(s.session_id, chat)
    fake_clock.advance(30)
    await engines.abandon(e)  # killed while the provider had the document
    fake_clock.advance(30)
    e = await engines.open(config, clock=fake_clock)
    rows = await e.spool.read(lambda c: c.execute(
        "SELECT json FROM events WHERE session_id = ? ORDER BY seq",
        (s.session_id,)).fetchall())
    ev = json.loads(rows[-1][0])
    assert (ev["event_id"], ev["outcome"]) == (chat.event_id, "failure")
    assert ev["details"] == {"model": "m", "reason": "interrupted",
                             "started_at": format_ts(noted)}
    assert ev["ts"] == format_ts(noted + 60)


async def test_a_full_spool_refuses_to_begin_an_action(make_config, engines) -> None:
    """README: under a full spool a chat is refused (503) and nothing is
    sent: begin, the note before the document leaves, is refused, and no
    note is left for the next start to record as interrupted."""
    config = make_config(audit={"spool_max_bytes": 200_000})
    e = await engines.open(config)
    s = await e.start_session("alice", "user", SRC, 3600)
    await e.record(s.session_id, Draft("document.list", details={"pad": "p" * 300_000}),
                   needs_space=False)
    assert e.spool.full
    chat = Draft("ai.interaction", source=SRC, details={"model": "m"})
    with pytest.raises(SpoolFull):
        await e.begin(s.session_id, chat)
    assert await e.spool.read(lambda c: c.execute(
        "SELECT key FROM meta WHERE key LIKE 'begun:%'").fetchall()) == []


async def test_close_waits_for_a_detached_record_to_reach_the_security_stream(
    make_config, engines
) -> None:
    """A chat's record runs detached (AuditEngine.detach) and close() waits
    for it. Its session was logged out ahead of it: the record takes a
    second commit, to the security stream (deleting the chat's note). A
    close that did not wait closed the spool between the two: the chat was
    recorded only at the next start, as interrupted, without its outcome."""
    config = make_config()
    e = await engines.open(config)
    s = await e.start_session("alice", "user", SRC, 3600)
    chat = Draft("ai.interaction", target={"type": "document", "id": "d1"}, source=SRC,
                 details={"model": "m", "reply": {"sha256": "cd", "length": 2}})
    key = await e.begin(s.session_id, chat)
    gate, held = await _hold_writer(e.spool)
    try:
        logout = asyncio.ensure_future(e.end_session(s.session_id, SRC))
        await wait_for(lambda: bool(e.spool._pending), message="the logout queued")
        recording = e.detach(e.record_done(s.session_id, chat, key))
        await wait_for(lambda: len(e.spool._pending) == 2, message="the record queued")
        await _shut_down_held(engines, e, gate, held, logout)
    finally:
        gate.set()
    assert recording.done()
    e = await engines.open(config)
    (ev,) = await _security(e)
    assert (ev["action"], ev["session_id"]) == ("auth.session_ended", s.session_id)
    assert ev["details"]["action"] == "ai.interaction"
    assert ev["details"]["action_outcome"] == "success"
    assert ev["details"]["action_details"]["reply"] == {"sha256": "cd", "length": 2}
    assert await e.spool.read(lambda c: c.execute(
        "SELECT key FROM meta WHERE key LIKE 'begun:%'").fetchall()) == []


async def test_a_full_spool_takes_the_security_events_counted_at_shutdown(
    make_config, engines
) -> None:
    """Security events past their client IP's budget are only counted; the
    count becomes a summary event later. At shutdown there is no later: a
    full spool must take the summary (AuditEngine.record_summaries, final),
    or the counted events are recorded nowhere."""
    config = make_config(audit={"spool_max_bytes": 200_000,
                                "security_events_per_ip_burst": 3,
                                "security_events_per_ip_per_second": 0.001})
    e = await engines.open(config)
    bad = Source(ip="198.51.100.7")
    for _ in range(5):  # three recorded, two counted
        await e.record_security(Draft("auth.invalid_token", outcome="denied", source=bad))
    s = await e.start_session("alice", "user", SRC, 3600)
    await e.record(s.session_id, Draft("document.list", details={"pad": "p" * 300_000}),
                   needs_space=False)
    assert e.spool.full
    await engines.close(e)
    e = await engines.open(config)
    (summary,) = [ev for ev in await _security(e)
                  if ev["details"].get("reason") == "over_budget"]
    assert (summary["action"], summary["details"]["count"]) == ("auth.invalid_token", 2)
    assert summary["source"]["ip"] == "198.51.100.7"

"""Actions noted before they act beyond the process (a chat: the document
goes to the AI provider), their event recorded only once they end: a crash
in between records them at the next start, as interrupted (AuditEngine.begin)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from audit.events import Draft, Source
from audit.store import SessionNotOpen

SRC = Source(user="alice", role="user", ip="192.0.2.1", request_id="req-chat")


def _chat() -> Draft:
    return Draft("ai.interaction", target={"type": "document", "id": "d1"}, source=SRC,
                 details={"model": "m", "prompt": {"sha256": "ab", "length": 2}})


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
    s = await e.start_session("alice", "user", SRC, 3600)
    draft = _chat()
    key = await e.begin(s.session_id, draft)
    assert [k for k, _ in await _begun_notes(e)] == [key]
    await e.record_done(s.session_id, draft, key)
    assert await _begun_notes(e) == []
    assert [ev["action"] for ev in await _events(e, s.session_id)][-1] == "ai.interaction"


async def test_an_action_under_way_at_a_crash_is_recorded_at_the_next_start(
    make_config, engines, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    e = await engines.open(config)
    s = await e.start_session("alice", "user", SRC, 3600)
    draft = _chat()
    await e.begin(s.session_id, draft)
    await engines.abandon(e)  # killed while the provider had the document
    with caplog.at_level(logging.WARNING, logger="session_audit.engine"):
        e = await engines.open(config)
    assert "recorded as interrupted" in caplog.text
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
    s = await e.start_session("alice", "user", SRC, 3600)
    draft = _chat()
    await e.begin(s.session_id, draft)
    await e.end_session(s.session_id, SRC)  # a logout while the provider had it
    await engines.abandon(e)
    e = await engines.open(config)
    assert await _begun_notes(e) == []
    rows = await e.spool.read(lambda c: c.execute(
        "SELECT json FROM security_events ORDER BY id").fetchall())
    (ev,) = [json.loads(j) for (j,) in rows]
    assert (ev["action"], ev["session_id"]) == ("auth.session_ended", s.session_id)
    assert ev["details"]["action"] == "ai.interaction"
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
    await e.spool.submit(lambda w: w.conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("begun:x", "not json"), ("begun:y", json.dumps({"draft": {}}))]))
    await engines.close(e)
    with caplog.at_level(logging.ERROR, logger="session_audit.engine"):
        e = await engines.open(config)
    assert caplog.text.count("cannot be read") == 2
    assert len(await _begun_notes(e)) == 2


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

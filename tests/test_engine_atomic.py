"""An app change and its audit event commit together or not at all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3

import pytest

from audit.events import Draft, Source
from audit.store import ActionError

NOW = "2026-01-01T00:00:00.000Z"


def insert_doc(doc_id: str, fail: BaseException | None = None):
    """A change that writes a document row, then optionally fails."""

    def change(conn: sqlite3.Connection, draft: Draft) -> str:
        conn.execute(
            "INSERT INTO documents (id, title, content, owner, version, created_at, updated_at)"
            " VALUES (?, 't', 'c', 'alice', 1, ?, ?)",
            (doc_id, NOW, NOW),
        )
        if fail is not None:
            raise fail
        return doc_id

    return change


def committed(config, sql: str, args=()) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(config.spool_path)) as conn:
        return conn.execute(sql, args).fetchall()


def events_of(config, session_id: str) -> list[dict]:
    rows = committed(
        config, "SELECT json FROM events WHERE session_id = ? ORDER BY seq", (session_id,)
    )
    return [json.loads(r[0]) for r in rows]


@pytest.fixture
async def setup(make_config, engines):
    config = make_config()
    engine = await engines.open(config)
    s = await engine.start_session("alice", "user", Source(ip="127.0.0.1"), 3600)
    return config, engine, s.session_id


async def test_change_and_event_commit_together(setup):
    config, engine, sid = setup
    result = await engine.record(sid, Draft("document.create"), insert_doc("d1"))
    assert result == "d1"
    assert committed(config, "SELECT id FROM documents") == [("d1",)]
    actions = [(e["action"], e["outcome"]) for e in events_of(config, sid)]
    assert actions[-1] == ("document.create", "success")


async def test_action_error_rolls_back_change_and_records_failure(setup):
    config, engine, sid = setup
    draft = Draft("document.update", target={"type": "document", "id": "d2"})
    with pytest.raises(ActionError) as info:
        await engine.record(sid, draft, insert_doc("d2", ActionError("version_conflict")))
    assert info.value.reason == "version_conflict"
    assert committed(config, "SELECT id FROM documents") == []
    last = events_of(config, sid)[-1]
    assert last["event_id"] == draft.event_id
    assert last["outcome"] == "failure"
    assert last["details"]["reason"] == "version_conflict"
    assert committed(config, "SELECT action FROM security_events") == []


async def test_denied_action_also_records_security_event(setup):
    config, engine, sid = setup
    draft = Draft("document.access", target={"type": "document", "id": "x"})
    with pytest.raises(ActionError):
        await engine.record(
            sid, draft, insert_doc("d3", ActionError("not_owner", outcome="denied"))
        )
    assert committed(config, "SELECT id FROM documents") == []
    assert events_of(config, sid)[-1]["outcome"] == "denied"
    rows = committed(config, "SELECT action, json FROM security_events")
    assert [r[0] for r in rows] == ["access.denied"]
    assert json.loads(rows[0][1])["session_id"] == sid


async def test_other_exception_leaves_neither_change_nor_event(setup):
    config, engine, sid = setup
    before = events_of(config, sid)
    draft = Draft("document.create")
    with pytest.raises(ZeroDivisionError):
        await engine.record(sid, draft, insert_doc("d4", ZeroDivisionError()))
    assert committed(config, "SELECT id FROM documents") == []
    assert events_of(config, sid) == before
    # The session's head was put back: the next event continues the chain gaplessly.
    ev = await engine.record(sid, Draft("document.list"))
    assert ev["seq"] == before[-1]["seq"] + 1
    s = engine.session(sid)
    assert s is not None and s.head == ev["hash"]


async def test_failing_job_does_not_affect_its_batch(setup):
    config, engine, sid = setup
    other = (await engine.start_session("bob", "user", Source(), 3600)).session_id
    commits = engine.stats.commits
    ok1, bad, denied, ok2 = (Draft("document.create") for _ in range(4))
    results = await asyncio.gather(
        engine.record(sid, ok1, insert_doc("a")),
        engine.record(other, bad, insert_doc("b", RuntimeError("boom"))),
        engine.record(other, denied, insert_doc("c", ActionError("nope", outcome="denied"))),
        engine.record(sid, ok2, insert_doc("d")),
        return_exceptions=True,
    )
    assert engine.stats.commits - commits == 1, "the four jobs should share one commit"
    assert results[0] == "a" and results[3] == "d"
    assert isinstance(results[1], RuntimeError)
    assert isinstance(results[2], ActionError)
    assert sorted(committed(config, "SELECT id FROM documents")) == [("a",), ("d",)]
    ids = {e["event_id"]: e for e in events_of(config, sid) + events_of(config, other)}
    assert ok1.event_id in ids and ok2.event_id in ids and denied.event_id in ids
    assert bad.event_id not in ids
    seqs = [e["seq"] for e in events_of(config, other)]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_change_on_closed_session_runs_nothing(setup):
    config, engine, sid = setup
    await engine.end_session(sid, Source(user="alice", role="user"))
    from audit.store import SessionNotOpen

    with pytest.raises(SessionNotOpen):
        await engine.record(sid, Draft("document.create"), insert_doc("late"))
    assert committed(config, "SELECT id FROM documents") == []

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
    ev = json.loads(await engine.record(sid, Draft("document.list")))
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


# -- read-only changes (engine.record(..., read_only=True): a Read job) ----------


def read_doc(doc_id: str, fail: BaseException | None = None):
    """A read-only change: the document's title, or the error it is given."""

    def read(conn: sqlite3.Connection, draft: Draft) -> str:
        if fail is not None:
            raise fail
        row = conn.execute("SELECT title FROM documents WHERE id = ?", (doc_id,)).fetchone()
        if row is None:
            raise ActionError("not_found")
        return str(row[0])

    return read


def trace_sql(engine) -> list[str]:
    """Every statement the writer's connection runs from now on."""
    seen: list[str] = []
    engine.spool._wconn.set_trace_callback(seen.append)
    return seen


async def test_read_only_change_records_its_event_without_savepoints(setup):
    config, engine, sid = setup
    await engine.record(sid, Draft("document.create"), insert_doc("r1"))
    seen = trace_sql(engine)
    drafts = [Draft("document.access", target={"type": "document", "id": "r1"})
              for _ in range(5)]
    titles = await asyncio.gather(
        *(engine.record(sid, d, read_doc("r1"), read_only=True) for d in drafts)
    )
    assert titles == ["t"] * 5
    assert not [q for q in seen if "SAVEPOINT" in q], seen
    ids = [e["event_id"] for e in events_of(config, sid)]
    assert [d.event_id for d in drafts] == ids[-5:]


async def test_read_only_denied_records_event_and_security_event(setup):
    config, engine, sid = setup
    draft = Draft("document.access", target={"type": "document", "id": "x"})
    with pytest.raises(ActionError) as info:
        await engine.record(sid, draft, read_doc("x", ActionError("not_owner", outcome="denied")),
                            read_only=True)
    assert info.value.reason == "not_owner"
    last = events_of(config, sid)[-1]
    assert (last["event_id"], last["outcome"], last["details"]["reason"]) == (
        draft.event_id, "denied", "not_owner")
    rows = committed(config, "SELECT action, json FROM security_events")
    assert [r[0] for r in rows] == ["access.denied"]
    assert json.loads(rows[0][1])["details"] == {"action": "document.access",
                                                 "reason": "not_owner"}


async def test_read_only_other_exception_fails_alone(setup):
    config, engine, sid = setup
    before = events_of(config, sid)
    bad, good = Draft("document.access"), Draft("document.list")
    results = await asyncio.gather(
        engine.record(sid, bad, read_doc("x", ZeroDivisionError()), read_only=True),
        engine.record(sid, good),
        return_exceptions=True,
    )
    assert isinstance(results[0], ZeroDivisionError)
    after = events_of(config, sid)
    assert [e["event_id"] for e in after[len(before):]] == [good.event_id]
    assert [e["seq"] for e in after] == list(range(1, len(after) + 1))


async def test_read_only_failure_record_that_fails_undoes_itself(setup, monkeypatch):
    """The failure's event and its access.denied go in one savepoint: if the
    security event cannot be written, neither is kept, the session's head is
    put back, and the other jobs of the batch commit."""
    from audit.store import Writer

    config, engine, sid = setup

    def broken(self, draft, session_id):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Writer, "append_security", broken)
    denied, good = Draft("document.access"), Draft("document.list")
    results = await asyncio.gather(
        engine.record(sid, denied, read_doc("x", ActionError("not_owner", outcome="denied")),
                      read_only=True),
        engine.record(sid, good),
        return_exceptions=True,
    )
    assert isinstance(results[0], sqlite3.OperationalError)
    events = events_of(config, sid)
    ids = [e["event_id"] for e in events]
    assert denied.event_id not in ids and good.event_id in ids
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    s = engine.session(sid)
    assert s is not None and s.head == events[-1]["hash"] and s.next_seq == len(events) + 1


async def test_an_event_that_cannot_be_stored_takes_its_change_with_it(make_config, engines):
    """The change has run; then storing its event fails (here the checkpoint
    cut the event needs is refused by the database): the change must not
    commit without it, and the other jobs of the batch are unaffected."""
    config = make_config(audit={"part_max_events": 1})
    engine = await engines.open(config)
    s = await engine.start_session("alice", "user", Source(ip="127.0.0.1"), 3600)
    other = await engine.start_session("bob", "user", Source(ip="127.0.0.1"), 3600)
    before = events_of(config, s.session_id)
    with contextlib.closing(sqlite3.connect(config.spool_path)) as conn:
        conn.execute(
            "CREATE TRIGGER refuse_parts BEFORE INSERT ON parts WHEN NEW.session_id = ?1"
            " BEGIN SELECT RAISE(ABORT, 'no parts today'); END".replace("?1", f"'{s.session_id}'")
        )
    results = await asyncio.gather(
        engine.record(s.session_id, Draft("document.create"), insert_doc("d1")),
        engine.record(other.session_id, Draft("document.create"), insert_doc("d2")),
        return_exceptions=True,
    )
    assert isinstance(results[0], sqlite3.Error), results[0]
    assert results[1] == "d2"
    assert committed(config, "SELECT id FROM documents") == [("d2",)]
    assert events_of(config, s.session_id) == before
    assert events_of(config, other.session_id)[-1]["action"] == "document.create"


# -- reads of one document (engine.record(..., document=id)): read ahead ------


def title_of(row, draft: Draft) -> str:
    """The check of a document read: the row's title, or not_found."""
    if row is None:
        raise ActionError("not_found")
    return str(row[1])


def set_title(doc_id: str, title: str):
    def change(conn: sqlite3.Connection, draft: Draft) -> None:
        conn.execute("UPDATE documents SET title = ? WHERE id = ?", (title, doc_id))

    return change


async def test_document_reads_of_a_batch_are_one_statement_and_see_its_changes(setup):
    """A batch's reads of documents take their rows from one statement (not
    two steps of the writer's each, see store.py), up to the first job that
    may change one: a read after an update in the same batch reads anew and
    sees it, and a read of no document is not_found, recorded."""
    config, engine, sid = setup
    for d in ("r1", "r2"):
        await engine.record(sid, Draft("document.create"), insert_doc(d))
    seen = trace_sql(engine)

    def read(doc_id: str) -> asyncio.Future:
        draft = Draft("document.access", target={"type": "document", "id": doc_id})
        return asyncio.ensure_future(
            engine.record(sid, draft, title_of, read_only=True, document=doc_id))

    # One batch: created here, in one turn of the loop, before the writer runs.
    futs = [read("r1"), read("r2"), read("nope"), read("r1"),
            asyncio.ensure_future(engine.record(sid, Draft("document.update"),
                                                set_title("r1", "new"))),
            read("r1"), read("r2")]
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[:2] == ["t", "t"] and results[3] == "t"
    assert isinstance(results[2], ActionError) and results[2].reason == "not_found"
    assert results[4] is None and results[5:] == ["new", "t"]
    reads = [q for q in seen if "FROM documents" in q]
    # The four at the head at once, then "nope" (not found ahead: none, or a
    # large one) by itself; after the update, r1 and r2 each.
    assert len(reads) == 4, reads
    assert "json_each" in reads[0]
    outcomes = [(e["target"]["id"], e["outcome"]) for e in events_of(config, sid)[-7:]
                if e["action"] == "document.access"]
    assert outcomes == [("r1", "success"), ("r2", "success"), ("nope", "failure"),
                        ("r1", "success"), ("r1", "success"), ("r2", "success")]


async def test_a_large_document_is_read_by_its_own_read(setup):
    """Past READ_AHEAD_MAX_BYTES a document is not in the batch's one text:
    its read reads it, whole."""
    from audit.store import READ_AHEAD_MAX_BYTES

    _, engine, sid = setup
    big = "x" * (READ_AHEAD_MAX_BYTES + 1)

    def create(conn: sqlite3.Connection, draft: Draft) -> None:
        for doc_id, content in (("big", big), ("small", "\x00\u2028 a NUL, a separator")):
            conn.execute("INSERT INTO documents VALUES (?, 't', ?, 'alice', 1, ?, ?)",
                         (doc_id, content, NOW, NOW))

    await engine.record(sid, Draft("document.create"), create)

    def content_of(row, draft: Draft) -> str:
        return str(row[2])

    seen = trace_sql(engine)
    got = await asyncio.gather(*(
        engine.record(sid, Draft("document.access"), content_of, read_only=True, document=d)
        for d in ("big", "small")))
    assert got == [big, "\x00\u2028 a NUL, a separator"]
    assert [q for q in seen if "FROM documents" in q][1:] == [
        "SELECT id, title, content, owner, version, created_at, updated_at FROM documents"
        " WHERE id = 'big'"]


def set_version(doc_id: str, version):
    """A change that sets a document's version to any value SQLite keeps as
    it is (another process writing the file could store a REAL there)."""

    def change(conn: sqlite3.Connection, draft: Draft) -> None:
        conn.execute("UPDATE documents SET version = ? WHERE id = ?", (version, doc_id))

    return change


def row_of(row, draft: Draft):
    if row is None:
        raise ActionError("not_found")
    return tuple(row)


async def test_a_non_finite_version_read_ahead_fails_nothing_but_its_read(setup):
    """A document whose version is a REAL infinity (INTEGER affinity keeps
    it; SQLite's JSON writes it as Inf, which is no JSON): reads of it in a
    batch, and the other jobs of that batch, go on as with a SELECT each;
    the spool does not fail."""
    _config, engine, sid = setup
    for d in ("r1", "r2"):
        await engine.record(sid, Draft("document.create"), insert_doc(d))
    await engine.record(sid, Draft("document.update"), set_version("r1", float("inf")))

    def read(doc_id: str) -> asyncio.Future:
        draft = Draft("document.access", target={"type": "document", "id": doc_id})
        return asyncio.ensure_future(
            engine.record(sid, draft, row_of, read_only=True, document=doc_id))

    futs = [read("r1"), read("r2"), asyncio.ensure_future(engine.record(sid, Draft("x.y")))]
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[0][4] == float("inf"), results
    assert results[1][4] == 1, results
    assert isinstance(results[2], str), results
    assert engine.spool.failure is None
    # and the spool still takes events
    await engine.record(sid, Draft("document.list"))


async def test_a_read_ahead_row_has_the_values_of_its_own_select(setup):
    """A REAL version (any value another process stored) is the same float
    read ahead as read by a SELECT of its own: SQLite 3.40's JSON writes a
    REAL with 15 significant digits."""
    _config, engine, sid = setup
    for d in ("r1", "r2"):
        await engine.record(sid, Draft("document.create"), insert_doc(d))
    await engine.record(sid, Draft("document.update"), set_version("r1", 0.1 + 0.2))
    alone = await engine.record(sid, Draft("document.access"), row_of, read_only=True,
                                document="r1")
    together = await asyncio.gather(*(
        engine.record(sid, Draft("document.access"), row_of, read_only=True, document=d)
        for d in ("r1", "r2")))
    assert alone[4] == 0.1 + 0.2
    assert together[0] == alone

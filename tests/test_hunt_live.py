"""Admin reads while the server writes: interleavings driven explicitly."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

import pytest
from api_fixtures import Api, Login, MakeApi, make_api, wait_for

from audit import queries
from audit.spool import connect

__all__ = ["make_api"]


async def test_a_session_begun_between_the_spool_and_the_sink_reads_is_listed_open(
    make_api: MakeApi,
) -> None:
    """A listing reads the spool, then the sink. A session that starts after
    the spool read and has a checkpoint part flushed before the sink read is
    found in the sink alone, as a session without its final part: it was
    listed "pending" (ended, API.md) with the checkpoint's event count,
    while it is open."""
    api = await make_api(audit={"part_max_events": 3, "keep_stored_seconds": 0})
    admin = await api.admin()
    await api.add_user("alice")
    sink = api.engine.sink
    real = sink.list_sessions
    began: list[str] = []

    async def between(**kwargs: Any) -> Any:
        if not began:  # after the spool read of the first listing, once
            alice = await api.login("alice")
            began.append(alice.session_id)
            for i in range(4):
                r = await api.client.post("/audit/events", json={"action": f"client.n{i}"},
                                          headers=alice.headers)
                assert r.status == 202
            await api.wait_parts_in_sink(alice.session_id, 1)
        return await real(**kwargs)

    sink.list_sessions = between  # type: ignore[method-assign]
    r = await api.client.get("/audit/sessions", headers=admin.headers)
    body = await r.json()
    assert r.status == 200, body
    (listed,) = [s for s in body["sessions"] if s["session_id"] == began[0]]
    assert listed["state"] == "open", listed
    assert listed["user"] == "alice"
    # Every event so far: session.start, token.issue and the four client events.
    assert listed["event_count"] >= 6, listed


class _PausedAfterSessions:
    """A spool read connection that, once, stops right after the query of
    ``sessions`` rows (its rows fetched) until the test lets it go on: the
    writes the test makes meanwhile land between that query and the next."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.reached, self.go = threading.Event(), threading.Event()

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def execute(self, sql: str, args: Any = ()) -> Any:
        cur = self.conn.execute(sql, args)
        if "FROM sessions WHERE" not in sql or self.reached.is_set():
            return cur
        rows = cur.fetchall()
        self.reached.set()
        assert self.go.wait(30)
        return _Rows(rows)


class _Rows(list):  # type: ignore[type-arg]
    def fetchall(self) -> list[Any]:
        return list(self)

    def fetchone(self) -> Any:
        return self[0] if self else None


async def _ended_and_purged(api: Api, who: Login) -> None:
    """``who`` logs out; the flusher takes the final part and the spool lets
    the session go (keep_stored_seconds = 0)."""
    assert (await api.client.post("/logout", headers=who.headers)).status == 200
    api.engine.flusher.flush_now()

    async def gone() -> bool:
        in_sink = api._sink("SELECT COUNT(*) FROM parts WHERE session_id = ? AND final = 1",
                            (who.session_id,))
        left = await api.engine.spool.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM sessions WHERE session_id = ?",
            (who.session_id,)).fetchone()[0])
        return bool(in_sink) and in_sink[0][0] == 1 and left == 0

    await wait_for(gone, message="the final part stored and the session purged")


@pytest.mark.parametrize("read", ["list", "detail"])
async def test_a_spool_summary_is_one_snapshot_while_the_session_ends(
    make_api: MakeApi, read: str,
) -> None:
    """The spool's summary of a session is read from its ``sessions`` row and
    from counts of its events. They were separate snapshots: a session that
    ended, was flushed and purged between them was shown open with 0 events
    (the row before, the counts after): in a listing, and as the summary of
    the detail (whose events the sink then gave, 5 of an event_count of 0)."""
    api = await make_api(audit={"keep_stored_seconds": 0})
    alice = await api.user("alice")
    for i in range(3):
        r = await api.client.post("/audit/events", json={"action": f"client.n{i}"},
                                  headers=alice.headers)
        assert r.status == 202
    conn = connect(api.config.spool_path, "normal", readonly=True)
    try:
        paused = _PausedAfterSessions(conn)
        if read == "list":
            task = asyncio.ensure_future(asyncio.to_thread(
                queries.list_sessions, paused, user="alice",  # type: ignore[arg-type]
                since=None, until=None, before=None, limit=10))
        else:
            task = asyncio.ensure_future(asyncio.to_thread(
                queries.get_session, paused, alice.session_id))  # type: ignore[arg-type]
        assert await asyncio.to_thread(paused.reached.wait, 30)
        try:
            await _ended_and_purged(api, alice)
        finally:
            paused.go.set()
        got = await task
    finally:
        conn.close()
    summary = got[0] if read == "list" else got
    assert summary is not None
    # As it was when the read began: open, with session.start, token.issue
    # and the three client events.
    assert (summary["state"], summary["event_count"]) == ("open", 5), summary
    if read == "detail":
        assert [e["seq"] for e in summary["events"]] == [1, 2, 3, 4, 5]

"""Admin reads while the server writes: interleavings driven explicitly."""

from __future__ import annotations

from typing import Any

from api_fixtures import MakeApi, make_api, wait_for

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

            async def in_sink() -> bool:
                rows = api._sink("SELECT COUNT(*) FROM parts WHERE session_id = ?",
                                 (alice.session_id,))
                return bool(rows) and rows[0][0] >= 1

            await wait_for(in_sink, message="a checkpoint part in the sink")
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

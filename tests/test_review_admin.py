"""Review findings on the admin API."""

from __future__ import annotations

import contextlib
import sqlite3

from api_fixtures import MakeApi, make_api, session_with_checkpoints_in_sink, wait_for

from sinks.base import QueryNotSupported, SinkUnavailable

__all__ = ["make_api"]


async def test_get_session_is_503_not_partial_when_the_sink_fails(make_api: MakeApi) -> None:
    """An open session whose checkpoint parts are in the sink (and no longer in
    the spool): with the sink failing, answering from the spool alone would
    silently drop those events while ``event_count`` still counts them."""
    api, admin, alice = await session_with_checkpoints_in_sink(make_api)

    async def down(session_id: str) -> list:
        raise SinkUnavailable("sqlite sink: database is locked")

    api.engine.sink.session_part_heads = down  # type: ignore[method-assign]
    r = await api.client.get(f"/audit/sessions/{alice.session_id}", headers=admin.headers)
    body = await r.json()
    assert r.status == 503, body
    assert body["error"]["code"] == "sink_unavailable"
    assert "locked" not in body["error"]["message"]  # the sink's own words stay in the log
    assert r.headers["Retry-After"] == "5"


async def test_get_session_says_when_a_sink_that_cannot_be_queried_holds_part_of_it(
    make_api: MakeApi,
) -> None:
    """Behind the http sink the checkpoint parts already sent cannot be read
    back: the answer has the rest and says it is not complete."""
    api, admin, alice = await session_with_checkpoints_in_sink(make_api)

    async def not_queryable(session_id: str) -> list:
        raise QueryNotSupported("the http sink cannot be queried")

    r = await api.client.get(f"/audit/sessions/{alice.session_id}", headers=admin.headers)
    whole = await r.json()
    assert r.status == 200 and whole["events_complete"] is True
    assert len(whole["events"]) == whole["event_count"]
    api.engine.sink.session_part_heads = not_queryable  # type: ignore[method-assign]
    r = await api.client.get(f"/audit/sessions/{alice.session_id}", headers=admin.headers)
    body = await r.json()
    assert r.status == 200 and body["events_complete"] is False
    assert body["event_count"] == whole["event_count"] > len(body["events"]) > 0
    assert [e["seq"] for e in body["events"]] == [e["seq"] for e in whole["events"]][
        -len(body["events"]):]


async def test_a_session_missing_a_part_in_the_sink_is_not_complete(make_api: MakeApi) -> None:
    api, admin, alice = await session_with_checkpoints_in_sink(make_api)
    r = await api.client.post("/logout", headers=alice.headers)
    assert r.status == 200

    async def stored() -> bool:
        return (await api.engine.status())["pending_parts"] == 0

    await wait_for(stored, message="every part in the sink")
    with contextlib.closing(sqlite3.connect(api.config.sqlite_sink_path)) as conn, conn:
        conn.execute("DELETE FROM parts WHERE session_id = ? AND part = 1", (alice.session_id,))
    r = await api.client.get(f"/audit/sessions/{alice.session_id}", headers=admin.headers)
    body = await r.json()
    assert r.status == 200 and body["events_complete"] is False

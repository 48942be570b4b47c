"""Review findings on the admin API."""

from __future__ import annotations

from api_fixtures import MakeApi, make_api, wait_for

from sinks.base import SinkUnavailable

__all__ = ["make_api"]


async def test_get_session_is_503_not_partial_when_the_sink_fails(make_api: MakeApi) -> None:
    """An open session whose checkpoint parts are in the sink (and no longer in
    the spool): with the sink failing, answering from the spool alone would
    silently drop those events while ``event_count`` still counts them."""
    api = await make_api(audit={"part_max_events": 3, "keep_stored_seconds": 0})
    admin = await api.admin()
    alice = await api.user("alice")
    for i in range(8):
        r = await api.client.post("/audit/events", json={"action": f"client.n{i}"},
                                  headers=alice.headers)
        assert r.status == 202

    async def parts_in_sink() -> bool:
        rows = api._sink("SELECT COUNT(*) FROM parts WHERE session_id = ?",
                         (alice.session_id,))
        return bool(rows) and rows[0][0] >= 3

    await wait_for(parts_in_sink, message="checkpoint parts in the sink")

    async def down(session_id: str) -> list:
        raise SinkUnavailable("sqlite sink: database is locked")

    api.engine.sink.get_session_parts = down  # type: ignore[method-assign]
    r = await api.client.get(f"/audit/sessions/{alice.session_id}", headers=admin.headers)
    body = await r.json()
    assert r.status == 503, body
    assert body["error"]["code"] == "sink_unavailable"

"""The admin listings (audit/queries.py, handlers/admin.py): behaviour that
mutation testing found unpinned by the other admin tests."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from api_fixtures import (
    Api,
    Login,
    MakeApi,
    api,
    expect_error,
    make_api,
    session_with_checkpoints_in_sink,
    wait_for,
)
from receiver import sample_part, sample_security_event

__all__ = ["api", "make_api"]


async def _get(api: Api, who: Login, path: str, **params: str) -> dict[str, Any]:
    resp = await api.client.get(path, params=params, headers=who.headers)
    body: dict[str, Any] = await resp.json()
    assert resp.status == 200, body
    return body


async def test_a_listing_without_a_limit_pages_by_50(api: Api) -> None:
    """openapi.yaml: the page size is 50 when no limit (or an empty one) is
    given; 51 stored sessions and 51 security events take two pages."""
    admin = await api.admin()
    for i in range(51):
        await api.engine.sink.write_part(
            sample_part(f"{i:032x}", user="dora", start=f"2025-01-01T00:00:{i:02d}.000Z"))
    await api.engine.sink.write_security_events(
        [sample_security_event(f"e{i:02d}", ts=f"2025-01-01T00:00:{i:02d}.000Z")
         for i in range(51)])
    for path, items, params in (("/audit/sessions", "sessions", {"user": "dora"}),
                                ("/audit/security-events", "events", {})):
        for limit in ({}, {"limit": ""}):
            first = await _get(api, admin, path, **params, **limit)
            assert len(first[items]) == 50 and first["next_cursor"], (path, limit)
            rest = await _get(api, admin, path, **params, cursor=first["next_cursor"])
            assert len(rest[items]) == 1 and rest["next_cursor"] is None, path


async def test_an_open_session_with_parts_in_the_sink_is_listed_as_the_spool_has_it(
    make_api: MakeApi,
) -> None:
    """Without a state filter the sink answers with the session's stored
    checkpoint parts too; the listing shows the spool's summary (open, every
    event counted), as the session's own page does, not the sink's."""
    api, admin, alice = await session_with_checkpoints_in_sink(make_api)
    (listed,) = (await _get(api, admin, "/audit/sessions", user="alice"))["sessions"]
    detail = await _get(api, admin, f"/audit/sessions/{alice.session_id}")
    assert listed["state"] == "open"
    assert listed == {k: v for k, v in detail.items() if k not in ("events", "events_complete")}
    assert listed["event_count"] == len(detail["events"])


async def test_paging_ends_over_sink_rows_whose_documents_moved_past_whole_reads(
    make_api: MakeApi,
) -> None:
    """The embedded sink pages by its columns, the listing by the documents'
    fields. Rows whose documents another writer moved later fill a
    request's reads with sessions it already listed. A page that reads
    nothing new ends the listing: with a state filter it must not hand back
    the cursor it was given (a client paging to the end asked for the same
    page forever), without one it must not be a 500 (no last session to
    make a cursor of)."""
    api = await make_api()
    admin = await api.admin()
    ts = "2026-11-26T14:00:0{}.000Z".format
    for i in range(5):
        await api.engine.sink.write_part(sample_part(f"{i}" * 32, start=ts(i)))
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        for i in (1, 2, 3):
            db.execute("UPDATE parts SET doc = json_set(doc, '$.session_start_time', ?)"
                       " WHERE session_id = ?", (ts(9), f"{i}" * 32))
    finally:
        db.close()
    for state in ("stored", ""):
        cursors: list[str] = []
        listed: list[str] = []
        cursor: str | None = ""
        while cursor is not None:
            assert len(cursors) < 10, (state, listed, cursors)
            params = {"state": state, "limit": "1"} | ({"cursor": cursor} if cursor else {})
            body = await _get(api, admin, "/audit/sessions", **params)
            listed += [s["session_id"] for s in body["sessions"]]
            cursors.append(cursor)
            cursor = body["next_cursor"]
            assert cursor not in cursors, (state, "the same page again", listed)
        assert len(listed) == len(set(listed)), (state, listed)


async def _assert_read_whole(api: Api, admin: Login, alice: Login, count: int) -> None:
    """alice's open session, read by the admin: every event once, in order."""
    detail = await _get(api, admin, f"/audit/sessions/{alice.session_id}")
    assert detail["state"] == "open" and detail["event_count"] == count
    assert [e["seq"] for e in detail["events"]] == list(range(1, count + 1))
    assert detail["events_complete"] is True


async def _alice_with_events(api: Api, total: int) -> Login:
    """alice logged in (2 events) with client events up to ``total``."""
    alice = await api.user("alice")
    for i in range(total - 2):
        r = await api.client.post("/audit/events", json={"action": f"client.n{i}"},
                                  headers=alice.headers)
        assert r.status == 202
    return alice


async def test_an_open_session_whose_cut_parts_the_spool_keeps_is_read_whole(
    make_api: MakeApi,
) -> None:
    """Checkpoint parts the spool still holds (kept after the sink took
    them) and the uncut events after them: each event once, in seq order,
    the uncut ones read from just past the last cut one."""
    api = await make_api(audit={"part_max_events": 3, "keep_stored_seconds": 3600})
    admin = await api.admin()
    alice = await _alice_with_events(api, 10)
    await _assert_read_whole(api, admin, alice, 10)


async def test_an_open_session_whose_every_event_is_in_the_sink_is_read_whole(
    make_api: MakeApi,
) -> None:
    """An open session cut at a time checkpoint with no event since, its
    parts stored and dropped from the spool: the spool holds none of its
    events (the plan's highest seq is none), the sink all of them."""
    api = await make_api(audit={"part_max_events": 3, "keep_stored_seconds": 0})
    admin = await api.admin()
    alice = await _alice_with_events(api, 9)
    # What the engine's checkpoint_seconds timer submits.
    assert await api.engine.spool.submit(lambda w: w.checkpoint(alice.session_id))
    await api.wait_parts_in_sink(alice.session_id, 3)

    async def dropped() -> bool:
        held = await api.engine.spool.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM events WHERE session_id = ?", (alice.session_id,)
        ).fetchone()[0])
        return held == 0

    await wait_for(dropped, message="alice's stored parts dropped from the spool")
    await _assert_read_whole(api, admin, alice, 9)


async def test_a_session_of_checkpoint_parts_only_the_sink_holds_is_not_complete(
    api: Api,
) -> None:
    """A session this spool does not know (another server's, sharing the
    sink) of which the sink holds no final part: its events so far, and
    ``events_complete`` false, though they are all its summary counts."""
    admin = await api.admin()
    sid = "c" * 32
    await api.engine.sink.write_part(sample_part(sid, final=False, events=2))
    detail = await _get(api, admin, f"/audit/sessions/{sid}")
    assert detail["state"] == "pending" and detail["event_count"] == 2
    assert [e["seq"] for e in detail["events"]] == [1, 2]
    assert detail["events_complete"] is False


@pytest.mark.parametrize("path", ["/audit/sessions", "/audit/security-events"])
@pytest.mark.parametrize("query", ["limit=5&limit=6", "limit=0", "bogus=1"])
async def test_a_non_admin_is_refused_before_the_parameters_are_read(
    api: Api, path: str, query: str
) -> None:
    """The role is checked first: a non-admin's malformed or repeated
    parameters are 403 forbidden with admin.denied recorded, not a 400
    telling them how to shape a query they may not make."""
    alice = await api.user("alice")
    resp = await api.client.get(f"{path}?{query}", headers=alice.headers)
    await expect_error(resp, 403, "forbidden")
    (ev,) = await api.wait_security("admin.denied")
    assert ev["session_id"] == alice.session_id and ev["details"]["endpoint"] == path

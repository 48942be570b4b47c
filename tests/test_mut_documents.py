"""Mutation review of handlers/documents.py and handlers/events.py (all but
who may see what): what an update changes and records, the listing's order,
the title counted in characters, a delete recorded once, and client events'
details measured as their canonical JSON in UTF-8 and checked whole (API.md,
openapi.yaml). Each test kills mutants the suite let pass."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import pytest
from api_fixtures import Api, api, expect_error, make_api
from test_api_events import nested

from audit.events import format_ts

__all__ = ["api", "make_api"]


async def _next_ms(after: str) -> None:
    """Until the clock's millisecond (as format_ts writes it) is past ``after``."""
    for _ in range(1000):
        if format_ts(time.time()) > after:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the clock did not move in a second")


async def test_an_update_changes_what_it_names_and_moves_updated_at(api: Api) -> None:
    """Only the fields sent change; created_at stays, updated_at moves (in the
    answer, in a later read, in the listing); a PUT naming neither title nor
    content is still an update at version + 1, and the event names the fields."""
    alice = await api.user("alice")
    doc = await api.create_doc(alice, title="Notes", content="Body text.")
    await _next_ms(doc["created_at"])
    url = f"/documents/{doc['id']}"
    resp = await api.client.put(url, json={"title": "Renamed"}, headers=alice.headers)
    updated = await resp.json()
    assert resp.status == 200, updated
    assert (updated["title"], updated["content"], updated["version"]) == (
        "Renamed", "Body text.", 2)
    assert updated["created_at"] == doc["created_at"]
    assert updated["updated_at"] > doc["updated_at"]
    ev = (await api.events(alice.session_id))[-1]
    assert (ev["action"], ev["outcome"], ev["details"]) == (
        "document.update", "success", {"version": 2, "fields": ["title"]})
    resp = await api.client.get(url, headers=alice.headers)
    assert await resp.json() == updated
    resp = await api.client.get("/documents", headers=alice.headers)
    (listed,) = (await resp.json())["documents"]
    assert (listed["version"], listed["updated_at"]) == (2, updated["updated_at"])

    for body, version in (({}, 3), ({"version": 3}, 4)):
        resp = await api.client.put(url, json=body, headers=alice.headers)
        got = await resp.json()
        assert resp.status == 200, got
        assert (got["title"], got["content"], got["version"]) == ("Renamed", "Body text.",
                                                                  version)
        ev = (await api.events(alice.session_id))[-1]
        assert ev["details"] == {"version": version, "fields": []}
    assert api.documents_in_db() == [(doc["id"], "Renamed", "Body text.", "alice", 4)]


async def test_an_update_under_a_clock_stepped_back_is_not_dated_before_the_last(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock stepped back an hour (NTP) between two updates: the
    second is dated no earlier than the first (it was an hour before it, and
    before the document's creation), and stays first in the listing."""
    from types import SimpleNamespace

    from handlers import documents

    alice = await api.user("alice")
    doc = await api.create_doc(alice, title="Notes", content="Body text.")
    other = await api.create_doc(alice, title="Other", content="x")
    url = f"/documents/{doc['id']}"
    first = await (await api.client.put(url, json={"content": "one"},
                                        headers=alice.headers)).json()
    monkeypatch.setattr(documents, "time", SimpleNamespace(time=lambda: time.time() - 3600))
    resp = await api.client.put(url, json={"content": "two"}, headers=alice.headers)
    assert resp.status == 200
    second = await resp.json()
    assert second["version"] == 3
    assert second["updated_at"] >= first["updated_at"] >= doc["created_at"]
    listed = await (await api.client.get("/documents", headers=alice.headers)).json()
    assert [d["id"] for d in listed["documents"]][:2] == [doc["id"], other["id"]]


async def test_the_listing_is_most_recently_updated_first(api: Api) -> None:
    """openapi.yaml: "Documents, most recently updated first"."""
    alice = await api.user("alice")
    a = await api.create_doc(alice, title="a")
    await _next_ms(a["updated_at"])
    b = await api.create_doc(alice, title="b")

    async def listed() -> list[str]:
        resp = await api.client.get("/documents", headers=alice.headers)
        return [d["id"] for d in (await resp.json())["documents"]]

    assert await listed() == [b["id"], a["id"]]
    await _next_ms(b["updated_at"])
    resp = await api.client.put(f"/documents/{a['id']}", json={"content": "new"},
                                headers=alice.headers)
    assert resp.status == 200
    assert await listed() == [a["id"], b["id"]]


async def test_a_title_is_counted_in_characters_not_bytes(api: Api) -> None:
    alice = await api.user("alice")
    for title in ("é" * 200, "\U0001f600" * 200):  # 400 and 800 bytes as UTF-8
        doc = await api.create_doc(alice, title=title, content="ç")
        assert doc["title"] == title
        ev = (await api.events(alice.session_id))[-1]
        assert ev["details"] == {"title_length": 200, "content_bytes": 2}
        resp = await api.client.put(f"/documents/{doc['id']}", json={"title": title[::-1]},
                                    headers=alice.headers)
        assert resp.status == 200
    resp = await api.client.post("/documents", json={"title": "\U0001f600" * 201,
                                                     "content": "c"}, headers=alice.headers)
    await expect_error(resp, 400, "invalid_request")
    ev = (await api.events(alice.session_id))[-1]
    assert (ev["action"], ev["outcome"], ev["details"]) == (
        "document.create", "failure", {"reason": "invalid_request"})


async def test_create_takes_no_version(api: Api) -> None:
    alice = await api.user("alice")
    resp = await api.client.post("/documents", json={"title": "t", "content": "c",
                                                     "version": 1}, headers=alice.headers)
    await expect_error(resp, 400, "invalid_request")
    assert api.documents_in_db() == []


async def test_a_deleted_document_is_gone_and_its_delete_recorded_once(api: Api) -> None:
    alice = await api.user("alice")
    doc = await api.create_doc(alice)
    url = f"/documents/{doc['id']}"
    resp = await api.client.delete(url, headers=alice.headers)
    assert resp.status == 204
    for method, body in (("DELETE", None), ("PUT", {"title": "back", "version": 1}),
                         ("GET", None)):
        resp = await api.client.request(method, url, json=body, headers=alice.headers)
        await expect_error(resp, 404, "not_found")
    events = [e for e in await api.events(alice.session_id)
              if e["action"] in ("document.delete", "document.update", "document.access")]
    assert [(e["action"], e["outcome"], e["details"].get("reason")) for e in events] == [
        ("document.delete", "success", None),
        ("document.delete", "failure", "not_found"),
        ("document.update", "failure", "not_found"),
        ("document.access", "failure", "not_found"),
    ]
    assert all(e["target"] == {"type": "document", "id": doc["id"]} for e in events)
    assert api.documents_in_db() == []


def _details(n: int) -> dict[str, str]:
    """Details whose canonical JSON is 8 + 2n bytes as UTF-8 (n characters)."""
    return {"k": "é" * n}


async def test_client_details_are_measured_as_canonical_json_in_utf8(api: Api) -> None:
    """4 KiB of details is 4096 bytes of their JSON as stored (sorted keys,
    no spaces, UTF-8), whatever escapes and spaces the client's JSON had:
    2044 "é" are 4096 bytes (accepted, sent as \\u00e9 with indents), 2045
    are 4098 (refused, though only 2053 characters)."""
    alice = await api.user("alice")
    sent = json.dumps({"action": "client.fits", "details": _details(2044)}, indent=4)
    assert len(sent) > 4096 * 3
    resp = await api.client.post("/audit/events", data=io.BytesIO(sent.encode()),
                                 headers={**alice.headers, "Content-Type": "application/json"})
    assert resp.status == 202, await resp.text()
    ev = (await api.events(alice.session_id))[-1]
    assert (ev["action"], ev["details"]) == ("client.fits", _details(2044))

    resp = await api.client.post("/audit/events", json=[
        {"action": "client.ok"}, {"action": "client.over", "details": _details(2045)}],
        headers={**alice.headers, "X-Request-ID": "over"})
    await expect_error(resp, 400, "invalid_request")
    events = await api.events(alice.session_id)
    assert [e["action"] for e in events][-2:] == ["client.fits", "client.rejected"]
    assert (events[-1]["outcome"], events[-1]["request_id"], events[-1]["details"]) == (
        "failure", "over", {"reason": "invalid_request"})


async def test_client_event_null_target_and_details_are_none(api: Api) -> None:
    alice = await api.user("alice")
    resp = await api.client.post("/audit/events", json=[
        {"action": "client.a", "target": None, "details": None},
        {"action": "client.b", "target": {"type": "t" * 128, "id": "i" * 128}}],
        headers=alice.headers)
    assert resp.status == 202
    assert await resp.json() == {"accepted": 2}
    a, b = (await api.events(alice.session_id))[-2:]
    assert (a["action"], a["target"], a["details"]) == ("client.a", None, {})
    assert (b["action"], b["target"]) == ("client.b", {"type": "t" * 128, "id": "i" * 128})


@pytest.mark.parametrize("target", [
    {"type": "t" * 129, "id": "i"}, {"type": "t", "id": "i" * 129},
    {"type": "", "id": "i"}, {"type": "t", "id": ""},
    {"type": "t", "id": "i", "owner": "bob"},
])
async def test_client_event_target_shape(api: Api, target: dict[str, Any]) -> None:
    alice = await api.user("alice")
    resp = await api.client.post("/audit/events", json={"action": "client.a", "target": target},
                                 headers=alice.headers)
    await expect_error(resp, 400, "invalid_request")
    ev = (await api.events(alice.session_id))[-1]
    assert (ev["action"], ev["outcome"], ev["target"]) == ("client.rejected", "failure", None)



@pytest.mark.parametrize(("details", "why"), [
    ({"$x": {"y": 1}}, "'$'"),
    ({"a": {"x": 1}, "b": {"$ref": "orders", "$id": 1}}, "'$'"),
    ({"a": [], "b": nested(32)}, "32 levels"),  # 33 levels, beside a shallow list
    ({"a": {"$ref": "orders"}, "z": 1}, "'$'"),  # beside a number
    ({"a": nested(32), "z": "s"}, "32 levels"),
])
async def test_client_details_are_checked_whole(
    api: Api, details: dict[str, Any], why: str
) -> None:
    """A '$' key or a depth past 32 levels anywhere in the details refuses
    them, whatever else they hold (here: siblings looked at after it)."""
    alice = await api.user("alice")
    resp = await api.client.post("/audit/events", json={"action": "client.d", "details": details},
                                 headers=alice.headers)
    body = await expect_error(resp, 400, "invalid_request")
    assert why in body["error"]["message"]
    ev = (await api.events(alice.session_id))[-1]
    assert (ev["action"], ev["outcome"], ev["details"]) == (
        "client.rejected", "failure", {"reason": "invalid_request"})


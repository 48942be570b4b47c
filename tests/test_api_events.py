"""POST /audit/events: client events join the caller's own session (API.md)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from api_fixtures import EVENT_KEYS, Api, api, expect_error, make_api

__all__ = ["api", "make_api"]


async def test_single_event_joins_the_session(api: Api) -> None:
    alice = await api.user("alice")
    resp = await api.client.post(
        "/audit/events",
        json={"action": "client.page_view", "target": {"type": "page", "id": "/home"},
              "details": {"ms": 12}},
        headers={**alice.headers, "X-Request-ID": "client-1"})
    assert resp.status == 202
    assert await resp.json() == {"accepted": 1}
    events = await api.events(alice.session_id)
    assert [e["seq"] for e in events] == [1, 2, 3]
    ev = events[-1]
    assert set(ev) == EVENT_KEYS
    assert ev["action"] == "client.page_view" and ev["outcome"] == "success"
    assert ev["session_id"] == alice.session_id
    assert ev["actor"] == {"user": "alice", "role": "user"}
    assert ev["target"] == {"type": "page", "id": "/home"}
    assert ev["details"] == {"ms": 12}
    assert ev["request_id"] == "client-1"


async def test_list_of_events_and_seq_continues(api: Api) -> None:
    alice = await api.user("alice")
    await api.client.get("/documents", headers=alice.headers)
    batch = [{"action": f"client.step.{i}"} for i in range(100)]
    resp = await api.client.post("/audit/events", json=batch, headers=alice.headers)
    assert resp.status == 202
    assert await resp.json() == {"accepted": 100}
    await api.client.get("/documents", headers=alice.headers)
    events = await api.events(alice.session_id)
    assert [e["seq"] for e in events] == list(range(1, 105))
    assert [e["action"] for e in events[3:103]] == [f"client.step.{i}" for i in range(100)]
    assert events[-1]["action"] == "document.list"
    for e in events[3:103]:
        assert e["target"] is None and e["details"] == {}
    resp = await api.client.post("/logout", headers=alice.headers)
    assert (await resp.json())["event_count"] == 105


# client.rejected too: it matches API.md's pattern. The server's own record
# of a refused request has that name as well, with outcome "failure" and
# details.reason; a client's is a "success" with the client's details.
OK_ACTIONS = ["client.a", "client.x_y-z:1.2", "client." + "a" * 64, "client.rejected"]
BAD = [
    ({"action": "document.access"}, "not client"),
    ({"action": "client."}, "empty name"),
    ({"action": "client.Click"}, "uppercase"),
    ({"action": "client." + "a" * 65}, "too long"),
    ({"action": "client.a b"}, "space"),
    ({"action": "client.a\n"}, "newline"),
    ({"action": "Client.a"}, "prefix case"),
    ({"action": 7}, "not a string"),
    ({}, "missing action"),
    ({"action": "client.a", "details": "x"}, "details not an object"),
    ({"action": "client.a", "details": ["x"]}, "details a list"),
    ({"action": "client.a", "details": {"k": "v" * 4096}}, "details over 4 KiB"),
    ({"action": "client.a", "target": "doc"}, "target not an object"),
    ({"action": "client.a", "target": {"type": "doc"}}, "target without id"),
    ({"action": "client.a", "target": {"type": "doc", "id": 5}}, "target id not string"),
    ({"action": "client.a", "outcome": "failure"}, "unknown field"),
    ({"action": "client.a", "session_id": "0" * 32}, "no writing into other sessions"),
    ([{"action": "client.a"}] * 101, "101 events"),
    ([], "empty list"),
    ([{"action": "client.a"}, {"action": "bad"}], "one bad in a list"),
    ("client.a", "a string"),
]


@pytest.mark.parametrize("action", OK_ACTIONS)
async def test_action_names_accepted(api: Api, action: str) -> None:
    alice = await api.user("alice")
    resp = await api.client.post("/audit/events", json={"action": action}, headers=alice.headers)
    assert resp.status == 202
    ev = (await api.events(alice.session_id))[-1]
    assert (ev["action"], ev["outcome"], ev["details"]) == (action, "success", {})


@pytest.mark.parametrize(("body", "why"), BAD, ids=[b[1] for b in BAD])
async def test_bad_client_events_are_refused_whole(api: Api, body: Any, why: str) -> None:
    """None of the request's events is recorded; the refused attempt is."""
    alice = await api.user("alice")
    resp = await api.client.post("/audit/events", json=body,
                                 headers={**alice.headers, "X-Request-ID": "bad-1"})
    await expect_error(resp, 400, "invalid_request")
    events = await api.events(alice.session_id)
    assert [e["action"] for e in events] == ["session.start", "token.issue", "client.rejected"]
    ev = events[-1]
    assert (ev["outcome"], ev["request_id"], ev["target"]) == ("failure", "bad-1", None)
    assert ev["details"] == {"reason": "invalid_request"}


def nested(levels: int) -> Any:
    """Objects and arrays in turn, ``levels`` deep, an object outermost."""
    value: Any = 1
    for i in range(levels):
        value = {"n": value} if (levels - i) % 2 else [value]
    return value


async def test_details_nested_at_most_32_levels(api: Api) -> None:
    """MongoDB refuses documents nested deeper than 100 levels, and would
    refuse the whole part holding such an event (a few hundred bytes)."""
    alice = await api.user("alice")
    resp = await api.client.post("/audit/events", json={"action": "client.deep",
                                                        "details": nested(32)},
                                 headers=alice.headers)
    assert resp.status == 202
    assert (await api.events(alice.session_id))[-1]["details"] == nested(32)
    resp = await api.client.post("/audit/events", json={"action": "client.deep",
                                                        "details": nested(33)},
                                 headers=alice.headers)
    body = await expect_error(resp, 400, "invalid_request")
    assert "32 levels" in body["error"]["message"]
    assert (await api.actions(alice.session_id))[-1] == "client.rejected"


async def test_details_up_to_4_kib(api: Api) -> None:
    alice = await api.user("alice")
    details = {"k": "v" * 4000}
    assert len(json.dumps(details, separators=(",", ":"))) <= 4096
    resp = await api.client.post("/audit/events", json={"action": "client.big",
                                                        "details": details},
                                 headers=alice.headers)
    assert resp.status == 202
    assert (await api.events(alice.session_id))[-1]["details"] == details


async def test_malformed_and_unauthenticated(api: Api) -> None:
    alice = await api.user("alice")
    resp = await api.client.post("/audit/events", data=b"[{",
                                 headers={**alice.headers, "Content-Type": "application/json"})
    await expect_error(resp, 400, "invalid_json")
    ev = (await api.events(alice.session_id))[-1]
    assert (ev["action"], ev["outcome"], ev["details"]["reason"]) == (
        "client.rejected", "failure", "invalid_json")
    resp = await api.client.post("/audit/events", json={"action": "client.a"})
    await expect_error(resp, 401, "missing_token")


async def test_too_large_body_is_refused_and_recorded(api: Api) -> None:
    from server import CLIENT_MAX_SIZE

    alice = await api.user("alice")
    body = json.dumps({"action": "client.a", "details": {"k": "v" * CLIENT_MAX_SIZE}})
    resp = await api.client.post("/audit/events", data=io.BytesIO(body.encode()),
                                 headers={**alice.headers, "Content-Type": "application/json"})
    await expect_error(resp, 413, "too_large")
    ev = (await api.events(alice.session_id))[-1]
    assert (ev["action"], ev["outcome"], ev["details"]["reason"]) == (
        "client.rejected", "failure", "too_large")

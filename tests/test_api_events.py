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


# Mutation review (handlers/events.py): the bounds and the walk of details.

TARGET_OK = [{"type": "t", "id": "i"}, {"type": "t" * 128, "id": "i" * 128}]
TARGET_BAD = [{"type": "", "id": "i"}, {"type": "t", "id": ""},
              {"type": "t" * 129, "id": "i"}, {"type": "t", "id": "i" * 129},
              {"type": "t", "id": "i", "extra": "x"}]


async def test_target_fields_of_1_to_128_characters(api: Api) -> None:
    alice = await api.user("alice")
    for target in TARGET_OK:
        resp = await api.client.post("/audit/events", json={"action": "client.t",
                                                            "target": target},
                                     headers=alice.headers)
        assert resp.status == 202, target
        assert (await api.events(alice.session_id))[-1]["target"] == target
    for target in TARGET_BAD:
        resp = await api.client.post("/audit/events", json={"action": "client.t",
                                                            "target": target},
                                     headers=alice.headers)
        body = await expect_error(resp, 400, "invalid_request")
        assert "target" in body["error"]["message"], target
    assert (await api.actions(alice.session_id))[2:] == (
        ["client.t"] * len(TARGET_OK) + ["client.rejected"] * len(TARGET_BAD))


async def test_null_target_and_details_are_none_and_empty(api: Api) -> None:
    alice = await api.user("alice")
    resp = await api.client.post("/audit/events", json={"action": "client.n", "target": None,
                                                        "details": None},
                                 headers=alice.headers)
    assert resp.status == 202
    ev = (await api.events(alice.session_id))[-1]
    assert (ev["action"], ev["target"], ev["details"]) == ("client.n", None, {})


async def test_details_of_exactly_4096_bytes_as_json(api: Api) -> None:
    """The 4 KiB of API.md counts the details' canonical JSON in UTF-8 bytes:
    4096 is taken, 4097 is not (``{"k":"…"}`` is 8 bytes around the value;
    "é" is 2 bytes)."""
    alice = await api.user("alice")
    for details, status in (({"k": "v" * 4088}, 202), ({"k": "é" * 2044}, 202),
                            ({"k": "v" * 4089}, 400), ({"k": "é" * 2044 + "v"}, 400)):
        resp = await api.client.post("/audit/events", json={"action": "client.big",
                                                            "details": details},
                                     headers=alice.headers)
        assert resp.status == status, (len(details["k"]), await resp.text())
    assert (await api.actions(alice.session_id))[2:] == ["client.big"] * 2 + [
        "client.rejected"] * 2


async def test_every_branch_of_details_is_walked(api: Api) -> None:
    """A scalar met first does not end the walk: a deep value or a '$' key
    after it (in the walk's order) is still found, in objects and arrays."""
    alice = await api.user("alice")
    for details, why in (({"a": nested(32), "z": 1}, "32 levels"),
                         ({"a": ["x", nested(31)]}, "32 levels"),
                         ({"a": {"$ref": "orders"}, "z": 1}, "'$'"),
                         ({"a": [{"b": {"$id": 1}}, 2]}, "'$'")):
        resp = await api.client.post("/audit/events", json={"action": "client.walk",
                                                            "details": details},
                                     headers=alice.headers)
        body = await expect_error(resp, 400, "invalid_request")
        assert why in body["error"]["message"], details
    assert (await api.actions(alice.session_id))[2:] == ["client.rejected"] * 4


async def test_a_bad_event_in_a_list_is_named_by_its_index(api: Api) -> None:
    alice = await api.user("alice")
    resp = await api.client.post("/audit/events",
                                 json=[{"action": "client.a"}, {"action": "client.b"}, 7],
                                 headers=alice.headers)
    body = await expect_error(resp, 400, "invalid_request")
    assert body["error"]["message"].startswith("event 2: ")


async def test_a_body_over_4_mib_is_too_large_before_it_is_parsed(api: Api) -> None:
    """The route's own limit (100 events of 4 KiB with room for escapes), not
    the server's 8 MiB: 413, recorded."""
    alice = await api.user("alice")
    body = json.dumps([{"action": "client.a", "details": {"k": "v" * 4000}}] * 1100).encode()
    assert 4 * 1024 * 1024 < len(body) < 8 * 1024 * 1024
    resp = await api.client.post("/audit/events", data=io.BytesIO(body),
                                 headers={**alice.headers, "Content-Type": "application/json"})
    await expect_error(resp, 413, "too_large")
    ev = (await api.events(alice.session_id))[-1]
    assert (ev["action"], ev["outcome"], ev["details"]) == (
        "client.rejected", "failure", {"reason": "too_large"})


async def test_events_join_only_the_callers_own_session(api: Api) -> None:
    """bob cannot write into alice's session: naming it is 403
    session_mismatch (a security event), nothing lands in it; his own
    events are his, with his actor."""
    alice = await api.user("alice")
    bob = await api.user("bob")
    resp = await api.client.post("/audit/events", json={"action": "client.forged"},
                                 headers={**bob.headers,
                                          "X-Audit-Session-ID": alice.session_id})
    await expect_error(resp, 403, "session_mismatch")
    resp = await api.client.post("/audit/events", json={"action": "client.mine"},
                                 headers={**bob.headers, "X-Audit-Session-ID": bob.session_id})
    assert resp.status == 202
    assert await api.actions(alice.session_id) == ["session.start", "token.issue"]
    ev = (await api.events(bob.session_id))[-1]
    assert (ev["action"], ev["actor"], ev["session_id"]) == (
        "client.mine", {"user": "bob", "role": "user"}, bob.session_id)
    (mismatch,) = await api.security("auth.session_mismatch")
    assert mismatch["actor"]["user"] == "bob"

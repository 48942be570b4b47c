"""Audit administration: 403 for non-admins, sessions, security events, status, flush."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest
from api_fixtures import (
    EVENT_KEYS,
    TS_RE,
    Api,
    Login,
    MakeApi,
    api,
    expect_error,
    logged_out_while_held,
    make_api,
    session_with_checkpoints_in_sink,
    wait_for,
)
from live_server import free_port
from receiver import sample_part, sample_security_event

from audit.events import Draft, format_ts, parse_ts
from audit.store import Writer
from sinks.base import encode_cursor

__all__ = ["api", "make_api"]

SUMMARY_KEYS = {"session_id", "user", "state", "session_start_time", "session_end_time",
                "session_duration_seconds", "event_count", "seal_reason", "parts"}
ADMIN_ENDPOINTS = [
    ("GET", "/audit/sessions"),
    ("GET", "/audit/sessions/0123456789abcdef0123456789abcdef"),
    ("GET", "/audit/security-events"),
    ("GET", "/audit/status"),
    ("POST", "/audit/flush"),
]


async def _get(api: Api, who: Login, path: str, **params: Any) -> dict[str, Any]:
    resp = await api.client.get(path, params=params, headers=who.headers)
    body: dict[str, Any] = await resp.json()
    assert resp.status == 200, body
    return body


async def _session_state(api: Api, admin: Login, sid: str) -> str:
    return str((await _get(api, admin, f"/audit/sessions/{sid}"))["state"])


@pytest.mark.parametrize(("method", "path"), ADMIN_ENDPOINTS)
async def test_non_admin_is_forbidden_and_recorded(api: Api, method: str, path: str) -> None:
    alice = await api.user("alice")
    resp = await api.client.request(method, path, headers={**alice.headers,
                                                           "X-Request-ID": "peek"})
    await expect_error(resp, 403, "forbidden")
    (ev,) = await api.wait_security("admin.denied")
    assert ev["session_id"] == alice.session_id
    assert ev["actor"] == {"user": "alice", "role": "user"}
    assert ev["outcome"] == "denied" and ev["request_id"] == "peek"
    assert ev["details"]["reason"] == "not_admin"
    assert ev["details"]["endpoint"] == path
    # An attempted audited action: its event too, with outcome denied (API.md,
    # "What gets recorded"), as for a document of somebody else.
    (q,) = [e for e in await api.events(alice.session_id) if e["action"] == "audit.query"]
    assert (q["outcome"], q["details"]["reason"], q["request_id"]) == ("denied", "not_admin",
                                                                         "peek")


async def test_parameter_names_are_recorded_as_every_sink_reads_them_back(api: Api) -> None:
    """A non-admin's parameter names go into a security event: {"$ref", "$id"}
    would come back from MongoDB as a reference (the listing a 500, verify a
    false alarm); a NUL cannot be stored at all."""
    alice = await api.user("alice")
    resp = await api.client.get("/audit/security-events?$ref=orders&$id=1&a%00b=2",
                                headers={**alice.headers, "X-Request-ID": "refs"})
    await expect_error(resp, 403, "forbidden")
    (ev,) = await api.wait_security("admin.denied")
    assert ev["details"]["query"] == {"\uff04ref": "orders", "\uff04id": "1", "a\ufffdb": "2"}


async def test_audit_query_records_the_outcome_of_the_query(api: Api) -> None:
    """audit.query is recorded once the answer is known: a 404 or a 400 is a
    failure with the error code as reason, not a success."""
    admin = await api.admin()
    cases = [
        ("/audit/sessions/" + "0" * 32, 404, "not_found"),
        ("/audit/sessions?limit=0", 400, "invalid_request"),
        ("/audit/sessions?state=bogus", 400, "invalid_request"),
        ("/audit/security-events?bogus=1", 400, "invalid_request"),
        ("/audit/sessions?limit=2", 200, None),
    ]
    for i, (path, status, code) in enumerate(cases):
        rid = f"q{i}"
        resp = await api.client.get(path, headers={**admin.headers, "X-Request-ID": rid})
        assert resp.status == status, (path, await resp.text())
        (ev,) = [e for e in await api.events(admin.session_id)
                 if e["action"] == "audit.query" and e["request_id"] == rid]
        if code is None:
            assert ev["outcome"] == "success" and "reason" not in ev["details"]
        else:
            assert (ev["outcome"], ev["details"]["reason"]) == ("failure", code), path


async def test_a_repeated_parameter_is_refused_and_the_record_names_what_was_used(
    api: Api,
) -> None:
    """The record of a query must name the filters the query used: with two
    values of one parameter it could name the one not used (a lookup of
    user=victim recorded as user=admin). A repeated parameter is 400."""
    admin = await api.admin()
    resp = await api.client.get(
        "/audit/sessions?user=victim&limit=5&user=admin",
        headers={**admin.headers, "X-Request-ID": "twice"})
    await expect_error(resp, 400, "invalid_request")
    assert "'user'" in (await resp.json())["error"]["message"]
    resp = await api.client.get(
        "/audit/sessions?user=victim&limit=5",
        headers={**admin.headers, "X-Request-ID": "once"})
    assert resp.status == 200
    queries = {e["request_id"]: e for e in await api.events(admin.session_id)
               if e["action"] == "audit.query"}
    twice, once = queries["twice"], queries["once"]
    assert (twice["outcome"], twice["details"]["reason"]) == ("failure", "invalid_request")
    assert twice["details"]["query"] == {"user": "victim", "limit": "5"}
    assert once["outcome"] == "success"
    assert once["details"]["query"] == {"user": "victim", "limit": "5"}


@pytest.mark.parametrize(("method", "path"), ADMIN_ENDPOINTS)
async def test_admin_endpoints_need_a_token(api: Api, method: str, path: str) -> None:
    resp = await api.client.request(method, path)
    await expect_error(resp, 401, "missing_token")


async def test_sessions_states_open_pending_stored(make_api: MakeApi) -> None:
    # One sink write per 100 s after the first: the second logout stays pending.
    api = await make_api(flush={"max_writes_per_second": 0.01, "burst": 1},
                         flush_at_close=False)
    admin = await api.admin()
    stored = await api.user("alice")
    await api.client.post("/logout", headers=stored.headers)
    await wait_for(lambda: _is(api, admin, stored.session_id, "stored"), message="stored")
    pending = await api.user("bob")
    resp = await api.client.post("/logout", headers=pending.headers)
    assert resp.status == 200
    still_open = await api.user("carol")

    body = await _get(api, admin, "/audit/sessions")
    by_id = {s["session_id"]: s for s in body["sessions"]}
    assert body["next_cursor"] is None
    for s in body["sessions"]:
        assert set(s) == SUMMARY_KEYS
        assert TS_RE.match(s["session_start_time"])
    assert by_id[stored.session_id]["state"] == "stored"
    assert by_id[pending.session_id]["state"] == "pending"
    assert by_id[still_open.session_id]["state"] == "open"
    assert by_id[admin.session_id]["state"] == "open"
    s = by_id[stored.session_id]
    assert s["user"] == "alice" and s["event_count"] == 3 and s["parts"] == 1
    assert s["seal_reason"] == "logout"
    assert TS_RE.match(s["session_end_time"])
    assert s["session_duration_seconds"] >= 0
    p = by_id[pending.session_id]
    assert p["seal_reason"] == "logout" and p["event_count"] == 3
    o = by_id[still_open.session_id]
    assert o["session_end_time"] is None and o["seal_reason"] is None
    assert o["session_duration_seconds"] is None and o["event_count"] == 2
    # Newest first.
    starts = [x["session_start_time"] for x in body["sessions"]]
    assert starts == sorted(starts, reverse=True)

    for state, expected in (("open", {still_open.session_id, admin.session_id}),
                            ("pending", {pending.session_id}),
                            ("stored", {stored.session_id})):
        got = await _get(api, admin, "/audit/sessions", state=state)
        assert {x["session_id"] for x in got["sessions"]} == expected, state

    # Details of each, events in seq order.
    for who, n in ((stored, 3), (pending, 3), (still_open, 2)):
        detail = await _get(api, admin, f"/audit/sessions/{who.session_id}")
        assert set(detail) == SUMMARY_KEYS | {"events", "events_complete"}
        assert detail["events_complete"] is True
        assert [e["seq"] for e in detail["events"]] == list(range(1, n + 1))
        assert all(set(e) == EVENT_KEYS for e in detail["events"])
    status = await _get(api, admin, "/audit/status")
    assert status["pending_parts"] == 1
    assert status["oldest_pending_age_seconds"] >= 0


async def test_a_session_dead_lettered_is_listed_as_pending(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part the sink refused for good (dead-lettered: not in the sink, kept
    in the spool) leaves its session pending, as GET /audit/sessions/{id}
    says; ?state=pending lists it too. A real receiver refuses every write
    with 401 (a wrong token)."""
    from receiver import Receiver, ReceiverOptions, serve

    receiver = Receiver(ReceiverOptions(token="the-receivers-token"))
    runner, port = await serve(receiver, "127.0.0.1", 0)
    try:
        monkeypatch.setenv("SESSION_AUDIT_TEST_SINK_TOKEN", "not-the-receivers-token")
        api = await make_api(sink={"type": "http", "http": {
            "url": f"http://127.0.0.1:{port}", "token_env": "SESSION_AUDIT_TEST_SINK_TOKEN"}})
        admin = await api.admin()
        alice = await api.user("alice")
        assert (await api.client.post("/logout", headers=alice.headers)).status == 200

        async def dead() -> bool:
            states = await api.engine.spool.read(lambda c: c.execute(
                "SELECT state FROM parts WHERE session_id = ?", (alice.session_id,)).fetchall())
            return bool(states == [("dead",)])

        await wait_for(dead, message="alice's part dead-lettered")
        assert await _session_state(api, admin, alice.session_id) == "pending"
        listed = await _get(api, admin, "/audit/sessions", state="pending")
        assert [s["session_id"] for s in listed["sessions"]] == [alice.session_id]
        assert listed["sessions"][0]["state"] == "pending"
    finally:
        await runner.cleanup()
        receiver.close()


async def _is(api: Api, admin: Login, sid: str, state: str) -> bool:
    resp = await api.client.get(f"/audit/sessions/{sid}", headers=admin.headers)
    return resp.status == 200 and (await resp.json())["state"] == state


async def test_filters_user_since_until_limit(api: Api) -> None:
    admin = await api.admin()
    alice = await api.user("alice")
    bob = await api.user("bob")
    bob2 = await api.login("bob")
    got = await _get(api, admin, "/audit/sessions", user="bob")
    assert {s["session_id"] for s in got["sessions"]} == {bob.session_id, bob2.session_id}
    got = await _get(api, admin, "/audit/sessions", user="nobody")
    assert got == {"sessions": [], "next_cursor": None}

    all_sessions = (await _get(api, admin, "/audit/sessions"))["sessions"]
    times = {s["session_id"]: s["session_start_time"] for s in all_sessions}
    t_bob = times[bob.session_id]
    got = await _get(api, admin, "/audit/sessions", since=t_bob)
    assert {s["session_id"] for s in got["sessions"]} == {
        sid for sid, t in times.items() if t >= t_bob}
    assert alice.session_id not in {s["session_id"] for s in got["sessions"]}
    got = await _get(api, admin, "/audit/sessions", until=times[alice.session_id])
    assert {s["session_id"] for s in got["sessions"]} == {
        sid for sid, t in times.items() if t <= times[alice.session_id]}
    assert bob2.session_id not in {s["session_id"] for s in got["sessions"]}
    future = format_ts(time.time() + 3600)
    assert (await _get(api, admin, "/audit/sessions", since=future))["sessions"] == []
    got = await _get(api, admin, "/audit/sessions", limit="2")
    assert len(got["sessions"]) == 2 and got["next_cursor"]
    # An offset form of RFC 3339 works too.
    got = await _get(api, admin, "/audit/sessions", since="2000-01-01T00:00:00+02:00")
    assert len(got["sessions"]) == 4


def _finer(shown: str, ms_delta: int, tail: str) -> str:
    """The time ``ms_delta`` ms after ``shown`` (``...07.123Z``), with
    ``tail`` digits past its milliseconds."""
    return format_ts(parse_ts(shown) + ms_delta / 1000)[:-1] + tail + "Z"


@pytest.mark.parametrize(("param", "ms_delta", "tail", "listed"), [
    ("since", 0, "", True),
    ("since", 0, "0", True),
    ("since", 0, "000000000", True),
    ("since", 0, "0000000001", False),  # past what the parser keeps (6 digits)
    ("since", 0, "1", False),
    ("since", 0, "4999", False),
    ("since", 0, "5", False),
    ("since", 0, "9", False),
    ("since", -1, "9", True),
    ("since", -1, "5", True),
    ("until", 0, "", True),
    ("until", 0, "0", True),
    ("until", 0, "9", True),
    ("until", 0, "999999999", True),
    ("until", -1, "9999999", False),
    ("until", -1, "5", False),
    ("until", -1, "4", False),
    ("until", -1, "0", False),
])
async def test_since_and_until_finer_than_a_millisecond_bound_the_times_shown(
    api: Api, param: str, ms_delta: int, tail: str, listed: bool
) -> None:
    """since and until are inclusive bounds on session_start_time as shown
    (whole ms). A bound given finer than that was rounded to the nearest ms:
    since=07.1235Z listed a session shown 07.123Z and until=07.1225Z one
    shown 07.123Z, both outside the window asked for."""
    admin = await api.admin()
    alice = await api.user("alice")
    shown = (await _get(api, admin, f"/audit/sessions/{alice.session_id}"))[
        "session_start_time"]
    bound = _finer(shown, ms_delta, tail)
    got = await _get(api, admin, "/audit/sessions", user="alice", **{param: bound})
    assert (alice.session_id in {s["session_id"] for s in got["sessions"]}) is listed, (
        shown, bound)


@pytest.mark.parametrize(("tail", "listed"), [("", True), ("0001", False), ("5", False)])
async def test_security_events_since_finer_than_a_millisecond(
    api: Api, tail: str, listed: bool
) -> None:
    admin = await api.admin()
    resp = await api.client.get("/me", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401
    event = (await api.wait_security("auth.invalid_token"))[-1]
    got = await _get(api, admin, "/audit/security-events", kind="auth.invalid_token",
                     since=_finer(event["ts"], 0, tail))
    assert (event["event_id"] in {e["event_id"] for e in got["events"]}) is listed


async def _in_one_instant(api: Api, fn: Callable[[Writer], Any]) -> None:
    """``fn`` as a spool job whose writer's clock stands still at one instant."""
    def job(w: Writer) -> None:
        clock, w.clock = w.clock, lambda: 1_800_000_000.1234
        try:
            fn(w)
        finally:
            w.clock = clock

    await api.engine.spool.submit(job)


async def test_security_events_the_spool_holds_are_filtered_by_kind(make_api: MakeApi) -> None:
    """The sink down, the spool alone holds the security events: kind=
    lists those of that kind only, paged by them."""
    api = await make_api(sink={"type": "http", "http": {"url": f"http://127.0.0.1:{free_port()}",
                                                        "timeout_seconds": 1.0}},
                         flush_at_close=False)
    admin = await api.admin()

    def job(w: Writer) -> None:
        for i in range(3):
            w.append_security(Draft("auth.login_failed", outcome="failure",
                                    details={"i": i}), None)
            w.append_security(Draft("auth.invalid_token", outcome="denied",
                                    details={"i": i}), None)

    await api.engine.spool.submit(job)
    body = await _get(api, admin, "/audit/security-events", kind="auth.login_failed")
    assert sorted(e["details"]["i"] for e in body["events"]) == [0, 1, 2]
    assert {e["action"] for e in body["events"]} == {"auth.login_failed"}
    assert body["next_cursor"] is None
    first = await _get(api, admin, "/audit/security-events", kind="auth.invalid_token",
                       limit="2")
    rest = await _get(api, admin, "/audit/security-events", kind="auth.invalid_token",
                      cursor=first["next_cursor"])
    listed = first["events"] + rest["events"]
    assert [e["action"] for e in listed] == ["auth.invalid_token"] * 3
    assert sorted(e["details"]["i"] for e in listed) == [0, 1, 2]
    assert rest["next_cursor"] is None


@pytest.mark.parametrize("limit", [1, 7])
async def test_many_security_events_in_one_millisecond_page_through(
    make_api: MakeApi, limit: int
) -> None:
    """Events the spool holds (the sink down) that share one shown time:
    the spool pages by that time and the event id, as clients do. (It took
    a window of the newest rows: past it, paging ended early, silently.)"""
    api = await make_api(sink={"type": "http", "http": {"url": f"http://127.0.0.1:{free_port()}",
                                                        "timeout_seconds": 1.0}},
                         flush_at_close=False)
    admin = await api.admin()
    burst = 45

    await _in_one_instant(api, lambda w: [
        w.append_security(Draft("auth.invalid_token", outcome="denied", details={"i": i}), None)
        for i in range(burst)])
    seen: list[tuple[str, str]] = []
    cursor = None
    while True:
        params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        body = await _get(api, admin, "/audit/security-events", **params)
        assert len(body["events"]) <= limit
        seen += [(e["ts"], e["_id"]) for e in body["events"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(seen) < 500
    assert seen == sorted(set(seen), reverse=True)  # newest first, each once
    assert len([t for t, _ in seen if t == "2027-01-15T08:00:00.123Z"]) == burst


async def test_times_before_the_year_1000_and_after_9999_are_taken_at_the_edge(
    api: Api,
) -> None:
    # Shown as format_ts writes them, a year below 1000 lost its leading
    # zeros and compared as text after every other time (found by schemathesis).
    admin = await api.admin()
    everyone = {s["session_id"] for s in (await _get(api, admin, "/audit/sessions"))["sessions"]}
    assert everyone
    for since in ("0198-04-03T03:53:41.31Z", "0001-01-01T00:00:00Z"):
        got = await _get(api, admin, "/audit/sessions", since=since)
        assert {s["session_id"] for s in got["sessions"]} == everyone, since
        assert (await _get(api, admin, "/audit/sessions", until=since))["sessions"] == []
    got = await _get(api, admin, "/audit/security-events", since="0198-04-03T03:53:41Z")
    assert got["events"] == (await _get(api, admin, "/audit/security-events"))["events"]
    late = "9999-12-31T23:59:59-23:00"
    assert (await _get(api, admin, "/audit/sessions", since=late))["sessions"] == []
    got = await _get(api, admin, "/audit/sessions", until=late)
    assert {s["session_id"] for s in got["sessions"]} == everyone


@pytest.mark.parametrize("limit", [3, 5])
async def test_many_sessions_started_in_one_millisecond_page_through(
    api: Api, limit: int
) -> None:
    admin = await api.admin()
    many = 40

    await _in_one_instant(api, lambda w: [
        w.start_session("bob", "user", 1_900_000_000.0, [Draft("session.start")])
        for _ in range(many)])
    pages = await _pages(api, admin, limit, user="bob")
    keys = [(s["session_start_time"], s["session_id"]) for p in pages for s in p]
    assert keys == sorted(set(keys), reverse=True) and len(keys) == many
    assert all(len(p) == limit for p in pages[:-1])


async def test_cursor_paging_without_duplicates(api: Api) -> None:
    admin = await api.admin()
    for i in range(3):
        await api.add_user(f"user{i}")
    # Concurrent logins start several sessions within the same millisecond.
    logins = await asyncio.gather(*(api.login(f"user{i % 3}") for i in range(12)))
    # Some of them stored in the sink by now, some open.
    for who in logins[:6]:
        await api.client.post("/logout", headers=who.headers)
    expected = {who.session_id for who in logins} | {admin.session_id}
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "4"} | ({"cursor": cursor} if cursor else {})
        body = await _get(api, admin, "/audit/sessions", **params)
        seen += [s["session_id"] for s in body["sessions"]]
        keys = [(s["session_start_time"], s["session_id"]) for s in body["sessions"]]
        assert keys == sorted(keys, reverse=True)
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 20
    assert len(seen) == len(set(seen)), "a session appeared on two pages"
    assert set(seen) == expected


async def _pages(api: Api, admin: Login, limit: int, **params: str) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        query = {"limit": str(limit), **params} | ({"cursor": cursor} if cursor else {})
        body = await _get(api, admin, "/audit/sessions", **query)
        pages.append(body["sessions"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 20


async def test_state_filter_fills_its_pages(api: Api) -> None:
    """With ``state=``, every page but the last is full: the filter is not
    applied to a page already cut from the unfiltered list."""
    admin = await api.admin()
    stored: list[str] = []
    opened = [admin.session_id]
    for i in range(4):  # stored, open, stored, open, ... interleaved in time
        done = await api.user(f"done{i}")
        await api.client.post("/logout", headers=done.headers)
        stored.append(done.session_id)
        opened.append((await api.user(f"open{i}")).session_id)
    for sid in stored:
        await wait_for(lambda sid=sid: _is(api, admin, sid, "stored"), message="stored")
    for state, expected in (("stored", stored), ("open", opened)):
        pages = await _pages(api, admin, 2, state=state)
        assert [len(p) for p in pages[:-1]] == [2] * (len(pages) - 1), (state, pages)
        got = [s["session_id"] for p in pages for s in p]
        assert all(s["state"] == state for p in pages for s in p)
        assert sorted(got) == sorted(expected), state
        assert len(pages) == (len(expected) + 1) // 2, state


async def test_state_filter_that_stops_early_still_pages_through(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filtered request reads a bounded number of merged pages; when it
    stops short, its cursor resumes after what it looked at (even with an
    empty page), so walking the cursors lists every match exactly once."""
    import handlers.admin

    monkeypatch.setattr(handlers.admin, "_MAX_PAGES", 1)
    # Three sink writes at once, then one per 100 s: the first three logouts
    # are stored, the three after them (newer) stay pending.
    api = await make_api(flush={"max_writes_per_second": 0.01, "burst": 3},
                         flush_at_close=False)
    admin = await api.admin()
    ended: list[str] = []
    for i in range(6):
        who = await api.user(f"user{i}")
        await api.client.post("/logout", headers=who.headers)
        ended.append(who.session_id)
        if i == 2:
            for sid in ended:
                await wait_for(lambda sid=sid: _is(api, admin, sid, "stored"), message="stored")
    pages = await _pages(api, admin, 1, state="stored")
    got = [s["session_id"] for p in pages for s in p]
    assert sorted(got) == sorted(ended[:3]) and len(got) == len(set(got))
    assert [] in pages, "some page should have stopped early with nothing in it"
    pending = [s["session_id"] for p in await _pages(api, admin, 1, state="pending") for s in p]
    assert sorted(pending) == sorted(ended[3:])


async def test_state_filter_on_an_open_session_with_parts_in_the_sink(make_api: MakeApi) -> None:
    api, admin, alice = await session_with_checkpoints_in_sink(make_api)
    listed = {state: {s["session_id"] for p in await _pages(api, admin, 5, state=state)
                      for s in p}
              for state in ("open", "pending", "stored")}
    assert alice.session_id in listed["open"]
    assert alice.session_id not in listed["stored"] | listed["pending"]


async def test_get_session_merges_parts_in_seq_order(make_api: MakeApi) -> None:
    # Parts of 3 events: the session is cut into checkpoint parts that reach
    # the sink while it is still open.
    api, admin, alice = await session_with_checkpoints_in_sink(make_api)
    detail = await _get(api, admin, f"/audit/sessions/{alice.session_id}")
    assert detail["state"] == "open"
    assert [e["seq"] for e in detail["events"]] == list(range(1, 11))
    assert detail["event_count"] == 10
    assert detail["parts"] == 4
    await api.client.post("/logout", headers=alice.headers)
    await wait_for(lambda: _is(api, admin, alice.session_id, "stored"), message="stored")
    detail = await _get(api, admin, f"/audit/sessions/{alice.session_id}")
    assert [e["seq"] for e in detail["events"]] == list(range(1, 12))
    assert detail["events"][-1]["action"] == "session.end"
    assert detail["event_count"] == 11 and detail["seal_reason"] == "logout"


async def test_unknown_session_is_404(api: Api) -> None:
    admin = await api.admin()
    for sid in ("0" * 32, "nope", "..%2F..", "x" * 3000):
        resp = await api.client.get(f"/audit/sessions/{sid}", headers=admin.headers)
        await expect_error(resp, 404, "not_found")


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/audit/sessions", {"limit": "0"}),
        ("/audit/sessions", {"limit": "501"}),
        ("/audit/sessions", {"limit": "ten"}),
        ("/audit/sessions", {"since": "yesterday"}),
        ("/audit/sessions", {"until": "2026-13-45T00:00:00Z"}),
        ("/audit/sessions", {"state": "sealed"}),
        ("/audit/sessions", {"cursor": "!!!"}),
        ("/audit/sessions", {"cursor": "e30"}),
        ("/audit/sessions", {"bogus": "1"}),
        ("/audit/security-events", {"since": "x"}),
        ("/audit/security-events", {"limit": "-1"}),
        ("/audit/security-events", {"cursor": "bm90IGpzb24"}),
        # RFC 3339 date-times only (Python's parser takes these too), with a zone.
        ("/audit/sessions", {"since": "2026-11-27"}),
        ("/audit/sessions", {"since": "2026-11-27T04"}),
        ("/audit/sessions", {"until": "20261127T044600"}),
        ("/audit/sessions", {"since": "2026-W48-5"}),
        ("/audit/sessions", {"since": "2026-11-27 04:46:00Z"}),
        ("/audit/security-events", {"since": "2026-11-27T04:46:00"}),
        # A cursor's time in another form than the server writes: it would be
        # compared as text with the times shown.
        ("/audit/sessions", {"cursor": encode_cursor("2026-11-27T04:46:00+00:00", "z")}),
        ("/audit/security-events", {"cursor": encode_cursor("2026-11-27T04:46:00Z", "z")}),
        ("/audit/sessions/" + "0" * 32, {"foo": "1"}),
        # The other listing's filters: taken, they would be ignored silently
        # (every user's security events listed as if filtered by one).
        ("/audit/sessions", {"kind": "auth.login_failed"}),
        ("/audit/security-events", {"user": "alice"}),
        ("/audit/security-events", {"until": "2026-11-27T04:46:00Z"}),
        ("/audit/security-events", {"state": "open"}),
    ],
)
async def test_bad_query_parameters(api: Api, path: str, params: dict[str, str]) -> None:
    admin = await api.admin()
    resp = await api.client.get(path, params=params, headers=admin.headers)
    await expect_error(resp, 400, "invalid_request")


@pytest.mark.parametrize("query", [
    # API.md's table writes the listings with every parameter empty; an empty
    # one is no filter (openapi.yaml: "empty: no bound", "empty: any"), and an
    # empty limit the default: it was the one 400 of the query as written.
    "/audit/sessions?user=&since=&until=&state=&limit=&cursor=",
    "/audit/security-events?since=&kind=&limit=&cursor=",
])
async def test_the_listings_as_api_md_writes_them_with_empty_parameters(
    api: Api, query: str
) -> None:
    admin = await api.admin()
    resp = await api.client.get(query, headers=admin.headers)
    body = await resp.json()
    assert resp.status == 200, body
    key, id_key = (("sessions", "session_id") if query.startswith("/audit/sessions")
                   else ("events", "_id"))
    plain = await _get(api, admin, query.partition("?")[0])
    assert [x[id_key] for x in body[key]] == [x[id_key] for x in plain[key]]
    assert body["next_cursor"] is None


async def _refused_and_recorded(api: Api, path: str, params: dict[str, str], rid: str) -> None:
    """400 invalid_request in the API's error format (not a 500), and the
    admin's query recorded as a failure with that reason."""
    admin = await api.admin()
    resp = await api.client.get(path, params=params,
                                headers={**admin.headers, "X-Request-ID": rid})
    await expect_error(resp, 400, "invalid_request")
    (ev,) = [e for e in await api.events(admin.session_id)
             if e["action"] == "audit.query" and e["request_id"] == rid]
    assert (ev["outcome"], ev["details"]["reason"]) == ("failure", "invalid_request")


@pytest.mark.parametrize("path", ["/audit/sessions", "/audit/security-events"])
async def test_a_limit_of_thousands_of_digits_is_a_400(api: Api, path: str) -> None:
    """Python refuses int() of more than 4300 digits (ValueError): such a
    limit was a 500. Leading zeros still count for nothing."""
    await _refused_and_recorded(api, path, {"limit": "9" * 5000}, "digits")
    await _refused_and_recorded(api, path, {"limit": "0" * 4999 + "1000"}, "zeros")
    admin = await api.admin()
    body = await _get(api, admin, path, limit="0" * 5000 + "2")
    assert len(body["sessions" if path == "/audit/sessions" else "events"]) <= 2


@pytest.mark.parametrize(("path", "param"), [("/audit/sessions", "since"),
                                           ("/audit/sessions", "until"),
                                           ("/audit/security-events", "since")])
@pytest.mark.parametrize("fraction", ["\u0661\u0662\u0663", "\uff11"])
async def test_a_time_with_digits_other_than_ascii_is_a_400(
    api: Api, path: str, param: str, fraction: str
) -> None:
    """RFC 3339's digits are ASCII. The pattern's \\d took any Unicode digit
    in the fraction, and int() read them: since=...07.<Arabic-Indic 123>Z was
    taken as 07.123Z and answered 200, not 400 as a time that is not one."""
    await _refused_and_recorded(
        api, path, {param: f"2026-11-26T14:31:07.{fraction}Z"}, f"{param}-{len(fraction)}")


@pytest.mark.parametrize("path", ["/audit/sessions", "/audit/security-events"])
async def test_a_cursor_nested_too_deep_for_json_is_a_400(api: Api, path: str) -> None:
    """json.loads raises RecursionError (not a ValueError) on arrays nested
    deeper than the interpreter's recursion limit: such a cursor was a 500."""
    cursor = base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=")
    await _refused_and_recorded(api, path, {"cursor": cursor}, "deep")


@pytest.mark.parametrize("path", ["/audit/sessions", "/audit/security-events"])
async def test_a_cursor_whose_id_is_no_utf_8_text_is_a_400(api: Api, path: str) -> None:
    """JSON's "\\ud800" decodes to a lone surrogate, which SQLite cannot bind
    (UnicodeEncodeError in the spool's query): such a cursor was a 500."""
    raw = b'["2026-11-27T04:46:00.000Z","\\ud800"]'
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    await _refused_and_recorded(api, path, {"cursor": cursor}, "surrogate")


async def test_security_events_kind_since_and_paging(api: Api) -> None:
    admin = await api.admin()
    for i in range(3):
        await api.client.post("/token", json={"username": f"ghost{i}", "password": "x"})
    await api.client.get("/me", headers={"Authorization": "Bearer junk"})
    await api.client.get("/me")
    await api.wait_security("auth.invalid_token", 2)
    body = await _get(api, admin, "/audit/security-events")
    kinds = [e["action"] for e in body["events"]]
    assert sorted(kinds) == ["auth.invalid_token"] * 2 + ["auth.login_failed"] * 3
    assert body["next_cursor"] is None
    for e in body["events"]:
        assert set(e) >= EVENT_KEYS
        assert e["_id"] == e["event_id"] and e["seq"] is None
    ts = [e["ts"] for e in body["events"]]
    assert ts == sorted(ts, reverse=True)

    body = await _get(api, admin, "/audit/security-events", kind="auth.login_failed")
    assert [e["details"]["username"] for e in body["events"]] == ["ghost2", "ghost1", "ghost0"]
    body = await _get(api, admin, "/audit/security-events", kind="admin.denied")
    assert body["events"] == []
    resp = await api.client.get("/audit/security-events", params={"kind": "auth.bogus"},
                                headers=admin.headers)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_request"
    newest = (await _get(api, admin, "/audit/security-events", limit="1"))
    assert len(newest["events"]) == 1 and newest["next_cursor"]
    since = newest["events"][0]["ts"]
    body = await _get(api, admin, "/audit/security-events", since=since)
    assert all(e["ts"] >= since for e in body["events"]) and body["events"]

    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await _get(api, admin, "/audit/security-events", **params)
        seen += [e["_id"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 and len(set(seen)) == 5


async def test_status_object(api: Api) -> None:
    admin = await api.admin()
    body = await _get(api, admin, "/audit/status")
    for key in ("active_sessions", "pending_parts", "pending_security_events", "spool_bytes",
                "oldest_pending_age_seconds", "dead_letter", "sink"):
        assert key in body, key
    assert set(body["sink"]) >= {"type", "healthy", "last_error", "writes_ok", "writes_failed",
                                 "rate_limited", "backoff_until"}
    assert body["sink"]["type"] == "sqlite"
    assert body["sink"]["healthy"] is True
    assert body["active_sessions"] == 1
    assert body["spool_bytes"] > 0
    assert body["dead_letter"] == 0


async def test_status_names_no_file_path(make_api: MakeApi, tmp_path: Any) -> None:
    """A sink error quoting a file path reaches /audit/status without it (API.md:
    no file paths to a client); `server.py status` keeps it for the operator."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    api = await make_api(sink={"sqlite": {"path": str(blocker / "sub" / "audit.db")}},
                         flush_at_close=False)
    admin = await api.admin()

    async def failing() -> dict[str, Any] | None:
        body = await _get(api, admin, "/audit/status")
        return body if body["sink"]["last_error"] else None

    body = await wait_for(failing, message="the sink's first failure")
    error = body["sink"]["last_error"]
    assert "<path>" in error and str(tmp_path) not in error, error
    assert str(tmp_path) not in json.dumps(body)
    # A message naming the sink's directory without quotes.
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    api = await make_api(sink={"sqlite": {"path": str(tmp_path / "open" / "audit.db")}},
                         flush_at_close=False)
    admin = await api.admin()
    body = await wait_for(failing, message="the sink's first failure")
    assert "writable by every user" in body["sink"]["last_error"]
    assert str(tmp_path) not in json.dumps(body), body


async def test_flush_and_audit_query_events(api: Api) -> None:
    admin = await api.admin()
    resp = await api.client.post("/audit/flush", headers={**admin.headers,
                                                          "X-Request-ID": "flush-1"})
    assert resp.status == 202
    for path in ("/audit/sessions", f"/audit/sessions/{admin.session_id}",
                 "/audit/security-events", "/audit/status"):
        await _get(api, admin, path)
    queries = [e for e in await api.events(admin.session_id) if e["action"] == "audit.query"]
    assert len(queries) == 5
    assert queries[0]["request_id"] == "flush-1"
    assert [q["details"]["endpoint"] for q in queries] == [
        "/audit/flush", "/audit/sessions", f"/audit/sessions/{admin.session_id}",
        "/audit/security-events", "/audit/status"]
    assert all(q["outcome"] == "success" and q["actor"]["role"] == "admin" for q in queries)
    assert await api.security("admin.denied") == []


async def test_audit_query_that_fails_unexpectedly_is_recorded(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query that breaks (a sink bug) answers 500 and is still recorded, as
    a failure with reason internal_error."""
    admin = await api.admin()

    async def broken(**kwargs: Any) -> Any:
        raise RuntimeError("a sink bug")

    monkeypatch.setattr(api.engine.sink, "list_sessions", broken)
    resp = await api.client.get("/audit/sessions",
                                headers={**admin.headers, "X-Request-ID": "boom"})
    await expect_error(resp, 500, "internal_error")
    (ev,) = [e for e in await api.events(admin.session_id) if e["request_id"] == "boom"]
    assert (ev["action"], ev["outcome"], ev["details"]["reason"]) == (
        "audit.query", "failure", "internal_error")


@pytest.mark.parametrize("ack", ["durable", "fast"])
async def test_an_answer_whose_session_ends_meanwhile_is_not_handed_out(
    make_api: Any, monkeypatch: pytest.MonkeyPatch, ack: str
) -> None:
    """An admin query records audit.query after it has its answer. Under
    ack = "fast" that record was not awaited: an admin session that ended
    meanwhile (a logout elsewhere, the reaper) still got the answer, and the
    failed record was only logged. It is awaited now whatever audit.ack says."""
    api = await make_api(audit={"ack": ack})
    admin = await api.admin()
    await logged_out_while_held(api, monkeypatch, api.engine.sink, "list_sessions",
                                "/audit/sessions", admin, "audit.query")


async def test_listings_over_jsonl_lines_with_a_start_or_an_id_of_another_type(
    make_api: MakeApi,
) -> None:
    """Lines appended to a day file by another process: a part whose
    session_start_time is a number or missing, a security event whose _id is
    a number. Listings sort by (start, id) and (ts, _id), in the sink and
    again when merged with the spool's: every /audit/sessions was a 500 (and
    /audit/security-events, with another event at the same ts) until the
    line was removed. Such lines are now left out, like one without a ts
    (verify reports them)."""
    api = await make_api(sink={"type": "jsonl"})
    admin = await api.admin()
    d = api.config.jsonl_dir
    await wait_for(d.exists, message="the jsonl directory")
    good, event = sample_part("a" * 32), sample_security_event("e1")
    lines = [{**good, "type": "session_part"},
             {**sample_part("b" * 32), "session_start_time": 5, "type": "session_part"},
             {**sample_part("c" * 32), "session_start_time": None, "type": "session_part"},
             {**event, "type": "security_event"},
             {**sample_security_event("e2"), "_id": 7, "type": "security_event"}]
    (d / "audit-2025-01-01.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for url in ("/audit/sessions", "/audit/sessions?since=2000-01-01T00:00:00.000Z"):
        async with api.client.get(url, headers=admin.headers) as r:
            assert r.status == 200, await r.text()
            listed = {s["session_id"] for s in (await r.json())["sessions"]}
        assert "a" * 32 in listed and not {"b" * 32, "c" * 32} & listed
    async with api.client.get("/audit/security-events", headers=admin.headers) as r:
        assert r.status == 200, await r.text()
        assert [e["_id"] for e in (await r.json())["events"]] == ["e1"]


@pytest.mark.parametrize("count", ["many", "1e400"])
async def test_a_session_over_a_jsonl_part_whose_event_count_is_no_count(
    make_api: MakeApi, count: str
) -> None:
    """A part line from another process whose event_count is a string, or
    JSON's 1e400 (a float infinity): its summary took int() of it, and
    GET /audit/sessions/{id} was a 500 (ValueError, OverflowError). The
    count falls back to 0, as in the sink's listings."""
    api = await make_api(sink={"type": "jsonl"})
    admin = await api.admin()
    d = api.config.jsonl_dir
    await wait_for(d.exists, message="the jsonl directory")
    sid = "a" * 32
    line = json.dumps({**sample_part(sid), "event_count": 0, "type": "session_part"})
    line = line.replace('"event_count": 0', f'"event_count": {json.dumps(count)}'
                        if count == "many" else f'"event_count": {count}')
    (d / "audit-2025-01-01.jsonl").write_text(line + "\n")
    async with api.client.get(f"/audit/sessions/{sid}", headers=admin.headers) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert body["event_count"] == 0 and len(body["events"]) == 2


async def test_listings_over_sqlite_sink_rows_with_a_start_or_an_id_of_another_type(
    make_api: MakeApi,
) -> None:
    """The same over the embedded sink: rows whose document another process
    changed (a start time that is a number or null, an event _id or ts that
    is a number) made the admin API's merge with the spool compare int or
    None with str: every /audit/sessions (or /audit/security-events) was a
    500 until the row was repaired. They are listed as they are (verify
    reports them), after the well-formed ones; so is an event without an
    _id (a KeyError)."""
    api = await make_api()
    admin = await api.admin()
    await api.engine.sink.write_part(sample_part("a" * 32))
    await api.engine.sink.write_part(sample_part("b" * 32))
    await api.engine.sink.write_part(sample_part("c" * 32))
    await api.engine.sink.write_security_events([sample_security_event("e1"),
                                                 sample_security_event("e2"),
                                                 sample_security_event("e3"),
                                                 sample_security_event("e4")])
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("UPDATE parts SET doc = json_set(doc, '$.session_start_time', 5)"
                   " WHERE session_id = ?", ("b" * 32,))
        db.execute("UPDATE parts SET doc = json_set(doc, '$.session_start_time', json('null'))"
                   " WHERE session_id = ?", ("c" * 32,))
        db.execute("UPDATE security_events SET doc = json_set(doc, '$._id', 7) WHERE id = 'e2'")
        db.execute("UPDATE security_events SET doc = json_set(doc, '$.ts', 8) WHERE id = 'e3'")
        db.execute("UPDATE security_events SET doc = json_remove(doc, '$._id') WHERE id = 'e4'")
    finally:
        db.close()
    async with api.client.get("/audit/sessions", headers=admin.headers) as r:
        assert r.status == 200, await r.text()
        listed = [s["session_id"] for s in (await r.json())["sessions"]]
    planted = [sid for sid in listed if sid in {"a" * 32, "b" * 32, "c" * 32}]
    assert planted[0] == "a" * 32 and len(planted) == 3
    cursor, pages = "", 0
    while cursor is not None and pages < 10:  # a page at a time: the cursors work too
        async with api.client.get(f"/audit/sessions?limit=1{cursor and '&cursor=' + cursor}",
                                  headers=admin.headers) as r:
            assert r.status == 200, await r.text()
            cursor, pages = (await r.json())["next_cursor"], pages + 1
    assert cursor is None
    async with api.client.get("/audit/security-events", headers=admin.headers) as r:
        assert r.status == 200, await r.text()
        events = [e.get("_id", "none") for e in (await r.json())["events"]]
    planted = [e for e in events if e in ("e1", 7, "e3", "none")]
    assert planted[0] == "e1" and planted[-1] == "e3" and len(planted) == 4


async def test_an_unreadable_embedded_sink_document_is_503_not_500(make_api: MakeApi) -> None:
    """A row of the embedded sink that SQLite cannot hand out (text that is
    not UTF-8, as a damaged page gives) or that is no JSON (another
    process's write): the listings and the session detail were a 500 with
    a traceback; they are 503 sink_unavailable, the sink's words in the log
    (verify reports the row)."""
    api = await make_api()
    admin = await api.admin()
    await api.engine.sink.write_part(sample_part("a" * 32))
    await api.engine.sink.write_part(sample_part("b" * 32))
    await api.engine.sink.write_security_events([sample_security_event("e1")])
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("UPDATE parts SET doc = CAST(X'7bff7d' AS TEXT) WHERE session_id = ?",
                   ("a" * 32,))
        db.execute("UPDATE parts SET doc = '{' WHERE session_id = ?", ("b" * 32,))
        db.execute("UPDATE security_events SET doc = CAST(X'ff' AS TEXT) WHERE id = 'e1'")
    finally:
        db.close()
    for url in ("/audit/sessions", f"/audit/sessions/{'a' * 32}", f"/audit/sessions/{'b' * 32}",
                "/audit/security-events"):
        async with api.client.get(url, headers=admin.headers) as r:
            assert r.status == 503, (url, r.status, await r.text())
            assert (await r.json())["error"]["code"] == "sink_unavailable", url


async def test_security_events_over_sqlite_sink_rows_whose_ts_or_id_is_a_blob(
    make_api: MakeApi,
) -> None:
    """A row of the embedded sink whose ts or id column is a BLOB (changed
    by hand, another program's) sorts after every text: a page ending at it
    took the sink's cursor from those columns, and bytes are no JSON, a
    TypeError: /audit/security-events?limit=1 was a 500. Such rows are left
    out of the listing (verify reports them: the column is not the
    document's); the others page through as before."""
    api = await make_api()
    admin = await api.admin()
    await api.engine.sink.write_security_events(
        [sample_security_event(f"e{i}", ts=f"2026-11-26T14:00:0{i}.000Z") for i in range(5)])
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("UPDATE security_events SET ts = CAST(ts AS BLOB) WHERE id IN ('e1', 'e2')")
        db.execute("UPDATE security_events SET id = CAST(id AS BLOB) WHERE id = 'e3'")
    finally:
        db.close()
    listed, cursor, pages = [], "", 0
    while cursor is not None and pages < 50:
        async with api.client.get(
                f"/audit/security-events?limit=1{cursor and '&cursor=' + cursor}",
                headers=admin.headers) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        listed += [e["_id"] for e in body["events"]]
        cursor, pages = body["next_cursor"], pages + 1
    assert cursor is None
    assert [e for e in listed if e in {"e0", "e1", "e2", "e3", "e4"}] == ["e4", "e0"]


async def _every_listing_is_sink_unavailable(api: Any, admin: Any) -> None:
    """Each admin read of the sink (listing, detail, security events): 503
    sink_unavailable, not a 500."""
    for url in ("/audit/sessions", f"/audit/sessions/{'a' * 32}", "/audit/security-events"):
        async with api.client.get(url, headers=admin.headers) as r:
            assert r.status == 503, (url, r.status, await r.text())
            assert (await r.json())["error"]["code"] == "sink_unavailable", url

async def test_a_sink_document_holding_a_lone_surrogate_is_not_a_500(make_api: MakeApi) -> None:
    """JSON's "\\ud800" alone parses to a lone surrogate, which no answer
    can encode as UTF-8: a stored document holding one (another writer's:
    the sink writes none) made the listings and the session detail a 500
    (UnicodeEncodeError). The embedded sink's row is unreadable, 503
    sink_unavailable, as one that is not UTF-8 text."""
    api = await make_api()
    admin = await api.admin()
    await api.engine.sink.write_part(sample_part("a" * 32))
    await api.engine.sink.write_security_events([sample_security_event("e1")])
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("""UPDATE parts SET doc = json_set(doc, '$.user', json('"\\ud800"'))""")
        db.execute("""UPDATE security_events SET doc = json_set(doc, '$.details',"""
                   """ json('"\\udfff"'))""")
    finally:
        db.close()
    await _every_listing_is_sink_unavailable(api, admin)


async def test_a_jsonl_line_holding_a_lone_surrogate_is_left_out(make_api: MakeApi) -> None:
    """The same in a JSONL line, escaped or as the three bytes that spell a
    surrogate (json.loads of bytes takes those): a 500 for the listings and
    the session. Such a line is no document of the sink's, left out of the
    queries as a line that is not UTF-8, and reported to verify."""
    api = await make_api(sink={"type": "jsonl"})
    admin = await api.admin()
    d = api.config.jsonl_dir
    await wait_for(d.exists, message="the jsonl directory")
    part = json.dumps({**sample_part("a" * 32), "type": "session_part"}).encode()
    event = json.dumps({**sample_security_event("e1"), "type": "security_event"}).encode()
    (d / "audit-2025-01-01.jsonl").write_bytes(
        part.replace(b'"user": "alice"', b'"user": "\\ud800"') + b"\n"
        + event.replace(b'"user": "mallory"', b'"user": "\xed\xa0\x80"') + b"\n")
    for url in ("/audit/sessions", "/audit/security-events"):
        async with api.client.get(url, headers=admin.headers) as r:
            assert r.status == 200, (url, await r.text())
            assert "a" * 32 not in await r.text() and '"e1"' not in await r.text()
    async with api.client.get(f"/audit/sessions/{'a' * 32}", headers=admin.headers) as r:
        assert r.status == 404, await r.text()
    unchecked = await api.engine.sink.unchecked_records()
    assert len([u for u in unchecked if "not UTF-8" in u]) == 2, unchecked


async def test_a_sqlite_sink_part_numbered_past_64_bits_is_not_a_500(make_api: MakeApi) -> None:
    """A part whose document another writer numbered past SQLite's 64-bit
    integers: the session's events are read a part at a time by that
    number, and binding it raised OverflowError, a 500 for
    GET /audit/sessions/{id}. It is a part the sink cannot hand out, 503."""
    api = await make_api()
    admin = await api.admin()
    await api.engine.sink.write_part(sample_part("a" * 32))
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute(f"UPDATE parts SET doc = json_set(doc, '$.part', json('{10**29}'))")
    finally:
        db.close()
    async with api.client.get(f"/audit/sessions/{'a' * 32}", headers=admin.headers) as r:
        assert r.status == 503, await r.text()
        assert (await r.json())["error"]["code"] == "sink_unavailable"


async def test_stored_parts_whose_event_counts_sum_past_printing_are_not_a_500(
    make_api: MakeApi,
) -> None:
    """JSON holds integers of any length, Python prints them up to 4,300
    digits: two parts of one session whose documents another writer gave
    a 4,300-digit event_count summed past that, and encoding the summary
    raised ValueError, a 500 for the listings and the session. A count
    past 64 bits is no count, as a string or an infinity already was (0)."""
    api = await make_api()
    admin = await api.admin()
    await api.engine.sink.write_part(sample_part("a" * 32, 0, final=False))
    await api.engine.sink.write_part(sample_part("a" * 32, 1, final=True))
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute(f"UPDATE parts SET doc = json_set(doc, '$.event_count', json('{'9' * 4300}'))")
    finally:
        db.close()
    for url in ("/audit/sessions", f"/audit/sessions/{'a' * 32}"):
        async with api.client.get(url, headers=admin.headers) as r:
            assert r.status == 200, (url, await r.text())


async def _one_at_a_time(api: Api, admin: Login, path: str, items: str, key: str) -> list[Any]:
    """``key`` of every item of a listing read a page of one at a time; the
    paging must end within 30 pages."""
    listed: list[Any] = []
    cursor, pages = "", 0
    while cursor is not None and pages < 30:
        async with api.client.get(f"{path}?limit=1{cursor and '&cursor=' + cursor}",
                                  headers=admin.headers) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        listed += [x[key] for x in body[items]]
        cursor, pages = body["next_cursor"], pages + 1
    assert cursor is None, listed
    return listed


async def test_paging_ends_over_sqlite_sink_rows_whose_document_is_newer_than_its_columns(
    make_api: MakeApi,
) -> None:
    """The embedded sink pages by its columns (ts, id; start, session id),
    the admin API by the documents' fields. A row whose document another
    writer moved later than its columns was answered by the sink past every
    cursor from that later time on, and so ended every page: the same event
    (or session) and the same next_cursor, page after page, for a client
    paging to the end. The sink's answers before the cursor are dropped: it
    is listed once."""
    api = await make_api()
    admin = await api.admin()
    ts = "2026-11-26T14:00:0{}.000Z".format
    await api.engine.sink.write_security_events(
        [sample_security_event(f"e{i}", ts=ts(i)) for i in range(4)])
    for i in range(4):
        await api.engine.sink.write_part(sample_part(f"{i}" * 32, start=ts(i)))
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("UPDATE security_events SET doc = json_set(doc, '$.ts', ?) WHERE id = 'e2'",
                   (ts(9),))
        db.execute("UPDATE parts SET doc = json_set(doc, '$.session_start_time', ?)"
                   " WHERE session_id = ?", (ts(9), "2" * 32))
    finally:
        db.close()
    events = await _one_at_a_time(api, admin, "/audit/security-events", "events", "_id")
    assert events == ["e2", "e3", "e1", "e0"]
    sessions = await _one_at_a_time(api, admin, "/audit/sessions", "sessions", "session_id")
    assert [s for s in sessions if s != admin.session_id] == [
        "2" * 32, "3" * 32, "1" * 32, "0" * 32]


async def test_a_sqlite_sink_document_nested_past_the_parser_is_503_not_500(
    make_api: MakeApi,
) -> None:
    """A document another writer nested 5,000 arrays deep (SQLite takes it
    as text) made json.loads raise RecursionError, no ValueError: the
    listings were a 500. It is a document the sink cannot hand out, 503,
    as one that is not JSON (the session detail, whose heads SQLite parses
    itself, was one already)."""
    api = await make_api()
    admin = await api.admin()
    await api.engine.sink.write_part(sample_part("a" * 32))
    await api.engine.sink.write_security_events([sample_security_event("e1")])
    deep = "[" * 100_000 + "]" * 100_000  # (5,000 parse on 3.13, whose limit is ~10,000)
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        for table in ("parts", "security_events"):
            db.execute(f"UPDATE {table} SET doc = substr(doc, 1, length(doc) - 1)"
                       " || ',\"x\":' || ? || '}'", (deep,))
    finally:
        db.close()
    await _every_listing_is_sink_unavailable(api, admin)


# -- found by mutation testing of handlers/admin.py ---------------------------


async def test_the_filters_apply_to_the_sessions_the_sink_holds(api: Api) -> None:
    """user, since and until bound the stored sessions (asked of the sink)
    as they bound the spool's: every other filter test listed open sessions
    only, and the listing was the same with the sink asked for every user
    and every time."""
    admin = await api.admin()
    start = "2025-01-01T00:00:0{}.000Z".format
    for i, user in enumerate(("alice", "bob", "alice")):
        await api.engine.sink.write_part(sample_part(f"{i}" * 32, user=user, start=start(i)))

    async def listed(**params: str) -> list[str]:
        return [s["session_id"] for s in (await _get(api, admin, "/audit/sessions",
                                                     **params))["sessions"]]

    assert await listed(user="alice") == ["2" * 32, "0" * 32]
    assert await listed(user="bob") == ["1" * 32]
    assert await listed(since=start(1), until=start(1)) == ["1" * 32]
    assert await listed(until=start(1)) == ["1" * 32, "0" * 32]
    assert (await listed(since=start(1)))[-2:] == ["2" * 32, "1" * 32]
    assert await listed(user="alice", since=start(1)) == ["2" * 32]


async def test_a_page_of_stored_sessions_is_filled_past_the_sinks_default(api: Api) -> None:
    """The sink is asked for the page's limit: with its own default (50) a
    page of 60 held 50 stored sessions and a next_cursor."""
    admin = await api.admin()
    for i in range(55):
        await api.engine.sink.write_part(
            sample_part(f"{i:032x}", start=f"2025-01-01T00:00:{i:02d}.000Z"))
    body = await _get(api, admin, "/audit/sessions", user="alice", limit="60")
    assert len(body["sessions"]) == 55 and body["next_cursor"] is None


async def test_a_page_that_holds_exactly_the_last_ones_has_no_next_cursor(api: Api) -> None:
    """As many sessions as the limit, from the spool or from the sink (or
    security events): the page is the last one (next_cursor null), not one
    more empty page."""
    admin = await api.admin()
    alice = [await api.user("alice"), await api.login("alice")]
    body = await _get(api, admin, "/audit/sessions", user="alice", limit="2")
    assert sorted(s["session_id"] for s in body["sessions"]) == sorted(
        a.session_id for a in alice)
    assert body["next_cursor"] is None
    for i in range(2):
        await api.engine.sink.write_part(sample_part(f"{i}" * 32, user="carol"))
    body = await _get(api, admin, "/audit/sessions", user="carol", limit="2")
    assert [s["session_id"] for s in body["sessions"]] == ["1" * 32, "0" * 32]
    assert body["next_cursor"] is None
    body = await _get(api, admin, "/audit/sessions", user="carol", limit="1")
    assert [s["session_id"] for s in body["sessions"]] == ["1" * 32] and body["next_cursor"]
    await api.engine.sink.write_security_events([sample_security_event(i) for i in "ab"])
    body = await _get(api, admin, "/audit/security-events", limit="2")
    assert [e["_id"] for e in body["events"]] == ["b", "a"] and body["next_cursor"] is None


async def test_paging_security_events_past_a_sink_event_whose_ts_is_no_text(
    make_api: MakeApi,
) -> None:
    """A sink document whose ts another writer made a number sorts last, as
    the epoch; a page ending at it gets a cursor at that time, which the
    next request takes (a cursor with an empty time would be a 400)."""
    api = await make_api()
    admin = await api.admin()
    await api.engine.sink.write_security_events(
        [sample_security_event(i) for i in ("e1", "e0", "d0")])
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("UPDATE security_events SET doc = json_set(doc, '$.ts', 8)"
                   " WHERE id IN ('e0', 'd0')")
    finally:
        db.close()
    body = await _get(api, admin, "/audit/security-events")
    assert [e["_id"] for e in body["events"]] == ["e1", "e0", "d0"]
    listed = await _one_at_a_time(api, admin, "/audit/security-events", "events", "_id")
    assert listed[:2] == ["e1", "e0"]


async def test_a_session_begun_between_the_spool_and_the_sink_reads_is_shown_as_the_spool_has_it(
    api: Api, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The spool is read first, the sink after: a session begun between
    the two, whose checkpoint part reached the sink, is in the sink's
    answer only, looking ended (``pending``). The spool is asked about it
    again and its summary (open) is listed."""
    admin = await api.admin()
    list_sessions = api.engine.sink.list_sessions
    late: list[Login] = []

    async def after_the_spool_read(**kwargs: Any) -> Any:
        if not late:
            late.append(await api.user("alice"))
            await api.engine.sink.write_part(sample_part(late[0].session_id, final=False))
        return await list_sessions(**kwargs)

    monkeypatch.setattr(api.engine.sink, "list_sessions", after_the_spool_read)
    body = await _get(api, admin, "/audit/sessions")
    (alice,) = [s for s in body["sessions"] if s["session_id"] == late[0].session_id]
    assert (alice["state"], alice["user"], alice["session_end_time"]) == ("open", "alice", None)


async def test_a_sink_that_cannot_be_queried_is_logged_once_a_minute_saying_how_many_were_left_out(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """One warning per kind of sink error, then one a minute while it lasts,
    saying how many were left out; the client gets a 503 without the sink's
    words."""
    import handlers.admin
    from audit.logthrottle import LogThrottle
    from sinks.base import SinkUnavailable, SinkUnreadable

    now = [1000.0]
    monkeypatch.setattr(handlers.admin, "_QUERY_LOG", LogThrottle(clock=lambda: now[0]))
    admin = await api.admin()
    error: list[Exception] = [SinkUnavailable("sqlite sink: /secret/audit.db is locked")]

    async def down(**kwargs: Any) -> Any:
        raise error[0]

    async def ask() -> None:
        resp = await api.client.get("/audit/sessions", headers=admin.headers)
        body = await expect_error(resp, 503, "sink_unavailable")
        assert body["error"]["message"] == "the sink cannot be queried now; try again later"
        assert resp.headers["Retry-After"] == "5"

    monkeypatch.setattr(api.engine.sink, "list_sessions", down)
    for _ in range(3):
        await ask()
    error[0] = SinkUnreadable("sqlite sink: a row is not JSON")
    await ask()  # another kind of error: logged at once
    error[0] = SinkUnavailable("sqlite sink: /secret/audit.db is locked")
    now[0] += 61
    await ask()
    lines = [r.getMessage() for r in caplog.records if r.name == "session_audit.admin"]
    locked = ("admin query: the sqlite sink cannot be queried:"
              " sqlite sink: /secret/audit.db is locked")
    assert lines == [
        locked,
        "admin query: the sqlite sink cannot be queried: sqlite sink: a row is not JSON",
        locked + " (2 more like it since the last such line)"]


def test_the_operational_reserve_is_as_readme_says() -> None:
    """README: status and flush are recorded up to a reserve past the limit,
    1 % of it, at least 256 KiB."""
    from handlers.admin import operational_reserve

    assert operational_reserve(1 << 20) == 256 * 1024
    assert operational_reserve(25_600_000) == 256 * 1024  # 1 % would be less
    assert operational_reserve(1_000_000_099) == 10_000_000


async def _ended_with_the_sink_down(api: Api, monkeypatch: pytest.MonkeyPatch,
                                    n: int) -> list[str]:
    """The session ids of ``n`` users (user0...) logged in and out while the
    sink takes no part: every ended session stays pending in the spool."""
    from sinks.base import SinkUnavailable

    async def down(part: Any) -> Any:
        raise SinkUnavailable("sqlite sink: down for this test")

    monkeypatch.setattr(api.engine.sink, "write_part", down)
    ended = []
    for i in range(n):
        who = await api.user(f"user{i}")
        await api.client.post("/logout", headers=who.headers)
        ended.append(who.session_id)
    return ended


async def test_a_state_filter_reads_on_past_sessions_of_other_states(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """state=stored with pending sessions newer and older than the one
    stored session: the first page reads past the newer ones to list it,
    and past the older one to know it is the last (next_cursor null), with
    limit=1 as with a larger one."""
    api = await make_api(flush_at_close=False)
    admin = await api.admin()

    write_part = api.engine.sink.write_part
    ended = await _ended_with_the_sink_down(api, monkeypatch, 4)
    start = (await _get(api, admin, f"/audit/sessions/{ended[0]}"))["session_start_time"]
    stored = "f" * 32  # just after ended[0], before the others
    await write_part(sample_part(stored, user="user0", start=start))
    for limit in ("1", "2", "50"):
        body = await _get(api, admin, "/audit/sessions", state="stored", limit=limit)
        assert ([s["session_id"] for s in body["sessions"]], body["next_cursor"]) == (
            [stored], None), limit
    body = await _get(api, admin, "/audit/sessions", state="pending", limit="50")
    assert sorted(s["session_id"] for s in body["sessions"]) == sorted(ended)


async def test_a_state_filter_asks_the_spool_for_that_state_only(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """state=open and state=pending are answered from the spool's sessions
    of that state: sessions of other states newer than them are not read
    page by page (one merged page allowed here), which answered a short
    page with a cursor instead of the sessions asked for."""
    from handlers import admin as admin_handlers

    api = await make_api(flush_at_close=False)
    admin = await api.admin()

    ended = await _ended_with_the_sink_down(api, monkeypatch, 3)
    still_open = [(await api.user(f"user{i}")).session_id for i in (3, 4)]
    monkeypatch.setattr(admin_handlers, "_MAX_PAGES", 1)
    body = await _get(api, admin, "/audit/sessions", state="pending", limit="1")
    (listed,) = body["sessions"]
    assert listed["session_id"] in ended and listed["state"] == "pending"
    body = await _get(api, admin, "/audit/sessions", state="open", limit="3")
    assert {s["session_id"] for s in body["sessions"]} == {*still_open, admin.session_id}
    assert body["next_cursor"] is None


async def test_flush_ends_the_flushers_pause_after_failures(make_api: MakeApi) -> None:
    """POST /audit/flush: what waits for a failure's backoff is sent now."""
    api = await make_api(flush_at_close=False)
    admin = await api.admin()
    backoff = api.engine.flusher.backoff
    backoff.until = backoff.clock() + 3600  # as after a run of sink failures
    alice = await api.user("alice")
    await api.client.post("/logout", headers=alice.headers)
    assert await _session_state(api, admin, alice.session_id) == "pending"
    resp = await api.client.post("/audit/flush", headers=admin.headers)
    assert resp.status == 202 and await resp.json() == {"message": "flush requested"}
    await wait_for(lambda: _is(api, admin, alice.session_id, "stored"), message="stored")


async def test_a_session_the_spool_holds_whole_is_answered_with_the_sink_down(
    make_api: MakeApi,
) -> None:
    """GET /audit/sessions/{id} answers from the spool alone, the sink down,
    while the spool holds every event of the session (as it does of an open
    session none of whose parts was stored)."""
    api = await make_api()
    admin = await api.admin()
    alice = await api.user("alice")
    whole = await _get(api, admin, f"/audit/sessions/{alice.session_id}")

    async def down(session_id: str) -> Any:
        from sinks.base import SinkUnavailable
        raise SinkUnavailable("sqlite sink: database is locked")

    api.engine.sink.session_part_heads = down  # type: ignore[method-assign]
    body = await _get(api, admin, f"/audit/sessions/{alice.session_id}")
    assert body == whole and body["events_complete"] is True
    assert [e["seq"] for e in body["events"]] == list(range(1, body["event_count"] + 1))


@pytest.mark.parametrize(("key", "value"), [
    ("part", True), ("events", {"seq": 1}), ("events", [1, 2]), ("seq", "1"), ("seq", True),
])
async def test_a_sink_part_that_is_no_part_of_events_is_503(
    make_api: MakeApi, key: str, value: Any
) -> None:
    """A stored part another writer appended (a jsonl line) whose number is
    no number, or whose events are no list of events with an integer seq:
    the session cannot be told whole, 503 sink_unavailable (not a 500, nor
    an answer missing events or holding a seq that is no number)."""
    api = await make_api(sink={"type": "jsonl"})
    admin = await api.admin()
    d = api.config.jsonl_dir
    await wait_for(d.exists, message="the jsonl directory")
    sid = "a" * 32
    part = {**sample_part(sid), "type": "session_part"}
    if key == "seq":
        part["events"][1]["seq"] = value
    else:
        part[key] = value
    (d / "audit-2025-01-01.jsonl").write_text(json.dumps(part) + "\n")
    resp = await api.client.get(f"/audit/sessions/{sid}", headers=admin.headers)
    await expect_error(resp, 503, "sink_unavailable")


@pytest.mark.parametrize(("path", "params", "message"), [
    ("/audit/sessions", {"since": "yesterday"},
     "since must be an RFC 3339 time (2026-11-26T14:31:07Z)"),
    ("/audit/sessions", {"until": "2026-02-30T00:00:00Z"},
     "until must be an RFC 3339 time (2026-11-26T14:31:07Z)"),
    ("/audit/security-events", {"limit": "501"}, "limit must be an integer from 1 to 500"),
    ("/audit/sessions", {"cursor": "e30"}, "cursor is not valid"),
    ("/audit/security-events", {"user": "x", "state": "open"}, "unknown parameters: state, user"),
    ("/audit/sessions", {"z" * 150: "1", "y" * 150: "2"},
     "unknown parameters: " + ("y" * 150 + ", " + "z" * 150)[:200]),
])
async def test_a_bad_parameter_is_named_in_the_message(
    api: Api, path: str, params: dict[str, str], message: str
) -> None:
    admin = await api.admin()
    resp = await api.client.get(path, params=params, headers=admin.headers)
    body = await expect_error(resp, 400, "invalid_request")
    assert body["error"]["message"] == message


@pytest.mark.parametrize("path", ["/audit/sessions", "/audit/security-events"])
async def test_limits_up_to_500_are_taken(api: Api, path: str) -> None:
    admin = await api.admin()
    for limit in ("500", "0500", "100", "1"):
        await _get(api, admin, path, limit=limit)


@pytest.mark.parametrize("cursor", [
    encode_cursor("2026-11-27T04:46:00.000Z", 5),  # type: ignore[arg-type]
    encode_cursor(5, "z"),  # type: ignore[arg-type]
    encode_cursor("2026-11-27T04:46:00.000Z", None),  # type: ignore[arg-type]
])
@pytest.mark.parametrize("path", ["/audit/sessions", "/audit/security-events"])
async def test_a_cursor_of_other_types_is_a_400(api: Api, path: str, cursor: str) -> None:
    admin = await api.admin()
    resp = await api.client.get(path, params={"cursor": cursor}, headers=admin.headers)
    await expect_error(resp, 400, "invalid_request")


async def test_a_bound_with_a_fraction_and_an_offset_is_taken_in_its_zone(api: Api) -> None:
    """since/until finer than a millisecond and with an offset from UTC: the
    fraction read from the text, the offset still applied."""
    admin = await api.admin()
    alice = await api.user("alice")
    shown = (await _get(api, admin, f"/audit/sessions/{alice.session_id}"))[
        "session_start_time"]
    t = parse_ts(shown)

    def in_plus_one(seconds: float, tail: str) -> str:  # the time in +01:00
        return format_ts(seconds + 3600)[:-1] + tail + "+01:00"

    async def listed(**params: str) -> bool:
        got = await _get(api, admin, "/audit/sessions", user="alice", **params)
        return alice.session_id in {s["session_id"] for s in got["sessions"]}

    assert await listed(since=in_plus_one(t, "0"), until=in_plus_one(t, "9"))
    assert not await listed(since=in_plus_one(t, "1"))
    assert not await listed(until=in_plus_one(t - 0.001, "9"))


async def test_a_stored_session_the_spool_still_keeps_is_listed_as_stored(
    make_api: MakeApi,
) -> None:
    """With keep_stored_seconds, the spool keeps a stored session, and its
    summary is the one listed (the spool's over the sink's): state stored,
    with its end time and duration, as the sink's would have."""
    api = await make_api(audit={"keep_stored_seconds": 3600})
    admin = await api.admin()
    alice = await api.user("alice")
    await api.client.post("/audit/events", json={"action": "client.x"}, headers=alice.headers)
    resp = await api.client.post("/logout", headers=alice.headers)
    assert resp.status == 200

    async def all_stored() -> bool:
        return (await api.engine.status())["pending_parts"] == 0

    await wait_for(all_stored, message="the session stored")
    kept = await api.engine.spool.read(lambda c: c.execute(
        "SELECT COUNT(*) FROM sessions WHERE session_id = ?", (alice.session_id,)).fetchone()[0])
    assert kept == 1
    (s,) = (await _get(api, admin, "/audit/sessions", user="alice"))["sessions"]
    assert (s["session_id"], s["state"], s["seal_reason"]) == (alice.session_id, "stored", "logout")
    assert TS_RE.match(s["session_end_time"]) and s["session_end_time"] >= s["session_start_time"]
    duration = parse_ts(s["session_end_time"]) - parse_ts(s["session_start_time"])
    assert isinstance(s["session_duration_seconds"], float)
    assert abs(s["session_duration_seconds"] - duration) < 0.002
    assert s["session_duration_seconds"] == round(s["session_duration_seconds"], 3)
    assert (s["event_count"], s["parts"]) == (4, 1)
    detail = await _get(api, admin, f"/audit/sessions/{alice.session_id}")
    assert {k: detail[k] for k in s} == s


async def test_status_and_flush_take_no_parameters(api: Api) -> None:
    admin = await api.admin()
    resp = await api.client.get("/audit/status", params={"verbose": "1"}, headers=admin.headers)
    await expect_error(resp, 400, "invalid_request")
    resp = await api.client.post("/audit/flush", params={"now": "1"}, headers=admin.headers)
    await expect_error(resp, 400, "invalid_request")


async def test_the_record_of_a_query_is_bounded(api: Api) -> None:
    """details.query holds the first 20 names, each cut at 64 characters, and
    their values cut at 200; a repeated name is named cut at 64 too."""
    admin = await api.admin()
    params = [(f"{i:02d}" + "n" * 70, "v" * 250) for i in range(25)]
    resp = await api.client.get("/audit/sessions", params=params,
                                headers={**admin.headers, "X-Request-ID": "big"})
    await expect_error(resp, 400, "invalid_request")
    long = "r" * 70
    resp = await api.client.get("/audit/sessions", params=[(long, "1"), (long, "2")],
                                headers={**admin.headers, "X-Request-ID": "twice"})
    body = await expect_error(resp, 400, "invalid_request")
    assert body["error"]["message"] == f"parameter {long[:64]!r} is given more than once"
    recorded = {e["request_id"]: e for e in await api.events(admin.session_id)
                if e["action"] == "audit.query"}
    assert recorded["big"]["details"]["query"] == {
        (f"{i:02d}" + "n" * 70)[:64]: "v" * 200 for i in range(20)}
    assert recorded["twice"]["details"]["query"] == {long[:64]: "1"}


async def _jsonl_session(make_api: MakeApi, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """GET /audit/sessions/{id} of a session whose parts are these jsonl lines
    (another writer's): status and body."""
    api = await make_api(sink={"type": "jsonl"})
    admin = await api.admin()
    d = api.config.jsonl_dir
    await wait_for(d.exists, message="the jsonl directory")
    (d / "audit-2025-01-01.jsonl").write_text(
        "".join(json.dumps({**p, "type": "session_part"}) + "\n" for p in parts))
    resp = await api.client.get(f"/audit/sessions/{parts[0]['session_id']}",
                                headers=admin.headers)
    return {"status": resp.status, "body": await resp.json()}


async def test_a_stored_part_without_events_does_not_end_the_session_s_events(
    make_api: MakeApi,
) -> None:
    """A part whose events another writer emptied: the events of the parts
    after it are still listed (the answer says it is not complete)."""
    sid = "a" * 32
    first = {**sample_part(sid, 0, final=False), "events": []}
    got = await _jsonl_session(make_api, [first, sample_part(sid, 1, final=True)])
    assert got["status"] == 200, got
    assert [e["seq"] for e in got["body"]["events"]] == [3, 4]
    assert got["body"]["events_complete"] is False


async def test_stored_parts_holding_the_same_seq_are_503(make_api: MakeApi) -> None:
    """Part 1 holding an event at the last seq of part 0 (another writer's
    overlapping parts): the session cannot be told in seq order, each seq
    once; 503 sink_unavailable, not an answer listing seq 2 twice."""
    sid = "a" * 32
    second = sample_part(sid, 1, final=True)
    second["events"][0]["seq"] = 2
    got = await _jsonl_session(make_api, [sample_part(sid, 0, final=False), second])
    assert got["status"] == 503, got
    assert got["body"]["error"]["code"] == "sink_unavailable"


async def test_status_counts_what_waits_for_the_sink(make_api: MakeApi) -> None:
    """The sink unreachable: /audit/status counts the pending parts, their
    events and the pending security events, and the oldest pending record's
    age (here a security event recorded 100 s ago)."""
    api = await make_api(sink={"type": "http", "http": {"url": f"http://127.0.0.1:{free_port()}",
                                                        "timeout_seconds": 1.0}},
                         flush_at_close=False)
    admin = await api.admin()
    alice = await api.user("alice")
    resp = await api.client.post("/logout", headers=alice.headers)
    ended = (await resp.json())["event_count"]

    def old_event(w: Writer) -> None:
        clock, w.clock = w.clock, lambda: time.time() - 100
        try:
            w.append_security(Draft("auth.invalid_token", outcome="denied"), None)
        finally:
            w.clock = clock

    await api.engine.spool.submit(old_event)
    body = await _get(api, admin, "/audit/status")
    assert body["pending_parts"] == 1
    assert body["pending_part_events"] == ended
    assert body["pending_security_events"] == 1
    assert 99 < body["oldest_pending_age_seconds"] < 200
    assert body["dead_letter"] == 0


async def test_a_streamed_session_answer_leaves_no_cycle_behind(api: Api) -> None:
    """The session detail, streamed (StreamedJson), got a callback holding
    its send deadline, which holds the request's task, whose result is the
    answer: a reference cycle kept (with the answer's generator) until a
    full collection, which the server's GC thresholds make rare. Reference
    counting frees it now."""
    import gc

    from handlers.streaming import StreamedJson

    admin = await api.admin()
    alice = await api.user("alice")
    await (await api.client.post("/logout", headers=alice.headers)).read()
    path = f"/audit/sessions/{alice.session_id}"
    await (await api.client.get(path, headers=admin.headers)).read()  # warmed up
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        resp = await api.client.get(path, headers=admin.headers)
        assert resp.status == 200
        await resp.read()
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, StreamedJson)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []

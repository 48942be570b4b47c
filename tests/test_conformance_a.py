"""A clean-room reading of API.md, checked as a user's acceptance tests would.

Sections "Conventions", "Authentication and sessions", "Documents", "What
gets recorded", "Client events" and the event shape of "Audit records":
each check below names the statement it holds the server to. Each test
builds one app and walks through many statements with it (fast).
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

import jwt
from api_fixtures import (
    ERROR_KEYS,
    EVENT_KEYS,
    TS_RE,
    USER_PASSWORD,
    Api,
    Login,
    api,
    assert_clean,
    full_ttl_or_what_is_left,
    make_api,
)
from waiting import wait_for

import server

__all__ = ["api", "make_api"]

JSON_TYPE = "application/json; charset=utf-8"
SECURITY_ACTIONS = {
    "auth.login_failed", "auth.login_throttled", "auth.invalid_token", "auth.token_expired",
    "auth.session_ended", "auth.session_mismatch", "access.denied", "admin.denied",
}


async def answer(resp: Any) -> tuple[int, Any]:
    """Status and JSON body; every answer but a 204 is JSON with the exact
    Content-Type of Conventions, and carries X-Request-ID."""
    assert resp.headers.get("X-Request-ID"), resp.url
    if resp.status == 204:
        assert await resp.read() == b""
        return 204, None
    assert resp.headers["Content-Type"] == JSON_TYPE, (resp.url, resp.headers)
    body = await resp.json()
    if resp.status >= 400:
        # Conventions: {"error": {"code", "message", "request_id"}}, no internals.
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
        assert body["error"]["request_id"] == resp.headers["X-Request-ID"]
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert_clean(json.dumps(body))
    return resp.status, body


def error_code(body: Any) -> str:
    code: str = body["error"]["code"]
    return code


def check_event(e: dict[str, Any]) -> None:
    """Audit records: every key present, target null or {type, id}, details an
    object, ts RFC 3339 UTC with milliseconds."""
    assert set(e) - {"_id"} == EVENT_KEYS, e
    assert TS_RE.match(e["ts"]), e["ts"]
    assert set(e["actor"]) == {"user", "role"}
    assert set(e["source"]) == {"ip", "user_agent"}
    assert e["target"] is None or set(e["target"]) == {"type", "id"}
    assert isinstance(e["details"], dict)
    assert e["outcome"] in ("success", "failure", "denied")
    assert isinstance(e["event_id"], str) and isinstance(e["hash"], str)


def check_security(e: dict[str, Any]) -> None:
    """Security events: same shape, one of the named actions, seq null,
    outcome denied or failure."""
    check_event(e)
    assert e["action"] in SECURITY_ACTIONS, e["action"]
    assert e["seq"] is None
    assert e["outcome"] in ("denied", "failure")


def b64(part: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


async def by_request_id(api: Api, rid: str) -> list[dict[str, Any]]:
    """The security events of one request."""
    return [e for e in await api.security() if e["request_id"] == rid]


# -- Conventions, Authentication and sessions --------------------------------------------


async def test_authentication_and_conventions(api: Api) -> None:
    await api.add_user("alice")
    c = api.client

    # POST /token (JSON): 200 with the four fields, their types; X-Request-ID echoed.
    sent = time.time()
    resp = await c.post("/token", json={"username": "alice", "password": USER_PASSWORD},
                        headers={"X-Request-ID": "Login.rid_1-A"})
    status, body = await answer(resp)
    answered = time.time()
    assert status == 200 and resp.headers["X-Request-ID"] == "Login.rid_1-A"
    assert set(body) == {"access_token", "token_type", "expires_in", "session_id"}
    assert body["token_type"] == "bearer"
    assert isinstance(body["access_token"], str) and isinstance(body["session_id"], str)
    # The JWT: HS256, with sub, sid, role, iat, exp, jti.
    header, claims, _ = body["access_token"].split(".")
    assert b64(header)["alg"] == "HS256"
    assert set(b64(claims)) == {"sub", "sid", "role", "iat", "exp", "jti"}
    # 3600 unless the login itself took over a second (a loaded machine).
    assert type(body["expires_in"]) is int
    assert full_ttl_or_what_is_left(body["expires_in"], b64(claims)["exp"], 3600, sent, answered)
    assert (b64(claims)["sub"], b64(claims)["sid"], b64(claims)["role"]) == (
        "alice", body["session_id"], "user")
    alice = Login("alice", body["access_token"], body["session_id"], body)

    # The OAuth2 form encoding works too (with grant_type=password).
    resp = await c.post("/token", data={"grant_type": "password", "username": "alice",
                                        "password": USER_PASSWORD})
    assert (await answer(resp))[0] == 200

    # X-Request-ID: at most 128 of [A-Za-z0-9._-] is echoed, anything else replaced.
    for given, echoed in (("r" * 128, True), ("r" * 129, False), ("a b", False),
                          ("a/b", False), ("", False), ("._-", True), ("a:b", False),
                          ('a"b', False), ("a;b", False)):
        resp = await c.get("/me", headers={**alice.headers, "X-Request-ID": given})
        got = resp.headers["X-Request-ID"]
        assert (got == given) is echoed, (given, got)
        assert 0 < len(got) <= 128
        await answer(resp)

    # GET /me: five fields, times RFC 3339 UTC with milliseconds.
    resp = await c.get("/me", headers=alice.headers)
    status, me = await answer(resp)
    assert status == 200
    assert me == {"user": "alice", "role": "user", "session_id": alice.session_id,
                  "session_start_time": me["session_start_time"],
                  "expires_at": me["expires_at"]}
    assert TS_RE.match(me["session_start_time"]) and TS_RE.match(me["expires_at"])

    # Login records session.start and token.issue, both with the login's request id.
    events = await api.events(alice.session_id)
    assert [(e["action"], e["outcome"], e["request_id"]) for e in events] == [
        ("session.start", "success", "Login.rid_1-A"), ("token.issue", "success", "Login.rid_1-A")]
    for e in events:
        check_event(e)
        assert e["target"] is None and e["actor"] == {"user": "alice", "role": "user"}
    assert events[0]["details"] == {}  # details is {} by default
    assert events[0]["ts"] == me["session_start_time"]

    # 401 invalid_credentials: the same answer for an unknown user and a wrong password.
    answers = []
    for name, rid in (("alice", "wrong-pw"), ("nobody", "no-user")):
        resp = await c.post("/token", json={"username": name, "password": "not-it"},
                            headers={"X-Request-ID": rid})
        status, body = await answer(resp)
        assert (status, error_code(body)) == (401, "invalid_credentials")
        answers.append(body["error"]["message"])
        (ev,) = await by_request_id(api, rid)
        check_security(ev)
        assert ev["action"] == "auth.login_failed" and ev["session_id"] is None
    assert answers[0] == answers[1]

    # The 401 codes, each a security event: auth.invalid_token with details.reason for
    # missing_token and invalid_token, auth.token_expired, auth.session_ended.
    key = server.jwt_key(api.config)
    now = int(time.time())
    good = {"sub": "alice", "sid": alice.session_id, "role": "user", "iat": now - 60,
            "exp": now + 600, "jti": "x" * 32}
    cases: list[tuple[str, dict[str, str], str, str, str | None]] = [
        ("no-token", {}, "missing_token", "auth.invalid_token", None),
        ("basic", {"Authorization": "Basic YWxpY2U6cHc="}, "missing_token",
         "auth.invalid_token", None),
        ("malformed", {"Authorization": "Bearer not.a.jwt"}, "invalid_token",
         "auth.invalid_token", None),
        ("bad-sig", {"Authorization": "Bearer " + jwt.encode(good, b"k" * 32, "HS256")},
         "invalid_token", "auth.invalid_token", None),
        ("alg-none", {"Authorization": "Bearer " + jwt.encode(good, None, "none")},
         "invalid_token", "auth.invalid_token", None),
        ("hs512", {"Authorization": "Bearer " + jwt.encode(good, key, "HS512")},
         "invalid_token", "auth.invalid_token", None),
        ("no-jti", {"Authorization": "Bearer " + jwt.encode(
            {k: v for k, v in good.items() if k != "jti"}, key, "HS256")},
         "invalid_token", "auth.invalid_token", None),
        ("expired", {"Authorization": "Bearer " + jwt.encode(
            {**good, "iat": now - 600, "exp": now - 60}, key, "HS256")},
         "token_expired", "auth.token_expired", alice.session_id),
    ]
    for rid, headers, code, action, session_id in cases:
        resp = await c.get("/documents", headers={**headers, "X-Request-ID": rid})
        status, body = await answer(resp)
        assert (status, error_code(body)) == (401, code), rid
        assert resp.headers["WWW-Authenticate"].startswith("Bearer "), rid
        (ev,) = await by_request_id(api, rid)
        check_security(ev)
        assert (ev["action"], ev["session_id"]) == (action, session_id), rid
        assert ev["details"]["reason"], rid
        if code == "missing_token":
            assert ev["details"]["reason"] == "missing_token"
    # None of the refused requests acted in the session.
    assert await api.actions(alice.session_id) == ["session.start", "token.issue"]

    # X-Audit-Session-ID: equal is fine; another value 403 session_mismatch + security event.
    resp = await c.get("/me", headers={**alice.headers, "X-Audit-Session-ID": alice.session_id})
    assert (await answer(resp))[0] == 200
    resp = await c.post("/documents", json={"title": "t", "content": "c"},
                        headers={**alice.headers, "X-Audit-Session-ID": "0" * 32,
                                 "X-Request-ID": "mismatch-1"})
    status, body = await answer(resp)
    assert (status, error_code(body)) == (403, "session_mismatch")
    (ev,) = await by_request_id(api, "mismatch-1")
    check_security(ev)
    assert (ev["action"], ev["session_id"], ev["actor"]["user"]) == (
        "auth.session_mismatch", alice.session_id, "alice")
    assert api.documents_in_db() == []  # nothing was done

    # POST /logout: a session_id of another session is 403, the session stays open.
    resp = await c.post("/logout", json={"session_id": "f" * 32}, headers=alice.headers)
    status, body = await answer(resp)
    assert (status, error_code(body)) == (403, "session_mismatch")
    assert (await answer(await c.get("/me", headers=alice.headers)))[0] == 200

    # POST /logout: 200 with the message, session_id and event_count (an int);
    # session.end with the logout's request id; the token is unusable at once.
    resp = await c.post("/logout", json={"session_id": alice.session_id},
                        headers={**alice.headers, "X-Request-ID": "bye-1"})
    status, body = await answer(resp)
    assert status == 200
    events = await api.events(alice.session_id)
    assert body == {"message": "Successfully logged out", "session_id": alice.session_id,
                    "event_count": len(events)}
    assert type(body["event_count"]) is int
    end = events[-1]
    check_event(end)
    assert (end["action"], end["outcome"], end["request_id"]) == ("session.end", "success",
                                                                  "bye-1")
    for i, (method, path) in enumerate((("GET", "/me"), ("GET", "/documents"),
                                        ("POST", "/logout"))):
        resp = await c.request(method, path, headers={**alice.headers,
                                                      "X-Request-ID": f"after-{i}"})
        status, body = await answer(resp)
        assert (status, error_code(body)) == (401, "session_ended")
        (ev,) = await by_request_id(api, f"after-{i}")
        check_security(ev)
        assert (ev["action"], ev["session_id"]) == ("auth.session_ended", alice.session_id)
    assert len(await api.events(alice.session_id)) == len(events)  # sealed: nothing added


async def test_login_throttling(make_api: Any) -> None:
    """Throttling: login_max_failures per (username, IP), 4 x that per IP across
    usernames; then even a correct password gets 429 with Retry-After in
    seconds, and auth.login_throttled is recorded."""
    api = await make_api(auth={"login_max_failures": 2, "login_window_seconds": 120})
    await api.add_user("alice")
    await api.add_user("carol")
    c = api.client
    for _ in range(2):
        resp = await c.post("/token", json={"username": "alice", "password": "nope"})
        assert (await answer(resp))[0] == 401
    resp = await c.post("/token", json={"username": "alice", "password": USER_PASSWORD},
                        headers={"X-Request-ID": "throttled-1"})
    status, body = await answer(resp)
    assert (status, error_code(body)) == (429, "too_many_attempts")
    assert 0 < int(resp.headers["Retry-After"]) <= 120
    (ev,) = await by_request_id(api, "throttled-1")
    check_security(ev)
    assert ev["action"] == "auth.login_throttled"
    # Another username from the same address still has its own budget ...
    assert (await answer(await c.post("/token", json={"username": "carol",
                                                      "password": USER_PASSWORD})))[0] == 200
    # ... until the address has 4 x 2 failures across usernames.
    for i in range(6):
        resp = await c.post("/token", json={"username": f"u{i}", "password": "nope"})
        assert (await answer(resp))[0] == 401
    resp = await c.post("/token", json={"username": "carol", "password": USER_PASSWORD})
    status, body = await answer(resp)
    assert (status, error_code(body)) == (429, "too_many_attempts")
    assert int(resp.headers["Retry-After"]) > 0


# -- Documents and What gets recorded ------------------------------------------------------


async def test_documents_and_what_gets_recorded(api: Api) -> None:
    c = api.client
    alice = await api.user("alice")
    bob = await api.user("bob")
    admin = await api.admin()

    # POST /documents: 201 document; id an opaque string, version 1 (an int), times.
    mib = json.dumps({"title": "T" * 200, "content": "é" * (512 * 1024)}, ensure_ascii=False)
    resp = await c.post("/documents", data=io.BytesIO(mib.encode()),
                        headers={**alice.headers, "Content-Type": "application/json"})
    status, doc = await answer(resp)
    assert status == 201
    assert set(doc) == {"id", "title", "content", "owner", "version", "created_at",
                        "updated_at"}
    assert isinstance(doc["id"], str) and doc["id"]
    assert type(doc["version"]) is int and doc["version"] == 1
    assert doc["owner"] == "alice"
    assert TS_RE.match(doc["created_at"]) and doc["updated_at"] == doc["created_at"]
    did = doc["id"]

    # GET /documents: exactly five fields per document; users see their own, admins all.
    status, listing = await answer(await c.get("/documents", headers=alice.headers))
    assert listing == {"documents": [{k: doc[k] for k in
                                      ("id", "title", "owner", "version", "updated_at")}]}
    assert (await answer(await c.get("/documents", headers=bob.headers)))[1] == {
        "documents": []}
    assert [d["id"] for d in (await answer(await c.get("/documents",
                                                        headers=admin.headers)))[1][
        "documents"]] == [did]

    # PUT: version + 1, optional fields; DELETE 204. Admins may act on any document.
    resp = await c.put(f"/documents/{did}", json={"content": "x", "version": 1},
                       headers=alice.headers)
    status, updated = await answer(resp)
    assert (status, updated["version"], updated["title"]) == (200, 2, "T" * 200)
    assert updated["created_at"] == doc["created_at"] and TS_RE.match(updated["updated_at"])
    resp = await c.put(f"/documents/{did}", json={"title": "by admin"}, headers=admin.headers)
    status, updated = await answer(resp)
    assert (status, updated["version"], updated["owner"]) == (200, 3, "alice")

    # Every refused request of a logged-in caller records its event: failure for
    # not found / version conflict / invalid input, denied (+ access.denied) for a
    # document the caller may not see, which is 404 not_found like a missing one.
    ghost = "0" * 32
    big = io.BytesIO(json.dumps({"title": "t", "content": "x" * (1024 * 1024 + 1)}).encode())
    rows: list[tuple[Login, str, str, dict[str, Any], int, str, str, str, str]] = [
        # who, method, path, kwargs, status, code, action, outcome, reason
        (alice, "GET", f"/documents/{ghost}", {}, 404, "not_found",
         "document.access", "failure", "not_found"),
        (alice, "PUT", f"/documents/{ghost}", {"json": {"title": "x"}}, 404, "not_found",
         "document.update", "failure", "not_found"),
        (alice, "DELETE", f"/documents/{ghost}", {}, 404, "not_found",
         "document.delete", "failure", "not_found"),
        (alice, "POST", f"/documents/{ghost}/chat", {"json": {"message": "hi"}}, 404,
         "not_found", "ai.interaction", "failure", "not_found"),
        (alice, "PUT", f"/documents/{did}", {"json": {"title": "x", "version": 1}}, 409,
         "version_conflict", "document.update", "failure", "version_conflict"),
        (alice, "PUT", f"/documents/{did}", {"json": {"title": 5}}, 400, "invalid_request",
         "document.update", "failure", "invalid_request"),
        (alice, "POST", "/documents", {"json": {"title": "x" * 201, "content": ""}}, 400,
         "invalid_request", "document.create", "failure", "invalid_request"),
        (alice, "POST", "/documents", {"data": b"{nope",
                                       "headers": {"Content-Type": "application/json"}},
         400, "invalid_json", "document.create", "failure", "invalid_json"),
        (alice, "POST", "/documents", {"data": big,
                                       "headers": {"Content-Type": "application/json"}},
         413, "too_large", "document.create", "failure", "too_large"),
        (alice, "POST", f"/documents/{did}/chat", {"json": {"message": "x" * (16 * 1024 + 1)}},
         413, "too_large", "ai.interaction", "failure", "too_large"),
        (alice, "POST", f"/documents/{did}/chat", {"json": {}}, 400, "invalid_request",
         "ai.interaction", "failure", "invalid_request"),
        (bob, "GET", f"/documents/{did}", {}, 404, "not_found",
         "document.access", "denied", "not_owner"),
        (bob, "PUT", f"/documents/{did}", {"json": {"title": "mine"}}, 404, "not_found",
         "document.update", "denied", "not_owner"),
        (bob, "PUT", f"/documents/{did}", {"json": {"title": 5}}, 404, "not_found",
         "document.update", "denied", "not_owner"),
        (bob, "DELETE", f"/documents/{did}", {}, 404, "not_found",
         "document.delete", "denied", "not_owner"),
        (bob, "POST", f"/documents/{did}/chat", {"json": {"message": "hi"}}, 404, "not_found",
         "ai.interaction", "denied", "not_owner"),
    ]
    for i, (who, method, path, kwargs, want, code, action, outcome, reason) in enumerate(rows):
        rid = f"refused-{i}"
        kw = dict(kwargs)
        kw["headers"] = {**who.headers, **kw.get("headers", {}), "X-Request-ID": rid}
        status, body = await answer(await c.request(method, path, **kw))
        assert (status, error_code(body)) == (want, code), (rid, body)
        (ev,) = [e for e in await api.events(who.session_id) if e["request_id"] == rid]
        check_event(ev)
        assert (ev["action"], ev["outcome"], ev["details"].get("reason")) == (
            action, outcome, reason), (rid, ev)
        assert ev["actor"] == {"user": who.user, "role": "user"}
        if action != "document.create":
            assert ev["target"] == {"type": "document", "id": path.split("/")[2]}, rid
        security = await by_request_id(api, rid)
        if outcome == "denied":
            (sec,) = security
            check_security(sec)
            assert (sec["action"], sec["session_id"], sec["target"]) == (
                "access.denied", who.session_id, ev["target"]), rid
        else:
            assert security == [], rid  # a missing document is no security event
    # The refused requests changed nothing.
    status, now = await answer(await c.get(f"/documents/{did}", headers=alice.headers))
    assert (now["version"], now["title"]) == (3, "by admin")

    # Chat: 200 reply, model, usage with integer token counts; ai.interaction records
    # model, latency, token counts, SHA-256 and length of prompt and reply, not the texts.
    resp = await c.post(f"/documents/{did}/chat", json={"message": "what is x"},
                        headers={**alice.headers, "X-Request-ID": "chat-ok"})
    status, chat = await answer(resp)
    assert status == 200 and set(chat) == {"reply", "model", "usage"}
    assert set(chat["usage"]) == {"prompt_tokens", "completion_tokens"}
    assert all(type(v) is int for v in chat["usage"].values())
    (ev,) = [e for e in await api.events(alice.session_id) if e["request_id"] == "chat-ok"]
    d = ev["details"]
    assert (ev["action"], ev["outcome"], d["model"]) == ("ai.interaction", "success",
                                                        chat["model"])
    assert isinstance(d["latency_ms"], int | float)
    assert (d["prompt_tokens"], d["completion_tokens"]) == (
        chat["usage"]["prompt_tokens"], chat["usage"]["completion_tokens"])
    assert d["prompt"]["length"] == len("what is x") and len(d["prompt"]["sha256"]) == 64
    assert d["reply"]["length"] == len(chat["reply"])
    assert "what is x" not in json.dumps(d)

    # DELETE: 204, empty; then 404 for everybody.
    assert (await answer(await c.delete(f"/documents/{did}", headers=alice.headers)))[0] == 204
    status, body = await answer(await c.get(f"/documents/{did}", headers=admin.headers))
    assert (status, error_code(body)) == (404, "not_found")

    # Conventions: 404 and 405 in the error format, with the common codes.
    status, body = await answer(await c.get("/no/such", headers=alice.headers))
    assert (status, error_code(body)) == (404, "not_found")
    resp = await c.patch(f"/documents/{did}", headers=alice.headers)
    status, body = await answer(resp)
    assert (status, error_code(body)) == (405, "method_not_allowed")

    # Every session event carries all the keys; the whole trail reaches the sink,
    # the security events with _id = event_id.
    for who in (alice, bob, admin):
        for e in await api.events(who.session_id):
            check_event(e)
    flushed = await c.post("/audit/flush", headers=admin.headers)
    assert flushed.status == 202
    wanted = {e["event_id"] for e in await api.security()}

    def in_sink() -> bool:
        docs = [json.loads(d) for (d,) in api._sink("SELECT doc FROM security_events")]
        return wanted <= {d["event_id"] for d in docs if d.get("_id") == d["event_id"]}

    await wait_for(in_sink, message="the security events in the sink, _id = event_id")


# -- Client events -------------------------------------------------------------------------


async def test_client_events(api: Api) -> None:
    c = api.client
    alice = await api.user("alice")
    headers = {**alice.headers, "User-Agent": "acceptance/1"}

    # One event: 202 {"accepted": 1}; it joins the caller's session, target null and
    # details {} by default, with the request's id, actor and source.
    resp = await c.post("/audit/events", json={"action": "client.page_view"},
                        headers={**headers, "X-Request-ID": "ce-1"})
    status, body = await answer(resp)
    assert (status, body) == (202, {"accepted": 1})
    ev = (await api.events(alice.session_id))[-1]
    check_event(ev)
    assert (ev["action"], ev["outcome"], ev["target"], ev["details"], ev["request_id"]) == (
        "client.page_view", "success", None, {}, "ce-1")
    assert ev["session_id"] == alice.session_id and ev["seq"] == 3
    assert ev["actor"] == {"user": "alice", "role": "user"}
    assert ev["source"] == {"ip": "127.0.0.1", "user_agent": "acceptance/1"}

    # A list of up to 100: accepted = its length, in order, seq continuing.
    batch = [{"action": f"client.n{i}", "target": {"type": "t", "id": str(i)},
              "details": {"i": i}} for i in range(100)]
    status, body = await answer(await c.post("/audit/events", json=batch, headers=headers))
    assert (status, body) == (202, {"accepted": 100})
    events = (await api.events(alice.session_id))[-100:]
    assert [e["action"] for e in events] == [f"client.n{i}" for i in range(100)]
    assert [e["seq"] for e in events] == list(range(4, 104))
    assert events[7]["target"] == {"type": "t", "id": "7"} and events[7]["details"] == {"i": 7}

    # The limits, inclusive: action name 1..64 of [a-z0-9_.:-], details 4 KiB as JSON.
    fill = "x" * (4096 - len('{"k":""}'))
    ok = [{"action": "client." + "a" * 64}, {"action": "client.a:b-c.d_0"},
          {"action": "client.x", "details": {"k": fill}}]
    for item in ok:
        assert (await answer(await c.post("/audit/events", json=item, headers=headers)))[0] == 202
    bad: list[Any] = [
        [{"action": "client.a"}] * 101, {"action": "client." + "a" * 65},
        {"action": "client."}, {"action": "client.A"}, {"action": "other.a"},
        {"action": "client.x", "details": {"k": fill + "x"}},
        {"action": "client.x", "target": {"type": "t"}},
    ]
    before = len(await api.events(alice.session_id))
    for i, item in enumerate(bad):
        resp = await c.post("/audit/events", json=item,
                            headers={**headers, "X-Request-ID": f"ce-bad-{i}"})
        status, body = await answer(resp)
        assert (status, error_code(body)) == (400, "invalid_request"), item
    # Refused whole: none of their events, one failure record of each attempt.
    added = (await api.events(alice.session_id))[before:]
    assert [(e["outcome"], e["request_id"], e["details"]["reason"]) for e in added] == [
        ("failure", f"ce-bad-{i}", "invalid_request") for i in range(len(bad))]
    assert all(e["action"].startswith("client.") for e in added)

"""POST /token, POST /logout, GET /me, bearer tokens and X-Audit-Session-ID (API.md)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from typing import Any

import jwt
import pytest
from api_fixtures import (
    ADMIN_PASSWORD,
    TS_RE,
    USER_PASSWORD,
    Api,
    MakeApi,
    api,
    expect_error,
    full_ttl_or_what_is_left,
    make_api,
    wait_for,
)
from multidict import CIMultiDict

import server
from audit.config import ConfigError, parse_config
from audit.events import Source, format_ts
from handlers.keys import ACCOUNTS

__all__ = ["api", "make_api"]


# -- POST /token -----------------------------------------------------------------


async def test_login_json_starts_a_session_with_two_events(api: Api) -> None:
    await api.add_user("alice")
    sent = time.time()
    resp = await api.client.post(
        "/token", json={"username": "alice", "password": USER_PASSWORD},
        headers={"X-Request-ID": "login-rid-1", "User-Agent": "pytest-agent/1"},
    )
    body = await resp.json()
    answered = time.time()
    assert resp.status == 200, body
    assert resp.headers["X-Request-ID"] == "login-rid-1"
    assert set(body) == {"access_token", "token_type", "expires_in", "session_id"}
    assert body["token_type"] == "bearer"
    claims = jwt.decode(body["access_token"], server.jwt_key(api.config), algorithms=["HS256"])
    # token_ttl_seconds, not 3599 (truncated): exactly 3600 unless the login
    # itself took over a second (a loaded machine), then what was left of it.
    assert full_ttl_or_what_is_left(body["expires_in"], claims["exp"], 3600, sent, answered)
    assert set(claims) == {"sub", "sid", "role", "iat", "exp", "jti"}
    assert claims["sub"] == "alice" and claims["role"] == "user"
    assert claims["sid"] == body["session_id"]
    # One moment of expiry everywhere: the JWT's exp is a whole second, and
    # /me and token.issue name that same second.
    assert claims["exp"] - claims["iat"] in (3600, 3601)
    me = await api.client.get("/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert (await me.json())["expires_at"] == format_ts(claims["exp"])
    events = await api.events(body["session_id"])
    assert [e["action"] for e in events] == ["session.start", "token.issue"]
    assert events[1]["details"]["expires_at"] == format_ts(claims["exp"])
    for e in events:
        assert e["request_id"] == "login-rid-1"
        assert e["outcome"] == "success"
        assert e["actor"] == {"user": "alice", "role": "user"}
        assert e["source"]["user_agent"] == "pytest-agent/1"
        assert e["source"]["ip"] == "127.0.0.1"
        assert TS_RE.match(e["ts"])
    assert [e["seq"] for e in events] == [1, 2]


async def test_login_form_encoded_with_grant_type(api: Api) -> None:
    resp = await api.client.post(
        "/token",
        data={"username": "admin", "password": ADMIN_PASSWORD, "grant_type": "password"},
    )
    body = await resp.json()
    assert resp.status == 200, body
    assert body["token_type"] == "bearer"
    me = await api.client.get("/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert (await me.json())["role"] == "admin"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"json": {"username": "admin"}}, "invalid_request"),
        ({"json": {"password": "x"}}, "invalid_request"),
        ({"json": {"username": 5, "password": "x"}}, "invalid_request"),
        ({"json": {"username": "admin", "password": ["x"]}}, "invalid_request"),
        ({"json": {"username": "", "password": "x"}}, "invalid_request"),
        ({"json": ["admin", "pw"]}, "invalid_request"),
        ({"json": {"username": "admin", "password": ADMIN_PASSWORD,
                   "grant_type": "client_credentials"}}, "invalid_request"),
        ({"data": {"username": "admin", "password": ADMIN_PASSWORD,
                   "grant_type": "authorization_code"}}, "invalid_request"),
        ({"data": {"username": "admin"}}, "invalid_request"),
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}},
         "invalid_json"),
        ({"data": b"", "headers": {"Content-Type": "application/json"}}, "invalid_json"),
        ({"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}},
         "invalid_json"),
    ],
)
async def test_login_bad_request(api: Api, kwargs: dict[str, Any], code: str) -> None:
    resp = await api.client.post("/token", **kwargs)
    await expect_error(resp, 400, code)


async def test_invalid_credentials_same_answer_for_unknown_user_and_wrong_password(
    api: Api,
) -> None:
    await api.add_user("alice")
    r1 = await api.client.post("/token", json={"username": "alice", "password": "wrong"})
    b1 = await expect_error(r1, 401, "invalid_credentials")
    r2 = await api.client.post("/token", json={"username": "nobody", "password": "wrong"})
    b2 = await expect_error(r2, 401, "invalid_credentials")
    assert "WWW-Authenticate" not in r1.headers  # a login's answer, not a bearer challenge
    b1["error"].pop("request_id")
    b2["error"].pop("request_id")
    assert b1 == b2
    assert set(r1.headers) - {"Date", "X-Request-ID"} == set(r2.headers) - {"Date",
                                                                              "X-Request-ID"}
    failed = await api.wait_security("auth.login_failed", 2)
    assert {e["details"]["username"] for e in failed} == {"alice", "nobody"}
    for e in failed:
        assert e["outcome"] == "denied"
        assert e["details"]["reason"] == "invalid_credentials"
        assert e["session_id"] is None and e["seq"] is None
        assert "wrong" not in json.dumps(e)  # the attempted password is never recorded


async def test_throttle_per_username_and_ip(make_api: MakeApi) -> None:
    api = await make_api(auth={"login_max_failures": 3, "login_window_seconds": 60})
    await api.add_user("alice")
    for _ in range(3):
        resp = await api.client.post("/token", json={"username": "alice", "password": "bad"})
        await expect_error(resp, 401, "invalid_credentials")
    # Throttled now: even the right password is refused.
    resp = await api.client.post("/token", json={"username": "alice", "password": USER_PASSWORD})
    await expect_error(resp, 429, "too_many_attempts")
    retry_after = int(resp.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    resp = await api.client.post("/token", data={"username": "alice", "password": "bad"})
    await expect_error(resp, 429, "too_many_attempts")
    throttled = await api.wait_security("auth.login_throttled", 2)
    assert throttled[0]["details"] == {"username": "alice", "reason": "too_many_attempts",
                                       "retry_after": retry_after}
    assert throttled[0]["outcome"] == "denied"
    assert throttled[0]["source"]["ip"] == "127.0.0.1"
    # Another user from the same address is not affected by alice's failures.
    resp = await api.client.post("/token", json={"username": "admin", "password": ADMIN_PASSWORD})
    assert resp.status == 200
    assert len(await api.security("auth.login_failed")) == 3


async def test_parallel_guesses_past_the_limit_are_not_all_checked(make_api: MakeApi) -> None:
    """Checks still running count against the limit: a burst of parallel
    guesses gets as many checks as the limit allows, the rest 429."""
    api = await make_api(auth={"login_max_failures": 3, "login_window_seconds": 60})
    await api.add_user("alice")

    async def guess(i: int) -> int:
        resp = await api.client.post("/token", json={"username": "alice",
                                                      "password": f"guess-{i}"})
        return resp.status

    statuses = await asyncio.gather(*(guess(i) for i in range(12)))
    assert sorted(statuses) == [401] * 3 + [429] * 9
    assert len(await api.security("auth.login_failed")) == 3


async def test_parallel_correct_logins_of_one_user_all_go_through(make_api: MakeApi) -> None:
    """From a review: more parallel logins of one user than login_max_failures
    got 429 without any failure, the checks in flight counted as failures;
    they now wait for those checks to be decided."""
    api = await make_api(auth={"login_max_failures": 3, "login_window_seconds": 60})
    await api.add_user("alice")

    async def login() -> dict[str, Any]:
        resp = await api.client.post("/token", json={"username": "alice",
                                                      "password": USER_PASSWORD})
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body

    logins = await asyncio.gather(*(login() for _ in range(8)))
    assert len({b["session_id"] for b in logins}) == 8
    assert await api.security("auth.login_throttled") == []


async def test_throttle_per_ip_across_usernames(make_api: MakeApi) -> None:
    api = await make_api(auth={"login_max_failures": 2, "login_window_seconds": 60})
    await api.add_user("alice")
    for i in range(8):  # 4 x login_max_failures, never twice the same username
        resp = await api.client.post("/token", json={"username": f"u{i}", "password": "bad"})
        await expect_error(resp, 401, "invalid_credentials")
    resp = await api.client.post("/token", json={"username": "alice", "password": USER_PASSWORD})
    await expect_error(resp, 429, "too_many_attempts")
    assert int(resp.headers["Retry-After"]) >= 1
    ev = (await api.wait_security("auth.login_throttled"))[0]
    assert ev["details"]["username"] == "alice"


async def test_a_successful_login_does_not_reset_the_ip_budget(make_api: MakeApi) -> None:
    """A caller's own correct login resets that username's count only, not
    its address's count across usernames: else one valid account interleaved
    with guesses at other usernames (7 guesses, 1 own login, again) sprays
    passwords without end (found by mutation testing: resetting both passed)."""
    api = await make_api(auth={"login_max_failures": 2, "login_window_seconds": 3600})
    await api.add_user("mallory")
    for i in range(7):  # one below 4 x login_max_failures
        resp = await api.client.post("/token", json={"username": f"u{i}", "password": "bad"})
        await expect_error(resp, 401, "invalid_credentials")
    await api.login("mallory")
    resp = await api.client.post("/token", json={"username": "u7", "password": "bad"})
    await expect_error(resp, 401, "invalid_credentials")  # the eighth failure
    resp = await api.client.post("/token", json={"username": "u8", "password": "bad"})
    await expect_error(resp, 429, "too_many_attempts")
    resp = await api.client.post("/token", json={"username": "mallory",
                                                  "password": USER_PASSWORD})
    await expect_error(resp, 429, "too_many_attempts")


async def test_successful_login_below_the_limit_resets_the_user_count(make_api: MakeApi) -> None:
    api = await make_api(auth={"login_max_failures": 3})
    await api.add_user("alice")
    for _ in range(2):
        await api.client.post("/token", json={"username": "alice", "password": "bad"})
    await api.login("alice")
    for _ in range(2):
        await api.client.post("/token", json={"username": "alice", "password": "bad"})
    await api.login("alice")


async def test_logins_past_the_waiting_limit_are_refused_at_once(api: Api) -> None:
    """With every bcrypt slot busy and as many password checks waiting as
    allowed, a login is refused at once (429, Retry-After, recorded) rather
    than queued for seconds; once a slot frees, logins work again."""
    await api.add_user("alice")
    accounts = api.app[ACCOUNTS]
    accounts.max_waiting = 0
    # The start-up's dummy hash (a task) holds a slot while it runs: made
    # first, it cannot free a slot after the loop below took the rest (a
    # login then went through: 1 run in 25 under load).
    await accounts.prepare()
    slots = accounts._slots
    held = 0
    while not slots.locked():
        await slots.acquire()
        held += 1
    try:
        resp = await api.client.post("/token", json={"username": "alice",
                                                     "password": USER_PASSWORD},
                                     headers={"X-Request-ID": "busy-1"})
        await expect_error(resp, 429, "too_many_attempts")
        assert resp.headers["Retry-After"] == "1"
        resp = await api.client.post("/token", json={"username": "nobody",
                                                     "password": USER_PASSWORD})
        await expect_error(resp, 429, "too_many_attempts")  # the same for unknown users
    finally:
        for _ in range(held):
            slots.release()
    (ev,) = [e for e in await api.wait_security("auth.login_throttled", 2)
             if e["request_id"] == "busy-1"]
    assert ev["details"] == {"username": "alice", "reason": "server_busy", "retry_after": 1}
    assert ev["outcome"] == "denied" and ev["source"]["ip"] == "127.0.0.1"
    resp = await api.client.post("/token", json={"username": "alice",
                                                 "password": USER_PASSWORD})
    assert resp.status == 200


# -- POST /logout, GET /me ---------------------------------------------------------


async def test_me(api: Api) -> None:
    alice = await api.user("alice")
    resp = await api.client.get("/me", headers=alice.headers)
    body = await resp.json()
    assert resp.status == 200
    assert set(body) == {"user", "role", "session_id", "session_start_time", "expires_at"}
    assert body["user"] == "alice" and body["role"] == "user"
    assert body["session_id"] == alice.session_id
    assert TS_RE.match(body["session_start_time"]) and TS_RE.match(body["expires_at"])
    assert body["expires_at"] > body["session_start_time"]


async def test_logout_ends_the_session_and_the_token(api: Api) -> None:
    alice = await api.user("alice")
    await api.client.get("/documents", headers=alice.headers)
    resp = await api.client.post("/logout", headers={**alice.headers, "X-Request-ID": "bye-1"})
    body = await resp.json()
    assert resp.status == 200, body
    assert body == {"message": "Successfully logged out", "session_id": alice.session_id,
                    "event_count": 4}
    events = await api.events(alice.session_id)
    assert [e["action"] for e in events] == ["session.start", "token.issue", "document.list",
                                             "session.end"]
    assert events[-1]["request_id"] == "bye-1"
    assert events[-1]["details"]["reason"] == "logout"
    for path in ("/me", "/documents"):
        r = await api.client.get(path, headers=alice.headers)
        await expect_error(r, 401, "session_ended")
        assert r.headers["WWW-Authenticate"] == (
            'Bearer realm="session-audit", error="invalid_token",'
            ' error_description="session_ended"')
    r = await api.client.post("/logout", headers=alice.headers)
    await expect_error(r, 401, "session_ended")
    ended = await api.wait_security("auth.session_ended", 3)
    assert all(e["session_id"] == alice.session_id for e in ended)
    assert all(e["actor"] == {"user": "alice", "role": "user"} for e in ended)
    # No event was added to the sealed session by the refused requests.
    assert len(await api.events(alice.session_id)) == 4


async def test_logout_with_matching_session_id_body(api: Api) -> None:
    alice = await api.user("alice")
    resp = await api.client.post("/logout", json={"session_id": alice.session_id},
                                 headers=alice.headers)
    assert resp.status == 200
    assert (await resp.json())["event_count"] == 3


@pytest.mark.parametrize("claimed", ["bob", ""])
async def test_logout_with_another_session_id_is_refused(api: Api, claimed: str) -> None:
    alice = await api.user("alice")
    bob = await api.user("bob")
    claimed_value = bob.session_id if claimed == "bob" else claimed
    resp = await api.client.post("/logout", json={"session_id": claimed_value},
                                 headers=alice.headers)
    await expect_error(resp, 403, "session_mismatch")
    ev = (await api.wait_security("auth.session_mismatch"))[0]
    assert ev["session_id"] == alice.session_id
    assert ev["details"] == {"reason": "logout_session_id", "method": "POST", "path": "/logout"}
    assert (ev["outcome"], ev["actor"]) == ("denied", {"user": "alice", "role": "user"})
    # Neither session ended.
    for who in (alice, bob):
        r = await api.client.get("/me", headers=who.headers)
        assert r.status == 200
    assert await api.actions(bob.session_id) == ["session.start", "token.issue"]


@pytest.mark.parametrize("body", [{"session_id": 42}, {"session_id": ["x"]},
                                  {"foo": 1}, {"session_id": "x", "all": True}])
async def test_logout_with_a_wrong_body_is_400_recorded_and_the_session_stays(
    api: Api, body: dict[str, Any]
) -> None:
    alice = await api.user("alice")
    resp = await api.client.post("/logout", json=body,
                                 headers={**alice.headers, "X-Request-ID": "odd-bye"})
    await expect_error(resp, 400, "invalid_request")
    assert (await api.client.get("/me", headers=alice.headers)).status == 200
    (ev,) = [e for e in await api.events(alice.session_id) if e["request_id"] == "odd-bye"]
    assert (ev["action"], ev["outcome"]) == ("session.end", "failure")
    assert ev["details"]["reason"] == "invalid_request"


# -- X-Audit-Session-ID ----------------------------------------------------------------


async def test_audit_session_header_of_another_session(api: Api) -> None:
    alice = await api.user("alice")
    bob = await api.user("bob")
    headers = {**alice.headers, "X-Audit-Session-ID": bob.session_id}
    for method, path in (("GET", "/documents"), ("POST", "/audit/events"), ("GET", "/me")):
        kwargs: dict[str, Any] = {"json": {"action": "client.x"}} if method == "POST" else {}
        resp = await api.client.request(method, path, headers=headers, **kwargs)
        await expect_error(resp, 403, "session_mismatch")
    # A token of her session claiming a role it does not have: the event
    # names the session's role (a mutation review: the claim's went unseen).
    claims = _claims(alice.session_id, role="admin")
    forged = jwt.encode(claims, server.jwt_key(api.config), algorithm="HS256")
    resp = await api.client.get("/me", headers={"Authorization": f"Bearer {forged}",
                                                "X-Audit-Session-ID": bob.session_id})
    await expect_error(resp, 403, "session_mismatch")
    events = await api.wait_security("auth.session_mismatch", 4)
    assert len(events) == 4
    for e in events:
        assert e["session_id"] == alice.session_id
        assert e["actor"] == {"user": "alice", "role": "user"}
        assert e["outcome"] == "denied"
    # Nothing was written into either session.
    assert await api.actions(bob.session_id) == ["session.start", "token.issue"]
    assert await api.actions(alice.session_id) == ["session.start", "token.issue"]


async def test_the_bearer_scheme_is_case_insensitive(api: Api) -> None:
    """RFC 9110 11.1: an authentication scheme's name is case-insensitive
    (a mutation review: no test sent another case)."""
    alice = await api.user("alice")
    for scheme in ("bearer", "BEARER"):
        resp = await api.client.get("/me", headers={"Authorization": f"{scheme} {alice.token}"})
        assert resp.status == 200, await resp.json()
    assert await api.security() == []


async def test_audit_session_header_matching_is_fine(api: Api) -> None:
    alice = await api.user("alice")
    headers = {**alice.headers, "X-Audit-Session-ID": alice.session_id}
    resp = await api.client.get("/documents", headers=headers)
    assert resp.status == 200
    resp = await api.client.post("/audit/events", json={"action": "client.ok"}, headers=headers)
    assert resp.status == 202
    assert await api.actions(alice.session_id) == [
        "session.start", "token.issue", "document.list", "client.ok"]
    assert await api.security("auth.session_mismatch") == []



async def test_every_audit_session_header_value_must_match(api: Api) -> None:
    """A second X-Audit-Session-ID naming another session is a mismatch too
    (only the first was compared: the other went unseen and unrecorded)."""
    alice = await api.user("alice")
    bob = await api.user("bob")
    headers = CIMultiDict(alice.headers)
    headers.add("X-Audit-Session-ID", alice.session_id)
    headers.add("X-Audit-Session-ID", bob.session_id)
    resp = await api.client.get("/documents", headers=headers)
    await expect_error(resp, 403, "session_mismatch")
    assert (await api.wait_security("auth.session_mismatch"))[0]["session_id"] == \
        alice.session_id
    assert await api.actions(alice.session_id) == ["session.start", "token.issue"]


async def test_two_authorization_headers_are_refused(api: Api) -> None:
    """Two Authorization headers (not a list field) were taken as the first:
    a proxy in front that checked or logged the other one saw another caller
    than we served. Refused as a malformed token, recorded."""
    alice = await api.user("alice")
    bob = await api.user("bob")
    for first, second in ((alice, bob), (alice, alice)):
        headers = CIMultiDict(first.headers)
        headers.add("Authorization", second.headers["Authorization"])
        resp = await api.client.get("/documents", headers=headers)
        await expect_error(resp, 401, "invalid_token")
    events = await api.wait_security("auth.invalid_token", 2)
    assert {e["details"]["reason"] for e in events} == {"several_authorization_headers"}
    assert await api.actions(alice.session_id) == ["session.start", "token.issue"]
    assert await api.actions(bob.session_id) == ["session.start", "token.issue"]

# -- bad tokens --------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], sig: bytes = b"") -> str:
    return ".".join((_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()),
                     _b64(sig)))


def _claims(session_id: str, drop: str | None = None, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {"sub": "alice", "sid": session_id, "role": "user", "iat": now,
                         "exp": now + 600, "jti": "j" * 32}
    if drop is not None:
        c.pop(drop)
    for k, v in changes.items():
        if v is None:
            c.pop(k)
        else:
            c[k] = v
    return c


BAD_TOKENS = [
    # name, code, security action, details.reason
    ("no_header", "missing_token", "auth.invalid_token", "missing_token"),
    ("basic_scheme", "missing_token", "auth.invalid_token", "missing_token"),
    ("empty_bearer", "missing_token", "auth.invalid_token", "missing_token"),
    ("garbage", "invalid_token", "auth.invalid_token", "malformed"),
    ("three_garbage_parts", "invalid_token", "auth.invalid_token", "malformed"),
    ("alg_none", "invalid_token", "auth.invalid_token", "wrong_algorithm"),
    ("alg_none_signed", "invalid_token", "auth.invalid_token", "wrong_algorithm"),
    ("wrong_key", "invalid_token", "auth.invalid_token", "bad_signature"),
    ("tampered_payload", "invalid_token", "auth.invalid_token", "bad_signature"),
    ("hs512", "invalid_token", "auth.invalid_token", "wrong_algorithm"),
    ("rs256_header", "invalid_token", "auth.invalid_token", "wrong_algorithm"),
    ("missing_sub", "invalid_token", "auth.invalid_token", "missing_claim"),
    ("missing_sid", "invalid_token", "auth.invalid_token", "missing_claim"),
    ("missing_role", "invalid_token", "auth.invalid_token", "missing_claim"),
    ("missing_iat", "invalid_token", "auth.invalid_token", "missing_claim"),
    ("missing_exp", "invalid_token", "auth.invalid_token", "missing_claim"),
    ("missing_jti", "invalid_token", "auth.invalid_token", "missing_claim"),
    ("iat_in_future", "invalid_token", "auth.invalid_token", "not_yet_valid"),
    # Signed with our key but not of the types this server issues.
    ("sid_empty", "invalid_token", "auth.invalid_token", "bad_claim"),
    ("role_a_list", "invalid_token", "auth.invalid_token", "bad_claim"),
    ("jti_a_number", "invalid_token", "auth.invalid_token", "invalid"),  # (PyJWT checks jti)
    ("iat_a_bool", "invalid_token", "auth.invalid_token", "bad_claim"),
    ("iat_a_word", "invalid_token", "auth.invalid_token", "invalid"),
    # Issued after now and expired before it: not taken as expired.
    ("iat_in_future_exp_past", "invalid_token", "auth.invalid_token", "not_yet_valid"),
    ("nbf_in_future", "invalid_token", "auth.invalid_token", "not_yet_valid"),
    ("expired", "token_expired", "auth.token_expired", "token_expired"),
]


def _make_bad(name: str, key: bytes, sid: str) -> dict[str, str]:
    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    good = _claims(sid)
    if name == "no_header":
        return {}
    if name == "basic_scheme":
        return {"Authorization": "Basic YWxpY2U6cHc="}
    if name == "empty_bearer":
        return {"Authorization": "Bearer "}
    if name == "garbage":
        return bearer("not-a-jwt")
    if name == "three_garbage_parts":
        return bearer("abc.def.ghi")
    if name == "alg_none":
        return bearer(_unsigned({"alg": "none", "typ": "JWT"}, good))
    if name == "alg_none_signed":
        return bearer(_unsigned({"alg": "none", "typ": "JWT"}, good, b"sig"))
    if name == "wrong_key":
        return bearer(jwt.encode(good, b"k" * 48, algorithm="HS256"))
    if name == "tampered_payload":
        token = jwt.encode(good, key, algorithm="HS256")
        h, _, s = token.split(".")
        forged = _b64(json.dumps({**good, "role": "admin"}).encode())
        return bearer(f"{h}.{forged}.{s}")
    if name == "hs512":
        return bearer(jwt.encode(good, key, algorithm="HS512"))
    if name == "rs256_header":
        return bearer(_unsigned({"alg": "RS256", "typ": "JWT"}, good, b"x" * 256))
    if name.startswith("missing_"):
        return bearer(jwt.encode(_claims(sid, drop=name[8:]), key, algorithm="HS256"))
    if name == "iat_in_future":
        now = int(time.time())
        return bearer(jwt.encode(_claims(sid, iat=now + 3600, exp=now + 7200), key,
                                 algorithm="HS256"))
    odd = {"sid_empty": {"sid": ""}, "role_a_list": {"role": ["admin"]},
           "jti_a_number": {"jti": 7}, "iat_a_bool": {"iat": True}, "iat_a_word": {"iat": "x"}}
    if name in odd:
        return bearer(jwt.encode({**good, **odd[name]}, key, algorithm="HS256"))
    if name == "nbf_in_future":
        return bearer(jwt.encode({**good, "nbf": good["iat"] + 3600}, key, algorithm="HS256"))
    if name == "iat_in_future_exp_past":
        now = int(time.time())
        return bearer(jwt.encode(_claims(sid, iat=now + 3600, exp=now - 60), key,
                                 algorithm="HS256"))
    if name == "expired":
        now = int(time.time())
        return bearer(jwt.encode(_claims(sid, iat=now - 7200, exp=now - 3600), key,
                                 algorithm="HS256"))
    raise AssertionError(name)


@pytest.mark.parametrize(("name", "code", "action", "reason"), BAD_TOKENS,
                         ids=[t[0] for t in BAD_TOKENS])
async def test_bad_token(api: Api, name: str, code: str, action: str, reason: str) -> None:
    alice = await api.user("alice")
    headers = _make_bad(name, server.jwt_key(api.config), alice.session_id)
    resp = await api.client.get("/documents", headers={**headers, "X-Request-ID": f"bad-{name}"})
    await expect_error(resp, 401, code)
    # RFC 6750: a 401 of a protected resource names its scheme; an error
    # code only when a token was sent.
    expected = ('Bearer realm="session-audit"' if code == "missing_token" else
                f'Bearer realm="session-audit", error="invalid_token", error_description="{code}"')
    assert resp.headers["WWW-Authenticate"] == expected
    ev = (await api.wait_security(action))[0]
    assert ev["details"]["reason"] == reason
    assert ev["outcome"] == "denied"
    assert ev["request_id"] == f"bad-{name}"
    assert ev["seq"] is None
    assert (ev["details"]["method"], ev["details"]["path"]) == ("GET", "/documents")
    if name in ("expired", "iat_in_future"):
        # Validly signed, its claims read: the session, user and role are known.
        assert ev["session_id"] == alice.session_id
        assert ev["actor"] == {"user": "alice", "role": "user"}
    else:
        assert ev["session_id"] is None
    # The refused request did not act: no document.list in alice's session.
    assert await api.actions(alice.session_id) == ["session.start", "token.issue"]


async def test_token_expires_and_the_reaper_seals_the_session(make_api: MakeApi) -> None:
    api = await make_api(auth={"token_ttl_seconds": 1})
    alice = await api.user("alice")
    assert (await api.client.get("/me", headers=alice.headers)).status == 200

    async def expired() -> bool:
        r = await api.client.get("/me", headers=alice.headers)
        return r.status == 401 and (await r.json())["error"]["code"] == "token_expired"

    await wait_for(expired, timeout=10, message="token_expired")
    ev = (await api.wait_security("auth.token_expired"))[0]
    assert ev["session_id"] == alice.session_id

    async def sealed() -> bool:
        return (await api.actions(alice.session_id))[-1:] == ["session.end"]

    await wait_for(sealed, message="the reaper sealing the session")
    end = (await api.events(alice.session_id))[-1]
    assert end["details"]["reason"] == "token_expired"


async def test_idle_timeout_ends_the_session(make_api: MakeApi) -> None:
    api = await make_api(audit={"idle_timeout_seconds": 1.0})
    alice = await api.user("alice")
    bob = await api.user("bob")
    await wait_for(lambda: api.engine.session(alice.session_id) is None, timeout=10,
                   message="alice idle")
    resp = await api.client.get("/me", headers=alice.headers)
    await expect_error(resp, 401, "session_ended")
    ev = (await api.wait_security("auth.session_ended"))[0]
    assert ev["session_id"] == alice.session_id

    async def sealed() -> bool:
        return (await api.actions(alice.session_id))[-1:] == ["session.end"]

    await wait_for(sealed, message="the reaper sealing the idle session")
    end = (await api.events(alice.session_id))[-1]
    assert end["details"]["reason"] == "idle_timeout"
    # bob was idle as well; a fresh login works.
    assert api.engine.session(bob.session_id) is None
    again = await api.login("alice")
    assert (await api.client.get("/me", headers=again.headers)).status == 200


async def test_passwords_over_72_bytes_count_in_full(api: Api) -> None:
    """bcrypt reads 72 bytes (bcrypt 5 raises beyond): passwords are pre-hashed,
    so a long passphrase works and its tail is not ignored."""
    long_pw = "correct horse battery staple " * 4  # 116 bytes
    await api.add_user("carol", password=long_pw)
    resp = await api.client.post("/token", json={"username": "carol", "password": long_pw})
    assert resp.status == 200
    same_head = long_pw[:72] + "x" * (len(long_pw) - 72)
    resp = await api.client.post("/token", json={"username": "carol", "password": same_head})
    await expect_error(resp, 401, "invalid_credentials")
    multibyte = "пароль-" * 20  # 260 bytes of UTF-8
    await api.add_user("dmitri", password=multibyte)
    resp = await api.client.post("/token", json={"username": "dmitri", "password": multibyte})
    assert resp.status == 200


async def test_a_forms_percent_escapes_are_read_in_its_charset(api: Api) -> None:
    """A login form's %XX escapes are bytes of the charset the form names, as
    its other bytes are: a Latin-1 form's 'p%E4sswort' is 'pässwort'. They
    were read as UTF-8 whatever the charset, with U+FFFD for what was not
    UTF-8: the right password, escaped, got 401 (and counted as a failed
    guess) while sent unescaped it got 200; and an escape that is no text
    of the charset was checked as U+FFFD instead of refused as malformed."""
    await api.add_user("alice", password="pässwort-1234")
    latin1 = "application/x-www-form-urlencoded; charset=iso-8859-1"
    for body in ("username=alice&password=pässwort-1234".encode("latin-1"),
                 b"username=alice&password=p%E4sswort-1234"):
        resp = await api.client.post("/token", data=body, headers={"Content-Type": latin1})
        assert resp.status == 200, await resp.json()
    form = "application/x-www-form-urlencoded"
    resp = await api.client.post("/token", data=b"username=alice&password=p%C3%A4sswort-1234",
                                 headers={"Content-Type": form})
    assert resp.status == 200, await resp.json()
    for body in (b"username=alice&password=p\xe4sswort-1234",
                 b"username=alice&password=p%E4sswort-1234"):
        resp = await api.client.post("/token", data=body, headers={"Content-Type": form})
        await expect_error(resp, 400, "invalid_request")
    assert await api.security("auth.login_failed") == []


async def test_a_login_form_in_a_codec_that_is_no_charset_is_400(api: Api) -> None:
    """A form's charset (or a multipart part's) that names a Python codec
    which is no character set but a transform (``unicode_escape``:
    ``\\x61lice`` is ``alice``; ``raw_unicode_escape``, ``punycode``,
    ``idna``, ``charmap``) is refused as malformed, not decoded: such a body
    logged in as ``alice`` while a filter in front, and the client, read the
    name ``\\x61lice``. Real charsets still log in."""
    await api.add_user("alice")
    pw = USER_PASSWORD
    escaped = f"username=\\x61lice&password={pw}".encode()
    form = "application/x-www-form-urlencoded; charset="
    for charset, body in (("unicode_escape", escaped), ("Unicode-Escape", escaped),
                          ("raw_unicode_escape", escaped.replace(b"\\x61", b"\\u0061")),
                          ("punycode", f"username=alice&password={pw}".encode()),
                          ("idna", f"username=alice&password={pw}".encode()),
                          ("charmap", f"username=alice&password={pw}".encode())):
        resp = await api.client.post("/token", data=body, headers={"Content-Type": form + charset})
        await expect_error(resp, 400, "invalid_request")

    def part(name: str, value: str, ctype: str | None = None) -> bytes:
        head = f'--XyZ\r\nContent-Disposition: form-data; name="{name}"\r\n'
        return (head + (f"Content-Type: {ctype}\r\n" if ctype else "")
                + f"\r\n{value}\r\n").encode()

    multipart = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    body = (part("username", "\\x61lice", "text/plain; charset=unicode_escape")
            + part("password", pw) + b"--XyZ--\r\n")
    resp = await api.client.post("/token", data=body, headers=multipart)
    await expect_error(resp, 400, "invalid_request")
    assert await api.security("auth.login_failed") == []
    # Real charsets log in, a form's and a part's.
    for charset in ("windows-1252", "shift_jis", "utf-16", "utf-7", "iso-8859-1"):
        body = f"username=alice&password={pw}".encode(charset)
        resp = await api.client.post("/token", data=body, headers={"Content-Type": form + charset})
        assert resp.status == 200, (charset, await resp.json())
    body = (part("username", "alice", "text/plain; charset=windows-1252")
            + part("password", pw, "text/plain; charset=shift_jis") + b"--XyZ--\r\n")
    resp = await api.client.post("/token", data=body, headers=multipart)
    assert resp.status == 200, await resp.json()
    # As request.post() read them: a file is ignored, more than 1000 parts are 413.
    file = b'--XyZ\r\nContent-Disposition: form-data; name="username"; filename="u"\r\n\r\nbob\r\n'
    resp = await api.client.post("/token", data=file + body, headers=multipart)
    assert resp.status == 200, await resp.json()
    many = b"".join(part(f"f{i}", "") for i in range(1000))
    resp = await api.client.post("/token", data=many + body, headers=multipart)
    await expect_error(resp, 413, "too_large")


async def test_a_multipart_login_reads_its_parts_as_post_did(api: Api) -> None:
    """The login's own reading of multipart parts keeps what ``request.post()``
    did (mutation review: dropping each rule passed): exactly
    ``client_max_fields`` parts (1000) log in; a part of another type than
    text is not a field (here a second username, as bytes, is ignored); a
    part without a name and a nested multipart part are 400, not a login
    that ignored them nor a 500."""
    await api.add_user("alice")
    pw = USER_PASSWORD

    def part(name: str | None, value: str, ctype: str | None = None) -> bytes:
        named = "" if name is None else f'; name="{name}"'
        return (f"--XyZ\r\nContent-Disposition: form-data{named}\r\n"
                + (f"Content-Type: {ctype}\r\n" if ctype else "")
                + f"\r\n{value}\r\n").encode()

    multipart = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    login = part("username", "alice") + part("password", pw) + b"--XyZ--\r\n"
    many = b"".join(part(f"f{i}", "") for i in range(998))
    resp = await api.client.post("/token", data=many + login, headers=multipart)
    assert resp.status == 200, await resp.json()
    other = part("username", "bob", "application/octet-stream")
    resp = await api.client.post("/token", data=other + login, headers=multipart)
    assert resp.status == 200, await resp.json()
    nested = (b'--XyZ\r\nContent-Disposition: form-data; name="files"\r\n'
              b"Content-Type: multipart/mixed; boundary=AbC\r\n\r\n"
              b'--AbC\r\nContent-Disposition: file; filename="a.txt"\r\n\r\nx\r\n--AbC--\r\n'
              b"\r\n")
    for first in (part(None, "x"), nested):
        resp = await api.client.post("/token", data=first + login, headers=multipart)
        await expect_error(resp, 400, "invalid_request")


async def test_a_blank_login_form_field_counts_as_given(api: Api) -> None:
    """``password=`` is a password given (empty), not none: given besides
    another it is a field given twice, refused (RFC 6749 3.1), as a filter in
    front that read the first (blank) value would otherwise see another
    request than the one served; alone it is an empty password, refused.
    A login form of more than 16 fields is refused before it is looked at
    (mutation review: dropping blank values, or the field limit, passed)."""
    await api.add_user("alice")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    pw = USER_PASSWORD
    for body in (f"username=alice&password=&password={pw}",
                 f"username=&username=alice&password={pw}",
                 f"username=alice&password={pw}&grant_type=&grant_type=password",
                 "username=alice&password=",
                 f"username=alice&password={pw}&" + "&".join(f"f{i}=" for i in range(15))):
        resp = await api.client.post("/token", data=body.encode(), headers=form)
        await expect_error(resp, 400, "invalid_request")
    # A password of the longest length adduser and passwd take logs in; one more is 400.
    await api.add_user("long", password="p" * 1024)
    resp = await api.client.post("/token", json={"username": "long", "password": "p" * 1024})
    assert resp.status == 200, await resp.json()
    resp = await api.client.post("/token", json={"username": "long", "password": "p" * 1025})
    await expect_error(resp, 400, "invalid_request")
    # 16 fields: a login.
    body = f"username=alice&password={pw}&" + "&".join(f"f{i}=" for i in range(14))
    resp = await api.client.post("/token", data=body.encode(), headers=form)
    assert resp.status == 200, await resp.json()
    assert await api.security("auth.login_failed") == []


async def test_client_address_behind_a_trusted_proxy(make_api: MakeApi) -> None:
    """With server.trusted_proxies, a request from the proxy is attributed to
    the rightmost X-Forwarded-For address that is not a proxy (what the client
    wrote left of it is ignored); the login throttle counts per that address,
    so one client cannot lock everybody out through the shared proxy."""
    api = await make_api(server={"trusted_proxies": "127.0.0.0/8, 10.0.0.0/8"},
                         auth={"login_max_failures": 3})
    await api.add_user("alice")
    await api.add_user("bob")
    xff = {"X-Forwarded-For": "198.51.100.9, 203.0.113.7, 10.1.2.3"}
    alice = await api.login("alice", headers=xff)
    (start,) = [e for e in await api.events(alice.session_id) if e["action"] == "session.start"]
    assert start["source"]["ip"] == "203.0.113.7"
    resp = await api.client.get("/documents", headers={**alice.headers,
                                                       "X-Forwarded-For": "192.0.2.44"})
    assert resp.status == 200
    listed = [e for e in await api.events(alice.session_id) if e["action"] == "document.list"]
    assert listed[-1]["source"]["ip"] == "192.0.2.44"
    for _ in range(4):  # an attacker behind the same proxy, one address
        resp = await api.client.post("/token", json={"username": "bob", "password": "wrong"},
                                     headers={"X-Forwarded-For": "192.0.2.66"})
        assert resp.status in (401, 429)
    failed = await api.security("auth.login_failed")
    assert {e["source"]["ip"] for e in failed} == {"192.0.2.66"}
    bob = await api.login("bob", headers={"X-Forwarded-For": "192.0.2.77"})
    assert bob.session_id  # bob from elsewhere is not locked out
    resp = await api.client.post("/token", json={"username": "bob", "password": USER_PASSWORD},
                                 headers={"X-Forwarded-For": "192.0.2.66"})
    assert resp.status == 429


async def test_an_ipv6_client_counts_by_its_slash_64(make_api: MakeApi) -> None:
    """Each address of a /64 would otherwise get a budget of its own: one
    host with a /64 could guess without end."""
    api = await make_api(server={"trusted_proxies": "127.0.0.1"},
                         auth={"login_max_failures": 3})
    await api.add_user("alice")
    for i in range(3):  # three addresses of one /64
        resp = await api.client.post("/token", json={"username": "alice", "password": "bad"},
                                     headers={"X-Forwarded-For": f"2001:db8:1:2::{i + 1:x}"})
        await expect_error(resp, 401, "invalid_credentials")
    resp = await api.client.post("/token", json={"username": "alice", "password": USER_PASSWORD},
                                 headers={"X-Forwarded-For": "2001:db8:1:2:ffff::9"})
    await expect_error(resp, 429, "too_many_attempts")
    # The record keeps the address itself; another /64 and IPv4 are not affected.
    failed = await api.security("auth.login_failed")
    assert {e["source"]["ip"] for e in failed} == {f"2001:db8:1:2::{i}" for i in (1, 2, 3)}
    for other in ("2001:db8:1:3::1", "192.0.2.1"):
        await api.login("alice", headers={"X-Forwarded-For": other})


def test_throttle_keys() -> None:
    key = server.LoginThrottle.client_key
    assert key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert key("::ffff:192.0.2.1") == "192.0.2.1"
    assert key("192.0.2.1") == "192.0.2.1"
    assert key(None) == "-" and key("") == "-" and key("not-an-ip") == "not-an-ip"


def test_failures_that_left_the_window_stop_counting_while_newer_ones_stay() -> None:
    """Retry-After is counted from the oldest failure that holds the attempt
    back; back after it, the attempt is let in although a newer failure is
    still in the window (found by mutation testing: failures kept a second
    past the window passed the suite, the key then being dropped whole only
    when its newest failure had left too)."""
    from conftest import FakeClock

    clock = FakeClock(1000.0)
    throttle = server.LoginThrottle(3, 300.0, clock=clock)
    for _ in range(2):
        throttle.failed("alice", "10.0.0.1")
    clock.advance(100)
    throttle.failed("alice", "10.0.0.1")  # the third: throttled now
    clock.advance(50)
    wait = throttle.retry_after("alice", "10.0.0.1")
    assert wait == 150  # the first two leave the window at 1300
    clock.advance(wait)
    assert throttle.retry_after("alice", "10.0.0.1") is None


async def test_forwarded_for_is_ignored_without_trusted_proxies(api: Api) -> None:
    await api.add_user("alice")
    alice = await api.login("alice", headers={"X-Forwarded-For": "203.0.113.7"})
    (start,) = [e for e in await api.events(alice.session_id) if e["action"] == "session.start"]
    assert start["source"]["ip"] == "127.0.0.1"


def test_a_bad_trusted_proxy_is_named() -> None:
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies"):
        parse_config({"server": {"trusted_proxies": "10.0.0.0/8, not-an-ip"}})


@pytest.mark.parametrize(("hop", "seen"), [
    ("203.0.113.5:4444", "203.0.113.5"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("2001:db8::1", "2001:db8::1"),
    ("::ffff:203.0.113.9", "203.0.113.9"),
    ("[fe80::1%eth0]:443", "fe80::1"),  # the zone dropped
    ("fe80::1%" + "A" * 5000, "127.0.0.1"),  # not an address: the proxy's
    ("unknown", "127.0.0.1"),
])
async def test_forwarded_for_entries_with_ports_and_odd_forms(
    make_api: MakeApi, hop: str, seen: str
) -> None:
    """Some balancers add the client's port; a hop that is not an address is
    not guessed at (the last trusted hop is used)."""
    api = await make_api(server={"trusted_proxies": "127.0.0.1, ::ffff:10.0.0.0/104"})
    await api.add_user("alice")
    alice = await api.login("alice", headers={"X-Forwarded-For": hop})
    (start,) = [e for e in await api.events(alice.session_id) if e["action"] == "session.start"]
    assert start["source"]["ip"] == seen


def test_ipv4_mapped_proxy_ranges_and_addresses() -> None:
    """A proxy listed in IPv4-mapped form matches its IPv4 address (addresses
    are compared in IPv4 form), and a dual-stack listener's mapped address is
    recorded in IPv4 form."""
    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web import Application

    from audit.config import parse_networks
    from audit.middleware import TRUSTED_PROXIES, client_ip

    nets = parse_networks("::ffff:10.0.0.0/104, 2001:db8::/32")
    assert [str(n) for n in nets] == ["10.0.0.0/8", "2001:db8::/32"]

    def ip(remote: str, xff: str | None) -> str | None:
        app = Application()
        app[TRUSTED_PROXIES] = nets

        class Transport:
            def get_extra_info(self, name: str, default: object = None) -> object:
                return (remote, 443) if name == "peername" else default

        headers = {"X-Forwarded-For": xff} if xff else {}
        req = make_mocked_request("GET", "/", headers=headers, app=app,
                                  transport=Transport())
        return client_ip(req)

    assert ip("::ffff:10.1.2.3", "203.0.113.7") == "203.0.113.7"
    assert ip("10.1.2.3", "203.0.113.7:5555") == "203.0.113.7"
    assert ip("::ffff:198.51.100.1", "203.0.113.7") == "198.51.100.1"  # not a proxy


@pytest.mark.parametrize(("lines", "seen"), [
    # One X-Forwarded-For field per hop (RFC 9110: the same as one list):
    # the lines are read in order, the client's own first, the proxies' last.
    (["198.51.100.9", "203.0.113.7", "10.1.2.3"], "203.0.113.7"),
    (["198.51.100.9, 203.0.113.7", "10.1.2.3"], "203.0.113.7"),
    # A hop that is not an address (a proxy's "unknown") stops the walk: what
    # the client wrote left of it is not taken instead.
    (["198.51.100.9, unknown"], "10.0.0.1"),
    (["198.51.100.9, unknown, 10.1.2.3"], "10.1.2.3"),
    # A fully written IPv6 address with a port is still an address.
    (["[2001:0db8:0000:0000:0000:ff00:0042:8329]:65535"], "2001:db8::ff00:42:8329"),
])
def test_forwarded_for_over_several_lines_and_past_a_bad_hop(lines: list[str], seen: str) -> None:
    """A mutation review: only the first (or last) X-Forwarded-For line read,
    a bad hop skipped over to the client's own entries, or a long hop taken
    as not an address: each passed the suite."""
    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web import Application

    from audit.config import parse_networks
    from audit.middleware import TRUSTED_PROXIES, client_ip

    app = Application()
    app[TRUSTED_PROXIES] = parse_networks("10.0.0.0/8")

    class Transport:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return ("10.0.0.1", 443) if name == "peername" else default

    headers = CIMultiDict(("X-Forwarded-For", line) for line in lines)
    req = make_mocked_request("GET", "/", headers=headers, app=app, transport=Transport())
    assert client_ip(req) == seen


async def test_a_request_whose_session_ends_on_the_way_is_recorded(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session ends (the reaper, a logout elsewhere, passwd or disable)
    after the middleware let the request in, before its record: 401
    session_ended, recorded as auth.session_ended like the middleware's, and
    the action does not happen."""
    alice = await api.user("alice")
    doc = await api.create_doc(alice)
    engine = api.engine
    real = engine.record

    async def racing(session_id: str, draft: Any, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(engine, "record", real)
        await engine.end_session(session_id, Source(user="alice", role="user"), "idle_timeout")
        return await real(session_id, draft, *args, **kwargs)

    monkeypatch.setattr(engine, "record", racing)
    resp = await api.client.delete(f"/documents/{doc['id']}", headers=alice.headers)
    await expect_error(resp, 401, "session_ended")
    (ev,) = await api.wait_security("auth.session_ended")
    assert ev["session_id"] == alice.session_id and ev["actor"]["user"] == "alice"
    assert ev["details"] == {"reason": "session_ended_during_action", "method": "DELETE",
                             "path": f"/documents/{doc['id']}"}
    assert "document.delete" not in await api.actions(alice.session_id)
    again = await api.login("alice")
    resp = await api.client.get(f"/documents/{doc['id']}", headers=again.headers)
    assert resp.status == 200  # not deleted


async def test_a_token_issued_before_the_clock_stepped_back_still_works(
    make_api: MakeApi,
) -> None:
    """Found by a review: the clock ran ten minutes ahead when alice logged
    in (a host clock wrong at boot), then NTP stepped it back. Her token's
    iat is now in the future, and PyJWT refused it as not yet valid: every
    session started before the correction was locked out (401
    invalid_token, an auth.invalid_token security event per request) until
    the clock caught up. A signed token whose iat is its open session's
    start is this server's own and is accepted; other future iats are not."""
    from handlers.keys import ENGINE, TOKENS

    offset = [600.0]

    def ahead() -> float:
        return time.time() + offset[0]

    def setup(app: Any) -> None:
        engine = app[ENGINE]
        engine.clock = engine.spool.clock = app[TOKENS].clock = ahead

    api = await make_api(setup=setup)
    alice = await api.user("alice")
    offset[0] = 0.0  # NTP steps the clock back
    resp = await api.client.get("/me", headers=alice.headers)
    assert resp.status == 200, await resp.json()
    assert (await resp.json())["session_id"] == alice.session_id
    assert await api.security("auth.invalid_token") == []
    # A signed token naming her session with another iat in the future is not hers.
    claims = jwt.decode(alice.token, options={"verify_signature": False})
    forged = jwt.encode({**claims, "iat": claims["iat"] + 3600}, server.jwt_key(api.config),
                        algorithm="HS256")
    resp = await api.client.get("/me", headers={"Authorization": f"Bearer {forged}"})
    await expect_error(resp, 401, "invalid_token")


# -- edges of the middleware a mutation review found untested ----------------------------


async def _raw_get(api: Api, path: str, headers: list[tuple[str, bytes]]) -> tuple[int, bytes]:
    """``GET path`` with header values sent as the bytes given (aiohttp's client
    encodes them): the status and the whole raw answer, headers and body."""
    server_ = api.client.server
    reader, writer = await asyncio.open_connection(server_.host, server_.port)
    try:
        head = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers)
        writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                     b"Connection: close\r\n" + head + b"\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status = int(raw.split(b" ", 2)[1])
    return status, raw


def _raw_json(raw: bytes) -> Any:
    return json.loads(raw.partition(b"\r\n\r\n")[2])


async def test_no_user_agent_is_recorded_as_null_everywhere(api: Api) -> None:
    """Without a User-Agent header (or with an empty one), every record of the
    request says ``source.user_agent: null``, the same in security events
    (refused tokens of every kind) and in session events (login, an action)."""
    no_ua: dict[str, Any] = {"skip_auto_headers": ["User-Agent"]}
    await api.add_user("alice")
    resp = await api.client.post("/token", json={"username": "alice", "password": USER_PASSWORD},
                                 **no_ua)
    body = await resp.json()
    assert resp.status == 200, body
    alice_sid = body["session_id"]
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    resp = await api.client.get("/documents", headers=headers, **no_ua)
    assert resp.status == 200
    resp = await api.client.get("/documents", headers={**headers, "User-Agent": ""})
    assert resp.status == 200
    events = await api.events(alice_sid)
    assert [e["action"] for e in events] == [
        "session.start", "token.issue", "document.list", "document.list"]
    assert [e["source"] for e in events] == [{"ip": "127.0.0.1", "user_agent": None}] * 4

    now = int(time.time())
    expired = jwt.encode(_claims(alice_sid, iat=now - 7200, exp=now - 3600),
                         server.jwt_key(api.config), algorithm="HS256")
    for sent, code in (({}, "missing_token"),
                       ({"Authorization": "Bearer not-a-jwt"}, "invalid_token"),
                       ({"Authorization": f"Bearer {expired}"}, "token_expired")):
        resp = await api.client.get("/documents", headers=sent, **no_ua)
        await expect_error(resp, 401, code)
    refused = await api.wait_security("auth.invalid_token", 2)
    refused += await api.wait_security("auth.token_expired")
    assert sorted(e["details"]["reason"] for e in refused) == [
        "malformed", "missing_token", "token_expired"]
    for e in refused:
        assert e["source"] == {"ip": "127.0.0.1", "user_agent": None}, e
        assert e["outcome"] == "denied"


async def test_long_user_agents_and_paths_are_cut_and_spaces_after_bearer_are_fine(
    api: Api,
) -> None:
    """A mutation review: the 512-character cut of User-Agent (in session and
    security events) and the 256-character cut of a refused request's path
    went untested, as did RFC 6750's ``1*SP`` between ``Bearer`` and the token."""
    alice = await api.user("alice")
    ua = "u" * 600
    token = alice.headers["Authorization"].partition(" ")[2]
    resp = await api.client.get("/documents", headers={"Authorization": f"Bearer   {token}",
                                                       "User-Agent": ua})
    assert resp.status == 200, await resp.json()
    listed = (await api.events(alice.session_id))[-1]
    assert listed["action"] == "document.list"
    assert listed["source"]["user_agent"] == ua[:512]
    path = "/documents/" + "d" * 300
    resp = await api.client.get(path, headers={"Authorization": "Bearer junk", "User-Agent": ua})
    await expect_error(resp, 401, "invalid_token")
    (ev,) = await api.wait_security("auth.invalid_token")
    assert ev["source"]["user_agent"] == ua[:512]
    assert ev["details"]["path"] == path[:256]


@pytest.mark.parametrize("xff", [None, "", " , "])
async def test_a_trusted_proxy_without_forwarded_for_is_the_client(
    make_api: MakeApi, xff: str | None
) -> None:
    """A request from a trusted proxy with no X-Forwarded-For, or an empty
    one, is attributed to the connection's address (the proxy's: nothing
    names another), in session and security events alike."""
    api = await make_api(server={"trusted_proxies": "127.0.0.1"})
    sent = {} if xff is None else {"X-Forwarded-For": xff}
    await api.add_user("alice")
    alice = await api.login("alice", headers=sent)
    resp = await api.client.get("/documents", headers={**alice.headers, **sent})
    assert resp.status == 200
    events = await api.events(alice.session_id)
    assert [e["action"] for e in events] == ["session.start", "token.issue", "document.list"]
    assert {e["source"]["ip"] for e in events} == {"127.0.0.1"}
    resp = await api.client.get("/documents", headers={"Authorization": "Bearer junk", **sent})
    await expect_error(resp, 401, "invalid_token")
    (ev,) = await api.wait_security("auth.invalid_token")
    assert ev["source"]["ip"] == "127.0.0.1"


async def test_a_session_id_header_of_bytes_that_are_not_utf8(api: Api) -> None:
    """X-Audit-Session-ID of bytes that are not UTF-8 (aiohttp reads them as
    lone surrogates): 403 session_mismatch, recorded, not a 500; the value
    is neither echoed nor stored."""
    alice = await api.user("alice")
    bad = alice.session_id.encode()[:8] + b"\xff\xfe\xc3("
    status, raw = await _raw_get(api, "/documents", [
        ("Authorization", alice.headers["Authorization"].encode()),
        ("X-Audit-Session-ID", bad),
        ("X-Request-ID", b"raw-sid-1"),
    ])
    body = _raw_json(raw)
    assert status == 403, raw
    assert body["error"]["code"] == "session_mismatch"
    assert body["error"]["request_id"] == "raw-sid-1"
    assert b"\xff" not in raw and b"\xfe" not in raw
    (ev,) = await api.wait_security("auth.session_mismatch")
    assert ev["outcome"] == "denied" and ev["request_id"] == "raw-sid-1"
    assert ev["session_id"] == alice.session_id
    assert ev["actor"] == {"user": "alice", "role": "user"}
    assert ev["details"] == {"reason": "session_mismatch", "method": "GET",
                             "path": "/documents"}
    rows = await api.engine.spool.read(lambda c: c.execute(
        "SELECT json FROM security_events").fetchall())
    assert all("\udcff" not in r[0] and "\\udcff" not in r[0] for r in rows)
    assert await api.actions(alice.session_id) == ["session.start", "token.issue"]


@pytest.mark.parametrize("token", [
    "é" * 40,  # UTF-8, not ASCII
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.\u00e9\u00e9",
    b"\xff\xfe\x80abc",  # not UTF-8 at all
])
async def test_a_token_that_is_not_ascii_is_malformed(api: Api, token: str | bytes) -> None:
    """A bearer token with characters outside ASCII (a JWT is base64url and
    dots) is 401 invalid_token, recorded as auth.invalid_token with reason
    ``malformed``; not a 500, and not echoed."""
    raw_token = token if isinstance(token, bytes) else token.encode()
    status, raw = await _raw_get(api, "/documents", [
        ("Authorization", b"Bearer " + raw_token), ("X-Request-ID", b"raw-token-1")])
    assert status == 401, raw
    body = _raw_json(raw)
    assert body["error"]["code"] == "invalid_token"
    assert raw_token not in raw
    assert (b'WWW-Authenticate: Bearer realm="session-audit", error="invalid_token", '
            b'error_description="invalid_token"') in raw
    (ev,) = await api.wait_security("auth.invalid_token")
    assert ev["details"] == {"reason": "malformed", "method": "GET", "path": "/documents"}
    assert (ev["outcome"], ev["session_id"], ev["request_id"]) == ("denied", None, "raw-token-1")


async def test_a_token_whose_header_nests_too_deep_is_malformed(api: Api) -> None:
    """A bearer token whose header is JSON nested 2,000 arrays deep (5 kB, a
    header field aiohttp takes): PyJWT before 2.14 let the parser's
    RecursionError out of ``jwt.decode`` before any signature check, a 500
    for anyone. It is 401 invalid_token, recorded as ``malformed``."""
    token = ".".join((_b64(b"[" * 2000 + b"]" * 2000), _b64(b"{}"), _b64(b"sig")))
    resp = await api.client.get("/documents", headers={"Authorization": f"Bearer {token}"})
    await expect_error(resp, 401, "invalid_token")
    (ev,) = await api.wait_security("auth.invalid_token")
    assert ev["details"] == {"reason": "malformed", "method": "GET", "path": "/documents"}


async def test_a_future_iat_is_taken_only_within_the_skew_of_its_session_start(
    api: Api,
) -> None:
    """A signed token whose iat is after now is accepted when iat is within
    ISSUED_AT_START_SECONDS of its open session's start (this server's own,
    issued before its clock stepped back), refused as not_yet_valid just
    outside it; once the session has ended, such a token gets session_ended
    like any token of ours after logout."""
    from audit.middleware import ISSUED_AT_START_SECONDS

    key = server.jwt_key(api.config)
    alice = await api.user("alice")
    session = api.engine.session(alice.session_id)
    assert session is not None
    start = int(session.start_ts)  # at most a second before start_ts

    def token(iat: int) -> dict[str, str]:
        claims = _claims(alice.session_id, iat=iat, exp=int(time.time()) + 600)
        return {"Authorization": f"Bearer {jwt.encode(claims, key, algorithm='HS256')}"}

    inside = start + int(ISSUED_AT_START_SECONDS)  # within (start_ts - 1, start_ts]
    resp = await api.client.get("/me", headers=token(inside))
    assert resp.status == 200, await resp.json()
    assert await api.security("auth.invalid_token") == []
    outside = start + int(ISSUED_AT_START_SECONDS) + 2  # over a second past the skew
    resp = await api.client.get("/documents", headers=token(outside))
    await expect_error(resp, 401, "invalid_token")
    (ev,) = await api.wait_security("auth.invalid_token")
    assert ev["details"] == {"reason": "not_yet_valid", "method": "GET", "path": "/documents"}
    assert ev["outcome"] == "denied"
    assert await api.actions(alice.session_id) == ["session.start", "token.issue"]
    # One of bob's naming alice's open session names no session of his: it
    # goes on to the session check, as after logout (a mutation review: the
    # skew was measured against her session's start instead).
    bobs = {**_claims(alice.session_id, iat=int(time.time()) + 3600,
                      exp=int(time.time()) + 7200), "sub": "bob"}
    resp = await api.client.get("/documents", headers={
        "Authorization": f"Bearer {jwt.encode(bobs, key, algorithm='HS256')}"})
    await expect_error(resp, 401, "session_ended")
    (ev,) = await api.wait_security("auth.session_ended")
    assert (ev["session_id"], ev["actor"]) == (alice.session_id,
                                               {"user": "bob", "role": "user"})

    assert (await api.client.post("/logout", headers=alice.headers)).status == 200
    for iat in (inside, int(time.time()) + 3600):
        resp = await api.client.get("/documents", headers=token(iat))
        await expect_error(resp, 401, "session_ended")
    ended = (await api.wait_security("auth.session_ended", 3))[1:]
    assert len(ended) == 2
    for ev in ended:
        assert ev["session_id"] == alice.session_id
        assert ev["actor"] == {"user": "alice", "role": "user"}
        assert ev["details"] == {"reason": "session_ended", "method": "GET",
                                 "path": "/documents"}
    assert len(await api.security("auth.invalid_token")) == 1


async def test_a_multipart_login_whose_part_headers_cannot_be_read_is_400(api: Api) -> None:
    """A part's header line that is no header, or a ``_charset_`` field
    (RFC 7578 4.6: aiohttp 3.14 takes its value, then reads the rest of the
    part as the next part's headers, and fails on every such body): aiohttp
    raises HttpProcessingError, which was a 500 with a traceback logged. It
    is 400 ``invalid_request``, as another malformed body is."""
    await api.add_user("alice")
    ctype = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    rest = (f'--XyZ\r\nContent-Disposition: form-data; name="username"\r\n\r\nalice\r\n'
            f'--XyZ\r\nContent-Disposition: form-data; name="password"\r\n\r\n'
            f"{USER_PASSWORD}\r\n--XyZ--\r\n").encode()
    for head in (b'--XyZ\r\nContent-Disposition: form-data; name="_charset_"\r\n\r\n'
                 b"utf-8\r\n",
                 b'--XyZ\r\nContent-Disposition: form-data; name="x"\r\nno header\r\n\r\n'
                 b"y\r\n"):
        resp = await api.client.post("/token", data=head + rest, headers=ctype)
        await expect_error(resp, 400, "invalid_request")
    assert await api.security("auth.login_failed") == []


async def test_a_multipart_login(api: Api) -> None:
    """multipart/form-data logs in as the other encodings do; without a
    Content-Length, or with a Content-Encoding (aiohttp reads such a body
    itself, and would inflate it past the login's 64 KiB), it is 400
    (mutation review: no test logged in with one, and dropping either
    condition passed)."""
    await api.add_user("alice")
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\n"
            f"alice\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"password\"\r\n"
            f"\r\n{USER_PASSWORD}\r\n--{boundary}--\r\n").encode()
    ctype = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    resp = await api.client.post("/token", data=body, headers=ctype)
    answer = await resp.json()
    assert resp.status == 200, answer
    me = await api.client.get("/me", headers={"Authorization": f"Bearer {answer['access_token']}"})
    assert (await me.json())["user"] == "alice"

    async def chunked() -> Any:
        yield body

    resp = await api.client.post("/token", data=chunked(), headers=ctype)
    await expect_error(resp, 400, "invalid_request")
    resp = await api.client.post("/token", data=gzip.compress(body),
                                 headers={**ctype, "Content-Encoding": "gzip"})
    await expect_error(resp, 400, "invalid_request")
    # A body of another boundary: 400 with a message, as every error has.
    resp = await api.client.post("/token", data=body.replace(b"XyZ", b"AbC"), headers=ctype)
    await expect_error(resp, 400, "invalid_request")
    assert await api.security("auth.login_failed") == []


async def test_a_json_login_sent_as_a_form_says_what_is_wrong(api: Api) -> None:
    """``curl -d '{"username": ...}'`` without a Content-Type header sends
    JSON labelled as a form: still 400 (a form it is read as, and so not
    logged in, as a filter in front reads it too), but the message says
    what to change instead of that the fields are missing."""
    await api.add_user("alice")
    body = json.dumps({"username": "alice", "password": USER_PASSWORD})
    resp = await api.client.post("/token", data=body.encode(), headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    error = await expect_error(resp, 400, "invalid_request")
    assert "send it as application/json" in error["error"]["message"]
    resp = await api.client.post("/token", data=body.encode(), headers={
        "Content-Type": "application/json"})
    assert resp.status == 200
    # A form of other fields is told the fields are missing, as before.
    resp = await api.client.post("/token", data=b"user=alice", headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    error = await expect_error(resp, 400, "invalid_request")
    assert "required" in error["error"]["message"]

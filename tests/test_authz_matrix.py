"""Every endpoint of API.md against every identity, on one real server.

One table: for each endpoint, the owner of a document, another user, an
admin, and callers who must not get in (no token, a malformed one, one
signed with another key, ``alg: none``, HS512, expired, its session logged
out, idle, past its longest duration, its user disabled or given a new
password since, a ``sid`` naming another user's session, a role claim the
session does not have, ``X-Audit-Session-ID`` naming another user's
session). Each cell says the status and error code, the audit event
recorded in the caller's own session (action, outcome, actor), the security
event, and that nothing of the other user reaches the body. Audit records
are read back through the admin API, by each request's ``X-Request-ID``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
import urllib.parse
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from live_server import ADMIN_PASSWORD, JWT_SECRET, Live
from waiting import wait_for

PASSWORD = "user-password-for-tests"
IDLE = 1.5
# Long enough for ``disable`` and ``passwd`` (two commands started at once,
# their imports half a second of CPU each) to commit their revocations
# before the sessions they end reach it: at 3 s, a slow machine sealed
# them max_duration (rightly: the deadline came first), failing the matrix.
MAX_SESSION = 8.0
SECRET_CONTENT = "Alice's secret plans: the cat is blue."

# Callers that get in, and those who must not.
VALID = ("owner", "other", "admin")
DENIED = {
    # identity: (status, code, security action, its details.reason if fixed,
    #   whose session it names: None (no session taken from the token),
    #   "other" (mallory's own, never alice's), "dead" (the ended one))
    "none": (401, "missing_token", "auth.invalid_token", "missing_token", None),
    "none_with_header": (401, "missing_token", "auth.invalid_token", "missing_token", None),
    "malformed": (401, "invalid_token", "auth.invalid_token", "malformed", None),
    "wrong_key": (401, "invalid_token", "auth.invalid_token", "bad_signature", None),
    "alg_none": (401, "invalid_token", "auth.invalid_token", "wrong_algorithm", None),
    "hs512": (401, "invalid_token", "auth.invalid_token", "wrong_algorithm", None),
    "expired": (401, "token_expired", "auth.token_expired", None, "other"),
    "logged_out": (401, "session_ended", "auth.session_ended", None, "dead"),
    "idle": (401, "session_ended", "auth.session_ended", None, "dead"),
    "max_duration": (401, "session_ended", "auth.session_ended", None, "dead"),
    "disabled": (401, "session_ended", "auth.session_ended", None, "dead"),
    "password_changed": (401, "session_ended", "auth.session_ended", None, "dead"),
    "foreign_sid": (401, "session_ended", "auth.session_ended", None, None),
    "header_mismatch": (403, "session_mismatch", "auth.session_mismatch", None, "other"),
}
# The owner last: its logout ends the session the others' cells name.
IDENTITIES = (*DENIED, "role_claim_admin", "other", "admin", "owner")


@dataclass
class Session:
    user: str
    token: str
    session_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Cell:
    endpoint: str
    identity: str
    request_id: str
    status: int
    body: Any
    session: Session | None  # the caller's own session, for a valid identity
    doc_id: str | None
    secrets: list[str] = field(default_factory=list)
    owner_sid: str = ""
    other_sid: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(sub: str, sid: str, role: str = "user", **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "sid": sid, "role": role, "iat": now, "exp": now + 600,
            "jti": "j" * 32, **changes}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Client:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def call(self, method: str, path: str, headers: dict[str, str],
                   body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.base + path, headers=headers,
                                     json=body) as r:
            text = await r.text()
            if r.content_type == "application/json" and text:
                return r.status, json.loads(text)
            return r.status, text

    async def login(self, user: str, password: str = PASSWORD) -> Session:
        status, body = await self.call("POST", "/token", {},
                                       {"username": user, "password": password})
        assert status == 200, body
        return Session(user, body["access_token"], body["session_id"])

    async def doc(self, owner: Session) -> dict[str, Any]:
        status, body = await self.call("POST", "/documents", owner.headers,
                                       {"title": "alice-secret-title", "content": SECRET_CONTENT})
        assert status == 201, body
        return dict(body)

    async def pages(self, admin: Session, path: str, key: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = ""
        while True:
            q = f"?limit=500&cursor={urllib.parse.quote(cursor)}" if cursor else "?limit=500"
            status, body = await self.call("GET", path + q, admin.headers)
            assert status == 200, body
            out += body[key]
            cursor = body["next_cursor"]
            if not cursor:
                return out


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[Live, Client]]:
    live = Live(tmp_path, {
        "audit": {"idle_timeout_seconds": IDLE, "max_session_seconds": MAX_SESSION,
                  "synchronous": "normal"},
        "flush": {"max_writes_per_second": 1000.0, "burst": 1000},
    })
    try:
        await live.start()
        await asyncio.gather(*(live.adduser(u, PASSWORD)
                               for u in ("alice", "mallory", "dora", "pat")))
        async with aiohttp.ClientSession() as http:
            yield live, Client(http, live.base)
    finally:
        live.close()


def _expected_valid(endpoint: str, identity: str) -> tuple[int, str | None]:
    """(status, error code) for the owner, another user and an admin."""
    admin_only = endpoint.startswith("admin_")
    if endpoint in ("token", "healthz", "readyz", "metrics", "me"):
        return 200, None
    if endpoint == "logout":
        return (200, None) if identity == "owner" else (403, "session_mismatch")
    if admin_only:
        if identity != "admin":
            return 403, "forbidden"
        return (202, None) if endpoint == "admin_flush" else (200, None)
    if endpoint == "doc_create":
        return 201, None
    if endpoint == "events":
        return 202, None
    if endpoint == "doc_list":
        return 200, None
    # get, put, delete, chat on alice's document
    if identity == "other":
        return 404, "not_found"
    return (204, None) if endpoint == "doc_delete" else (200, None)


ACTIONS = {
    "doc_create": "document.create", "doc_list": "document.list",
    "doc_get": "document.access", "doc_put": "document.update",
    "doc_delete": "document.delete", "doc_chat": "ai.interaction",
    "admin_sessions": "audit.query", "admin_session": "audit.query",
    "admin_security": "audit.query", "admin_status": "audit.query",
    "admin_flush": "audit.query", "events": "client.authz",
}
PUBLIC = ("token", "healthz", "readyz", "metrics")
ENDPOINTS = ("token", "logout", "me", "doc_create", "doc_list", "doc_get", "doc_put",
             "doc_delete", "doc_chat", "events", "admin_sessions", "admin_session",
             "admin_security", "admin_status", "admin_flush", "healthz", "readyz", "metrics")


def _request(endpoint: str, doc_id: str, alice_sid: str) -> tuple[str, str, Any]:
    doc = f"/documents/{doc_id}"
    return {
        "token": ("POST", "/token", {"username": "mallory", "password": PASSWORD}),
        "logout": ("POST", "/logout", {"session_id": alice_sid}),
        "me": ("GET", "/me", None),
        "doc_create": ("POST", "/documents", {"title": "t", "content": "c"}),
        "doc_list": ("GET", "/documents", None),
        "doc_get": ("GET", doc, None),
        "doc_put": ("PUT", doc, {"content": "overwritten", "version": 1}),
        "doc_delete": ("DELETE", doc, None),
        "doc_chat": ("POST", doc + "/chat", {"message": "what colour is the cat?"}),
        "events": ("POST", "/audit/events",
                   {"action": "client.authz", "target": {"type": "document", "id": doc_id}}),
        "admin_sessions": ("GET", "/audit/sessions?user=alice", None),
        "admin_session": ("GET", f"/audit/sessions/{alice_sid}", None),
        "admin_security": ("GET", "/audit/security-events", None),
        "admin_status": ("GET", "/audit/status", None),
        "admin_flush": ("POST", "/audit/flush", None),
        "healthz": ("GET", "/healthz", None),
        "readyz": ("GET", "/readyz", None),
        "metrics": ("GET", "/metrics", None),
    }[endpoint]


async def _dead_sessions(live: Live, c: Client) -> dict[str, Session]:
    """Sessions of every way to end one, all ended by the time this returns."""
    logged_out = await c.login("mallory")
    idle = await c.login("mallory")
    longest = await c.login("mallory")
    started = time.monotonic()
    dora = await c.login("dora")
    pat = await c.login("pat")
    status, _ = await c.call("POST", "/logout", logged_out.headers)
    assert status == 200

    async def keep_active(*sessions: Session) -> None:  # never idle
        while True:
            for s in sessions:
                await c.call("GET", "/me", s.headers)
            await asyncio.sleep(IDLE / 4)

    async def stopped(task: asyncio.Future[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    keeper = asyncio.ensure_future(keep_active(longest))  # past max_session_seconds
    # dora's and pat's too, until the commands' changes commit: on a loaded
    # machine a command took longer than IDLE, and the session it ended had
    # gone idle by then (sealed idle_timeout, as it should be)
    revoked = asyncio.ensure_future(keep_active(dora, pat))
    try:
        disabled, changed = await asyncio.gather(
            live.cli("disable", "dora"),
            live.cli("passwd", "pat", "--password-stdin", stdin="another-password-1\n"))
        await stopped(revoked)
        assert disabled.returncode == 0, disabled.stderr
        assert changed.returncode == 0, changed.stderr
        await asyncio.sleep(max(0.0, MAX_SESSION + 0.3 - (time.monotonic() - started)))
    finally:
        await stopped(revoked)
        await stopped(keeper)
    sessions = {"logged_out": logged_out, "idle": idle, "max_duration": longest,
                "disabled": dora, "password_changed": pat}
    admin = await c.login("admin", ADMIN_PASSWORD)

    async def all_sealed() -> bool:
        for s in sessions.values():
            status, body = await c.call("GET", f"/audit/sessions/{s.session_id}",
                                        admin.headers)
            if status != 200 or body["state"] == "open":
                return False
        return True

    await wait_for(all_sealed, timeout=60, message="the dead sessions sealed")
    seals = {}
    for name, s in sessions.items():
        _, body = await c.call("GET", f"/audit/sessions/{s.session_id}", admin.headers)
        end = [e for e in body["events"] if e["action"] == "session.end"]
        seals[name] = (body["seal_reason"], end[0]["details"].get("cause") if end else None)
    assert seals == {
        "logged_out": ("logout", None), "idle": ("idle_timeout", None),
        "max_duration": ("max_duration", None), "disabled": ("logout", "user_disabled"),
        "password_changed": ("logout", "password_changed"),
    }
    # And their logins: the right password of a disabled user, the old one
    # of a changed user, answered as any wrong one; the new one works.
    for user, password, rid in (("dora", PASSWORD, "authz-login-disabled"),
                                ("pat", PASSWORD, "authz-login-old-password")):
        status, body = await c.call("POST", "/token", {"X-Request-ID": rid},
                                    {"username": user, "password": password})
        assert (status, _code(body)) == (401, "invalid_credentials"), body
    assert (await c.login("pat", "another-password-1")).user == "pat"
    failed = {e["request_id"]: e for e in await c.pages(admin, "/audit/security-events",
                                                        "events")
              if e["action"] == "auth.login_failed"}
    assert failed["authz-login-disabled"]["details"]["reason"] == "user_disabled"
    assert failed["authz-login-old-password"]["details"]["reason"] == "invalid_credentials"
    assert all(e["session_id"] is None for e in failed.values())
    return sessions


def _headers(identity: str, row: dict[str, Session], dead: dict[str, Session]) -> dict[str, str]:
    key = JWT_SECRET.encode()
    alice, mallory = row["owner"], row["other"]
    if identity in VALID:
        return row[identity].headers
    if identity == "none":
        return {}
    if identity == "none_with_header":
        return {"X-Audit-Session-ID": alice.session_id}
    if identity == "malformed":
        return _bearer("not.a-jwt")
    if identity == "wrong_key":
        return _bearer(jwt.encode(_claims("alice", alice.session_id), b"k" * 48,
                                  algorithm="HS256"))
    if identity == "alg_none":
        good = _claims("alice", alice.session_id)
        return _bearer(".".join((_b64(b'{"alg":"none","typ":"JWT"}'),
                                 _b64(json.dumps(good).encode()), "")))
    if identity == "hs512":
        with warnings.catch_warnings():  # PyJWT: short for HS512 (and not ours to choose)
            warnings.simplefilter("ignore")
            return _bearer(jwt.encode(_claims("alice", alice.session_id), key,
                                      algorithm="HS512"))
    if identity == "expired":
        now = int(time.time())
        return _bearer(jwt.encode(_claims("mallory", mallory.session_id, iat=now - 7200,
                                          exp=now - 3600), key, algorithm="HS256"))
    if identity in dead:
        return dead[identity].headers
    if identity == "foreign_sid":
        return _bearer(jwt.encode(_claims("mallory", alice.session_id), key, algorithm="HS256"))
    if identity == "role_claim_admin":
        # Signed with the server's key, role "admin": the session's role counts.
        return _bearer(jwt.encode(_claims("mallory", row["role"].session_id, role="admin"),
                                  key, algorithm="HS256"))
    if identity == "header_mismatch":
        return {**mallory.headers, "X-Audit-Session-ID": alice.session_id}
    raise AssertionError(identity)


async def test_every_endpoint_against_every_identity(server: tuple[Live, Client]) -> None:
    live, c = server
    dead = await _dead_sessions(live, c)
    cells: list[Cell] = []
    docs_of_alice: dict[str, dict[str, Any]] = {}  # request id: the document it aimed at
    for endpoint in ENDPOINTS:
        # Fresh sessions per endpoint: the short idle timeout never catches them.
        owner, other, admin, role, maker = await asyncio.gather(
            c.login("alice"), c.login("mallory"), c.login("admin", ADMIN_PASSWORD),
            c.login("mallory"), c.login("alice"))
        row = {"owner": owner, "other": other, "admin": admin, "role": role}
        for identity in IDENTITIES:
            rid = f"authz-{endpoint}-{identity}"
            doc = await c.doc(maker)
            docs_of_alice[rid] = doc
            method, path, body = _request(endpoint, doc["id"], owner.session_id)
            headers = {**_headers(identity, row, dead), "X-Request-ID": rid}
            status, answer = await c.call(method, path, headers, body)
            session = row[identity] if identity in VALID else (
                role if identity == "role_claim_admin" else None)
            cells.append(Cell(endpoint, identity, rid, status, answer, session, doc["id"],
                              [doc["id"], doc["title"], SECRET_CONTENT, owner.session_id,
                               owner.token], owner.session_id, other.session_id))

    # -- read everything back through the admin API ------------------------
    reader = await c.login("admin", ADMIN_PASSWORD)
    security = await c.pages(reader, "/audit/security-events", "events")
    summaries = await c.pages(reader, "/audit/sessions", "sessions")
    events: list[dict[str, Any]] = []
    for s in summaries:
        status, body = await c.call("GET", f"/audit/sessions/{s['session_id']}",
                                    reader.headers)
        assert status == 200, body
        events += body["events"]
    by_rid: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_rid.setdefault(e["request_id"], []).append(e)
    sec_by_rid: dict[str, list[dict[str, Any]]] = {}
    for e in security:
        sec_by_rid.setdefault(e["request_id"], []).append(e)

    failures: list[str] = []
    for cell in cells:
        try:
            _check(cell, by_rid.get(cell.request_id, []), sec_by_rid.get(cell.request_id, []),
                   dead)
        except AssertionError as exc:
            failures.append(f"{cell.endpoint} x {cell.identity}: {exc}")
    assert not failures, "\n".join(failures)

    # The documents of the denied cells are as alice made them.
    admin = await c.login("admin", ADMIN_PASSWORD)
    for cell in cells:
        if cell.endpoint in ("doc_put", "doc_delete") and cell.identity not in (
                "owner", "admin"):
            doc = docs_of_alice[cell.request_id]
            status, body = await c.call("GET", f"/documents/{doc['id']}", admin.headers)
            assert (status, body["content"], body["version"]) == (200, SECRET_CONTENT, 1), \
                (cell.identity, body)
    await _probes(c)


# Another user's reach beyond the plain requests: (name, method, path with
# {doc} and {alice}, body, status, code, the event in mallory's session as
# (action, outcome, details.reason) or None, its security event or None).
PROBES: list[tuple[str, str, str, Any, int, str | None, tuple[str, str, str | None] | None,
                   str | None]] = [
    ("put_stale_version", "PUT", "/documents/{doc}", {"content": "x", "version": 99},
     404, "not_found", ("document.update", "denied", "not_owner"), "access.denied"),
    ("put_title_only", "PUT", "/documents/{doc}", {"title": "mine now"},
     404, "not_found", ("document.update", "denied", "not_owner"), "access.denied"),
    ("put_too_large", "PUT", "/documents/{doc}", {"content": "x" * (1024 * 1024 + 1)},
     404, "not_found", ("document.update", "denied", "not_owner"), "access.denied"),
    ("put_not_json", "PUT", "/documents/{doc}", b"{", 404, "not_found",
     ("document.update", "denied", "not_owner"), "access.denied"),
    ("chat_empty", "POST", "/documents/{doc}/chat", {"message": ""}, 404, "not_found",
     ("ai.interaction", "denied", "not_owner"), "access.denied"),
    ("sessions_of_alice", "GET", "/audit/sessions?user=alice&state=open&limit=500", None,
     403, "forbidden", ("audit.query", "denied", "not_admin"), "admin.denied"),
    ("security_of_alice", "GET", "/audit/security-events?kind=access.denied", None,
     403, "forbidden", ("audit.query", "denied", "not_admin"), "admin.denied"),
    ("create_as_alice", "POST", "/documents", {"title": "t", "content": "c", "owner": "alice"},
     400, "invalid_request", ("document.create", "failure", "invalid_request"), None),
    ("event_with_actor", "POST", "/audit/events",
     {"action": "client.x", "actor": {"user": "alice", "role": "admin"}},
     400, "invalid_request", ("client.rejected", "failure", "invalid_request"), None),
    ("event_with_session", "POST", "/audit/events",
     {"action": "client.x", "session_id": "{alice}"},
     400, "invalid_request", ("client.rejected", "failure", "invalid_request"), None),
    ("event_with_source", "POST", "/audit/events",
     {"action": "client.x", "source": {"ip": "10.0.0.1"}, "seq": 1, "hash": "0" * 64},
     400, "invalid_request", ("client.rejected", "failure", "invalid_request"), None),
    ("events_one_forged", "POST", "/audit/events",
     [{"action": "client.ok"}, {"action": "client.x", "actor": {"user": "alice"}}],
     400, "invalid_request", ("client.rejected", "failure", "invalid_request"), None),
    ("event_on_alices_target", "POST", "/audit/events",
     {"action": "client.look", "target": {"type": "session", "id": "{alice}"},
      "details": {"actor": "alice", "session_id": "{alice}"}},
     202, None, ("client.look", "success", None), None),
]


async def _send(c: Client, method: str, path: str, headers: dict[str, str],
                raw: bytes) -> tuple[int, Any, dict[str, str]]:
    async with c.http.request(method, c.base + path, headers=headers,
                              data=io.BytesIO(raw)) as r:
        # The headers that could tell the two apart (not the date, the id).
        shown = {k: v for k, v in r.headers.items()
                 if k not in ("Date", "X-Request-ID", "Content-Length")}
        return r.status, await r.json(), shown


async def _probes(c: Client) -> None:
    alice, mallory, maker = await asyncio.gather(c.login("alice"), c.login("mallory"),
                                                 c.login("alice"))
    results = []
    for name, method, path, body, *_ in PROBES:
        doc = await c.doc(maker)
        rid = f"probe-{name}"

        def fill(v: Any, doc_id: str = doc["id"]) -> Any:
            if isinstance(v, str):
                return v.replace("{doc}", doc_id).replace("{alice}", alice.session_id)
            if isinstance(v, list):
                return [fill(x) for x in v]
            if isinstance(v, dict):
                return {k: fill(x) for k, x in v.items()}
            return v

        raw = body if isinstance(body, bytes) else json.dumps(fill(body)).encode()
        headers = {**mallory.headers, "Content-Type": "application/json"}
        status, answer, shown = await _send(c, method, fill(path),
                                            {**headers, "X-Request-ID": rid}, raw)
        # The same request on a document that does not exist answers alike.
        missing = None
        if "{doc}" in path:
            missing = await _send(c, method, path.replace("{doc}", "f" * 32),
                                  {**headers, "X-Request-ID": rid + "-missing"}, raw)
        status_ok, _ = await c.call("GET", f"/documents/{doc['id']}", alice.headers)
        results.append((name, status, answer, missing, doc, status_ok, shown))

    reader = await c.login("admin", ADMIN_PASSWORD)
    security = await c.pages(reader, "/audit/security-events", "events")
    _, mine = await c.call("GET", f"/audit/sessions/{mallory.session_id}", reader.headers)
    _, hers = await c.call("GET", f"/audit/sessions/{alice.session_id}", reader.headers)
    assert {e["action"] for e in hers["events"]} <= {
        "session.start", "token.issue", "document.access"}, hers["events"]
    assert {e["actor"]["user"] for e in hers["events"]} == {"alice"}
    failures = []
    for probe, result in zip(PROBES, results, strict=True):
        name, _, _, _, want_status, want_code, want_ev, want_sec = probe
        _, status, answer, missing, doc, read_back, shown = result
        rid = f"probe-{name}"
        try:
            assert (status, _code(answer)) == (want_status, want_code), answer
            text = json.dumps(answer)
            for secret in (doc["id"], doc["title"], SECRET_CONTENT, alice.session_id):
                assert secret not in text or name == "event_on_alices_target", text
            if missing is not None:
                assert (missing[0], missing[2]) == (status, shown), missing
                assert {**missing[1]["error"], "request_id": ""} == {
                    **answer["error"], "request_id": ""}, (missing, answer)
            assert read_back == 200  # the document is still there
            evs = [e for e in mine["events"] if e["request_id"] == rid]
            assert want_ev is not None
            (ev,) = evs
            assert (ev["action"], ev["outcome"], ev["details"].get("reason")) == want_ev, ev
            assert ev["actor"] == {"user": "mallory", "role": "user"}, ev
            assert ev["session_id"] == mallory.session_id
            assert ev["source"]["ip"] == "127.0.0.1", ev
            secs = [e for e in security if e["request_id"] == rid]
            if want_sec is None:
                assert secs == [], secs
            else:
                (sec,) = secs
                assert sec["action"] == want_sec, sec
                assert sec["session_id"] == mallory.session_id, sec
                assert sec["actor"]["user"] == "mallory", sec
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


def _check(cell: Cell, evs: list[dict[str, Any]], secs: list[dict[str, Any]],
           dead: dict[str, Session]) -> None:
    ident, ep = cell.identity, cell.endpoint
    if ep in PUBLIC:
        assert cell.status == 200, (cell.status, cell.body)
        assert secs == [], secs
        if ep == "token":
            assert [e["action"] for e in evs] == ["session.start", "token.issue"], evs
            assert {e["actor"]["user"] for e in evs} == {"mallory"}
        else:
            assert evs == [], evs
            # No authentication, counts only: nobody's names, ids or titles.
            _no_leak(cell)
            for name in ("alice", "mallory", "dora", "pat"):
                assert name not in str(cell.body), name
        return
    if ident in DENIED:
        status, code, action, reason, whose = DENIED[ident]
        assert (cell.status, _code(cell.body)) == (status, code), cell.body
        assert evs == [], f"a refused caller's request recorded {evs}"
        assert len(secs) == 1, secs
        (sec,) = secs
        assert (sec["action"], sec["outcome"]) == (action, "denied"), sec
        if reason is not None:
            assert sec["details"]["reason"] == reason, sec
        assert sec["seq"] is None
        # A token signed with the server's key whose sid is alice's session
        # is recorded under that sid (with mallory as the actor); only the
        # holder of the key can make one.
        if ident != "foreign_sid":
            assert sec["session_id"] != cell.owner_sid, f"recorded in alice's session: {sec}"
        if whose is None and ident != "foreign_sid":
            # Claims not taken: no session, no user (the forged ones say alice).
            assert (sec["session_id"], sec["actor"]["user"]) == (None, None), sec
        elif whose is None:
            assert sec["actor"]["user"] == "mallory", sec
        elif whose == "dead":
            assert sec["session_id"] == dead[ident].session_id, sec
            assert sec["actor"]["user"] == dead[ident].user, sec
        else:  # the caller's own (mallory's) session, never alice's
            assert sec["session_id"] == cell.other_sid, sec
            assert sec["actor"]["user"] == "mallory", sec
        _no_leak(cell)
        return
    # A valid caller: owner, other, admin, and mallory claiming role admin.
    as_identity = "other" if ident == "role_claim_admin" else ident
    user = {"owner": "alice", "other": "mallory", "admin": "admin"}[as_identity]
    status, code = _expected_valid(ep, as_identity)
    assert (cell.status, _code(cell.body)) == (status, code), cell.body
    assert cell.session is not None
    for e in evs:
        assert e["session_id"] == cell.session.session_id, e
        assert e["actor"]["user"] == user, e
    if ep == "me":
        assert cell.body["user"] == user and cell.body["role"] == (
            "admin" if as_identity == "admin" else "user"), cell.body
        assert evs == [] and secs == []
    elif ep == "logout":
        if status == 200:
            assert [e["action"] for e in evs] == ["session.end"], evs
            assert secs == []
        else:
            (sec,) = secs
            assert sec["action"] == "auth.session_mismatch", sec
            assert sec["session_id"] == cell.session.session_id, sec
            assert sec["actor"]["user"] == user, sec
    else:
        (ev,) = [e for e in evs if e["action"] == ACTIONS[ep]]
        denied = status in (403, 404)
        assert ev["outcome"] == ("denied" if denied else "success"), ev
        if denied:
            assert ev["details"]["reason"] == ("not_admin" if status == 403 else "not_owner")
        if denied:
            (sec,) = secs
            assert sec["action"] == ("admin.denied" if status == 403 else "access.denied"), sec
            assert sec["session_id"] == cell.session.session_id, sec
            assert sec["actor"]["user"] == user, sec
            assert sec["outcome"] == "denied"
        else:
            assert secs == [], secs
        if ep.startswith("doc_") and ep not in ("doc_create", "doc_list"):
            assert ev["target"] == {"type": "document", "id": cell.doc_id}, ev
    if as_identity == "other":
        _no_leak(cell)
        if ep == "doc_list":
            assert {d["owner"] for d in cell.body["documents"]} <= {"mallory"}, cell.body


def _code(body: Any) -> str | None:
    if isinstance(body, dict) and "error" in body:
        return str(body["error"]["code"])
    return None


def _no_leak(cell: Cell) -> None:
    text = cell.body if isinstance(cell.body, str) else json.dumps(cell.body)
    for secret in cell.secrets:
        assert secret not in text, f"{secret!r} in {text[:300]}"
    if isinstance(cell.body, dict) and "error" in cell.body:
        assert "alice" not in text, text

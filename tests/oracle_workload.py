"""An exact oracle between what clients were told and what the audit trail says.

A workload of several concurrent users (one of them an admin) against a real
server: logins right and wrong, documents of their own and of others, stale
versions, bad bodies, chats, client events, the admin API, session-id
mismatches, logouts, tokens after logout. Every request carries its own
``X-Request-ID``; from each answer, API.md fixes which events must exist
(stream, session, action, outcome, reason, target, actor) and, by omission,
which must not. After every session has ended and the sink has taken
everything, the sink's SQLite file is read and compared with that exactly.

``run(live, seed, steps)`` returns the list of disagreements (empty: none).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import random
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from live_server import ADMIN_PASSWORD, Live

PASSWORD = "oracle-password-0123"
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
EVENT_KEYS = {"event_id", "session_id", "seq", "ts", "action", "outcome", "actor", "target",
              "source", "request_id", "details", "hash"}
UA = "oracle-client/1.0"
ANY = object()


@dataclass
class Exp:
    """One event that must exist."""

    rid: str
    action: str
    outcome: Any = "success"  # ANY: any
    reason: Any = None  # None: no details.reason; ANY: any
    target: Any = None  # None, a doc id, a dict, or ANY
    user: str | None = None
    role: str | None = None
    session_id: Any = None  # security events: the session named (None: null)
    details: dict[str, Any] | None = None  # keys that must have these values
    where: str = ""
    group: int = 0  # consecutive events of one group may come in any order


@dataclass
class Oracle:
    sessions: dict[str, list[Exp]] = field(default_factory=dict)
    session_user: dict[str, str] = field(default_factory=dict)
    ended: dict[str, int] = field(default_factory=dict)  # sid -> event_count told
    security: list[Exp] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    requests: int = 0

    def bad(self, text: str) -> None:
        self.findings.append(text)


@dataclass
class Sess:
    user: str
    role: str
    token: str
    sid: str


class Client:
    def __init__(self, http: aiohttp.ClientSession, base: str, oracle: Oracle, name: str,
                 rng: random.Random) -> None:
        self.http = http
        self.base = base
        self.o = oracle
        self.name = name
        self.rng = rng
        self.n = 0

    def rid(self) -> str:
        self.n += 1
        return f"{self.name}-{self.n}-{self.rng.randrange(1 << 30):x}"

    async def call(self, method: str, path: str, *, token: str | None = None,
                   json_body: Any = ANY, data: Any = None, headers: dict[str, str] | None = None,
                   rid: str | None = None) -> tuple[str, int, Any, Any]:
        rid = rid or self.rid()
        sent = rid
        if self.rng.random() < 0.05:
            sent = self.rng.choice(["bad id!", "x" * 129, "é", ""])
        h = {"X-Request-ID": sent, "User-Agent": UA, **(headers or {})}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {}
        if json_body is not ANY:
            raw = json.dumps(json_body).encode()
            # (aiohttp warns about large bytes bodies: a stream instead)
            kwargs["data"] = io.BytesIO(raw) if len(raw) > 65536 else raw
            h.setdefault("Content-Type", "application/json")
        elif data is not None:
            kwargs["data"] = data
            h.setdefault("Content-Type", "application/json")
        self.o.requests += 1
        async with self.http.request(method, self.base + path, headers=h, **kwargs) as r:
            raw = await r.read()
            body: Any = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
            if sent != rid:
                got = r.headers.get("X-Request-ID", "")
                if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", got) or got == sent:
                    self.o.bad(f"{method} {path}: generated X-Request-ID {got!r} for {sent!r}")
                rid = got
            if r.headers.get("X-Request-ID") != rid:
                self.o.bad(f"{method} {path}: X-Request-ID {r.headers.get('X-Request-ID')!r}"
                           f" != {rid!r}")
            if r.status >= 400:
                self.check_error(method, path, rid, r.status, body)
            return rid, r.status, body, r.headers

    def check_error(self, method: str, path: str, rid: str, status: int, body: Any) -> None:
        if not (isinstance(body, dict) and set(body) == {"error"}
                and isinstance(body["error"], dict)
                and set(body["error"]) == {"code", "message", "request_id"}
                and body["error"]["request_id"] == rid):
            self.o.bad(f"{method} {path} {status}: error body not API.md's: {body!r}"[:400])

    def expect_status(self, what: str, status: int, body: Any, want: int,
                      code: str | None = None) -> bool:
        ok = status == want and (code is None or (isinstance(body, dict) and
                                                  body.get("error", {}).get("code") == code))
        if not ok:
            self.o.bad(f"{what}: got {status} {str(body)[:200]}, want {want} {code or ''}")
        return ok


def _code(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        c = body["error"].get("code")
        return c if isinstance(c, str) else None
    return None


GROUP = [0]


class Shared:
    """Documents other workers may read but only their owner writes (never deleted)."""

    def __init__(self) -> None:
        self.permanent: dict[str, list[str]] = {}


class UserWorker:
    def __init__(self, c: Client, user: str, password: str, role: str, shared: Shared,
                 users: list[str]) -> None:
        self.c = c
        self.o = c.o
        self.user = user
        self.password = password
        self.role = role
        self.shared = shared
        self.users = users
        self.s: Sess | None = None
        self.exp_at = 0
        self.old: list[Sess] = []
        self.scratch: dict[str, int] = {}  # own doc id -> version
        self.deleted: list[str] = []

    # -- helpers -----------------------------------------------------------

    def exp(self, rid: str, action: str, **kw: Any) -> None:
        assert self.s is not None
        kw.setdefault("user", self.user)
        kw.setdefault("role", self.role)
        self.o.sessions[self.s.sid].append(Exp(rid, action, **kw))

    def sec(self, rid: str, action: str, **kw: Any) -> None:
        self.o.security.append(Exp(rid, action, **kw))

    async def login(self, password: str | None = None, username: str | None = None) -> None:
        username = username or self.user
        right = password is None and username == self.user
        body = {"username": username, "password": password or self.password}
        form = self.c.rng.random() < 0.3
        for _ in range(50):
            sent_at = time.time()
            if form:
                rid, st, b, h = await self.c.call("POST", "/token", data=body,
                                                  headers={"Content-Type":
                                                           "application/x-www-form-urlencoded"})
            else:
                rid, st, b, h = await self.c.call("POST", "/token", json_body=body)
            if st == 429:
                if _code(b) != "too_many_attempts" or not h.get("Retry-After", "").isdigit():
                    self.o.bad(f"login 429 wrong: {b} {dict(h)}")
                self.sec(rid, "auth.login_throttled", outcome="denied",
                         reason="too_many_attempts", details={"username": username[:64]},
                         where="login 429")
                if not right:
                    return
                await asyncio.sleep(min(3.0, int(h.get("Retry-After", "1"))))
                continue
            if st == 401:
                self.c.expect_status("login", st, b, 401, "invalid_credentials")
                self.sec(rid, "auth.login_failed", outcome="denied",
                         reason="invalid_credentials", details={"username": username[:64]},
                         where="login 401")
                if right:
                    self.o.bad(f"right password for {username} got 401")
                return
            if st == 200:
                if not right:
                    self.o.bad(f"wrong password for {username} got 200")
                    return
                if set(b) != {"access_token", "token_type", "expires_in", "session_id"} \
                        or b["token_type"] != "bearer":
                    self.o.bad(f"login body: {b}")
                self.s = Sess(self.user, self.role, b["access_token"], b["session_id"])
                self.check_token(b, sent_at)
                self.o.sessions[self.s.sid] = []
                self.o.session_user[self.s.sid] = self.user
                self.exp(rid, "session.start")
                self.exp(rid, "token.issue", details={"expires_at": time.strftime(
                    "%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(self.exp_at))})
                return
            self.o.bad(f"login: unexpected {st} {b}")
            return
        self.o.bad(f"{username}: could not log in for 50 tries")

    def check_token(self, b: dict[str, Any], sent_at: float) -> None:
        """The token's claims, and its exp against expires_in: the server
        counted expires_in at some moment between ``sent_at`` and now."""
        import base64
        try:
            head, payload, _ = b["access_token"].split(".")
            hdr = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except Exception as exc:
            self.o.bad(f"token not a JWT: {exc}")
            return
        if hdr.get("alg") != "HS256":
            self.o.bad(f"token alg {hdr}")
        if not {"sub", "sid", "role", "iat", "exp", "jti"} <= set(claims) or \
                claims["sub"] != self.user or claims["sid"] != b["session_id"] or \
                claims["role"] != self.role:
            self.o.bad(f"token claims {claims}")
        # (Not against now alone: an answer that took over 1.5 s to reach
        # this loop, on a loaded machine, would make a right expires_in look short.)
        if not sent_at - 1.5 <= claims["exp"] - b["expires_in"] <= time.time() + 2.5:
            self.o.bad(f"expires_in {b['expires_in']} vs exp {claims['exp']}")
        self.exp_at = claims.get("exp")

    async def start(self) -> None:
        while self.s is None:
            await self.login()
        mine = []
        for i in range(2):
            doc = await self.create(f"Permanent {self.user} {i}",
                                    f"{self.user} owns this. The cat sat on the mat {i}.")
            if doc:
                mine.append(doc["id"])
        self.shared.permanent[self.user] = mine
        for k in list(self.scratch):
            if k in mine:
                del self.scratch[k]

    def others_docs(self) -> list[str]:
        return [d for u, ds in self.shared.permanent.items() if u != self.user for d in ds]

    def missing_id(self) -> str:
        r = self.c.rng.random()
        if r < 0.6:
            return f"{self.c.rng.randrange(1 << 128):032x}"
        if r < 0.8 and self.deleted:
            return self.c.rng.choice(self.deleted)
        return self.c.rng.choice(["x" * 65, "bad-id", "a.b", "%C3%A9t%C3%A9"])

    @staticmethod
    def target_of(doc_id: str) -> dict[str, str]:
        from urllib.parse import unquote
        return {"type": "document", "id": unquote(doc_id)[:128]}

    # -- actions ---------------------------------------------------------------

    async def create(self, title: str | None = None, content: str | None = None
                     ) -> dict[str, Any] | None:
        assert self.s is not None
        title = title or f"T{self.c.rng.randrange(1000)}"
        content = content or "Alpha beta. Gamma delta! Epsilon? " * self.c.rng.randrange(1, 5)
        rid, st, b, _ = await self.c.call("POST", "/documents", token=self.s.token,
                                          json_body={"title": title, "content": content})
        if not self.c.expect_status("create", st, b, 201):
            return None
        want = {"id", "title", "content", "owner", "version", "created_at", "updated_at"}
        if set(b) != want or b["version"] != 1 or b["owner"] != self.user \
                or b["title"] != title or b["content"] != content:
            self.o.bad(f"create body: {b}")
        self.exp(rid, "document.create", target=b["id"],
                 details={"title_length": len(title),
                          "content_bytes": len(content.encode())})
        self.scratch[b["id"]] = 1
        return b  # type: ignore[no-any-return]

    async def create_bad(self) -> None:
        assert self.s is not None
        choice = self.c.rng.randrange(7)
        if choice == 0:
            rid, st, b, _ = await self.c.call("POST", "/documents", token=self.s.token,
                                              data=b"{not json")
            want, code = 400, "invalid_json"
        elif choice == 1:
            rid, st, b, _ = await self.c.call("POST", "/documents", token=self.s.token,
                                              json_body={"title": "x"})
            want, code = 400, "invalid_request"
        elif choice == 2:
            rid, st, b, _ = await self.c.call("POST", "/documents", token=self.s.token,
                                              json_body={"title": "t" * 201, "content": "c"})
            want, code = 400, "invalid_request"
        elif choice == 3:
            rid, st, b, _ = await self.c.call("POST", "/documents", token=self.s.token,
                                              json_body=[1, 2])
            want, code = 400, "invalid_request"
        elif choice == 4:
            rid, st, b, _ = await self.c.call("POST", "/documents", token=self.s.token,
                                              json_body={"title": "t", "content": "c",
                                                         "owner": "bob"})
            want, code = 400, "invalid_request"
        elif choice == 5:
            rid, st, b, _ = await self.c.call(
                "POST", "/documents", token=self.s.token,
                json_body={"title": "t", "content": "c" * (1024 * 1024 + 1)})
            want, code = 413, "too_large"
        else:
            rid, st, b, _ = await self.c.call("POST", "/documents", token=self.s.token,
                                              json_body={"title": "  ", "content": "c"})
            want, code = 400, "invalid_request"
        self.c.expect_status(f"create bad {choice}", st, b, want, code)
        self.exp(rid, "document.create", outcome="failure", reason=code, target=None)

    async def list_docs(self) -> None:
        assert self.s is not None
        rid, st, b, _ = await self.c.call("GET", "/documents", token=self.s.token)
        if not self.c.expect_status("list", st, b, 200):
            return
        docs = b.get("documents")
        if not isinstance(docs, list):
            self.o.bad(f"list body {b}")
            return
        for d in docs:
            if set(d) != {"id", "title", "owner", "version", "updated_at"}:
                self.o.bad(f"list item keys {set(d)}")
            if self.role != "admin" and d["owner"] != self.user:
                self.o.bad(f"{self.user} listed {d['owner']}'s document")
            if d["owner"] == self.user and d["id"] in self.scratch \
                    and d["version"] != self.scratch[d["id"]]:
                self.o.bad(f"list version {d['version']} != {self.scratch[d['id']]}")
        self.exp(rid, "document.list", details={"count": len(docs)})

    async def get(self, doc_id: str, kind: str) -> None:
        assert self.s is not None
        rid, st, b, _ = await self.c.call("GET", f"/documents/{doc_id}", token=self.s.token)
        await self._judge(rid, st, b, "document.access", doc_id, kind, 200)
        if st == 200 and kind == "own" and b.get("version") != self.scratch.get(doc_id):
            self.o.bad(f"get version {b.get('version')} != {self.scratch.get(doc_id)}")

    async def _judge(self, rid: str, st: int, b: Any, action: str, doc_id: str, kind: str,
                     ok: int, details: dict[str, Any] | None = None) -> bool:
        """kind: own | other | missing. Returns whether it succeeded."""
        tgt = self.target_of(doc_id)
        if kind == "missing":
            self.c.expect_status(f"{action} missing {doc_id}", st, b, 404, "not_found")
            self.exp(rid, action, outcome="failure", reason="not_found", target=tgt)
            return False
        if kind == "other" and self.role != "admin":
            self.c.expect_status(f"{action} other", st, b, 404, "not_found")
            self.exp(rid, action, outcome="denied", reason="not_owner", target=tgt)
            self.sec(rid, "access.denied", outcome="denied", reason="not_owner", target=tgt,
                     user=self.user, role=self.role, session_id=self.s.sid if self.s else None,
                     details={"action": action}, where=f"{action} other")
            return False
        if self.c.expect_status(f"{action} {kind}", st, b, ok):
            self.exp(rid, action, target=tgt, details=details)
            return True
        return False

    async def update(self, doc_id: str, kind: str, *, version: str = "none") -> None:
        assert self.s is not None
        body: dict[str, Any] = {}
        if self.c.rng.random() < 0.7:
            body["title"] = f"U{self.c.rng.randrange(1000)}"
        if self.c.rng.random() < 0.5 or not body:
            body["content"] = "Updated text. The dog barks."
        cur = self.scratch.get(doc_id)
        if version == "right" and cur is not None:
            body["version"] = cur
        elif version == "stale" and cur is not None:
            body["version"] = max(1, cur - 1) if cur > 1 else cur + 5
        rid, st, b, _ = await self.c.call("PUT", f"/documents/{doc_id}", token=self.s.token,
                                          json_body=body)
        if version == "stale" and kind == "own" and cur is not None:
            self.c.expect_status("update stale", st, b, 409, "version_conflict")
            self.exp(rid, "document.update", outcome="failure", reason="version_conflict",
                     target=self.target_of(doc_id),
                     details={"expected_version": body["version"], "current_version": cur})
            return
        fields = sorted(k for k in body if k != "version")
        details = ({"version": cur + 1, "fields": fields} if kind == "own" and cur is not None
                   else None)
        if await self._judge(rid, st, b, "document.update", doc_id, kind, 200, details):
            if kind == "own" and cur is not None:
                if b.get("version") != cur + 1:
                    self.o.bad(f"update version {b.get('version')} != {cur + 1}")
                self.scratch[doc_id] = cur + 1
            elif kind == "other":
                # admin updated somebody's permanent document: details version unknown
                pass

    async def update_bad(self, doc_id: str, kind: str) -> None:
        assert self.s is not None
        choice = self.c.rng.randrange(4)
        if choice == 0:
            rid, st, b, _ = await self.c.call("PUT", f"/documents/{doc_id}", token=self.s.token,
                                              data=b"[oops")
            code = "invalid_json"
        elif choice == 1:
            rid, st, b, _ = await self.c.call("PUT", f"/documents/{doc_id}", token=self.s.token,
                                              json_body={"version": "three"})
            code = "invalid_request"
        elif choice == 2:
            rid, st, b, _ = await self.c.call("PUT", f"/documents/{doc_id}", token=self.s.token,
                                              json_body={"title": 5})
            code = "invalid_request"
        else:
            rid, st, b, _ = await self.c.call("PUT", f"/documents/{doc_id}", token=self.s.token,
                                              json_body={"version": 0, "title": "x"})
            code = "invalid_request"
        tgt = self.target_of(doc_id)
        if kind == "own" or (kind == "other" and self.role == "admin"):
            self.c.expect_status(f"update bad {choice}", st, b, 400, code)
            self.exp(rid, "document.update", outcome="failure", reason=code, target=tgt)
        else:
            await self._judge(rid, st, b, "document.update", doc_id, kind, 400)

    async def delete(self, doc_id: str, kind: str) -> None:
        assert self.s is not None
        cur = self.scratch.get(doc_id)
        rid, st, b, _ = await self.c.call("DELETE", f"/documents/{doc_id}", token=self.s.token)
        details = {"version": cur} if kind == "own" else None
        if await self._judge(rid, st, b, "document.delete", doc_id, kind, 204, details):
            if b is not None:
                self.o.bad(f"delete 204 with a body {b!r}")
            self.scratch.pop(doc_id, None)
            self.deleted.append(doc_id)

    async def chat(self, doc_id: str, kind: str) -> None:
        assert self.s is not None
        r = self.c.rng.random()
        if r < 0.05 and kind == "own":
            rid, st, b, _ = await self.c.call("POST", f"/documents/{doc_id}/chat",
                                              token=self.s.token,
                                              json_body={"message": "q" * (16 * 1024 + 1)})
            self.c.expect_status("chat big", st, b, 413, "too_large")
            self.exp(rid, "ai.interaction", outcome="failure", reason="too_large",
                     target=self.target_of(doc_id))
            return
        if r < 0.15 and kind == "own":
            bad = self.c.rng.choice([{"message": ""}, {"msg": "hi"}, {"message": 3}])
            rid, st, b, _ = await self.c.call("POST", f"/documents/{doc_id}/chat",
                                              token=self.s.token, json_body=bad)
            self.c.expect_status("chat bad", st, b, 400, "invalid_request")
            self.exp(rid, "ai.interaction", outcome="failure", reason="invalid_request",
                     target=self.target_of(doc_id))
            return
        message = f"Where does the cat sit? {self.c.rng.randrange(100)}"
        rid, st, b, _ = await self.c.call("POST", f"/documents/{doc_id}/chat",
                                          token=self.s.token, json_body={"message": message})
        ok = await self._judge(rid, st, b, "ai.interaction", doc_id, kind, 200, {
            "prompt": {"sha256": hashlib.sha256(message.encode()).hexdigest(),
                       "length": len(message)}})
        if ok:
            if set(b) != {"reply", "model", "usage"} or \
                    set(b["usage"]) != {"prompt_tokens", "completion_tokens"}:
                self.o.bad(f"chat body {b}")
                return
            ev = self.o.sessions[self.s.sid][-1]
            assert ev.details is not None
            ev.details.update({
                "model": b["model"],
                "reply": {"sha256": hashlib.sha256(b["reply"].encode()).hexdigest(),
                          "length": len(b["reply"])},
                "prompt_tokens": b["usage"]["prompt_tokens"],
                "completion_tokens": b["usage"]["completion_tokens"],
            })

    async def client_events(self) -> None:
        assert self.s is not None
        r = self.c.rng.random()
        if r < 0.2:
            bad = self.c.rng.choice([
                {"action": "server.x"}, [], [{"action": "client.ok"}, {"action": "nope"}],
                {"action": "client.a", "details": {"k": "v" * 5000}},
                {"action": "client.a", "target": {"type": "t"}},
            ])
            rid, st, b, _ = await self.c.call("POST", "/audit/events", token=self.s.token,
                                              json_body=bad)
            self.c.expect_status("events bad", st, b, 400, "invalid_request")
            self.exp(rid, "client.rejected", outcome="failure", reason="invalid_request")
            return
        n = self.c.rng.randrange(1, 5)
        items = []
        for i in range(n):
            item: dict[str, Any] = {"action": f"client.step_{i}:{self.c.rng.randrange(9)}"}
            if self.c.rng.random() < 0.5:
                item["target"] = {"type": "page", "id": f"p{i}"}
            if self.c.rng.random() < 0.5:
                item["details"] = {"i": i, "note": "ok"}
            items.append(item)
        body: Any = items if (n > 1 or self.c.rng.random() < 0.5) else items[0]
        rid, st, b, _ = await self.c.call("POST", "/audit/events", token=self.s.token,
                                          json_body=body)
        if not self.c.expect_status("events", st, b, 202):
            return
        if b != {"accepted": n}:
            self.o.bad(f"events body {b} for {n}")
        for it in items:
            self.exp(rid, it["action"], target=it.get("target"), details=it.get("details", {}))

    async def admin_call(self) -> None:
        assert self.s is not None
        r = self.c.rng.randrange(9)
        sids = list(self.o.sessions)
        if r == 0:
            path, ok = "/audit/sessions?limit=5", 200
        elif r == 1 and self.c.rng.random() < 0.5:
            path, ok = f"/audit/sessions/{self.c.rng.choice(sids)}", 200
        elif r == 1:
            path, ok = f"/audit/sessions/{self.s.sid}", 200
        elif r == 2:
            path, ok = f"/audit/sessions/{f'{self.c.rng.randrange(1 << 120):032x}'}", 404
        elif r == 3:
            path, ok = "/audit/security-events?kind=access.denied&limit=3", 200
        elif r == 4:
            path, ok = "/audit/status", 200
        elif r == 5:
            path, ok = "/audit/flush", 202
        elif r == 6:
            path, ok = "/audit/sessions?limit=0", 400
        elif r == 7:
            path, ok = f"/audit/sessions?user={self.user}&state=open", 200
        else:
            path, ok = "/audit/security-events?kind=nope", 400
        method = "POST" if path == "/audit/flush" else "GET"
        rid, st, b, _ = await self.c.call(method, path, token=self.s.token)
        endpoint = path.partition("?")[0]
        query = dict(x.split("=", 1) for x in path.partition("?")[2].split("&") if x)
        if self.role != "admin":
            self.c.expect_status(f"admin {path} by user", st, b, 403, "forbidden")
            self.exp(rid, "audit.query", outcome="denied", reason="not_admin",
                     details={"endpoint": endpoint, "query": query})
            self.sec(rid, "admin.denied", outcome="denied", reason="not_admin",
                     user=self.user, role=self.role, session_id=self.s.sid,
                     details={"endpoint": endpoint, "query": query}, where="admin.denied")
            return
        if r == 1 and st == 404:
            # A session id of somebody else's that is listed in the oracle: must exist.
            self.o.bad(f"admin detail of a known session {path}: 404")
        if path == f"/audit/sessions/{self.s.sid}" and st == 200 and self.role == "admin":
            exps = self.o.sessions[self.s.sid]
            got = [(e["request_id"], e["action"]) for e in b.get("events", [])]
            want = [(e.rid, e.action) for e in exps]
            if got != want or b.get("event_count") != len(want) or b.get("state") != "open" \
                    or b.get("session_end_time") is not None or b.get("user") != self.user \
                    or b.get("seal_reason") is not None:
                self.o.bad(f"admin detail of own open session: {len(got)} events,"
                           f" event_count {b.get('event_count')}, want {len(want)};"
                           f" state {b.get('state')} end {b.get('session_end_time')}"
                           f" diff {[x for x in got if x not in want][:3]}"
                           f" {[x for x in want if x not in got][:3]}")
        code = {400: "invalid_request", 404: "not_found"}.get(ok)
        self.c.expect_status(f"admin {path}", st, b, ok, code)
        if ok >= 400:
            self.exp(rid, "audit.query", outcome="failure", reason=code,
                     details={"endpoint": endpoint, "query": query})
        else:
            self.exp(rid, "audit.query", details={"endpoint": endpoint, "query": query})

    async def mismatch(self) -> None:
        assert self.s is not None
        path = self.c.rng.choice(["/me", "/documents", "/audit/status"])
        wrong = f"{self.c.rng.randrange(1 << 128):032x}"
        rid, st, b, _ = await self.c.call("GET", path, token=self.s.token,
                                          headers={"X-Audit-Session-ID": wrong})
        self.c.expect_status("mismatch", st, b, 403, "session_mismatch")
        self.sec(rid, "auth.session_mismatch", outcome="denied", reason="session_mismatch",
                 user=self.user, role=self.role, session_id=self.s.sid, where="mismatch")

    async def matching_header(self) -> None:
        assert self.s is not None
        _rid, st, b, _ = await self.c.call("GET", "/me", token=self.s.token,
                                          headers={"X-Audit-Session-ID": self.s.sid})
        keys = {"user", "role", "session_id", "session_start_time", "expires_at"}
        if self.c.expect_status("me", st, b, 200) and (
                set(b) != keys or b["user"] != self.user or b["session_id"] != self.s.sid
                or not TS_RE.match(b["session_start_time"])
                or not TS_RE.match(b["expires_at"])):
            self.o.bad(f"me body {b}")

    async def logout(self) -> None:
        assert self.s is not None
        r = self.c.rng.random()
        if r < 0.15:
            rid, st, b, _ = await self.c.call("POST", "/logout", token=self.s.token,
                                              json_body={"session_id": f"{7:032x}"})
            self.c.expect_status("logout mismatch", st, b, 403, "session_mismatch")
            self.sec(rid, "auth.session_mismatch", outcome="denied",
                     reason="logout_session_id", user=self.user, role=self.role,
                     session_id=self.s.sid, where="logout mismatch")
            return
        if r < 0.25:
            rid, st, b, _ = await self.c.call("POST", "/logout", token=self.s.token,
                                              json_body={"session_id": self.s.sid, "x": 1})
            self.c.expect_status("logout bad body", st, b, 400, "invalid_request")
            self.exp(rid, "session.end", outcome="failure", reason="invalid_request")
            return
        body: Any = {"session_id": self.s.sid} if r < 0.6 else ANY
        rid, st, b, _ = await self.c.call("POST", "/logout", token=self.s.token,
                                          json_body=body)
        if not self.c.expect_status("logout", st, b, 200):
            return
        self.exp(rid, "session.end", reason="logout")
        n = len(self.o.sessions[self.s.sid])
        if b != {"message": "Successfully logged out", "session_id": self.s.sid,
                 "event_count": n}:
            self.o.bad(f"logout body {b}, expected event_count {n}")
        self.o.ended[self.s.sid] = n
        self.old.append(self.s)
        self.s = None

    async def use_old(self) -> None:
        old = self.c.rng.choice(self.old)
        path = self.c.rng.choice(["/me", "/documents", "/logout"])
        method = "POST" if path == "/logout" else "GET"
        rid, st, b, _ = await self.c.call(method, path, token=old.token)
        self.c.expect_status("old token", st, b, 401, "session_ended")
        self.sec(rid, "auth.session_ended", outcome="denied", reason="session_ended",
                 user=self.user, role=self.role, session_id=old.sid, where="old token")

    async def bad_token(self) -> None:
        r = self.c.rng.random()
        if r < 0.5:
            rid, st, b, _ = await self.c.call("GET", "/documents")
            self.c.expect_status("no token", st, b, 401, "missing_token")
            self.sec(rid, "auth.invalid_token", outcome="denied", reason="missing_token",
                     where="missing token")
        else:
            rid, st, b, _ = await self.c.call("GET", "/documents", token="abc.def.ghi")
            self.c.expect_status("bad token", st, b, 401, "invalid_token")
            self.sec(rid, "auth.invalid_token", outcome="denied", reason=ANY,
                     where="bad token")


    async def race(self) -> None:
        """Several requests with one token at once, and a logout among them:
        each answer decides its events (2xx, 404: in the session, before
        session.end, in any order; 401 session_ended: none there, a security
        event instead), and what a 401 was told did not happen did not."""
        assert self.s is not None
        s = self.s
        rng = self.c.rng
        GROUP[0] += 1
        g = GROUP[0]
        own = list(self.scratch)
        upd = rng.choice(own) if own else None
        titles: dict[str, str] = {}
        before = self.scratch.get(upd) if upd else None

        async def one(kind: str) -> tuple[list[Exp], list[Exp], int]:
            sess: list[Exp] = []
            sec: list[Exp] = []
            u, role = self.user, self.role
            if kind == "create":
                title = f"race-{rng.randrange(1 << 40):x}"
                rid, st, b, _ = await self.c.call("POST", "/documents", token=s.token,
                                                  json_body={"title": title, "content": "c."})
                titles[title] = "?"
                if st == 201:
                    titles[title] = b["id"]
                    sess.append(Exp(rid, "document.create", target=b["id"], user=u, role=role,
                                    group=g))
            elif kind == "update" and upd:
                rid, st, b, _ = await self.c.call("PUT", f"/documents/{upd}", token=s.token,
                                                  json_body={"title": "raced"})
                if st == 200:
                    sess.append(Exp(rid, "document.update", target=upd, user=u, role=role,
                                    group=g, details={"version": (before or 0) + 1}))
            elif kind == "get_other" and self.others_docs() and self.role != "admin":
                d = rng.choice(self.others_docs())
                rid, st, b, _ = await self.c.call("GET", f"/documents/{d}", token=s.token)
                if st == 404:
                    sess.append(Exp(rid, "document.access", outcome="denied", reason="not_owner",
                                    target=d, user=u, role=role, group=g))
                    sec.append(Exp(rid, "access.denied", outcome="denied", reason="not_owner",
                                   target=d, user=u, role=role, session_id=s.sid))
            elif kind == "events":
                rid, st, b, _ = await self.c.call("POST", "/audit/events", token=s.token,
                                                  json_body={"action": "client.raced"})
                if st == 202:
                    sess.append(Exp(rid, "client.raced", user=u, role=role, group=g))
            elif kind == "chat" and own:
                d = rng.choice(own)
                rid, st, b, _ = await self.c.call("POST", f"/documents/{d}/chat", token=s.token,
                                                  json_body={"message": "cat?"})
                if st == 200:
                    sess.append(Exp(rid, "ai.interaction", target=d, user=u, role=role,
                                    group=g))
            elif kind == "list":
                rid, st, b, _ = await self.c.call("GET", "/documents", token=s.token)
                if st == 200:
                    sess.append(Exp(rid, "document.list", user=u, role=role, group=g,
                                    details={"count": len(b["documents"])}))
            elif kind == "admin":
                rid, st, b, _ = await self.c.call("GET", "/audit/status", token=s.token)
                if st == 403 and self.role != "admin":
                    sess.append(Exp(rid, "audit.query", outcome="denied", reason="not_admin",
                                    user=u, role=role, group=g))
                    sec.append(Exp(rid, "admin.denied", outcome="denied", reason="not_admin",
                                   user=u, role=role, session_id=s.sid))
                elif st == 200 and self.role == "admin":
                    sess.append(Exp(rid, "audit.query", user=u, role=role, group=g))
            else:
                rid, st, b, _ = await self.c.call("GET", "/me", token=s.token)
            if st == 401:
                if _code(b) != "session_ended":
                    self.o.bad(f"race {kind}: 401 {b}")
                sec.append(Exp(rid, "auth.session_ended", outcome=ANY, reason=ANY, user=u,
                               role=role, session_id=s.sid, target=ANY, where=f"race {kind}"))
            elif st >= 400 and not sess:
                self.o.bad(f"race {kind}: {st} {b}")
            return sess, sec, st

        kinds = [rng.choice(["create", "update", "get_other", "events", "chat", "list",
                             "admin", "me"]) for _ in range(rng.randrange(3, 9))]
        if "update" in kinds:
            kinds = [k for k in kinds if k != "update"] + ["update"]  # one at most

        async def logout() -> tuple[str, int, Any]:
            await asyncio.sleep(rng.random() * 0.01)
            rid, st, b, _ = await self.c.call("POST", "/logout", token=s.token)
            return rid, st, b

        logout_task = asyncio.ensure_future(logout())
        raced = await asyncio.gather(*(one(k) for k in kinds))
        lo_rid, lo_st, lo_b = await logout_task
        results: list[Any] = [*raced, None]
        if lo_st != 200:
            self.o.bad(f"race logout {lo_st} {lo_b}")
            return
        for sess, sec, _ in results[:-1]:
            self.o.sessions[s.sid].extend(sess)
            self.o.security.extend(sec)
        self.exp(lo_rid, "session.end", reason="logout")
        n = len(self.o.sessions[s.sid])
        if lo_b.get("event_count") != n:
            self.o.bad(f"race logout event_count {lo_b.get('event_count')} != {n}")
        self.o.ended[s.sid] = n
        self.old.append(s)
        self.s = None
        # What the 401s were told did not happen did not.
        upd_status = [st for k, (_, _, st) in zip(kinds, results[:-1], strict=False)
                      if k == "update"]
        while self.s is None:
            await self.login()
        rid, st, b, _ = await self.c.call("GET", "/documents", token=self.s.token)
        if st != 200:
            self.o.bad(f"race list {st}")
            return
        self.exp(rid, "document.list", details={"count": len(b["documents"])})
        have = {d["title"]: d for d in b["documents"]}
        for title, doc_id in titles.items():
            if doc_id == "?" and title in have:
                self.o.bad(f"race: a create answered 401 happened: {title}")
            if doc_id != "?":
                self.scratch[doc_id] = 1
                if title not in have:
                    self.o.bad(f"race: a create answered 201 is missing: {title}")
        if upd and upd_status:
            now = next((d["version"] for d in b["documents"] if d["id"] == upd), None)
            want = (before or 0) + (1 if upd_status[0] == 200 else 0)
            if now != want:
                self.o.bad(f"race: update answered {upd_status[0]}: version {now} != {want}")
            self.scratch[upd] = now if now is not None else want

    async def step(self) -> None:
        rng = self.c.rng
        if self.s is None:
            r = rng.random()
            if r < 0.2 and self.old:
                await self.use_old()
            elif r < 0.3:
                await self.login(password="wrong-" + str(rng.randrange(99)))
            elif r < 0.35:
                await self.bad_token()
            else:
                await self.login()
            return
        r = rng.random()
        own = list(self.scratch)
        others = self.others_docs()
        if r < 0.08:
            await self.create()
        elif r < 0.13:
            await self.create_bad()
        elif r < 0.18:
            await self.list_docs()
        elif r < 0.26:
            if own:
                await self.get(rng.choice(own), "own")
        elif r < 0.31:
            if others:
                await self.get(rng.choice(others), "other")
        elif r < 0.35:
            await self.get(self.missing_id(), "missing")
        elif r < 0.43:
            if own:
                await self.update(rng.choice(own), "own",
                                  version=rng.choice(["right", "stale", "none"]))
        elif r < 0.46:
            if others and self.role != "admin":
                await self.update(rng.choice(others), "other")
        elif r < 0.48:
            await self.update(self.missing_id(), "missing")
        elif r < 0.51:
            if own:
                await self.update_bad(rng.choice(own), "own")
        elif r < 0.53:
            if others and self.role != "admin":
                await self.update_bad(rng.choice(others), "other")
        elif r < 0.57:
            if own and len(own) > 2:
                await self.delete(rng.choice(own), "own")
        elif r < 0.59:
            if others and self.role != "admin":
                await self.delete(rng.choice(others), "other")
        elif r < 0.61:
            await self.delete(self.missing_id(), "missing")
        elif r < 0.67:
            if own:
                await self.chat(rng.choice(own), "own")
        elif r < 0.69:
            if others:
                await self.chat(rng.choice(others), "other")
        elif r < 0.70:
            await self.chat(self.missing_id(), "missing")
        elif r < 0.76:
            await self.client_events()
        elif r < 0.83:
            await self.admin_call()
        elif r < 0.86:
            await self.mismatch()
        elif r < 0.88:
            await self.matching_header()
        elif r < 0.90:
            await self.bad_token()
        elif r < 0.92 and self.old:
            await self.use_old()
        elif r < 0.94:
            await self.logout()
        elif r < 0.96:
            await self.race()

    async def finish(self) -> None:
        while self.s is not None:
            await self.logout()


class Guesser:
    """Wrong passwords and unknown users until throttled, from the same address."""

    def __init__(self, c: Client, shared: Shared) -> None:
        self.w = UserWorker(c, "nobody", "x", "user", shared, [])


    async def step(self) -> None:
        name = self.w.c.rng.choice(["mallory", "alice", "ghost" + str(self.w.c.rng.randrange(3))])
        await self.w.login(password="guess" + str(self.w.c.rng.randrange(1000)), username=name)
        await asyncio.sleep(0.05)


# -- the comparison ---------------------------------------------------------


def read_jsonl(d: Any) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    parts: dict[str, list[dict[str, Any]]] = {}
    sec: list[dict[str, Any]] = []
    for f in sorted(d.glob("audit-*.jsonl")):
        for line in f.read_text().splitlines():
            doc = json.loads(line)
            kind = doc.pop("type")
            if kind == "session_part":
                parts.setdefault(doc["session_id"], []).append(doc)
            else:
                sec.append(doc)
    return parts, sec


def read_sink(path: str) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        parts: dict[str, list[dict[str, Any]]] = {}
        for (doc,) in conn.execute("SELECT doc FROM parts"):
            d = json.loads(doc)
            parts.setdefault(d["session_id"], []).append(d)
        sec = [json.loads(doc) for (doc,) in conn.execute("SELECT doc FROM security_events")]
        return parts, sec
    finally:
        conn.close()


def _target_ok(want: Any, got: Any) -> bool:
    if want is ANY:
        return True
    if isinstance(want, str):
        want = {"type": "document", "id": want}
    return bool(want == got)


def compare_event(o: Oracle, where: str, exp: Exp, ev: dict[str, Any]) -> None:
    problems = []
    keys = EVENT_KEYS | ({"_id"} if where == "security" else set())
    if set(ev) != keys:
        problems.append(f"keys {sorted(set(ev) ^ keys)}")
    if ev.get("request_id") != exp.rid:
        problems.append(f"request_id {ev.get('request_id')} != {exp.rid}")
    if ev.get("action") != exp.action:
        problems.append(f"action {ev.get('action')} != {exp.action}")
    if exp.outcome is not ANY and ev.get("outcome") != exp.outcome:
        problems.append(f"outcome {ev.get('outcome')} != {exp.outcome}")
    details = ev.get("details")
    if not isinstance(details, dict):
        problems.append(f"details {details!r}")
        details = {}
    if exp.reason is None:
        if "reason" in details and exp.action not in ("session.end",):
            problems.append(f"unexpected details.reason {details['reason']!r}")
    elif exp.reason is not ANY and details.get("reason") != exp.reason:
        problems.append(f"reason {details.get('reason')!r} != {exp.reason!r}")
    if not _target_ok(exp.target, ev.get("target")):
        problems.append(f"target {ev.get('target')} != {exp.target}")
    actor = ev.get("actor") or {}
    if exp.user is not None and actor.get("user") != exp.user:
        problems.append(f"actor {actor} != {exp.user}")
    if exp.role is not None and actor.get("role") != exp.role:
        problems.append(f"actor role {actor} != {exp.role}")
    for k, v in (exp.details or {}).items():
        if details.get(k) != v:
            problems.append(f"details.{k} {details.get(k)!r} != {v!r}")
    if not isinstance(ev.get("ts"), str) or not TS_RE.match(ev["ts"]):
        problems.append(f"ts {ev.get('ts')!r}")
    src = ev.get("source") or {}
    if src.get("ip") != "127.0.0.1":
        problems.append(f"source {src}")
    if src.get("user_agent") != UA:
        problems.append(f"user_agent {src.get('user_agent')!r}")
    if problems:
        o.bad(f"{where}: {exp.action} rid={exp.rid}: " + "; ".join(problems))


def compare(o: Oracle, parts: dict[str, list[dict[str, Any]]],
            security: list[dict[str, Any]]) -> None:
    for sid in set(parts) - set(o.sessions):
        o.bad(f"session {sid} in the sink that no client was told of:"
              f" {[e['action'] for p in parts[sid] for e in p['events']][:10]}")
    for sid, exps in o.sessions.items():
        ps = sorted(parts.get(sid, []), key=lambda p: p["part"])
        if not ps:
            o.bad(f"session {sid} ({o.session_user[sid]}): not in the sink")
            continue
        if [p["part"] for p in ps] != list(range(len(ps))):
            o.bad(f"session {sid}: parts {[p['part'] for p in ps]}")
        if not ps[-1]["final"] or any(p["final"] for p in ps[:-1]):
            o.bad(f"session {sid}: final flags {[p['final'] for p in ps]}")
        events = [e for p in ps for e in p["events"]]
        for p in ps:
            if p["event_count"] != len(p["events"]):
                o.bad(f"session {sid} part {p['part']}: event_count {p['event_count']}"
                      f" != {len(p['events'])}")
            if p["events"] and (p["first_seq"] != p["events"][0]["seq"]
                                or p["last_seq"] != p["events"][-1]["seq"]):
                o.bad(f"session {sid} part {p['part']}: first/last seq")
            if p["user"] != o.session_user[sid]:
                o.bad(f"session {sid} part user {p['user']}")
        for a, b in itertools.pairwise(ps):
            if b["prev_hash"] != a["hash"]:
                o.bad(f"session {sid}: part {b['part']} prev_hash does not follow")
        if ps[-1].get("seal_reason") != "logout":
            o.bad(f"session {sid}: seal_reason {ps[-1].get('seal_reason')}")
        tss = [e["ts"] for e in events]
        if tss != sorted(tss):
            o.bad(f"session {sid}: event times go backwards in seq order")
        seqs = [e["seq"] for e in events]
        if seqs != list(range(1, len(events) + 1)):
            o.bad(f"session {sid}: seqs {seqs[:50]}")
        if any(e["session_id"] != sid for e in events):
            o.bad(f"session {sid}: events of another session in it")
        if sid in o.ended and o.ended[sid] != len(events):
            o.bad(f"session {sid}: logout said event_count {o.ended[sid]}, sink has"
                  f" {len(events)}")
        skip_to = 0
        for i in range(max(len(events), len(exps))):
            if i < skip_to:
                continue
            if i >= len(exps):
                e = events[i]
                o.bad(f"session {sid} ({o.session_user[sid]}): extra event seq {e['seq']}"
                      f" {e['action']} {e['outcome']} {e['details'].get('reason')}"
                      f" rid={e['request_id']}")
                continue
            if i >= len(events):
                o.bad(f"session {sid} ({o.session_user[sid]}): missing event {exps[i]}")
                continue
            if exps[i].group:
                g = exps[i].group
                j = i
                while j < len(exps) and exps[j].group == g:
                    j += 1
                block = events[i:j]
                want_keys = sorted((e.rid, e.action) for e in exps[i:j])
                got_keys = sorted((e.get("request_id"), e.get("action")) for e in block)
                if want_keys != got_keys:
                    o.bad(f"session {sid}: concurrent block differs: want-only"
                          f" {sorted(set(want_keys) - set(got_keys))}, got-only"
                          f" {sorted(set(got_keys) - set(want_keys))}")
                    break
                by = {(e.get("request_id"), e.get("action")): e for e in block}
                for e in exps[i:j]:
                    compare_event(o, f"session {sid} block", e, by[(e.rid, e.action)])
                skip_to = j
                continue
            if i < skip_to:
                continue
            if events[i].get("request_id") != exps[i].rid or \
                    events[i].get("action") != exps[i].action:
                o.bad(f"session {sid} ({o.session_user[sid]}): at seq {i + 1}: got"
                      f" {events[i].get('action')} {events[i].get('outcome')}"
                      f" {events[i].get('details', {}).get('reason')}"
                      f" rid={events[i].get('request_id')}, want {exps[i].action}"
                      f" {exps[i].outcome} {exps[i].reason} rid={exps[i].rid}"
                      f" ({exps[i].where})")
                # Re-align: report only the first divergence of a session.
                break
            compare_event(o, f"session {sid} seq {i + 1}", exps[i], events[i])
    # Security events: matched by request id and action.
    got: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for ev in security:
        if ev.get("seq") is not None:
            o.bad(f"security event with seq {ev}")
        if ev.get("_id") != ev.get("event_id"):
            o.bad(f"security event _id {ev.get('_id')} != event_id")
        got.setdefault((ev.get("request_id") or "", ev["action"]), []).append(ev)
    for exp in o.security:
        found = got.get((exp.rid, exp.action))
        if not found:
            o.bad(f"missing security event {exp.action} rid={exp.rid} ({exp.where})")
            continue
        ev = found.pop(0)
        compare_event(o, "security", exp, ev)
        if ev.get("session_id") != exp.session_id:
            o.bad(f"security {exp.action} rid={exp.rid}: session_id {ev.get('session_id')}"
                  f" != {exp.session_id}")
    for (rid, action), left in got.items():
        for ev in left:
            o.bad(f"extra security event {action} rid={rid} session={ev.get('session_id')}"
                  f" details={ev.get('details')}")


async def metric(http: aiohttp.ClientSession, base: str, name: str) -> float:
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or ("{" not in name and line.startswith(name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


async def run(live: Live, seed: int = 1, steps: int = 60, users: int = 3,
              guess: bool = True) -> Oracle:
    names = ["alice", "bob", "carol", "dave", "erin"][:users]
    for n in names:
        await live.adduser(n, PASSWORD)
    o = Oracle()
    shared = Shared()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        rng = random.Random(seed)
        workers = [UserWorker(Client(http, live.base, o, n, random.Random(rng.random())), n,
                              PASSWORD, "user", shared, names) for n in names]
        workers.append(UserWorker(Client(http, live.base, o, "admin",
                                         random.Random(rng.random())),
                                  "admin", ADMIN_PASSWORD, "admin", shared, names))
        await asyncio.gather(*(w.start() for w in workers))

        async def drive(w: Any, n: int) -> None:
            for _ in range(n):
                await w.step()

        jobs = [drive(w, steps) for w in workers]
        if guess:
            jobs.append(drive(Guesser(Client(http, live.base, o, "guess",
                                             random.Random(rng.random())), shared), steps // 3))
        await asyncio.gather(*jobs)
        await asyncio.gather(*(w.finish() for w in workers))
        # Everything ended: wait until the sink has it all.
        deadline = time.monotonic() + 60
        while True:
            pp = await metric(http, live.base, "session_audit_pending_parts")
            ps = await metric(http, live.base, "session_audit_pending_security_events")
            if pp == 0 and ps == 0:
                break
            if time.monotonic() > deadline:
                o.bad(f"not drained: {pp} parts, {ps} security events pending")
                break
            await asyncio.sleep(0.1)
        if (live.data_dir / "audit-jsonl").exists():
            parts, security = read_jsonl(live.data_dir / "audit-jsonl")
        else:
            parts, security = read_sink(str(live.data_dir / "audit.db"))
        compare(o, parts, security)
        ev_s = await metric(http, live.base, 'session_audit_events_recorded_total{kind="session"}')
        ev_x = await metric(http, live.base, 'session_audit_events_recorded_total{kind="security"}')
        pw = await metric(http, live.base, "session_audit_parts_written_total")
        active = await metric(http, live.base, "session_audit_active_sessions")
        n_ev = sum(len(p["events"]) for ps in parts.values() for p in ps)
        n_parts = sum(len(ps) for ps in parts.values())
        if (ev_s, ev_x, pw, active) != (n_ev, len(security), n_parts, 0):
            o.bad(f"metrics: session events {ev_s} (sink {n_ev}), security {ev_x}"
                  f" (sink {len(security)}), parts written {pw} (sink {n_parts}),"
                  f" active sessions {active} (0)")
        await readback(o, http, live.base, parts, security)
    r = await live.cli("verify")
    if r.returncode != 0:
        o.bad(f"verify failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    return o


# -- the admin API read back against the sink ----------------------------------


async def readback(o: Oracle, http: aiohttp.ClientSession, base: str,
                   parts: dict[str, list[dict[str, Any]]],
                   security: list[dict[str, Any]]) -> None:
    """Log in as admin, page through sessions and security events and read each
    session's detail: all must equal what the sink holds."""
    for _ in range(20):
        async with http.post(base + "/token", json={"username": "admin",
                                                    "password": ADMIN_PASSWORD}) as r:
            if r.status == 429:
                await asyncio.sleep(int(r.headers.get("Retry-After", "1")))
                continue
            if r.status != 200:
                o.bad(f"readback login {r.status}")
                return
            tok = (await r.json())["access_token"]
            break
    else:
        o.bad("readback login throttled")
        return
    h = {"Authorization": f"Bearer {tok}"}

    async def get(path: str) -> Any:
        async with http.get(base + path, headers=h) as r:
            body = await r.json()
            if r.status != 200:
                o.bad(f"readback {path}: {r.status} {body}")
                return None
            return body

    async def all_pages(q: str, key: str, limit: int) -> list[dict[str, Any]] | None:
        out: list[dict[str, Any]] = []
        cur = None
        for _ in range(500):
            sep = "&" if "?" in q else "?"
            page = await get(q + f"{sep}limit={limit}" + (f"&cursor={cur}" if cur else ""))
            if page is None:
                return None
            out += page[key]
            cur = page["next_cursor"]
            if not cur:
                return out
        return out

    listed = await all_pages("/audit/sessions?state=stored", "sessions", 7)
    if listed is None:
        return
    ids = [s["session_id"] for s in listed]
    if len(ids) != len(set(ids)):
        o.bad(f"session listing repeats sessions: {len(ids)} listed, {len(set(ids))} distinct")
    if set(ids) != set(parts):
        o.bad(f"session listing: missing {set(parts) - set(ids)}, extra {set(ids) - set(parts)}")
    starts = [(s["session_start_time"], s["session_id"]) for s in listed]
    if starts != sorted(starts, reverse=True):
        o.bad("session listing not newest first")
    for s in listed:
        sid = s["session_id"]
        ps = sorted(parts.get(sid, []), key=lambda p: p["part"])
        if not ps:
            continue
        detail = await get(f"/audit/sessions/{sid}")
        if detail is None:
            continue
        events = [e for p in ps for e in p["events"]]
        want = {
            "session_id": sid, "user": ps[0]["user"], "state": "stored",
            "session_start_time": ps[0]["session_start_time"],
            "session_end_time": ps[-1]["session_end_time"],
            "session_duration_seconds": ps[-1]["session_duration_seconds"],
            "event_count": len(events), "seal_reason": ps[-1]["seal_reason"],
            "parts": len(ps),
        }
        for summary, what in ((s, "listing"), (detail, "detail")):
            for k, v in want.items():
                if summary.get(k) != v:
                    o.bad(f"admin {what} of {sid}: {k} {summary.get(k)!r} != sink's {v!r}")
        if detail.get("events") != events:
            o.bad(f"admin detail of {sid}: events differ from the sink's")
        start = ps[0]["session_start_time"]
        if events and events[0]["ts"] != start:
            o.bad(f"session {sid}: start {start} != first event ts {events[0]['ts']}")
        if events and events[-1]["ts"] != ps[-1]["session_end_time"]:
            o.bad(f"session {sid}: end {ps[-1]['session_end_time']} != session.end ts"
                  f" {events[-1]['ts']}")
    from urllib.parse import quote
    starts_by = {sid: ps[0]["session_start_time"] for sid, ps in parts.items()
                 for ps in [sorted(ps, key=lambda p: p["part"])]}
    users_by = {sid: ps[0]["user"] for sid, ps in parts.items()}
    rng = random.Random(len(parts))
    times = sorted(starts_by.values())
    for _ in range(6):
        since = rng.choice(times) if rng.random() < 0.7 else None
        until = rng.choice(times) if rng.random() < 0.5 else None
        user = rng.choice(sorted(set(users_by.values()))) if rng.random() < 0.5 else None
        state = rng.choice([None, "stored", "open", "pending"])
        q = "/audit/sessions?" + "&".join(
            f"{k}={quote(v)}" for k, v in (("since", since), ("until", until), ("user", user),
                                           ("state", state)) if v)
        got = await all_pages(q, "sessions", rng.randrange(1, 9))
        if got is None:
            continue
        got_ids = [x["session_id"] for x in got if x["session_id"] in parts or
                   x.get("state") != "open"]
        want_ids = {sid for sid in parts
                if (since is None or starts_by[sid] >= since)
                and (until is None or starts_by[sid] <= until)
                and (user is None or users_by[sid] == user)
                and state in (None, "stored")}
        if len(got_ids) != len(set(got_ids)) or set(got_ids) != want_ids:
            o.bad(f"listing {q}: {len(got_ids)} listed ({len(set(got_ids))} distinct),"
                  f" want {len(want_ids)}; missing {sorted(want_ids - set(got_ids))[:3]}"
                  f" extra {sorted(set(got_ids) - want_ids)[:3]}")
        opened = [x for x in got if x.get("state") == "open"]
        if state in (None, "open") and user in (None, "admin") and until is None:
            if len(opened) != 1:
                o.bad(f"listing {q}: open sessions {opened}")
        elif opened:
            o.bad(f"listing {q}: open sessions {opened}")
    sec_pages = await all_pages("/audit/security-events", "events", 13)
    if sec_pages is None:
        return
    got_sec: list[dict[str, Any]] = sec_pages
    known_rids = {e.rid for e in o.security}
    got_sec = [e for e in got_sec if e["request_id"] in known_rids
               or e["action"] != "auth.login_throttled"]
    sec_ids = [e["_id"] for e in got_sec]
    if len(sec_ids) != len(set(sec_ids)):
        o.bad("security listing repeats events")
    want_ids = {e["_id"] for e in security}
    if set(sec_ids) != want_ids:
        o.bad(f"security listing: missing {len(want_ids - set(sec_ids))},"
              f" extra {len(set(sec_ids) - want_ids)}")
    by_id = {e["_id"]: e for e in security}
    for e in got_sec:
        if e["_id"] in by_id and e != by_id[e["_id"]]:
            o.bad(f"security event {e['_id']} differs between admin API and sink")
    for kind in ("access.denied", "auth.login_failed", "admin.denied"):
        page = await get(f"/audit/security-events?kind={kind}&limit=500")
        if page is None:
            continue
        kind_ids = {e["_id"] for e in security if e["action"] == kind}
        if {e["_id"] for e in page["events"]} != kind_ids:
            o.bad(f"security listing kind={kind} differs from the sink")

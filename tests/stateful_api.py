"""A Hypothesis state machine driving a real server with several users.

Not a test module: ``tests/test_stateful_api.py`` runs it briefly in CI and
``python tests/stateful_api.py`` runs a longer local campaign.

Each step is one request (or a handful at once) by one of several sessions of
several users (an admin among them): logins right and wrong, documents
created, read, updated with fresh, stale and future versions, deleted and
chatted about, client events, logouts, ended tokens, session-id mismatches,
the admin API (session detail, session and security-event listings paged
through), concurrent updates at one version, a delete racing an update or a
chat, and (``--restarts``, campaign only) the server stopped by SIGTERM or
SIGKILL and started again. A model says what each answer must be; after every answer:
no 5xx, the answer as openapi.yaml documents it, the error body and
``X-Request-ID`` as API.md says, a document visible to its owner and admins
only, versions up by one per update. An admin reading a session (open,
pending or stored) sees exactly the events the model expects so far.

At the end of each run every session is logged out, the sink is waited for,
and its audit trail held against the model with ``oracle_workload.compare``:
one event per attempted action, with its outcome and reason, in ``seq``
order, each session's parts chained; and security events exactly those
expected. ``server.py verify`` checks the chains at the end of a campaign.

A local campaign, e.g.::

    cd tests && ../.venv/bin/python stateful_api.py --examples 250 --steps 60
    ../.venv/bin/python stateful_api.py --restarts --part-max-events 4 \\
        --audit checkpoint_seconds=0.5 --keep-stored 2
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

sys.path.insert(0, str(Path(__file__).resolve().parent))

import oracle_workload
from live_server import ADMIN_PASSWORD, Live
from oracle_workload import ANY, UA, Exp, Oracle, compare, read_sink

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "stateful-password-0123"
USERS = {"alice": "user", "bob": "user", "admin": "admin"}
SETTINGS: dict[str, Any] = {
    # No throttling: the model does not follow its windows.
    "auth": {"login_max_failures": 100000, "login_window_seconds": 1},
    "flush": {"max_writes_per_second": 1000.0, "burst": 1000},
    "audit": {"synchronous": "normal"},
}
ERROR_KEYS = {"code", "message", "request_id"}

# openapi.yaml's path templates, to validate each answer against its operation.
TEMPLATES = [
    ("/documents/{doc_id}/chat", "/documents/", "/chat"),
    ("/documents/{doc_id}", "/documents/", ""),
    ("/audit/sessions/{session_id}", "/audit/sessions/", ""),
]


def template_of(path: str) -> str:
    path = path.partition("?")[0]
    for tpl, head, tail in TEMPLATES:
        if path.startswith(head) and path.endswith(tail) and len(path) > len(head) + len(tail):
            return tpl
    return path


@dataclass
class Sess(oracle_workload.Sess):
    open: bool = True


@dataclass
class Doc:
    owner: str
    title: str
    content: str
    version: int = 1


@dataclass
class World:
    """The live server shared by every run of the machine in one process."""

    live: Live
    schema: Any
    http: requests.Session = field(default_factory=requests.Session)
    runs: int = 0
    failed_run: int = 0
    # Wait for /metrics to say nothing is pending (a second more a run), not
    # only for the sink to hold what the model expects: finds extra events
    # written late.
    strict_drain: bool = True
    # The rule that stops and starts the server (a few seconds each time).
    restarts: bool = False
    verbose: bool = False
    requests: int = 0
    sids: set[str] = field(default_factory=set)
    answers: dict[tuple[str, str, int], int] = field(default_factory=dict)


WORLD: World | None = None


def start_world(workdir: Path, settings: dict[str, Any] | None = None) -> World:
    global WORLD
    live = Live(workdir, {**SETTINGS, **(settings or {})})
    asyncio.run(live.start())
    for name, role in USERS.items():
        if name != "admin":
            asyncio.run(live.adduser(name, PASSWORD, admin=role == "admin"))
    schema = schemathesis.openapi.from_path(str(ROOT / "openapi.yaml"))
    WORLD = World(live, schema)
    return WORLD


def stop_world() -> None:
    global WORLD
    if WORLD is not None:
        WORLD.live.close()
        WORLD.http.close()
        WORLD = None


class Failure(AssertionError):
    """A disagreement with the model (it also tells the teardown of the run
    that failed not to hold its half-updated model against the sink)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        if WORLD is not None:
            WORLD.failed_run = WORLD.runs
            if WORLD.verbose:  # what shrinking or a flaky replay may hide
                print(f"FAILURE in run {WORLD.runs}: {args[0] if args else ''}"[:3000],
                      file=sys.stderr, flush=True)


def blocks(events: list[tuple[Any, ...]], exps: list[Exp]) -> list[Any]:
    """``events`` with each run of expected events of one concurrent group
    (in any order) as one sorted block."""
    out: list[Any] = []
    k = 0
    while k < len(events):
        g = exps[k].group if k < len(exps) else 0
        if not g:
            out.append(events[k])
            k += 1
            continue
        end = k
        while end < len(exps) and exps[end].group == g:
            end += 1
        out.append(sorted(events[k:end]))
        k = end
    return out


def metric(world: World, name: str) -> float:
    text = world.http.get(world.live.base + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise Failure(f"no metric {name}")


def drain(world: World, timeout: float = 60.0) -> None:
    """Wait until nothing is pending (the metric's counts may be up to a
    second old: the wait starts past that)."""
    time.sleep(1.1)
    deadline = time.monotonic() + timeout
    while True:
        if metric(world, "session_audit_pending_parts") == 0 and \
                metric(world, "session_audit_pending_security_events") == 0:
            return
        if time.monotonic() > deadline:
            raise Failure("the sink did not take everything in time")
        time.sleep(0.05)


PAYLOAD = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                  min_size=0, max_size=40)
TITLE = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() != "")
PICK = st.integers(min_value=0, max_value=1 << 16)


class ApiMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert WORLD is not None, "start_world() first"
        self.w = WORLD
        self.w.runs += 1
        self.run = self.w.runs
        self.n = 0
        self.o = Oracle()
        self.sessions: list[Sess] = []
        self.docs: dict[str, Doc] = {}
        self.gone: list[str] = []
        self.rids: set[str] = set()
        self.group = 0
        self.done = False
        # Listings start here: sessions of earlier runs are not the model's.
        self.t0 = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 1))

    # -- plumbing ------------------------------------------------------------

    def rid(self) -> str:
        self.n += 1
        r = f"sm{self.run}-{self.n}-{time.monotonic_ns() % 100000}"
        self.rids.add(r)
        return r

    def call(self, method: str, path: str, *, token: str | None = None, json_body: Any = ANY,
             data: Any = None, headers: dict[str, str] | None = None,
             http: requests.Session | None = None) -> tuple[str, requests.Response, Any]:
        rid = self.rid()
        h = {"X-Request-ID": rid, "User-Agent": UA, **(headers or {})}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {}
        if json_body is not ANY:
            kwargs["data"] = json.dumps(json_body).encode()
            h["Content-Type"] = "application/json"
        elif data is not None:
            kwargs["data"] = data
        self.w.requests += 1
        r = (http or self.w.http).request(method, self.w.live.base + path, headers=h,
                                          timeout=60, **kwargs)
        body: Any = None
        if r.content:
            try:
                body = r.json()
            except ValueError:
                body = r.text
        where = f"{method} {path} -> {r.status_code} {str(body)[:300]}"
        key = (method, template_of(path), r.status_code)
        self.w.answers[key] = self.w.answers.get(key, 0) + 1
        if r.status_code >= 500:
            raise Failure(f"5xx: {where}")
        if r.headers.get("X-Request-ID") != rid:
            raise Failure(f"X-Request-ID {r.headers.get('X-Request-ID')!r} != {rid}: {where}")
        if r.status_code >= 400 and not (
                isinstance(body, dict) and set(body) == {"error"}
                and isinstance(body["error"], dict) and set(body["error"]) == ERROR_KEYS
                and body["error"]["request_id"] == rid):
            raise Failure(f"error body: {where}")
        op = self.w.schema[template_of(path)][method]
        try:
            op.validate_response(r)
        except Exception as exc:  # schemathesis raises a group of failures
            raise Failure(f"not as openapi.yaml says: {where}: {exc}") from None
        return rid, r, body

    def want(self, where: str, r: requests.Response, body: Any, status: int,
             code: str | None = None) -> None:
        got_code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        if r.status_code != status or (code is not None and got_code != code):
            raise Failure(f"{where}: got {r.status_code} {str(body)[:300]}, want {status}"
                          f" {code or ''}")

    def pages(self, s: Sess, endpoint: str, key: str, id_key: str,
              **params: Any) -> Iterator[dict[str, Any]]:
        """Page through an admin listing as ``s`` (the parameters given, None
        left out, then each next_cursor): every item, checked to come once,
        each page's items before its own audit.query is expected."""
        seen: set[str] = set()
        query = {k: str(v) for k, v in params.items() if v is not None}
        for _ in range(2000):
            q = "&".join(f"{k}={v}" for k, v in query.items())
            rid, r, b = self.call("GET", f"{endpoint}?{q}", token=s.token)
            self.want(endpoint, r, b, 200)
            for item in b[key]:
                if item[id_key] in seen:
                    raise Failure(f"{endpoint} listed {item[id_key]} twice")
                seen.add(item[id_key])
                yield item
            self.exp(s, rid, "audit.query", details={"endpoint": endpoint, "query": dict(query)})
            if not b["next_cursor"]:
                break
            query["cursor"] = b["next_cursor"]

    def exp(self, s: Sess, rid: str, action: str, **kw: Any) -> None:
        kw.setdefault("user", s.user)
        kw.setdefault("role", s.role)
        self.o.sessions[s.sid].append(Exp(rid, action, where=action, **kw))

    def sec(self, rid: str, action: str, **kw: Any) -> None:
        self.o.security.append(Exp(rid, action, where=action, **kw))

    def open_sessions(self) -> list[Sess]:
        return [s for s in self.sessions if s.open]

    def pick_open(self, i: int) -> Sess:
        ss = self.open_sessions()
        return ss[i % len(ss)]

    def visible(self, s: Sess, doc_id: str) -> str:
        """own | other (not visible) | missing; admins see every document."""
        d = self.docs.get(doc_id)
        if d is None:
            return "missing"
        return "own" if d.owner == s.user or s.role == "admin" else "other"

    def pick_doc(self, s: Sess, i: int, kind: int) -> str:
        """kind 0-5: a document (any), 6: a deleted one, 7: one never made."""
        ids = sorted(self.docs)
        if kind < 6 and ids:
            return ids[i % len(ids)]
        if kind == 6 and self.gone:
            return self.gone[i % len(self.gone)]
        return hashlib.sha256(f"{self.run}-{i}".encode()).hexdigest()[:32]

    def judge(self, s: Sess, rid: str, r: requests.Response, body: Any, action: str,
              doc_id: str, ok: int, details: dict[str, Any] | None = None) -> bool:
        kind = self.visible(s, doc_id)
        tgt = {"type": "document", "id": doc_id}
        if kind == "missing":
            self.want(f"{action} missing", r, body, 404, "not_found")
            self.exp(s, rid, action, outcome="failure", reason="not_found", target=tgt)
            return False
        if kind == "other":
            self.want(f"{action} other's", r, body, 404, "not_found")
            self.exp(s, rid, action, outcome="denied", reason="not_owner", target=tgt)
            self.sec(rid, "access.denied", outcome="denied", reason="not_owner", target=tgt,
                     user=s.user, role=s.role, session_id=s.sid, details={"action": action})
            return False
        self.want(f"{action} own", r, body, ok)
        self.exp(s, rid, action, target=tgt, details=details)
        return True

    def check_doc(self, doc_id: str, body: Any) -> None:
        d = self.docs[doc_id]
        got = {k: body.get(k) for k in ("id", "owner", "title", "content", "version")}
        want = {"id": doc_id, "owner": d.owner, "title": d.title, "content": d.content,
                "version": d.version}
        if got != want:
            raise Failure(f"document {doc_id}: {got} != model {want}")

    # -- rules -----------------------------------------------------------------

    @initialize(docs=st.lists(st.sampled_from(sorted(USERS)), max_size=4))
    def start(self, docs: list[str]) -> None:
        """Every user logged in once, and a few documents: the rules start
        from a state where there is something to act on."""
        for user in sorted(USERS):
            self.login(user, False)
        for user in docs:
            s = next(x for x in self.sessions if x.user == user)
            self.create(self.sessions.index(s), f"{user}'s", "The cat sat on the mat.")

    @rule(user=st.sampled_from(sorted(USERS)), form=st.booleans())
    def login(self, user: str, form: bool) -> None:
        pw = ADMIN_PASSWORD if user == "admin" else PASSWORD
        creds = {"username": user, "password": pw}
        if form:
            rid, r, b = self.call("POST", "/token", data=creds)
        else:
            rid, r, b = self.call("POST", "/token", json_body=creds)
        self.want("login", r, b, 200)
        s = Sess(user, USERS[user], b["access_token"], b["session_id"])
        if s.sid in self.w.sids:
            raise Failure(f"session id {s.sid} issued twice")
        self.w.sids.add(s.sid)
        self.sessions.append(s)
        self.o.sessions[s.sid] = []
        self.o.session_user[s.sid] = user
        self.exp(s, rid, "session.start")
        self.exp(s, rid, "token.issue")

    @rule(user=st.sampled_from([*sorted(USERS), "nobody"]), pw=st.text(max_size=12))
    def login_wrong(self, user: str, pw: str) -> None:
        pw = "wrong:" + pw
        rid, r, b = self.call("POST", "/token", json_body={"username": user, "password": pw})
        self.want("wrong login", r, b, 401, "invalid_credentials")
        self.sec(rid, "auth.login_failed", outcome="denied", reason="invalid_credentials",
                 details={"username": user})

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, title=TITLE, content=PAYLOAD)
    def create(self, i: int, title: str, content: str) -> None:
        s = self.pick_open(i)
        rid, r, b = self.call("POST", "/documents", token=s.token,
                              json_body={"title": title, "content": content})
        self.want("create", r, b, 201)
        if b["owner"] != s.user or b["version"] != 1 or b["title"] != title \
                or b["content"] != content or b["id"] in self.docs or b["id"] in self.gone:
            raise Failure(f"create answered {b}")
        self.docs[b["id"]] = Doc(s.user, title, content)
        self.exp(s, rid, "document.create", target={"type": "document", "id": b["id"]},
                 details={"title_length": len(title),
                          "content_bytes": len(content.encode())})

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, j=PICK, kind=st.integers(0, 7))
    def get(self, i: int, j: int, kind: int) -> None:
        s = self.pick_open(i)
        doc_id = self.pick_doc(s, j, kind)
        rid, r, b = self.call("GET", f"/documents/{doc_id}", token=s.token)
        if self.judge(s, rid, r, b, "document.access", doc_id, 200):
            self.check_doc(doc_id, b)

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, j=PICK, kind=st.integers(0, 7),
          version=st.sampled_from(["none", "fresh", "stale", "future"]),
          title=st.none() | TITLE, content=st.none() | PAYLOAD)
    def update(self, i: int, j: int, kind: int, version: str, title: str | None,
               content: str | None) -> None:
        s = self.pick_open(i)
        doc_id = self.pick_doc(s, j, kind)
        d = self.docs.get(doc_id)
        body: dict[str, Any] = {}
        if title is not None:
            body["title"] = title
        if content is not None:
            body["content"] = content
        cur = d.version if d else 1
        if version == "fresh":
            body["version"] = cur
        elif version == "stale" and cur > 1:
            body["version"] = cur - 1
        elif version in ("stale", "future"):
            body["version"] = cur + 1
        rid, r, b = self.call("PUT", f"/documents/{doc_id}", token=s.token, json_body=body)
        if d is not None and self.visible(s, doc_id) == "own" \
                and body.get("version", cur) != cur:
            self.want("stale update", r, b, 409, "version_conflict")
            self.exp(s, rid, "document.update", outcome="failure", reason="version_conflict",
                     target={"type": "document", "id": doc_id},
                     details={"expected_version": body["version"], "current_version": cur})
            return
        fields = sorted(k for k in body if k != "version")
        if self.judge(s, rid, r, b, "document.update", doc_id, 200,
                      {"version": cur + 1, "fields": fields}):
            assert d is not None
            d.version += 1
            d.title = body.get("title", d.title)
            d.content = body.get("content", d.content)
            self.check_doc(doc_id, b)

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, j=PICK, kind=st.integers(0, 7), choice=st.integers(0, 3))
    def update_bad(self, i: int, j: int, kind: int, choice: int) -> None:
        """A bad body: refused for what it is on a document the caller may see,
        as the document (404) on one they may not."""
        s = self.pick_open(i)
        doc_id = self.pick_doc(s, j, kind)
        bodies: list[tuple[Any, str]] = [(b"[oops", "invalid_json"),
                                         ({"version": "three"}, "invalid_request"),
                                         ({"title": 5}, "invalid_request"),
                                         ({"version": 0, "title": "x"}, "invalid_request")]
        body, code = bodies[choice]
        if isinstance(body, bytes):
            rid, r, b = self.call("PUT", f"/documents/{doc_id}", token=s.token, data=body,
                                  headers={"Content-Type": "application/json"})
        else:
            rid, r, b = self.call("PUT", f"/documents/{doc_id}", token=s.token, json_body=body)
        if self.visible(s, doc_id) == "own":
            self.want("bad update", r, b, 400, code)
            self.exp(s, rid, "document.update", outcome="failure", reason=code,
                     target={"type": "document", "id": doc_id})
        else:
            self.judge(s, rid, r, b, "document.update", doc_id, 400)

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, j=PICK)
    def logout_mismatch(self, i: int, j: int) -> None:
        s = self.pick_open(i)
        others = [x.sid for x in self.sessions if x.sid != s.sid] or ["0" * 32]
        rid, r, b = self.call("POST", "/logout", token=s.token,
                              json_body={"session_id": others[j % len(others)]})
        self.want("logout of another session", r, b, 403, "session_mismatch")
        self.sec(rid, "auth.session_mismatch", outcome="denied", reason="logout_session_id",
                 user=s.user, role=s.role, session_id=s.sid)

    @precondition(lambda self: any(s.role == "admin" for s in self.open_sessions()))
    @rule(i=PICK, kind=st.sampled_from([None, "auth.login_failed", "access.denied",
                                        "auth.session_ended", "auth.session_mismatch",
                                        "admin.denied"]),
          limit=st.integers(1, 7))
    def security_listing(self, i: int, kind: str | None, limit: int) -> None:
        """Page through the security events: this run's so far, each once."""
        admins = [s for s in self.open_sessions() if s.role == "admin"]
        s = admins[i % len(admins)]
        seen: dict[str, dict[str, Any]] = {}
        for e in self.pages(s, "/audit/security-events", "events", "event_id",
                            limit=limit, since=self.t0, kind=kind):
            seen[e["event_id"]] = e
            if kind and e["action"] != kind:
                raise Failure(f"security listing of {kind} has {e}")
        got = sorted((e["request_id"], e["action"]) for e in seen.values()
                     if e.get("request_id") in self.rids)
        want = sorted((e.rid, e.action) for e in self.o.security
                      if kind is None or e.action == kind)
        if got != want:
            raise Failure(f"security listing {kind}: {got} != model {want}")
        ts = [(e["ts"]) for e in seen.values()]
        if ts != sorted(ts, reverse=True) and ts != sorted(ts):
            raise Failure("security listing out of order")

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, j=PICK, kind=st.integers(0, 7))
    def delete(self, i: int, j: int, kind: int) -> None:
        s = self.pick_open(i)
        doc_id = self.pick_doc(s, j, kind)
        d = self.docs.get(doc_id)
        rid, r, b = self.call("DELETE", f"/documents/{doc_id}", token=s.token)
        if self.judge(s, rid, r, b, "document.delete", doc_id, 204,
                      {"version": d.version} if d else None):
            del self.docs[doc_id]
            self.gone.append(doc_id)

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, j=PICK, kind=st.integers(0, 7), message=PAYLOAD)
    def chat(self, i: int, j: int, kind: int, message: str) -> None:
        s = self.pick_open(i)
        doc_id = self.pick_doc(s, j, kind)
        rid, r, b = self.call("POST", f"/documents/{doc_id}/chat", token=s.token,
                              json_body={"message": message})
        if not message.strip() and self.visible(s, doc_id) == "own":
            # An empty message is bad input, on a document the caller may see.
            self.want("empty chat", r, b, 400, "invalid_request")
            self.exp(s, rid, "ai.interaction", outcome="failure", reason="invalid_request",
                     target={"type": "document", "id": doc_id})
            return
        self.judge(s, rid, r, b, "ai.interaction", doc_id, 200, {
            "prompt": {"sha256": hashlib.sha256(message.encode()).hexdigest(),
                       "length": len(message)}})

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK)
    def list_docs(self, i: int) -> None:
        s = self.pick_open(i)
        rid, r, b = self.call("GET", "/documents", token=s.token)
        self.want("list", r, b, 200)
        got = {d["id"]: (d["owner"], d["title"], d["version"]) for d in b["documents"]}
        want = {k: (d.owner, d.title, d.version) for k, d in self.docs.items()
                if d.owner == s.user or s.role == "admin"}
        if s.role != "admin" and any(v[0] != s.user for v in got.values()):
            raise Failure(f"{s.user}'s listing has others' documents: {got}")
        # Earlier runs left documents behind: only this run's are in the model.
        got = {k: v for k, v in got.items() if k in self.docs or k in self.gone}
        if got != want:
            raise Failure(f"{s.user}'s listing {got} != model {want}")
        self.exp(s, rid, "document.list", details={"count": len(b["documents"])})

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, n=st.integers(1, 4) | st.just(100), single=st.booleans(),
          big=st.booleans())
    def client_events(self, i: int, n: int, single: bool, big: bool) -> None:
        s = self.pick_open(i)
        pad = "x" * (4000 if big else 0)
        items = [{"action": f"client.step_{k}", "details": {"k": k, "pad": pad}}
                 for k in range(n)]
        body: Any = items[0] if single and n == 1 else items
        rid, r, b = self.call("POST", "/audit/events", token=s.token, json_body=body)
        self.want("client events", r, b, 202)
        if b != {"accepted": n}:
            raise Failure(f"events answered {b} for {n}")
        for it in items:
            self.exp(s, rid, it["action"], details=it["details"])

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, with_body=st.booleans())
    def logout(self, i: int, with_body: bool) -> None:
        s = self.pick_open(i)
        body: Any = {"session_id": s.sid} if with_body else ANY
        rid, r, b = self.call("POST", "/logout", token=s.token, json_body=body)
        self.want("logout", r, b, 200)
        self.exp(s, rid, "session.end", reason="logout")
        n = len(self.o.sessions[s.sid])
        if b != {"message": "Successfully logged out", "session_id": s.sid, "event_count": n}:
            raise Failure(f"logout answered {b}, want event_count {n}")
        self.o.ended[s.sid] = n
        s.open = False

    @precondition(lambda self: any(not s.open for s in self.sessions))
    @rule(i=PICK, what=st.sampled_from(["/me", "/documents", "/logout", "/audit/status"]))
    def use_ended(self, i: int, what: str) -> None:
        ended = [s for s in self.sessions if not s.open]
        s = ended[i % len(ended)]
        method = "POST" if what == "/logout" else "GET"
        rid, r, b = self.call(method, what, token=s.token)
        self.want("ended token", r, b, 401, "session_ended")
        self.sec(rid, "auth.session_ended", outcome="denied", reason="session_ended",
                 user=s.user, role=s.role, session_id=s.sid)

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, j=PICK, what=st.sampled_from(["/me", "/documents", "/audit/status"]))
    def mismatch(self, i: int, j: int, what: str) -> None:
        s = self.pick_open(i)
        others = [x.sid for x in self.sessions if x.sid != s.sid] or ["0" * 32]
        rid, r, b = self.call("GET", what, token=s.token,
                              headers={"X-Audit-Session-ID": others[j % len(others)]})
        self.want("mismatch", r, b, 403, "session_mismatch")
        self.sec(rid, "auth.session_mismatch", outcome="denied", reason="session_mismatch",
                 user=s.user, role=s.role, session_id=s.sid)

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK)
    def me(self, i: int) -> None:
        s = self.pick_open(i)
        _rid, r, b = self.call("GET", "/me", token=s.token,
                               headers={"X-Audit-Session-ID": s.sid})
        self.want("me", r, b, 200)
        if (b["user"], b["role"], b["session_id"]) != (s.user, s.role, s.sid):
            raise Failure(f"/me answered {b} for {s}")

    @precondition(lambda self: self.open_sessions())
    @rule(i=PICK, j=PICK, admin=st.booleans())
    def session_detail(self, i: int, j: int, admin: bool) -> None:
        """An admin (or, refused, a user) reads a session of this run."""
        ss = [x for x in self.open_sessions() if (x.role == "admin") == admin]
        if not ss:
            return
        s = ss[i % len(ss)]
        target = self.sessions[j % len(self.sessions)]
        path = f"/audit/sessions/{target.sid}"
        rid, r, b = self.call("GET", path, token=s.token)
        details = {"endpoint": path, "query": {}}
        if s.role != "admin":
            self.want("detail by a user", r, b, 403, "forbidden")
            self.exp(s, rid, "audit.query", outcome="denied", reason="not_admin",
                     details=details)
            self.sec(rid, "admin.denied", outcome="denied", reason="not_admin", user=s.user,
                     role=s.role, session_id=s.sid, details=details)
            return
        self.want("detail", r, b, 200)
        exps = self.o.sessions[target.sid]
        if [e["seq"] for e in b["events"]] != list(range(1, len(b["events"]) + 1)):
            raise Failure(f"detail seqs {[e['seq'] for e in b['events']]}")
        got = blocks([(e["request_id"], e["action"], e["outcome"]) for e in b["events"]], exps)
        want = blocks([(e.rid, e.action, e.outcome) for e in exps], exps)
        if got != want:
            how = "open" if target.open else "ended"
            raise Failure(f"detail of {target.user}'s {how} session: events {got}"
                          f" != model {want}")
        state_ok = ("open",) if target.open else ("pending", "stored")
        if b["event_count"] != len(exps) or b["state"] not in state_ok \
                or b["user"] != target.user or b["session_id"] != target.sid \
                or (b["seal_reason"] is None) != target.open:
            raise Failure(f"detail summary {({k: v for k, v in b.items() if k != 'events'})}"
                          f" for {target}, {len(exps)} events")
        self.exp(s, rid, "audit.query", details=details)

    @precondition(lambda self: any(s.role == "admin" for s in self.open_sessions()))
    @rule(i=PICK, state=st.sampled_from([None, "open", "pending", "stored"]),
          limit=st.integers(1, 5), user=st.sampled_from([None, *sorted(USERS)]))
    def session_listing(self, i: int, state: str | None, limit: int, user: str | None) -> None:
        """Page through the listing: our sessions appear once each, with their
        user, a state that fits and the event count so far."""
        admins = [s for s in self.open_sessions() if s.role == "admin"]
        s = admins[i % len(admins)]
        seen: dict[str, dict[str, Any]] = {}
        for x in self.pages(s, "/audit/sessions", "sessions", "session_id",
                            limit=limit, since=self.t0, state=state, user=user):
            seen[x["session_id"]] = x
            if (state and x["state"] != state) or (user and x["user"] != user):
                raise Failure(f"listing state={state} user={user} gave {x}")
            # The count so far (this page's own audit.query not yet in it).
            exps = self.o.sessions.get(x["session_id"])
            if exps is not None and x["event_count"] != len(exps):
                raise Failure(f"listing has {x}, {len(exps)} events")
        times = [x["session_start_time"] for x in seen.values()]
        for sess in self.sessions:
            x = seen.get(sess.sid)
            fits = (state is None or (state == "open") == sess.open) and \
                (user is None or user == sess.user)
            if not fits:
                if x is not None:
                    raise Failure(f"listing {state} {user} has {x} for {sess}")
                continue
            if x is None:
                if state is None or state == "open":
                    raise Failure(f"listing {state} {user} misses {sess}")
                continue  # pending or stored: which one depends on the flusher
            if x["user"] != sess.user:
                raise Failure(f"listing has {x} for {sess}")
        if times != sorted(times, reverse=True):
            raise Failure("listing not newest first")

    @precondition(lambda self: any(s.role == "admin" for s in self.open_sessions()))
    @rule(i=PICK, j=PICK, n=st.integers(2, 5))
    def race_update(self, i: int, j: int, n: int) -> None:
        """n updates of one document at once, all with its current version:
        one succeeds, the others get 409; in the trail in any order."""
        s = self.pick_open(i)
        ids = sorted(d for d in self.docs if self.visible(s, d) == "own")
        if not ids:
            return
        doc_id = ids[j % len(ids)]
        d = self.docs[doc_id]
        cur = d.version

        def one(k: int) -> tuple[str, requests.Response, Any]:
            with requests.Session() as http:
                return self.call("PUT", f"/documents/{doc_id}", token=s.token,
                                 json_body={"title": f"race {k}", "version": cur}, http=http)

        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one, range(n)))
        wins = [(rid, b) for rid, r, b in results if r.status_code == 200]
        if len(wins) != 1 or any(r.status_code not in (200, 409) for _, r, _ in results):
            raise Failure(f"race of {n} updates at version {cur}:"
                          f" {[r.status_code for _, r, _ in results]}")
        self.group += 1
        g = 1000000 * self.run + self.group
        tgt = {"type": "document", "id": doc_id}
        for rid, r, _b in results:
            if r.status_code == 200:
                self.exp(s, rid, "document.update", target=tgt, group=g,
                         details={"version": cur + 1, "fields": ["title"]})
            else:
                self.exp(s, rid, "document.update", outcome="failure",
                         reason="version_conflict", target=tgt, group=g)
        d.version += 1
        d.title = wins[0][1]["title"]
        self.check_doc(doc_id, wins[0][1])

    @precondition(lambda self: len(self.open_sessions()) >= 1 and self.docs)
    @rule(i=PICK, j=PICK, k=PICK, chat=st.booleans())
    def race_delete(self, i: int, j: int, k: int, chat: bool) -> None:
        """One session deletes a document while another (or the same) updates
        or chats about it: the delete wins or loses the race, and what each
        was told agrees with the other's record (the version deleted)."""
        ss = self.open_sessions()
        deleter = ss[i % len(ss)]
        ids = sorted(d for d in self.docs if self.visible(deleter, d) == "own")
        if not ids:
            return
        doc_id = ids[j % len(ids)]
        d = self.docs[doc_id]
        others = [x for x in ss if self.visible(x, doc_id) == "own"]
        other = others[k % len(others)]
        cur = d.version
        tgt = {"type": "document", "id": doc_id}

        def one(what: str) -> tuple[str, requests.Response, Any]:
            with requests.Session() as http:
                if what == "delete":
                    return self.call("DELETE", f"/documents/{doc_id}", token=deleter.token,
                                     http=http)
                if chat:
                    return self.call("POST", f"/documents/{doc_id}/chat", token=other.token,
                                     json_body={"message": "where is the cat?"}, http=http)
                return self.call("PUT", f"/documents/{doc_id}", token=other.token,
                                 json_body={"content": "raced"}, http=http)

        with ThreadPoolExecutor(2) as pool:
            (drid, dr, db), (orid, orr, ob) = pool.map(one, ["delete", "other"])
        self.want("raced delete", dr, db, 204)
        action = "ai.interaction" if chat else "document.update"
        self.group += 1
        g = 1000000 * self.run + self.group if deleter is other else 0
        if orr.status_code == 404:
            self.want(f"raced {action}", orr, ob, 404, "not_found")
            self.exp(other, orid, action, outcome="failure", reason="not_found", target=tgt,
                     group=g)
            deleted = cur
        else:
            self.want(f"raced {action}", orr, ob, 200)
            self.exp(other, orid, action, target=tgt, group=g,
                     details=None if chat else {"version": cur + 1, "fields": ["content"]})
            deleted = cur if chat else cur + 1
        self.exp(deleter, drid, "document.delete", target=tgt, group=g,
                 details={"version": deleted})
        del self.docs[doc_id]
        self.gone.append(doc_id)

    @precondition(lambda self: self.w.restarts)
    @rule(kill=st.booleans())
    def restart(self, kill: bool) -> None:
        """The server stops (SIGTERM, or SIGKILL) and starts again: open
        sessions stay open, ended ones ended, documents and the trail as they were."""
        live = self.w.live
        if kill:
            asyncio.run(live.kill())
        else:
            rc = asyncio.run(live.stop())
            if rc != 0:
                raise Failure(f"the server exited with {rc} on SIGTERM")
        asyncio.run(live.start())
        self.w.http.close()
        self.w.http = requests.Session()

    # -- the end -----------------------------------------------------------

    def teardown(self) -> None:
        try:
            self.finish()
        finally:
            self.done = True

    def finish(self) -> None:
        if self.w.failed_run == self.run:
            return  # a rule failed: the model is not to be trusted
        for s in self.open_sessions():
            self._logout(s)
        if not self.o.sessions and not self.o.security:
            return
        parts, security = self.sink_when_complete()
        if self.w.strict_drain:
            drain(self.w)
            parts, security = read_sink(str(self.w.live.data_dir / "audit.db"))
        parts = {k: v for k, v in parts.items() if k in self.o.sessions}
        security = [e for e in security if e.get("request_id") in self.rids]
        compare(self.o, parts, security)
        if self.o.findings:
            raise Failure("audit trail:\n" + "\n".join(self.o.findings[:20]))
        for sid in self.o.sessions:
            for a, b in itertools.pairwise(sorted(parts[sid], key=lambda p: p["part"])):
                if b["first_seq"] != a["last_seq"] + 1:
                    raise Failure(f"session {sid}: parts do not follow in seq")

    def sink_when_complete(self, timeout: float = 60.0
                           ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
        """The sink's parts of our sessions and our security events, once it
        holds every session's final part and as many security events as expected."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                parts, security = read_sink(str(self.w.live.data_dir / "audit.db"))
            except sqlite3.Error:  # not made yet
                parts, security = {}, []
            parts = {k: v for k, v in parts.items() if k in self.o.sessions}
            security = [e for e in security if e.get("request_id") in self.rids]
            if all(any(p["final"] for p in parts.get(sid, ())) for sid in self.o.sessions) \
                    and len(security) >= len(self.o.security):
                return parts, security
            if time.monotonic() > deadline:
                return parts, security  # compare() says what is missing
            time.sleep(0.05)

    def _logout(self, s: Sess) -> None:
        rid, r, b = self.call("POST", "/logout", token=s.token)
        self.want("final logout", r, b, 200)
        self.exp(s, rid, "session.end", reason="logout")
        n = len(self.o.sessions[s.sid])
        if b.get("event_count") != n:
            raise Failure(f"final logout answered {b}, want event_count {n}")
        self.o.ended[s.sid] = n
        s.open = False


def verify(world: World) -> None:
    r = asyncio.run(world.live.cli("verify"))
    if r.returncode != 0:
        raise Failure(f"verify failed: {r.stdout[-3000:]} {r.stderr[-3000:]}")


def server_errors(world: World) -> list[str]:
    out = []
    for line in world.live.log_tail(10**8).splitlines():
        if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line:
            out.append(line)
    return out


if __name__ == "__main__":
    import argparse
    import tempfile

    from hypothesis import HealthCheck, settings

    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--part-max-events", type=int, default=0)
    ap.add_argument("--keep-stored", type=int, default=0)
    ap.add_argument("--restarts", action="store_true")
    ap.add_argument("--audit", action="append", default=[], metavar="KEY=NUMBER",
                    help="another [audit] setting, e.g. checkpoint_seconds=1")
    args = ap.parse_args()
    audit = dict(SETTINGS["audit"])
    for kv in args.audit:
        k, _, v = kv.partition("=")
        audit[k] = float(v) if "." in v else int(v)
    if args.part_max_events:
        audit["part_max_events"] = args.part_max_events
    if args.keep_stored:
        audit["keep_stored_seconds"] = args.keep_stored
    start_world(Path(tempfile.mkdtemp(prefix="stateful-")), {"audit": audit})
    assert WORLD is not None
    WORLD.restarts = args.restarts
    WORLD.verbose = True
    try:
        ApiMachine.TestCase.settings = settings(
            max_examples=args.examples, stateful_step_count=args.steps, deadline=None,
            suppress_health_check=list(HealthCheck), database=None)
        import unittest
        result = unittest.TextTestRunner(verbosity=2).run(
            unittest.defaultTestLoader.loadTestsFromTestCase(ApiMachine.TestCase))
        verify(WORLD)
        errs = server_errors(WORLD)
        print(f"runs {WORLD.runs} requests {WORLD.requests} server errors {len(errs)}")
        for k, v in sorted(WORLD.answers.items()):
            print(f"  {k[0]:6} {k[1]:32} {k[2]} {v}")
        for e in errs[:10]:
            print(e[:1000])
        sys.exit(0 if result.wasSuccessful() and not errs else 1)
    finally:
        stop_world()

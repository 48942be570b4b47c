"""Simulated users for the crash storm, and the oracle of what must be stored.

Every request carries its own ``X-Request-ID``. For every answered request
the user notes the audit events the answer promises (2xx: the success events;
a 404 on a logged-in request: the failure event; a 401 for a bad token: the
security event). A request that fails with a connection error (the server was
killed under it) is *uncertain*: its event may or may not exist, but at most
once. :class:`Oracle` then checks what the sink holds against these notes.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from audit.verify import check_session

# A request that may have been cut by a crash.
UNCERTAIN = object()


@dataclass
class Expect:
    """An event that must be stored exactly once."""

    request_id: str
    action: str
    user: str
    session_id: str | None
    outcome: str = "success"
    target_id: str | None = None
    security: bool = False


@dataclass
class SessionNote:
    session_id: str
    user: str
    ended: bool = False


@dataclass
class Oracle:
    expected: list[Expect] = field(default_factory=list)
    uncertain: set[str] = field(default_factory=set)
    sessions: dict[str, SessionNote] = field(default_factory=dict)
    unanswered_logins: int = 0
    unexpected: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    def expect(self, *items: Expect) -> None:
        self.expected.extend(items)

    def check(self, key: bytes, parts: list[dict[str, Any]],
              security: list[dict[str, Any]]) -> dict[str, int]:
        """Assert everything; returns counts for the report."""
        problems: list[str] = []
        by_session: dict[str, list[dict[str, Any]]] = {}
        for p in parts:
            by_session.setdefault(p["session_id"], []).append(p)
        ids = Counter(p["_id"] for p in parts)
        problems += [f"part {k} stored {n} times" for k, n in ids.items() if n > 1]
        events = [e for p in parts for e in p["events"]]
        all_events = events + security
        eids = Counter(e["event_id"] for e in all_events)
        problems += [f"event {k} stored {n} times" for k, n in eids.items() if n > 1]
        seqs = Counter((e["session_id"], e["seq"]) for e in events)
        problems += [f"seq {k} stored {n} times" for k, n in seqs.items() if n > 1]
        by_rid: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for e in all_events:
            if e.get("request_id"):
                by_rid.setdefault((e["request_id"], e["action"]), []).append(e)
        for k, found in by_rid.items():
            if len(found) > 1:
                problems.append(f"request {k} has {len(found)} events")
        for x in self.expected:
            found = by_rid.get((x.request_id, x.action), [])
            if len(found) != 1:
                problems.append(f"{x.action} of request {x.request_id} ({x.user}): "
                                f"{len(found)} stored")
                continue
            e = found[0]
            want = {"session_id": x.session_id, "outcome": x.outcome, "user": x.user}
            got = {"session_id": e["session_id"], "outcome": e["outcome"],
                   "user": e["actor"]["user"]}
            if x.target_id is not None:
                want["target"] = x.target_id
                got["target"] = (e.get("target") or {}).get("id")
            if want != got:
                problems.append(f"{x.action} of request {x.request_id}: {got} != {want}")
            if x.security != (e["seq"] is None):
                problems.append(f"{x.action} of request {x.request_id}: wrong stream")
        for sid, parts_of in by_session.items():
            for prob in check_session(key, sid, parts_of):
                problems.append(f"verify {sid}: {prob.kind}: {prob.detail}")
        for note in self.sessions.values():
            if not note.ended:
                continue
            got_parts = sorted(by_session.get(note.session_id, []), key=lambda p: p["part"])
            if [p["part"] for p in got_parts] != list(range(len(got_parts))) or not got_parts:
                problems.append(f"session {note.session_id}: parts "
                                f"{[p['part'] for p in got_parts]}")
                continue
            last = got_parts[-1]
            if not last["final"] or any(p["final"] for p in got_parts[:-1]):
                problems.append(f"session {note.session_id}: final part is not last")
            seq_list = [e["seq"] for p in got_parts for e in p["events"]]
            if seq_list != list(range(1, len(seq_list) + 1)):
                problems.append(f"session {note.session_id}: seq not 1..n")
            actions = [e["action"] for p in got_parts for e in p["events"]]
            if actions[:2] != ["session.start", "token.issue"] or actions[-1] != "session.end":
                problems.append(f"session {note.session_id}: starts/ends wrongly")
        assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])
        return {
            "parts": len(parts),
            "sessions": len(by_session),
            "events": len(events),
            "security_events": len(security),
            "expected": len(self.expected),
            "uncertain": len(self.uncertain),
            "multi_part_sessions": sum(1 for v in by_session.values() if len(v) > 1),
        }


class User:
    """One simulated user: log in, work on documents, chat, log out, in loops."""

    def __init__(self, name: str, password: str, base: str, http: aiohttp.ClientSession,
                 oracle: Oracle, wait_up: Callable[[], Awaitable[None]], seed: int,
                 think: float = 0.0) -> None:
        self.name = name
        self.think = think
        self.password = password
        self.base = base
        self.http = http
        self.oracle = oracle
        self.wait_up = wait_up
        self.rng = random.Random(seed)
        self.n = 0
        self.token: str | None = None
        self.sid: str | None = None
        self.docs: list[str] = []

    def _rid(self) -> str:
        self.n += 1
        return f"{self.name}-{self.n}"

    async def call(self, method: str, path: str, *, json: Any = None, token: str | None = None,
                   auth: bool = True) -> tuple[str, Any]:
        """(request id, (status, body)) or (request id, UNCERTAIN)."""
        rid = self._rid()
        headers = {"X-Request-ID": rid}
        tok = token if token is not None else self.token
        if auth and tok:
            headers["Authorization"] = f"Bearer {tok}"
        try:
            async with self.http.request(method, self.base + path, json=json,
                                         headers=headers) as r:
                body = await r.json() if r.status != 204 else None
                status = r.status
        except (aiohttp.ClientError, TimeoutError):
            self.oracle.uncertain.add(rid)
            await self.wait_up()
            return rid, UNCERTAIN
        self.oracle.statuses[status] += 1
        if status >= 500:
            self.oracle.unexpected.append(f"{method} {path} {rid}: {status} {body}")
        return rid, (status, body)

    def _unexpected(self, what: str, res: Any) -> None:
        self.oracle.unexpected.append(f"{self.name} {what}: {res}")

    def _ev(self, rid: str, action: str, **kw: Any) -> Expect:
        return Expect(rid, action, self.name, self.sid, **kw)

    async def login(self) -> None:
        while self.token is None:
            rid, res = await self.call("POST", "/token", auth=False,
                                       json={"username": self.name, "password": self.password})
            if res is UNCERTAIN:
                self.oracle.unanswered_logins += 1
                continue
            status, body = res
            if status != 200:
                self._unexpected("login", res)
                return
            self.token, self.sid = body["access_token"], body["session_id"]
            self.oracle.sessions[self.sid] = SessionNote(self.sid, self.name)
            self.oracle.expect(self._ev(rid, "session.start"), self._ev(rid, "token.issue"))

    async def logout(self) -> None:
        cut = False
        while self.token is not None:
            rid, res = await self.call("POST", "/logout")
            if res is UNCERTAIN:
                cut = True
                continue
            status, body = res
            if status == 200:
                self.oracle.expect(self._ev(rid, "session.end"))
            elif not (cut and status == 401 and body["error"]["code"] == "session_ended"):
                self._unexpected("logout", res)
            assert self.sid is not None
            self.oracle.sessions[self.sid].ended = True
            self.token = self.sid = None
            self.docs = []

    def _ok(self, res: Any, status: int, what: str) -> bool:
        if res is UNCERTAIN:
            return False
        if res[0] != status:
            self._unexpected(what, res)
            return False
        return True

    async def step(self) -> None:
        """One random action in the open session."""
        r = self.rng.random()
        if not self.docs or r < 0.15:
            title = f"{self.name} doc {self.n} \u2603"
            rid, res = await self.call("POST", "/documents", json={
                "title": title, "content": "The cat sat on the mat. Dogs bark at night. " * 5})
            if self._ok(res, 201, "create"):
                doc_id = res[1]["id"]
                self.docs.append(doc_id)
                self.oracle.expect(self._ev(rid, "document.create", target_id=doc_id))
            return
        doc = self.rng.choice(self.docs)
        if r < 0.40:
            rid, res = await self.call("GET", f"/documents/{doc}")
            if self._ok(res, 200, "access"):
                self.oracle.expect(self._ev(rid, "document.access", target_id=doc))
        elif r < 0.55:
            rid, res = await self.call("PUT", f"/documents/{doc}",
                                       json={"content": f"new text {self.n}. The cat naps."})
            if self._ok(res, 200, "update"):
                self.oracle.expect(self._ev(rid, "document.update", target_id=doc))
        elif r < 0.68:
            rid, res = await self.call("POST", f"/documents/{doc}/chat",
                                       json={"message": "where did the cat sit?"})
            if self._ok(res, 200, "chat"):
                self.oracle.expect(self._ev(rid, "ai.interaction", target_id=doc))
        elif r < 0.80:
            rid, res = await self.call("POST", "/audit/events", json=[
                {"action": "client.view", "target": {"type": "document", "id": doc}},
                {"action": "client.scroll", "details": {"y": self.n}}])
            if self._ok(res, 202, "client events"):
                self.oracle.expect(self._ev(rid, "client.view"), self._ev(rid, "client.scroll"))
        elif r < 0.86:
            rid, res = await self.call("GET", "/documents")
            if self._ok(res, 200, "list"):
                self.oracle.expect(self._ev(rid, "document.list"))
        elif r < 0.91:
            rid, res = await self.call("GET", "/documents/0000doesnotexist")
            if self._ok(res, 404, "missing"):
                self.oracle.expect(self._ev(rid, "document.access", outcome="failure",
                                            target_id="0000doesnotexist"))
        elif r < 0.95:
            rid, res = await self.call("GET", "/me", token="not-a-jwt")
            if self._ok(res, 401, "bad token"):
                self.oracle.expect(Expect(rid, "auth.invalid_token", None, None,
                                          outcome="denied", security=True))
        else:
            _, res = await self.call("GET", "/me")
            self._ok(res, 200, "me")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.login()
            if self.token is None:
                return
            for _ in range(self.rng.randint(3, 12)):
                if stop.is_set() or self.token is None:
                    break
                await self.step()
                if self.think:  # pacing a simulated user, not waiting for a condition
                    await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.think)
            await self.logout()

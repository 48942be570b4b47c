"""Fixtures and helpers for the API tests: the real app factory, real SQLite files.

Import the fixtures a test module needs (``from api_fixtures import api, make_api``);
pytest finds them as module attributes. Audit records are read from where they
are at the moment: the spool first, then the sink file (the flusher moves them
in that order, so reading in this order never misses one).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import re
import sqlite3
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from waiting import wait_for

import server
from audit.config import Config, parse_config
from audit.engine import AuditEngine
from handlers.auth import PREFIX
from handlers.keys import ACCOUNTS, ENGINE

# A password whose NFC and NFD forms differ, and its hash as made before
# passwords were normalised (tests of the normalisation and of renewing it).
NFC = unicodedata.normalize("NFC", "café-crème-brûlée")
NFD = unicodedata.normalize("NFD", NFC)


def legacy_hash(password: str) -> str:
    """A hash as made before passwords were normalised: of the text as given."""
    prehashed = base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest())
    return PREFIX + bcrypt.hashpw(prehashed, bcrypt.gensalt(4)).decode("ascii")


ADMIN_PASSWORD = "admin-password-for-tests"
USER_PASSWORD = "user-password-for-tests"
ERROR_KEYS = {"code", "message", "request_id"}
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
EVENT_KEYS = {
    "event_id", "session_id", "seq", "ts", "action", "outcome", "actor", "target",
    "source", "request_id", "details", "hash",
}


def api_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A Config in ``tmp_path`` with fast bcrypt and a fast flusher; sections override."""
    data: dict[str, Any] = {
        "server": {"data_dir": str(tmp_path / "data")},
        "auth": {"bcrypt_rounds": 4},
        # No fsync per commit: these tests are about the API, not power loss.
        "audit": {"synchronous": "normal"},
        "flush": {"max_writes_per_second": 1000.0, "burst": 1000},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, base_dir=str(tmp_path))


@dataclass
class Login:
    user: str
    token: str
    session_id: str
    body: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Api:
    """A test client on an app built by ``server.create_app`` plus audit readers."""

    def __init__(self, client: TestClient, config: Config) -> None:
        self.client = client
        self.config = config

    @property
    def app(self) -> web.Application:
        return self.client.server.app  # type: ignore[return-value]

    @property
    def engine(self) -> AuditEngine:
        return self.app[ENGINE]

    # -- users and sessions --------------------------------------------------

    async def add_user(self, name: str, role: str = "user",
                       password: str = USER_PASSWORD) -> None:
        await self.app[ACCOUNTS].create(name, password, role)

    async def login(self, name: str, password: str = USER_PASSWORD,
                    headers: dict[str, str] | None = None) -> Login:
        resp = await self.client.post("/token", json={"username": name, "password": password},
                                      headers=headers)
        body = await resp.json()
        assert resp.status == 200, body
        return Login(name, body["access_token"], body["session_id"], body)

    async def user(self, name: str, role: str = "user") -> Login:
        await self.add_user(name, role)
        return await self.login(name)

    async def admin(self) -> Login:
        return await self.login("admin", ADMIN_PASSWORD)

    async def create_doc(
        self, who: Login, title: str = "Doc",
        content: str = "The cat sat on the mat. Dogs bark loudly.",
    ) -> dict[str, Any]:
        resp = await self.client.post("/documents", json={"title": title, "content": content},
                                      headers=who.headers)
        body = await resp.json()
        assert resp.status == 201, body
        return body

    # -- audit records -------------------------------------------------------

    async def wait_parts_in_sink(self, session_id: str, at_least: int) -> None:
        """Wait until the sink holds ``at_least`` parts of ``session_id``."""

        async def there() -> bool:
            rows = self._sink("SELECT COUNT(*) FROM parts WHERE session_id = ?", (session_id,))
            return bool(rows) and rows[0][0] >= at_least

        await wait_for(there, message=f"{at_least} part(s) of {session_id} in the sink")

    def _sink(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        path = self.config.sqlite_sink_path
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # the sink has not made its tables yet
            return []
        finally:
            conn.close()

    async def events(self, session_id: str) -> list[dict[str, Any]]:
        """Every event of a session, wherever it is now, in ``seq`` order."""
        spooled = await self.engine.spool.read(lambda c: c.execute(
            "SELECT json FROM events WHERE session_id = ?", (session_id,)).fetchall())
        found = {e["seq"]: e for e in (json.loads(r[0]) for r in spooled)}
        for (doc,) in self._sink("SELECT doc FROM parts WHERE session_id = ?", (session_id,)):
            for e in json.loads(doc)["events"]:
                found.setdefault(e["seq"], e)
        return [found[k] for k in sorted(found)]

    async def actions(self, session_id: str) -> list[str]:
        return [e["action"] for e in await self.events(session_id)]

    async def security(self, action: str | None = None) -> list[dict[str, Any]]:
        """Security events (spool and sink), oldest first, optionally of one kind."""
        spooled = await self.engine.spool.read(lambda c: c.execute(
            "SELECT json FROM security_events ORDER BY id").fetchall())
        found = {e["event_id"]: e for e in (json.loads(r[0]) for r in spooled)}
        for (doc,) in self._sink("SELECT doc FROM security_events"):
            e = json.loads(doc)
            found.setdefault(e["event_id"], e)
        out = sorted(found.values(), key=lambda e: e["ts"])
        return [e for e in out if action is None or e["action"] == action]

    async def wait_security(self, action: str, count: int = 1) -> list[dict[str, Any]]:
        async def enough() -> list[dict[str, Any]] | None:
            found = await self.security(action)
            return found if len(found) >= count else None

        result: list[dict[str, Any]] = await wait_for(enough, message=f"{count} x {action}")
        return result

    def documents_in_db(self) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.config.spool_path}?mode=ro", uri=True)
        try:
            return conn.execute(
                "SELECT id, title, content, owner, version FROM documents ORDER BY id"
            ).fetchall()
        finally:
            conn.close()


MakeApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MakeApi]:
    """``await make_api(audit={...}, setup=fn)``: a client on ``server.create_app``.

    ``setup(app)`` may add routes before the app starts. Each call gets its own
    data directory. ``flush_at_close=False``: for a test that leaves work its
    sink will not take (rate limited for minutes, a closed port): the app is
    closed at the end without the shutdown's flush window, 2 s of waiting
    for nothing (nothing is sent or checked after the test's body).
    """
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, ADMIN_PASSWORD)
    monkeypatch.delenv(server.JWT_SECRET_ENV, raising=False)
    monkeypatch.delenv(server.AUDIT_KEY_ENV, raising=False)
    counter = [0]
    unflushed: list[TestClient] = []

    async def make(setup: Callable[[web.Application], None] | None = None, *,
                   flush_at_close: bool = True, **sections: dict[str, Any]) -> Api:
        counter[0] += 1
        config = api_config(tmp_path / f"app{counter[0]}", **sections)
        app = server.create_app(config)
        if setup is not None:
            setup(app)
        client = await aiohttp_client(app)
        if not flush_at_close:
            unflushed.append(client)
        return Api(client, config)

    yield make
    # Before aiohttp_client's own teardown (closing twice is nothing).
    monkeypatch.setattr(server, "SHUTDOWN_FLUSH_SECONDS", 0.0)
    for client in unflushed:
        await client.close()


@pytest.fixture
async def api(make_api: MakeApi) -> Api:
    return await make_api()


def assert_error(status: int, body: Any, headers: Any, expected_status: int,
                 code: str) -> None:
    """API.md's error format, with no stack traces or paths in it."""
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message.strip(), body  # human text, always
    assert body["error"]["request_id"] == headers["X-Request-ID"]
    assert_clean(json.dumps(body))


def full_ttl_or_what_is_left(expires_in: int, exp: int, ttl: int, sent: float,
                             answered: float) -> bool:
    """Whether a login's ``expires_in`` is what the server should have said
    at some moment of the request (``sent`` .. ``answered``): the whole
    ``ttl`` if the login took under a second, else the whole seconds left
    to ``exp`` then (handlers/auth.py: less only after a slow start)."""
    return min(ttl, math.ceil(exp - answered)) <= expires_in <= min(ttl, math.ceil(exp - sent))


def assert_clean(text: str) -> None:
    """No traceback, source path, SQL or exception class names in a client-visible text."""
    for bad in ("Traceback", ".py", "/work", "/tmp", "File \"", "sqlite", "SELECT ",
                "INSERT ", "Error:", "Exception"):
        assert bad not in text, f"{bad!r} leaked in {text[:500]}"


async def expect_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    body = await resp.json()
    assert_error(resp.status, body, resp.headers, status, code)
    assert resp.content_type == "application/json"
    return body


async def logged_out_while_held(
    api: Api, monkeypatch: pytest.MonkeyPatch, target: Any, name: str, path: str,
    who: Login, action: str,
) -> None:
    """``GET path`` with the coroutine method ``target.name`` held once it has
    returned, ``who`` logged out meanwhile: the request must get 401
    session_ended, recorded, and no ``action`` event in the session."""
    reached, go = asyncio.Event(), asyncio.Event()
    real = getattr(target, name)

    async def held(*args: Any, **kwargs: Any) -> Any:
        result = await real(*args, **kwargs)
        reached.set()
        await go.wait()
        return result

    monkeypatch.setattr(target, name, held)
    pending = asyncio.ensure_future(api.client.get(path, headers=who.headers))
    await asyncio.wait_for(reached.wait(), 10)
    assert (await api.client.post("/logout", headers=who.headers)).status == 200
    go.set()
    await expect_error(await pending, 401, "session_ended")
    assert action not in await api.actions(who.session_id)
    (ev,) = await api.wait_security("auth.session_ended")
    assert ev["details"]["reason"] == "session_ended_during_action"


async def session_with_checkpoints_in_sink(make_api: MakeApi) -> tuple[Api, Login, Login]:
    """An open session of 11 events cut into 3-event checkpoint parts, at least
    three of them already in the sink (and gone from the spool)."""
    api = await make_api(audit={"part_max_events": 3, "keep_stored_seconds": 0})
    admin = await api.admin()
    alice = await api.user("alice")
    for i in range(8):
        r = await api.client.post("/audit/events", json={"action": f"client.n{i}"},
                                  headers=alice.headers)
        assert r.status == 202

    await api.wait_parts_in_sink(alice.session_id, 3)
    return api, admin, alice


def plant_part(config: Config, kind: str, part: dict[str, Any], doc: str | None = None) -> None:
    """Put ``part`` into the ``kind`` sink's files as another writer would:
    a row of audit.db (its document ``doc`` if given, else the part's JSON)
    or a line of a jsonl day file."""
    if kind == "sqlite":
        with closing(sqlite3.connect(config.sqlite_sink_path)) as db, db:
            db.execute("INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (f"{part['session_id']}:0", part["session_id"], 0, "alice",
                        part["session_start_time"], 1, part["hash"],
                        json.dumps(part) if doc is None else doc))
    else:
        with (config.jsonl_dir / "audit-2026-11-26.jsonl").open("a") as f:
            f.write(json.dumps({**part, "type": "session_part"}) + "\n")


@contextlib.asynccontextmanager
async def served_app(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[web.Application, web.AppRunner, int]]:
    """The real app on loopback under aiohttp's own runner and shutdown path,
    as ``serve`` runs it (handlers not cancelled when their client goes),
    with a short wait for requests in flight (serve's is 10 s): the app, its
    runner and its port."""
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, ADMIN_PASSWORD)
    app = server.create_app(config)
    runner = web.AppRunner(app, shutdown_timeout=0.3)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield app, runner, runner.addresses[0][1]
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()

"""Bad input against the real app (``create_app`` through ``aiohttp_client``).

Every endpoint gets malformed JSON, wrong types, huge bodies, deep nesting,
odd unicode (NUL, lone surrogates, right-to-left marks, emoji), path tricks in
ids, broken and forged tokens and spoofed session headers. Each answer must be
an API-format error (never a 500, never a stack trace), and every attempt of a
logged-in caller on an audited action must leave its event, found by the
request's ``X-Request-ID``.

The last test is the login storm: 1,000 failed logins in parallel against a
live server subprocess (bcrypt at 10 rounds) while logged-in users keep
calling ``GET /me``; it asserts only correctness (every ``/me`` 200, every
failed login 401 or 429) and prints the ``/me`` latency figures, which are
written down in bench/README.md ("Login storm").
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import bson
import jwt
import pytest
from live_server import JWT_SECRET, Live
from waiting import wait_for

import server
from audit.config import parse_config
from handlers.keys import ACCOUNTS, ENGINE

PASSWORD = "bad-input-password"
ADMIN_PASSWORD = "bad-input-admin"


class Api:
    def __init__(self, client: Any, config: Any) -> None:
        self.client = client
        self.config = config
        self.app = client.server.app
        self.n = 0

    def rid(self) -> str:
        self.n += 1
        return f"bad-{self.n}"

    async def login(self, user: str, password: str = PASSWORD) -> dict[str, Any]:
        r = await self.client.post("/token", json={"username": user, "password": password})
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        body["headers"] = {"Authorization": f"Bearer {body['access_token']}"}
        return body

    async def send(self, method: str, path: str, *, token: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None, data: Any = None,
                   json_body: Any = None) -> tuple[str, int, dict[str, Any] | None]:
        """(request id, status, JSON body) — the body checked for the API format."""
        rid = self.rid()
        h = {"X-Request-ID": rid, **(token["headers"] if token else {}), **(headers or {})}
        kwargs: dict[str, Any] = {"headers": h}
        if data is not None:
            kwargs["data"] = data
        if json_body is not None:
            kwargs["json"] = json_body
        r = await self.client.request(method, path, **kwargs)
        text = await r.text()
        assert r.status != 500 and r.status < 600, f"{method} {path}: {r.status} {text[:300]}"
        assert r.headers.get("X-Request-ID") == rid, (method, path, dict(r.headers))
        body = None
        if r.status == 204:
            assert text == ""
        else:
            assert r.content_type == "application/json", (method, path, r.status, text[:200])
            body = json.loads(text)
        if r.status >= 400:
            assert isinstance(body, dict) and set(body) == {"error"}, body
            err = body["error"]
            assert set(err) == {"code", "message", "request_id"}, err
            assert err["request_id"] == rid and err["code"].islower(), err
            for leak in ("Traceback", "sqlite", "File \"", "/work/", "SELECT "):
                assert leak not in text, text
        return rid, r.status, body

    async def events(self, rid: str) -> list[dict[str, Any]]:
        """Every stored event (session or security, spool or sink) of a request."""
        return [e for e in await self.all_events() if e.get("request_id") == rid]

    async def assert_storable_in_mongodb(self) -> None:
        """Every event recorded so far can be written by the MongoDB sink:
        PyMongo's BSON encoder takes it (a NUL in a key, an integer past 64
        bits would make the sink refuse the event's whole part)."""
        events = await self.all_events()
        assert events
        for e in events:
            bson.encode(e)

    async def all_events(self) -> list[dict[str, Any]]:
        engine = self.app[ENGINE]

        def read(c: sqlite3.Connection) -> list[str]:
            rows = c.execute("SELECT json FROM events").fetchall()
            rows += c.execute("SELECT json FROM security_events").fetchall()
            return [r[0] for r in rows]

        texts = await engine.spool.read(read)
        sink = self.config.sqlite_sink_path
        if sink.exists():
            conn = sqlite3.connect(sink)
            try:
                for (doc,) in conn.execute("SELECT doc FROM parts"):
                    texts += [json.dumps(e) for e in json.loads(doc)["events"]]
                texts += [r[0] for r in conn.execute("SELECT doc FROM security_events")]
            finally:
                conn.close()
        found = [json.loads(t) for t in texts]
        return list({e["event_id"]: e for e in found}.values())

    async def recorded(self, rid: str, action: str, *, outcome: str | None = None,
                       session_id: str | None = None) -> dict[str, Any]:
        evs = [e for e in await self.events(rid) if e["action"] == action]
        assert len(evs) == 1, (rid, action, await self.events(rid))
        e = evs[0]
        if outcome is not None:
            assert e["outcome"] == outcome, e
        if session_id is not None:
            assert e["session_id"] == session_id, e
        return e


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    monkeypatch.setenv("SESSION_AUDIT_ADMIN_PASSWORD", ADMIN_PASSWORD)
    monkeypatch.setenv("SESSION_AUDIT_JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv("SESSION_AUDIT_AUDIT_KEY", "audit-key-bad-input-0123456789abcdef")
    config = parse_config({
        "server": {"data_dir": str(tmp_path / "data")},
        "auth": {"bcrypt_rounds": 4},
        "flush": {"max_writes_per_second": 1000.0, "burst": 100},
    }, base_dir=str(tmp_path))
    app = server.create_app(config)
    client = await aiohttp_client(app)
    for name in ("alice", "bob"):
        await app[ACCOUNTS].create(name, PASSWORD, "user")
    yield Api(client, config)


async def _doc(api: Api, who: dict[str, Any]) -> str:
    _, status, body = await api.send("POST", "/documents", token=who,
                                     json_body={"title": "t", "content": "The cat sat."})
    assert status == 201 and body is not None
    doc_id: str = body["id"]
    return doc_id


def _object_or_nothing(raw: bytes) -> bool:
    try:
        value = json.loads(raw) if raw.strip() else None
    except ValueError:
        return False
    return value is None or isinstance(value, dict)


DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJ = b'{"title": "t", "content": "c", "x": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001

BAD_BODIES: list[tuple[str, bytes]] = [
    ("truncated", b'{"title": "t"'),
    ("empty", b""),
    ("whitespace", b"  \n "),
    ("not utf-8", b'{"title": "\xff\xfe"}'),
    ("latin-1", "{\"title\": \"caf\u00e9\", \"content\": \"x\"}".encode("latin-1")),
    ("utf-16", '{"title": "t", "content": "c"}'.encode("utf-16")),
    ("null", b"null"),
    ("array", b"[]"),
    ("number", b"42"),
    ("string", b'"hello"'),
    ("bool", b"true"),
    ("NaN", b'{"title": NaN, "content": "c"}'),
    ("Infinity", b'{"title": "t", "content": "c", "version": Infinity}'),
    ("huge float", b'{"title": "t", "content": "c", "version": 1e400}'),
    ("huge int", b'{"title": "t", "content": "c", "version": ' + b"9" * 5000 + b"}"),
    ("wrong types", b'{"title": 5, "content": ["x"], "version": "1"}'),
    ("bool version", b'{"version": true}'),
    ("unknown field", b'{"title": "t", "content": "c", "owner": "bob", "id": "x"}'),
    ("nested title", b'{"title": {"$gt": ""}, "content": "c"}'),
    ("deep arrays", DEEP),
    ("deep objects", DEEP_OBJ),
    ("lone surrogate", b'{"title": "\\ud800", "content": "x", "message": "\\udfff"}'),
    ("surrogate key", b'{"\\ud800": 1}'),
    # What MongoDB's BSON cannot hold would make a whole session part undeliverable.
    ("NUL in a key", b'{"title": "t", "content": "c", "details": {"a\\u0000b": 1}}'),
    ("int over 64 bits", b'{"title": "t", "content": "c", "version": 9223372036854775808}'),
    ("int under 64 bits", b'{"action": "client.x", "details": {"n": -9223372036854775809}}'),
    ("version as a huge float", b'{"version": 1e300}'),
    ("duplicate keys", b'{"title": "a", "title": 5, "content": "c"}'),
    ("control chars", b'{"title": "a\x01b", "content": "c"}'),
    ("trailing garbage", b'{"title": "t", "content": "c"} xyz'),
    ("BOM", b'\xef\xbb\xbf{"title": "t", "content": "c"}'),
    ("empty title", b'{"title": "  ", "content": "c", "message": ""}'),
    ("long title", json.dumps({"title": "x" * 201, "content": "c"}).encode()),
]

JSON_ENDPOINTS = [
    ("POST", "/documents", "document.create"),
    ("PUT", "/documents/{doc}", "document.update"),
    ("POST", "/documents/{doc}/chat", "ai.interaction"),
    ("POST", "/audit/events", "client.rejected"),
    ("POST", "/logout", "session.end"),
    ("POST", "/token", None),
]


@pytest.mark.parametrize(("method", "path", "action"), JSON_ENDPOINTS)
async def test_malformed_bodies_on_every_json_endpoint(
    api: Api, method: str, path: str, action: str | None
) -> None:
    alice = await api.login("alice")
    doc = await _doc(api, alice)
    url = path.format(doc=doc)
    for name, raw in BAD_BODIES:
        rid, status, body = await api.send(
            method, url, token=alice, data=raw,
            headers={"Content-Type": "application/json"})
        assert body is not None
        if status < 300:  # logout takes no body, null, or any object without session_id
            assert path == "/logout" and _object_or_nothing(raw), (name, status, body)
            alice = await api.login("alice")
            continue
        assert status in (400, 413), (name, status, body)
        assert body["error"]["code"] in ("invalid_json", "invalid_request", "too_large"), \
            (name, body)
        if action is not None:  # the failed attempt of a logged-in caller is recorded
            e = await api.recorded(rid, action, outcome="failure",
                                   session_id=alice["session_id"])
            assert e["details"]["reason"] == body["error"]["code"], (name, e)
    # The session and the document are unharmed.
    _, status, got = await api.send("GET", f"/documents/{doc}", token=alice)
    assert status == 200 and got is not None and got["version"] == 1


async def test_huge_bodies_are_413_and_recorded(api: Api) -> None:
    alice = await api.login("alice")
    doc = await _doc(api, alice)
    big = b'{"title": "t", "content": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    for method, path, action in JSON_ENDPOINTS[:4]:
        rid, status, body = await api.send(method, path.format(doc=doc), token=alice,
                                           data=io.BytesIO(big))
        assert status == 413 and body is not None, (path, status, body)
        assert body["error"]["code"] == "too_large"
        if action is not None:
            await api.recorded(rid, action, outcome="failure")
    # Just over the content limit (1 MiB) but under the body limit.
    over = {"title": "t", "content": "\u00e9" * (512 * 1024 + 1)}
    rid, status, body = await api.send("POST", "/documents", token=alice,
                                       data=io.BytesIO(json.dumps(over).encode()))
    assert status == 413, body
    await api.recorded(rid, "document.create", outcome="failure")
    rid, status, body = await api.send("POST", f"/documents/{doc}/chat", token=alice,
                                       json_body={"message": "m" * (16 * 1024 + 1)})
    assert status == 413, body
    await api.recorded(rid, "ai.interaction", outcome="failure")
    # A compressed body is limited by its decompressed size (a gzip bomb).
    bomb = gzip.compress(b'{"title": "t", "content": "' + b"0" * (64 * 1024 * 1024) + b'"}')
    rid, status, body = await api.send("POST", "/documents", token=alice, data=io.BytesIO(bomb),
                                       headers={"Content-Encoding": "gzip",
                                                "Content-Type": "application/json"})
    assert status in (400, 413), (status, body)
    # Client events: too many, too big.
    many = [{"action": "client.x"}] * 101
    _, status, _ = await api.send("POST", "/audit/events", token=alice, json_body=many)
    assert status == 400
    _, status, _ = await api.send("POST", "/audit/events", token=alice,
                                  json_body={"action": "client.x", "details": {"p": "x" * 5000}})
    assert status == 400



@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_is_400_and_recorded(
        api: Api, encoding: str, caplog: pytest.LogCaptureFixture) -> None:
    alice = await api.login("alice")
    doc = await _doc(api, alice)
    for method, path, action in JSON_ENDPOINTS:
        if path == "/token":
            continue  # below: the caller is nobody
        rid, status, body = await api.send(
            method, path.format(doc=doc), token=alice, data=b"\x1f\x8b not what it says",
            headers={"Content-Encoding": encoding, "Content-Type": "application/json"})
        assert status == 400 and body is not None, (path, status, body)
        assert body["error"]["code"] == "invalid_request"
        await api.recorded(rid, action, outcome="failure", session_id=alice["session_id"])
    _, status, body = await api.send("POST", "/token", data=b"\x1f\x8b garbage", headers={
        "Content-Encoding": encoding, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and body is not None and body["error"]["code"] == "invalid_request"
    _, status, got = await api.send("GET", f"/documents/{doc}", token=alice)
    assert status == 200 and got is not None and got["version"] == 1
    # Answered, and the connection closed: no traceback in the log.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_body_the_client_cuts_short_is_recorded(live: Live) -> None:
    """Found by a review: a client closing its connection half way through
    the body it announced got a 500, an ERROR with a traceback in the log,
    and no record of its attempt. A real server process: the in-process test
    server cancels a handler whose client went away, ``serve`` does not."""
    await live.start()
    await live.adduser("alice", PASSWORD)
    async with aiohttp.ClientSession() as http:
        async def token(user: str, password: str) -> dict[str, Any]:
            async with http.post(live.base + "/token",
                                 json={"username": user, "password": password}) as r:
                assert r.status == 200
                body: dict[str, Any] = await r.json()
                return body

        alice = await token("alice", PASSWORD)
        auth = {"Authorization": f"Bearer {alice['access_token']}"}
        async with http.post(live.base + "/documents", headers=auth,
                             json={"title": "t", "content": "c"}) as r:
            doc = (await r.json())["id"]
        sent: list[tuple[str, str]] = []
        for n, (method, path, action) in enumerate(JSON_ENDPOINTS):
            if path == "/token":
                continue
            for framing in ("Content-Length: 1000\r\n\r\n{\"title\": \"par",
                            "Transfer-Encoding: chunked\r\n\r\n3e8\r\n{\"title\": \"par"):
                rid = f"cut-{n}-{len(sent)}"
                # Expect: 100-continue: once the server says go on, the request
                # is in the app's hands (a connection lost before never reaches it).
                head = (f"{method} {path.format(doc=doc)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        f"Authorization: Bearer {alice['access_token']}\r\n"
                        f"X-Request-ID: {rid}\r\nContent-Type: application/json\r\n"
                        f"Expect: 100-continue\r\n{framing}")
                reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
                writer.write(head.encode())
                await writer.drain()
                assert (await reader.readline()).startswith(b"HTTP/1.1 100"), (method, path)
                writer.close()
                await writer.wait_closed()
                sent.append((rid, action))
        admin = await token("admin", "admin-password-for-tests")
        admin_auth = {"Authorization": f"Bearer {admin['access_token']}"}
        got: dict[str, dict[str, Any]] = {}

        async def all_recorded() -> bool:
            async with http.get(f"{live.base}/audit/sessions/{alice['session_id']}",
                                headers=admin_auth) as r:
                got.update((e["request_id"], e) for e in (await r.json())["events"])
            return all(rid in got for rid, _ in sent)

        await wait_for(all_recorded, timeout=60, message=f"records of {sent}", interval=0.05)
        for rid, action in sent:
            assert rid in got, (rid, action, "not recorded")
            assert (got[rid]["action"], got[rid]["outcome"]) == (action, "failure"), got[rid]
        async with http.get(f"{live.base}/documents/{doc}", headers=auth) as r:
            assert r.status == 200 and (await r.json())["title"] == "t"
    log = live.log_tail(200_000)
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]


def _chunked(data: bytes, size: int = 16 * 1024) -> Any:
    """A body sent with chunked transfer encoding (no Content-Length)."""
    async def gen() -> Any:
        for i in range(0, len(data), size):
            yield data[i : i + size]
    return gen()


async def test_each_route_has_its_own_body_limit(api: Api) -> None:
    """Bodies are parsed on the event loop: login and logout (a few strings)
    stop at 64 KiB, chat at 256 KiB, client events at 4 MiB, documents at 8 MiB
    -- by Content-Length before reading, or once a chunked body is over."""
    alice = await api.login("alice")
    doc = await _doc(api, alice)
    pad = "x" * (100 * 1024)
    login = json.dumps({"username": "alice", "password": PASSWORD, "pad": pad}).encode()
    for data in (io.BytesIO(login), _chunked(login)):
        _, status, body = await api.send("POST", "/token", data=data,
                                         headers={"Content-Type": "application/json"})
        assert status == 413 and body is not None and body["error"]["code"] == "too_large"
    form = f"username=alice&password={PASSWORD}&pad={pad}".encode()
    urlencoded = {"Content-Type": "application/x-www-form-urlencoded"}
    for data, extra in ((io.BytesIO(form), {}), (_chunked(form), {}),
                        (io.BytesIO(gzip.compress(form)), {"Content-Encoding": "gzip"})):
        _, status, _ = await api.send("POST", "/token", data=data, headers={**urlencoded, **extra})
        assert status == 413, extra
    ok_form = f"username=alice&password={PASSWORD}".encode()
    _, status, _ = await api.send("POST", "/token", data=_chunked(ok_form, 5), headers=urlencoded)
    assert status == 200
    # Just under the limit, a login is still a login.
    small = json.dumps({"username": "alice", "password": PASSWORD,
                        "grant_type": "password"}).encode()
    _, status, _ = await api.send("POST", "/token", data=_chunked(small, 7),
                                  headers={"Content-Type": "application/json"})
    assert status == 200
    cases = [
        ("POST", "/logout", {"pad": pad}, "session.end"),
        ("POST", f"/documents/{doc}/chat", {"message": "hi", "pad": "x" * (300 * 1024)},
         "ai.interaction"),
        ("POST", "/audit/events", [{"action": "client.x", "details": {"p": "x" * 4000}}] * 1100,
         "client.rejected"),
    ]
    for method, path, obj, action in cases:
        raw = json.dumps(obj).encode()
        for data in (io.BytesIO(raw), _chunked(raw)):
            rid, status, body = await api.send(method, path, token=alice, data=data,
                                               headers={"Content-Type": "application/json"})
            assert status == 413 and body is not None, (path, status, body)
            assert body["error"]["code"] == "too_large"
            e = await api.recorded(rid, action, outcome="failure",
                                   session_id=alice["session_id"])
            assert e["details"]["reason"] == "too_large"
    # The session is still open: a refused logout body ends nothing.
    _, status, _ = await api.send("GET", "/me", token=alice)
    assert status == 200


ODD_TEXT = [
    "NUL \u0000 inside",
    "\u202eright-to-left override\u202c and \u200f mark",
    "emoji \U0001f600\U0001f469\u200d\U0001f4bb flags \U0001f1fa\U0001f1f3",
    "combining e\u0301\u0301\u0301 and zero width \u200b\ufeff",
    "<script>alert(1)</script>'; DROP TABLE documents; --",
    "\U0010ffff max code point",
    "x" * 200,
]


async def test_odd_unicode_round_trips_and_is_audited(api: Api) -> None:
    alice = await api.login("alice")
    for text in ODD_TEXT:
        rid, status, body = await api.send("POST", "/documents", token=alice,
                                           json_body={"title": text, "content": text * 3})
        assert status == 201 and body is not None, (text, body)
        assert body["title"] == text and body["content"] == text * 3
        doc = body["id"]
        await api.recorded(rid, "document.create", outcome="success")
        _, status, got = await api.send("GET", f"/documents/{doc}", token=alice)
        assert status == 200 and got is not None and got["title"] == text
        rid, status, _ = await api.send("POST", f"/documents/{doc}/chat", token=alice,
                                        json_body={"message": text})
        assert status == 200, text
        await api.recorded(rid, "ai.interaction", outcome="success")
        rid, status, _ = await api.send("POST", "/audit/events", token=alice, json_body={
            "action": "client.odd", "target": {"type": "document", "id": text[:128]},
            "details": {text.replace("\x00", "0"): text}})
        assert status == 202
        await api.recorded(rid, "client.odd")
    # NUL in a value is fine (above); in a key it is refused: MongoDB cannot store it.
    rid, status, body = await api.send("POST", "/audit/events", token=alice, json_body={
        "action": "client.odd", "details": {"ok": [{"a\x00b": 1}]}})
    assert status == 400 and body is not None and "NUL" in body["error"]["message"]
    await api.recorded(rid, "client.rejected", outcome="failure")
    # So is a key starting with "$": MongoDB reads {"$ref", "$id"} back as a
    # reference, and servers before 5.0 refuse the key (and the whole part).
    rid, status, body = await api.send("POST", "/audit/events", token=alice, json_body={
        "action": "client.odd", "details": {"ok": [{"$ref": "orders", "$id": 1}]}})
    assert status == 400 and body is not None and "'$'" in body["error"]["message"]
    await api.recorded(rid, "client.rejected", outcome="failure")
    # client.rejected matches API.md's pattern: a client's is taken, as a
    # success (the server's record of a refused request is a failure).
    rid, status, body = await api.send("POST", "/audit/events", token=alice, json_body={
        "action": "client.rejected"})
    assert status == 202 and body == {"accepted": 1}, body
    await api.recorded(rid, "client.rejected", outcome="success")
    # The 64-bit integers at the edges are fine.
    rid, status, _ = await api.send("POST", "/audit/events", token=alice, json_body={
        "action": "client.edges", "details": {"max": 2 ** 63 - 1, "min": -(2 ** 63)}})
    assert status == 202
    assert (await api.recorded(rid, "client.edges"))["details"] == {
        "max": 2 ** 63 - 1, "min": -(2 ** 63)}
    # Lone surrogates in JSON escapes are refused (they cannot be stored as UTF-8).
    for raw in (b'{"title": "\\ud800", "content": "c"}', b'{"title": "a\\udc00b", "content": "c"}'):
        rid, status, body = await api.send("POST", "/documents", token=alice, data=raw)
        assert status == 400 and body is not None
        await api.recorded(rid, "document.create", outcome="failure")
    for raw in (b'{"action": "client.x", "details": {"k": "\\ud800"}}',
                b'{"action": "client.\\ud800"}'):
        _, status, _ = await api.send("POST", "/audit/events", token=alice, data=raw)
        assert status == 400
    # Numbers JSON cannot carry back out (1e400 is inf) are refused, not a 500.
    for raw in (b'{"action": "client.x", "details": {"big": 1e400}}',
                b'{"action": "client.x", "details": {"nan": -1e999}}'):
        _, status, _ = await api.send("POST", "/audit/events", token=alice, data=raw)
        assert status == 400
    await api.assert_storable_in_mongodb()


PATH_TRICKS = [
    "..%2F..%2Fetc%2Fpasswd",
    "..",
    "%2e%2e",
    "a%2Fb",
    "%00",
    "a%00b",
    "%ED%A0%80",  # a UTF-8 encoded lone surrogate
    "%FF%FE",
    "%E2%80%AE",  # right-to-left override
    "%F0%9F%98%80",
    "x" * 3000,
    "y" * 12000,  # past aiohttp's own request-line limit (8190 bytes)
    "1%20OR%201%3D1",
    "'%3B%20DROP%20TABLE%20documents%3B--",
    "%25",
    "%",
    "abc%3Fq%3D1",
    "CON",
    "-1",
    "0x10",
]


# Normalised away by the client (``/documents/..`` is ``/``) or split at a slash.
NO_ROUTE = {"..", "%2e%2e", "..%2F..%2Fetc%2Fpasswd", "a%2Fb"}


async def test_path_tricks_in_ids(api: Api) -> None:
    alice = await api.login("alice")
    doc = await _doc(api, alice)
    for trick in PATH_TRICKS:
        for method, suffix, action, body in (
            ("GET", "", "document.access", None),
            ("PUT", "", "document.update", {"content": "x"}),
            ("DELETE", "", "document.delete", None),
            ("POST", "/chat", "ai.interaction", {"message": "hi"}),
        ):
            rid, status, resp = await api.send(method, f"/documents/{trick}{suffix}",
                                               token=alice, json_body=body)
            assert status in (400, 404), (trick, method, status, resp)
            evs = [e for e in await api.events(rid) if e["action"] == action]
            if status == 404 and evs == [] and trick in NO_ROUTE:
                continue  # the path does not reach a document route: nothing was attempted
            assert len(evs) == 1 and evs[0]["outcome"] == "failure", (trick, method, evs)
            assert len(evs[0]["target"]["id"]) <= 128
        rid, status, resp = await api.send("GET", f"/audit/sessions/{trick}", token=alice)
        assert status in (403, 404), (trick, status, resp)
    # The real document is untouched.
    _, status, got = await api.send("GET", f"/documents/{doc}", token=alice)
    assert status == 200 and got is not None and got["version"] == 1


async def test_bad_query_parameters(api: Api) -> None:
    admin = await api.login("admin", ADMIN_PASSWORD)
    alice = await api.login("alice")
    queries = [
        "limit=abc", "limit=-1", "limit=0", "limit=99999999999999999999", "limit=1e3",
        "since=yesterday", "since=2026-13-45T99:99:99Z", "until=%00", "since=" + "9" * 500,
        "cursor=garbage", "cursor=" + base64.urlsafe_b64encode(b'["x", 5]').decode(),
        "cursor=" + base64.urlsafe_b64encode(b"\xff\xfe").decode(), "cursor=%ED%A0%80",
        "state=deleted", "nope=1", "user=%00", "user=%ED%A0%80", "kind=%E2%80%AE",
        "limit=1&limit=2", "a%00b=1", "%00=%00",
    ]
    for path in ("/audit/sessions", "/audit/security-events"):
        for q in queries:
            _, status, body = await api.send("GET", f"{path}?{q}", token=admin)
            assert status in (200, 400), (path, q, status, body)
            # A non-admin is refused as such, whatever the parameters.
            rid, status, body = await api.send("GET", f"{path}?{q}", token=alice)
            assert status == 403 and body is not None, (path, q, status, body)
            assert body["error"]["code"] == "forbidden"
            await api.recorded(rid, "admin.denied", outcome="denied")
    await api.assert_storable_in_mongodb()


def _forge(claims: dict[str, Any], key: str | bytes = JWT_SECRET, alg: str = "HS256",
           header: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=header)


def _b64(obj: Any) -> str:
    raw = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_bad_tokens_are_401_and_recorded(api: Api) -> None:
    alice = await api.login("alice")
    now = int(time.time())
    good = {"sub": "alice", "sid": alice["session_id"], "role": "user", "iat": now,
            "exp": now + 600, "jti": "j1"}
    none_token = _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(good) + "."
    admin_claims = {**good, "role": "admin"}
    cases: list[tuple[str, str, str]] = [
        ("alg none", none_token, "invalid_token"),
        ("alg None", _b64({"alg": "None"}) + "." + _b64(good) + ".", "invalid_token"),
        ("wrong key", _forge(good, "another-secret-another-secret-0123"), "invalid_token"),
        ("HS512", _forge(good, JWT_SECRET + "x" * 40, "HS512"), "invalid_token"),
        ("RS256 header", _b64({"alg": "RS256"}) + "." + _b64(good) + "." + _b64(b"sig"),
         "invalid_token"),
        ("expired", _forge({**good, "exp": now - 10}), "token_expired"),
        ("iat in future", _forge({**good, "iat": now + 3600}), "invalid_token"),
        ("garbage", "garbage", "invalid_token"),
        ("three dots", "a.b.c", "invalid_token"),
        ("empty parts", "..", "invalid_token"),
        ("huge", "A" * 6000, "invalid_token"),
        ("past aiohttp's header limit", "A" * 20_000, "invalid_token"),
        ("json header", _b64(b"{") + "." + _b64(good) + ".x", "invalid_token"),
        ("exp string", _forge({**good, "exp": "tomorrow"}), "invalid_token"),
        ("iat string", _forge({**good, "iat": "now"}), "invalid_token"),
        ("sub int", _forge({**good, "sub": 5}), "invalid_token"),
        ("sid list", _forge({**good, "sid": ["x"]}), "invalid_token"),
        ("role null", _forge({**good, "role": None}), "invalid_token"),
        ("jti empty", _forge({**good, "jti": ""}), "invalid_token"),
        ("unknown session", _forge({**good, "sid": "0" * 32}), "session_ended"),
        ("other user's session", _forge({**good, "sub": "bob"}), "session_ended"),
    ]
    for claim in ("sub", "sid", "role", "iat", "exp", "jti"):
        cases.append((f"missing {claim}",
                      _forge({k: v for k, v in good.items() if k != claim}), "invalid_token"))
    for what, token, code in cases:
        rid, status, body = await api.send("GET", "/me",
                                           headers={"Authorization": f"Bearer {token}"})
        assert status == 401 and body is not None, (what, status, body)
        assert body["error"]["code"] == code, (what, body)
        action = {"invalid_token": "auth.invalid_token", "token_expired": "auth.token_expired",
                  "session_ended": "auth.session_ended"}[code]
        e = await api.recorded(rid, action, outcome="denied")
        assert e["seq"] is None and e["details"]["reason"], (what, e)
    # A forged role claim on a real session does not make anyone an admin: the
    # session's own role counts. (It is validly signed only with the real key.)
    rid, status, body = await api.send(
        "GET", "/audit/status", headers={"Authorization": f"Bearer {_forge(admin_claims)}"})
    assert status == 403, body
    # Authorization header shapes.
    for header in ("", "Bearer", "Bearer ", "Basic YWxpY2U6cHc=", "bearer  x", "Token abc",
                   "Bearer " + alice["access_token"] + " extra"):
        rid, status, body = await api.send("GET", "/me", headers={"Authorization": header})
        assert status == 401 and body is not None, (header, status, body)
        assert body["error"]["code"] in ("missing_token", "invalid_token"), body
        await api.recorded(rid, "auth.invalid_token", outcome="denied")  # both codes
    # The real token still works; after logout it is ended at once.
    _, status, _ = await api.send("GET", "/me", token=alice)
    assert status == 200
    _, status, _ = await api.send("POST", "/logout", token=alice)
    assert status == 200
    rid, status, body = await api.send("GET", "/documents", token=alice)
    assert status == 401 and body is not None and body["error"]["code"] == "session_ended"
    await api.recorded(rid, "auth.session_ended", outcome="denied")


async def test_session_header_spoofing(api: Api) -> None:
    alice = await api.login("alice")
    bob = await api.login("bob")
    doc = await _doc(api, bob)
    for spoof in (bob["session_id"], "", "x" * 5000, alice["session_id"].upper(), "\u00e9"):
        rid, status, body = await api.send(
            "GET", f"/documents/{doc}", token=alice,
            headers={"X-Audit-Session-ID": spoof.encode("utf-8").decode("latin-1")})
        assert status == 403 and body is not None, (spoof[:20], status, body)
        assert body["error"]["code"] == "session_mismatch"
        e = await api.recorded(rid, "auth.session_mismatch", outcome="denied",
                               session_id=alice["session_id"])
        assert e["actor"]["user"] == "alice"
        # Nothing was written into bob's session, nor into alice's.
        assert [x for x in await api.events(rid) if x["seq"] is not None] == []
    # The matching header is fine.
    _, status, _ = await api.send("GET", "/me", token=alice,
                                  headers={"X-Audit-Session-ID": alice["session_id"]})
    assert status == 200
    # Logging out someone else's session through the body is refused and
    # recorded; a session_id that is not a string is a wrong type (400).
    for claimed in (bob["session_id"], 5, None, ["x"], {"a": 1}):
        body_json = {"session_id": claimed}
        rid, status, body = await api.send("POST", "/logout", token=alice, json_body=body_json)
        if claimed is None:  # the same as no session_id
            assert status == 200, body
            alice = await api.login("alice")
        elif isinstance(claimed, str):
            assert status == 403, (claimed, status, body)
            await api.recorded(rid, "auth.session_mismatch", outcome="denied")
        else:
            assert status == 400, (claimed, status, body)
            await api.recorded(rid, "session.end", outcome="failure")
    _, status, _ = await api.send("GET", "/me", token=bob)
    assert status == 200  # bob's session is still open


async def test_login_bad_input(api: Api) -> None:
    cases: list[tuple[dict[str, Any], tuple[int, ...]]] = [
        ({"json_body": {"username": "alice"}}, (400,)),
        ({"json_body": {"username": 5, "password": 5}}, (400,)),
        ({"json_body": {"username": ["alice"], "password": PASSWORD}}, (400,)),
        ({"json_body": {"username": "alice", "password": PASSWORD, "grant_type": "code"}},
         (400,)),
        ({"json_body": {"username": "x" * 300, "password": "p"}}, (400,)),
        ({"json_body": {"username": "alice", "password": "p" * 2000}}, (400,)),
        ({"json_body": {"username": "al\u0000ice", "password": PASSWORD}}, (401,)),
        ({"json_body": {"username": "\u202ealice", "password": PASSWORD}}, (401,)),
        ({"json_body": {"username": "alice", "password": "\u0000"}}, (401,)),
        ({"json_body": {"username": "alice\U0001f600", "password": "\U0001f600"}}, (401,)),
        ({"data": b"username=alice&password=%FF%FE",
          "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, (400, 401)),
        ({"data": b"username=alice&password=",
          "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, (400,)),
        ({"data": b"username=alice&username=bob&password=x",
          "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, (400, 401)),
        ({"data": b"\x00\x01\x02", "headers": {"Content-Type": "multipart/form-data"}},
         (400,)),
        ({"data": b"garbage", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
         (400,)),
        # A part with an unknown Content-Transfer-Encoding: aiohttp raises RuntimeError.
        ({"data": (b"--XX\r\nContent-Disposition: form-data; name=\"username\"\r\n"
                   b"Content-Transfer-Encoding: x-weird\r\n\r\nalice\r\n--XX\r\n"
                   b"Content-Disposition: form-data; name=\"password\"\r\n\r\n"
                   + PASSWORD.encode() + b"\r\n--XX--\r\n"),
          "headers": {"Content-Type": "multipart/form-data; boundary=XX"}}, (400,)),
    ]
    for kwargs, statuses in cases:
        rid, status, body = await api.send("POST", "/token", **kwargs)
        assert status in statuses, (kwargs, status, body)
        if status == 401:
            await api.recorded(rid, "auth.login_failed", outcome="denied")


async def test_unknown_routes_and_methods(api: Api) -> None:
    alice = await api.login("alice")
    for method, path, status in (
        ("PATCH", "/documents", 405), ("DELETE", "/me", 405), ("GET", "/token", 405),
        ("GET", "/nothing", 404), ("GET", "/documents/a/b/c", 404), ("GET", "//", 404),
        ("POST", "/audit/status", 405), ("TRACE", "/me", 405), ("GET", "/%00", 404),
    ):
        _, got, body = await api.send(method, path, token=alice)
        assert got == status, (method, path, got, body)
    for rid_header in ("x" * 200, "bad id!", "\u00e9"):
        r = await api.client.get("/healthz", headers={"X-Request-ID": rid_header.encode(
            "utf-8").decode("latin-1")})
        assert r.status == 200 and r.headers["X-Request-ID"] != rid_header
        assert len(r.headers["X-Request-ID"]) <= 128


# -- the login storm -----------------------------------------------------------

STORM_LOGINS = 1000
ME_USERS = 5


@pytest.fixture
def storm_server(tmp_path: Path) -> Iterator[Live]:
    rounds = int(os.environ.get("LOGIN_STORM_BCRYPT_ROUNDS", "10"))
    lv = Live(tmp_path, {"auth": {"bcrypt_rounds": rounds}})
    yield lv
    lv.close()


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_login_storm_does_not_starve_other_users(storm_server: Live) -> None:
    lv = storm_server
    for i in range(ME_USERS):
        await lv.adduser(f"u{i}", PASSWORD)
    await lv.start()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        tokens = []
        for i in range(ME_USERS):
            async with http.post(lv.base + "/token",
                                 json={"username": f"u{i}", "password": PASSWORD}) as r:
                assert r.status == 200
                tokens.append((await r.json())["access_token"])

        async def me_loop(token: str, stop: asyncio.Event, out: list[tuple[int, float]]) -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                async with http.get(lv.base + "/me",
                                    headers={"Authorization": f"Bearer {token}"}) as r:
                    await r.read()
                    out.append((r.status, time.perf_counter() - t0))

        baseline: list[tuple[int, float]] = []
        stop = asyncio.Event()
        loops = [asyncio.create_task(me_loop(t, stop, baseline)) for t in tokens]
        await asyncio.sleep(1.0)  # measuring window for the baseline
        stop.set()
        await asyncio.gather(*loops)

        async def bad_login(i: int) -> int:
            body = {"username": f"u{i % ME_USERS}" if i % 2 else f"nobody{i}",
                    "password": f"wrong-{i}"}
            async with http.post(lv.base + "/token", json=body) as r:
                await r.read()
                return r.status

        during: list[tuple[int, float]] = []
        stop = asyncio.Event()
        loops = [asyncio.create_task(me_loop(t, stop, during)) for t in tokens]
        t0 = time.perf_counter()
        statuses = Counter(await asyncio.gather(*(bad_login(i) for i in range(STORM_LOGINS))))
        storm_seconds = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*loops)

    assert set(statuses) <= {401, 429}, statuses
    assert sum(statuses.values()) == STORM_LOGINS
    assert during and all(s == 200 for s, _ in during), Counter(s for s, _ in during)
    assert all(s == 200 for s, _ in baseline)
    lat = [d * 1000 for _, d in during]
    base_lat = [d * 1000 for _, d in baseline]
    print(f"\nlogin storm: {STORM_LOGINS} failed logins in {storm_seconds:.2f}s {dict(statuses)};"
          f" GET /me during: n={len(lat)} p50={_pct(lat, 50):.1f}ms p99={_pct(lat, 99):.1f}ms"
          f" max={max(lat):.1f}ms; before: n={len(base_lat)} p50={_pct(base_lat, 50):.1f}ms"
          f" p99={_pct(base_lat, 99):.1f}ms")

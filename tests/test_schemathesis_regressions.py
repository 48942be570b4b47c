"""Fast in-process regressions for what the schemathesis run (and its review) found.

Each was a 500 ``internal_error`` before its fix; API.md wants 400 for bad input
(and a normal answer for valid input), never a 500.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

ADMIN_PASSWORD = "regress-admin-pw"


@pytest.fixture
async def client(make_config: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TestClient]:
    import server

    monkeypatch.setenv("SESSION_AUDIT_ADMIN_PASSWORD", ADMIN_PASSWORD)
    config = make_config(auth={"bcrypt_rounds": 4}, flush={"max_writes_per_second": 1000.0})
    async with TestClient(TestServer(server.create_app(config))) as c:
        yield c


async def _admin(client: TestClient) -> dict[str, str]:
    resp = await client.post("/token", data={"username": "admin", "password": ADMIN_PASSWORD})
    assert resp.status == 200
    return {"Authorization": "Bearer " + (await resp.json())["access_token"]}


async def _error(resp: Any, status: int, code: str) -> None:
    assert resp.status == status, await resp.text()
    assert (await resp.json())["error"]["code"] == code


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("multipart/form-data", b'{"username": "alice", "password": "x"}'),  # no boundary
        ("multipart/form-data; boundary=xyz", b"garbage"),  # no starting boundary
        ("multipart/form-data; boundary=xyz",
         b'--xyz\r\nContent-Disposition: form-data; name="username"\r\n'
         b"Content-Type: text/plain; charset=bogus\r\n\r\nadmin\r\n--xyz--\r\n"),
        ("application/x-www-form-urlencoded", b"username=\xff\xfe&password=x"),
        ("application/x-www-form-urlencoded; charset=nonexistent", b"username=a&password=b"),
    ],
)
async def test_malformed_login_form_is_400(client: TestClient, ctype: str, body: bytes) -> None:
    resp = await client.post("/token", data=body, headers={"Content-Type": ctype})
    await _error(resp, 400, "invalid_request")


@pytest.mark.parametrize("path", ["/audit/sessions", "/audit/security-events"])
@pytest.mark.parametrize(
    "since", ["9999-12-31T23:59:59-23:00", "0001-01-01T00:00:00+23:00"]
)
async def test_times_beyond_year_range_in_utc(client: TestClient, path: str, since: str) -> None:
    """Valid RFC 3339 times whose offset takes them outside years 1-9999 in UTC."""
    h = await _admin(client)
    resp = await client.get(path, params={"since": since}, headers=h)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    items = body["sessions" if path == "/audit/sessions" else "events"]
    if since.startswith("9999"):
        assert items == []  # nothing after year 9999
    elif path == "/audit/sessions":
        assert items  # everything after year 1, the admin's own session included
    if path == "/audit/sessions":
        resp = await client.get(path, params={"until": since}, headers=h)
        assert resp.status == 200, await resp.text()


def _cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


@pytest.mark.parametrize("path", ["/audit/sessions", "/audit/security-events"])
@pytest.mark.parametrize(
    "cursor",
    [_cursor([1, 2]), _cursor([None, "x"]), _cursor([["a"], "x"]),
     _cursor(["9999-12-31T23:59:59-23:00", "x"]), _cursor(["2026-01-01T00:00:00Z", 5])],
)
async def test_cursor_that_the_server_never_issued(client: TestClient, path: str,
                                                   cursor: str) -> None:
    h = await _admin(client)
    resp = await client.get(path, params={"cursor": cursor}, headers=h)
    await _error(resp, 400, "invalid_request")


@pytest.mark.parametrize("path", ["/audit/sessions", "/audit/security-events"])
@pytest.mark.parametrize("limit", ["\u00b2", "\u0663", "+5", " 5", "5.0"])
async def test_limit_must_be_ascii_digits(client: TestClient, path: str, limit: str) -> None:
    h = await _admin(client)
    resp = await client.get(path, params={"limit": limit}, headers=h)
    await _error(resp, 400, "invalid_request")


def test_env_untouched() -> None:
    # the fixture's monkeypatch must not leak the admin password to other tests
    assert os.environ.get("SESSION_AUDIT_ADMIN_PASSWORD") != ADMIN_PASSWORD


async def test_integral_float_version_is_an_integer(client: TestClient) -> None:
    """JSON has one number type: ``"version": 1.0`` is version 1 (schemathesis sent 2.0)."""
    h = await _admin(client)
    resp = await client.post("/documents", json={"title": "t", "content": "c"}, headers=h)
    doc = await resp.json()
    resp = await client.put(f"/documents/{doc['id']}", data=b'{"version": 1.0, "title": "u"}',
                            headers={**h, "Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["version"] == 2
    resp = await client.put(f"/documents/{doc['id']}", data=b'{"version": 1.0}',
                            headers={**h, "Content-Type": "application/json"})
    await _error(resp, 409, "version_conflict")
    for bad in (b"1.5", b"0.0", b"-2.0", b"true", b'"2"'):
        resp = await client.put(f"/documents/{doc['id']}", data=b'{"version": ' + bad + b"}",
                                headers={**h, "Content-Type": "application/json"})
        await _error(resp, 400, "invalid_request")

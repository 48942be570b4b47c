"""Errors in API.md's format everywhere: 404, 405, 413, 500, and no details leaking."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from aiohttp import web
from api_fixtures import ADMIN_PASSWORD, Api, MakeApi, api, assert_clean, expect_error, make_api

from handlers.ops import REQUESTS

__all__ = ["api", "make_api"]

SECRET_DETAIL = "boom at /srv/secret/path.py with password hunter2"


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError(SECRET_DETAIL)


async def _key_error(request: web.Request) -> web.Response:
    return web.json_response({}[request.path])  # type: ignore[index]


def _add_test_routes(app: web.Application) -> None:
    app.router.add_get("/test-only/boom", _boom)  # unnamed: needs a token like any route
    app.router.add_post("/test-only/key-error", _key_error)


@pytest.fixture
async def boom_api(make_api: MakeApi) -> Api:
    return await make_api(setup=_add_test_routes)


async def test_unexpected_exception_is_internal_error_without_details(
    boom_api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    api = boom_api
    alice = await api.user("alice")
    with caplog.at_level(logging.ERROR, logger="session_audit.http"):
        resp = await api.client.get("/test-only/boom",
                                    headers={**alice.headers, "X-Request-ID": "boom-1"})
        body = await expect_error(resp, 500, "internal_error")
        text = await resp.text()
    assert "hunter2" not in text and "RuntimeError" not in text and "/srv" not in text
    assert body["error"]["request_id"] == "boom-1"
    # Logged for the operator, with the request id.
    logged = [r for r in caplog.records if "boom-1" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    resp = await api.client.post("/test-only/key-error", headers=alice.headers)
    await expect_error(resp, 500, "internal_error")
    # The server keeps serving.
    assert (await api.client.get("/healthz")).status == 200


async def test_unnamed_routes_are_not_public(boom_api: Api) -> None:
    resp = await boom_api.client.get("/test-only/boom")
    await expect_error(resp, 401, "missing_token")


@pytest.mark.parametrize("path", ["/nope", "/documents/a/b/c", "/audit", "/%00", "/" + "z" * 4000,
                                  "/audit/sessions/x/y", "/.env", "/../../etc/passwd"])
async def test_unknown_paths_are_404_in_api_format(api: Api, path: str) -> None:
    for method in ("GET", "POST", "DELETE"):
        resp = await api.client.request(method, path)
        await expect_error(resp, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/token"),
        ("DELETE", "/me"),
        ("PATCH", "/documents"),
        ("POST", "/documents/abc"),
        ("GET", "/documents/abc/chat"),
        ("GET", "/audit/events"),
        ("DELETE", "/audit/sessions"),
        ("GET", "/audit/flush"),
        ("POST", "/healthz"),
        ("PUT", "/metrics"),
        ("GET", "/logout"),
    ],
)
async def test_wrong_method_is_405_in_api_format(api: Api, method: str, path: str) -> None:
    resp = await api.client.request(method, path)
    await expect_error(resp, 405, "method_not_allowed")
    assert resp.headers.get("Allow")


async def test_oversized_bodies_are_413_in_api_format(api: Api) -> None:
    big = 8 * 1024 * 1024 + 1
    admin = await api.admin()
    for path, headers in (("/token", {}), ("/audit/events", admin.headers),
                          ("/logout", admin.headers)):
        resp = await api.client.post(path, data=io.BytesIO(b"{" + b" " * big + b"}"),
                                     headers={**headers, "Content-Type": "application/json"})
        await expect_error(resp, 413, "too_large")
    # The refused logout did not end the session.
    resp = await api.client.get("/me", headers=admin.headers)
    assert resp.status == 200


async def test_login_accepts_no_other_content_type_garbage(api: Api) -> None:
    resp = await api.client.post("/token", data=b"username=admin&password=" +
                                 ADMIN_PASSWORD.encode(),
                                 headers={"Content-Type": "text/plain"})
    await expect_error(resp, 400, "invalid_json")


async def test_error_bodies_are_clean(api: Api) -> None:
    """A sample of every kind of error: none carries a path, trace or SQL."""
    alice = await api.user("alice")
    probes = [
        ("GET", "/documents/" + "' OR 1=1 --", None),
        ("PUT", "/documents/x", {"version": "1; DROP TABLE documents"}),
        ("POST", "/documents", {"title": None}),
        ("GET", "/audit/sessions?limit=-5", None),
        ("POST", "/audit/events", {"action": "client.x", "details": {"a": [1] * 3000}}),
    ]
    for method, path, body in probes:
        resp = await api.client.request(method, path, json=body, headers=alice.headers)
        assert resp.status >= 400
        assert_clean(await resp.text())


async def test_every_answer_carries_the_security_headers(boom_api: Api) -> None:
    """OWASP's REST security headers on answers of every kind, and a Server
    header without aiohttp's or Python's version (it was
    ``Python/3.11 aiohttp/3.x``): nothing for a cache to keep (RFC 6749 asks
    ``no-store`` of a token answer), no sniffing, no framing."""
    api = boom_api
    resp = await api.client.post("/token", json={"username": "admin",
                                                 "password": ADMIN_PASSWORD})
    assert resp.status == 200
    token = (await resp.json())["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    created = await api.client.post("/documents", json={"title": "t", "content": "c"},
                                    headers=auth)
    doc_id = (await created.json())["id"]
    probes = [
        (created, 201),
        (await api.client.get(f"/documents/{doc_id}", headers=auth), 200),
        (await api.client.get("/me", headers=auth), 200),
        (await api.client.get("/audit/status", headers=auth), 200),
        (await api.client.get("/healthz"), 200),
        (await api.client.get("/metrics"), 200),
        (await api.client.post("/token", json={"username": "admin", "password": "nope-x"}),
         401),
        (await api.client.get("/me"), 401),
        (await api.client.get("/no/such/path", headers=auth), 404),
        (await api.client.delete("/me", headers=auth), 405),
        (await api.client.get("/test-only/boom", headers=auth), 500),
        (await api.client.delete(f"/documents/{doc_id}", headers=auth), 204),
    ]
    for resp, status in probes:
        assert resp.status == status, (resp.url, resp.status)
        headers = resp.headers
        assert headers["Cache-Control"] == "no-store", resp.url
        assert headers["Pragma"] == "no-cache", resp.url
        assert headers["X-Content-Type-Options"] == "nosniff", resp.url
        assert headers["X-Frame-Options"] == "DENY", resp.url
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], resp.url
        assert headers["Referrer-Policy"] == "no-referrer", resp.url
        assert headers["Server"] == "session-audit", resp.url
        assert headers["X-Request-ID"], resp.url


async def test_a_request_aiohttp_cannot_parse_is_refused_in_the_api_format(api: Api) -> None:
    """A header aiohttp's parser refuses (here a control character in an
    Authorization header) is answered before any middleware runs. That answer
    was text/plain, with ``Server: Python/3.11 aiohttp/3.x``, none of the
    security headers, no X-Request-ID, and the header quoted back, token and
    all. Now: API.md's error format, the same headers as every answer."""
    alice = await api.user("alice")
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + alice.token.encode() + b"\x01\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)  # the connection closes after it
    writer.close()
    head, _, text = raw.decode("latin-1").partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert " 400 " in status, raw
    assert alice.token not in raw.decode("latin-1")
    assert headers["server"] == "session-audit"
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["cache-control"] == "no-store" and headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    body = json.loads(text)
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["request_id"] == headers["x-request-id"]
    assert_clean(text)
    # The server keeps serving.
    assert (await api.client.get("/me", headers=alice.headers)).status == 200


async def test_a_failure_outside_the_middlewares_keeps_the_request_id(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure in the outermost middleware (here the metrics counter,
    after the error middleware has answered) reaches aiohttp's handle_error:
    its 500 is in API.md's format and, like every answer, carries the
    request's own X-Request-ID (API.md: echoed when sane), which the log
    line names too, not a fresh id nobody can find in the log."""
    counter = api.app[REQUESTS]

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError(SECRET_DETAIL)

    monkeypatch.setattr(counter, "labels", broken)
    with caplog.at_level(logging.ERROR, logger="session_audit.http"):
        resp = await api.client.get("/healthz", headers={"X-Request-ID": "outer-1"})
        body = await expect_error(resp, 500, "internal_error")
    assert resp.headers["X-Request-ID"] == "outer-1"
    assert body["error"]["request_id"] == "outer-1"
    assert resp.headers["Cache-Control"] == "no-store"
    assert_clean(await resp.text())
    assert any("outer-1" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert (await api.client.get("/healthz")).status == 200

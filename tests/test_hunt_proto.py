"""Clients that go away mid-request, and HTTP protocol details (found by a
hunt from that angle). The real app factory under aiohttp's own runner, as
``serve`` runs it, real SQLite files, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from api_fixtures import USER_PASSWORD, MakeApi, api_config, make_api, served_app
from openai_stub import OpenAIStub
from waiting import wait_for

from handlers.keys import ACCOUNTS

__all__ = ["make_api"]


async def _login_and_doc(app: web.Application, base: str) -> tuple[dict[str, Any], str]:
    await app[ACCOUNTS].create("alice", USER_PASSWORD, "user")
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/token", json={"username": "alice",
                                                    "password": USER_PASSWORD}) as r:
            assert r.status == 200
            login = await r.json()
        async with http.post(base + "/documents",
                             headers={"Authorization": f"Bearer {login['access_token']}"},
                             json={"title": "t", "content": "the document"}) as r:
            assert r.status == 201
            return login, (await r.json())["id"]


def _events(config: Any, session_id: str) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(config.spool_path)) as spool:
        return [json.loads(j) for (j,) in spool.execute(
            "SELECT json FROM events WHERE session_id = ? ORDER BY seq", (session_id,))]


async def test_a_chat_whose_client_left_is_waited_for_by_the_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The client of a chat goes away while the provider has the document,
    then the server is told to stop. aiohttp lets such a handler run on, but
    its shutdown waits for it only as long as for the first phase (10 s in
    ``serve``), neither waits for it nor cancels it after that, and the
    engine closed under it: the interaction went unrecorded ("audit
    unavailable: the spool is closed", seen with ``serve`` and a provider
    answering 10 s after SIGTERM). The shutdown now waits for it like any
    request in flight, before the engine closes."""
    caplog.set_level(logging.INFO, logger="session_audit")
    stub = OpenAIStub()
    stub.mode = "held"
    base_url = await stub.start()
    config = api_config(tmp_path, ai={"provider": "openai", "openai": {
        "base_url": base_url, "timeout_seconds": 60.0}})
    try:
        async with served_app(config, monkeypatch) as (app, runner, port):
            base = f"http://127.0.0.1:{port}"
            login, doc = await _login_and_doc(app, base)
            body = json.dumps({"message": "hi"}).encode()
            _, writer = await asyncio.open_connection(*runner.addresses[0][:2])
            writer.write(f"POST /documents/{doc}/chat HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {login['access_token']}\r\n"
                         "X-Request-ID: client-gone\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            await asyncio.wait_for(stub.arrived.wait(), 10)
            writer.close()  # the client goes away while the provider has the document
            await writer.wait_closed()
            stopping = asyncio.ensure_future(runner.cleanup())
            # Either the shutdown waits for the chat, or it is over without it.
            await wait_for(lambda: "requests still running" in caplog.text or stopping.done(),
                           timeout=10)
            stub.gate.set()  # the provider answers
            await asyncio.wait_for(stopping, 20)
    finally:
        await stub.stop()
    chats = [e for e in _events(config, login["session_id"])
             if e["request_id"] == "client-gone"]
    assert [(e["action"], e["outcome"]) for e in chats] == [("ai.interaction", "success")], (
        caplog.text[-3000:])


async def test_a_request_whose_client_left_is_cancelled_at_the_end_of_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the shutdown's wait, a request whose client went away is
    cancelled before the engine closes, like one whose client is still
    there: a chat so cut off is recorded as ``cancelled`` (it was cancelled
    only by ``run_app``'s last sweep, after the engine had closed)."""
    stub = OpenAIStub()
    stub.mode = "held"  # never answers
    base_url = await stub.start()
    # served_app's runner waits 0.3 s (half the grace, as serve's does).
    config = api_config(tmp_path, server={"shutdown_grace_seconds": 0.6},
                        ai={"provider": "openai", "openai": {
                            "base_url": base_url, "timeout_seconds": 60.0}})
    try:
        async with served_app(config, monkeypatch) as (app, runner, port):
            base = f"http://127.0.0.1:{port}"
            login, doc = await _login_and_doc(app, base)
            async with aiohttp.ClientSession() as http:
                asking = asyncio.ensure_future(http.post(
                    f"{base}/documents/{doc}/chat", json={"message": "hi"},
                    headers={"Authorization": f"Bearer {login['access_token']}",
                             "X-Request-ID": "client-gone"}, raise_for_status=False))
                await asyncio.wait_for(stub.arrived.wait(), 10)
                asking.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asking
            # The session closed: the client's connection is gone.
            await asyncio.wait_for(runner.cleanup(), 20)
    finally:
        await stub.stop()
    chats = [e for e in _events(config, login["session_id"])
             if e["request_id"] == "client-gone"]
    assert [(e["action"], e["outcome"], e["details"]["reason"]) for e in chats] == [
        ("ai.interaction", "failure", "cancelled")]


async def test_a_key_given_twice_is_refused_and_recorded(make_api: MakeApi) -> None:
    """``{"title": "a", "title": "b"}``: the last value was applied (and
    recorded so), where another reader in front of the server (a proxy, a
    filter, a log) may take the first. An object with a key twice, at any
    depth, is refused with 400 ``invalid_request`` and recorded like any
    refused body; nothing is done."""
    api = await make_api()
    alice = await api.user("alice")
    doc = await api.create_doc(alice, title="kept")
    cases = [
        ("POST", "/documents", b'{"title": "a", "title": "b", "content": "c"}',
         "document.create"),
        ("PUT", f"/documents/{doc['id']}", b'{"title": "x", "version": 9, "version": 1}',
         "document.update"),
        ("POST", f"/documents/{doc['id']}/chat", b'{"message": "a", "message": "b"}',
         "ai.interaction"),
        ("POST", "/audit/events", b'{"action": "client.a", "action": "client.b"}',
         "client.rejected"),
        ("POST", "/audit/events", b'[{"action": "client.a", "details": {"k": 1, "\\u006b": 2}}]',
         "client.rejected"),
        ("POST", "/logout", b'{"session_id": "x", "session_id": "%s"}'
         % alice.session_id.encode(), "session.end"),
    ]
    for i, (method, path, body, action) in enumerate(cases):
        resp = await api.client.request(method, path, data=body, headers={
            **alice.headers, "Content-Type": "application/json", "X-Request-ID": f"twice-{i}"})
        answer = await resp.json()
        assert (resp.status, answer["error"]["code"]) == (400, "invalid_request"), (path, answer)
        (ev,) = [e for e in await api.events(alice.session_id)
                 if e["request_id"] == f"twice-{i}"]
        assert (ev["action"], ev["outcome"], ev["details"]["reason"]) == (
            action, "failure", "invalid_request"), ev
    assert api.documents_in_db() == [(doc["id"], "kept", doc["content"], "alice", 1)]
    assert api.engine.session(alice.session_id) is not None  # not logged out


async def test_a_login_field_given_twice_is_refused(make_api: MakeApi) -> None:
    """RFC 6749, 3.1: the token endpoint's parameters "MUST NOT be included
    more than once". A second username (JSON, form or multipart) was taken
    over the first: alice was logged in by a request whose first username
    was somebody else's."""
    api = await make_api()
    await api.add_user("alice")
    form = aiohttp.FormData()
    for k, v in (("username", "mallory"), ("username", "alice"), ("password", USER_PASSWORD)):
        form.add_field(k, v)
    multipart = form()
    bodies: list[tuple[Any, dict[str, str]]] = [
        (json.dumps({"username": "mallory", "password": USER_PASSWORD})
         .replace('"password"', '"username": "alice", "password"').encode(),
         {"Content-Type": "application/json"}),
        (f"username=mallory&username=alice&password={USER_PASSWORD}".encode(),
         {"Content-Type": "application/x-www-form-urlencoded"}),
        (f"username=alice&password=wrong-one&password={USER_PASSWORD}".encode(),
         {"Content-Type": "application/x-www-form-urlencoded"}),
    ]
    for body, headers in bodies:
        resp = await api.client.post("/token", data=body, headers=headers)
        answer = await resp.json()
        assert (resp.status, answer["error"]["code"]) == (400, "invalid_request"), (body, answer)
    resp = await api.client.post("/token", data=multipart)
    answer = await resp.json()
    assert (resp.status, answer["error"]["code"]) == (400, "invalid_request"), answer
    assert "more than once" in answer["error"]["message"]
    await api.login("alice")  # given once, the same fields log in
    # A field the login does not read is ignored, however often it comes.
    resp = await api.client.post(
        "/token", data=f"scope=a&scope=b&username=alice&password={USER_PASSWORD}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 200, await resp.text()

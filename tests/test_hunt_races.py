"""Races with the end of a request's session, and with the server's shutdown
(found by a hunt for races and clock steps). Real app factory, real SQLite
files, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from api_fixtures import (
    USER_PASSWORD,
    Api,
    MakeApi,
    api_config,
    expect_error,
    make_api,
    served_app,
)

from audit.events import Source
from handlers.keys import ACCOUNTS, ENGINE, TOKENS

__all__ = ["make_api"]


async def _answer_at_shutdown(runner: web.AppRunner, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> bytes:
    """Shut the server down while a request's body is still awaited: what
    the client then gets, to the end of the connection."""
    stopping = asyncio.ensure_future(runner.cleanup())
    answer = await asyncio.wait_for(reader.read(), 10)
    await asyncio.wait_for(stopping, 20)
    writer.close()
    return answer


async def test_a_body_cut_off_by_the_shutdown_is_answered_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while a logged-in client is still sending a request body: once
    the shutdown's wait for requests in flight is over, aiohttp ends the
    body's stream with CancelledError. That went through every handler
    uncaught: the client got no answer (the connection just closed) and the
    attempt was not recorded, unlike a body cut off by the client. Now it
    is refused (400, the connection closed after) and recorded as a failure."""
    config = api_config(tmp_path)
    async with served_app(config, monkeypatch) as (app, runner, port):
        base = f"http://127.0.0.1:{port}"
        await app[ACCOUNTS].create("alice", USER_PASSWORD, "user")
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/token", json={"username": "alice",
                                                        "password": USER_PASSWORD}) as r:
                assert r.status == 200
                login = await r.json()
            auth = {"Authorization": f"Bearer {login['access_token']}"}
            async with http.post(base + "/documents", headers=auth,
                                 json={"title": "t", "content": "c"}) as r:
                assert r.status == 201
                doc = (await r.json())["id"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"content": "x" * 1000}).encode()
        writer.write(
            f"PUT /documents/{doc} HTTP/1.1\r\nHost: t\r\nX-Request-ID: cut-off\r\n"
            f"Authorization: Bearer {login['access_token']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode())
        await writer.drain()
        # The 100 Continue: the request is in the server's hands, its body awaited.
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 100")
        await asyncio.wait_for(reader.readline(), 10)
        writer.write(body[:100])  # ... and never the rest
        await writer.drain()
        answer = await _answer_at_shutdown(runner, reader, writer)
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert json.loads(text)["error"]["code"] == "invalid_request"
    with contextlib.closing(sqlite3.connect(config.spool_path)) as spool:
        events = [json.loads(j) for (j,) in spool.execute(
            "SELECT json FROM events WHERE session_id = ? ORDER BY seq",
            (login["session_id"],))]
    (ev,) = [e for e in events if e["request_id"] == "cut-off"]
    assert (ev["action"], ev["outcome"]) == ("document.update", "failure"), ev
    assert ev["details"]["reason"] == "invalid_request"
    with contextlib.closing(sqlite3.connect(config.spool_path)) as spool:
        (version,) = spool.execute("SELECT version FROM documents WHERE id = ?",
                                   (doc,)).fetchone()
    assert version == 1  # nothing was done


async def test_a_multipart_login_cut_off_by_the_shutdown_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multipart login body cut off by the graceful shutdown: aiohttp ends
    its stream with CancelledError, which went through ``request.post()``
    uncaught (only ``read_body`` caught it): no answer, the connection just
    closed. It is 400 ``invalid_request`` like a JSON or form body's."""
    async with served_app(api_config(tmp_path), monkeypatch) as (_, runner, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /token HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 1000\r\n"
            b"Expect: 100-continue\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 100")
        await asyncio.wait_for(reader.readline(), 10)
        writer.write(b"--XyZ\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nal")
        await writer.drain()
        answer = await _answer_at_shutdown(runner, reader, writer)
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert json.loads(text)["error"]["code"] == "invalid_request"


async def test_a_token_of_an_ended_session_after_the_clock_stepped_back_is_session_ended(
    make_api: MakeApi,
) -> None:
    """The clock ran ten minutes ahead when alice logged in, then NTP stepped
    it back (her token's iat is now in the future, which the server accepts
    for her open session). She logs out; her client tries the old token once
    more. API.md: after logout any request with it gets 401 session_ended.
    It got 401 invalid_token, recorded as auth.invalid_token (reason
    not_yet_valid) rather than auth.session_ended: the trail called a replay
    of an ended session's token a malformed one. The same for a session the
    reaper ended."""
    offset = [600.0]

    def ahead() -> float:
        return time.time() + offset[0]

    def setup(app: web.Application) -> None:
        engine = app[ENGINE]
        engine.clock = engine.spool.clock = app[TOKENS].clock = ahead

    api: Api = await make_api(setup=setup)
    alice = await api.user("alice")
    bob = await api.user("bob")
    offset[0] = 0.0  # NTP steps the clock back
    assert (await api.client.post("/logout", headers=alice.headers)).status == 200
    await expect_error(await api.client.get("/me", headers=alice.headers), 401,
                       "session_ended")
    # Ended by the reaper (as after an idle timeout) rather than by a logout.
    await api.engine.end_session(bob.session_id, Source(user="bob", role="user"),
                                 "idle_timeout")
    await expect_error(await api.client.get("/me", headers=bob.headers), 401,
                       "session_ended")
    assert await api.security("auth.invalid_token") == []
    ended = await api.wait_security("auth.session_ended", 2)
    assert {(e["session_id"], e["actor"]["user"]) for e in ended} == {
        (alice.session_id, "alice"), (bob.session_id, "bob")}

"""Regressions of a hunt at the HTTP edge of a real server process, with raw
sockets (a client library would hide what goes over the wire).

- ``Expect: 100-continue``: the ``100 Continue`` went out before any check
  (authentication, the route's body limit), so a client with no token, or
  announcing a body of 100 MB, was told to send it all before it got its
  401 or 413. Now the ``100 Continue`` goes out when the route first reads
  the body; an answer given without reading it comes at once, with
  ``Connection: close`` (the client may never send the body, so the
  connection cannot carry another request). The attempt is recorded as
  before. Requests no route matches (404, 405) had aiohttp's own handler
  still: a ``100 Continue`` before the 404, and another expectation
  answered with a plain-text 417 that quoted the header back.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from live_server import ADMIN_PASSWORD, Live
from waiting import wait_for

PASSWORD = "alice-password-for-tests"


async def _login(http: aiohttp.ClientSession, live: Live, user: str, password: str) -> Any:
    async with http.post(live.base + "/token",
                         json={"username": user, "password": password}) as r:
        assert r.status == 200
        return await r.json()


async def _first_answer(port: int, head: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Send ``head`` (a request's headers, no body) and read the first
    answer: its status line, headers and body (by Content-Length)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        headers: dict[str, str] = {}
        while (line := await asyncio.wait_for(reader.readline(), 5)) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(
            reader.readexactly(int(headers.get("content-length", "0"))), 5)
    finally:
        writer.close()
    return status, headers, body


async def test_expect_100_continue_gets_the_final_answer_at_once_when_refused(
    live: Live,
) -> None:
    await live.start()
    await live.adduser("alice", PASSWORD)
    async with aiohttp.ClientSession() as http:
        alice = await _login(http, live, "alice", PASSWORD)
        auth = f"Authorization: Bearer {alice['access_token']}\r\n"
        async with http.post(live.base + "/documents", json={"title": "t", "content": "c"},
                             headers={"Authorization": f"Bearer {alice['access_token']}"}) as r:
            doc = (await r.json())["id"]
        cases = [
            # (request line, extra headers, Content-Length, status, code, action)
            ("POST /documents", "", 100, 401, "missing_token", None),
            ("POST /documents", "Authorization: Bearer junk\r\n", 100, 401, "invalid_token",
             None),
            ("POST /token", "", 100_000_000, 413, "too_large", None),
            ("POST /documents", auth, 100_000_000, 413, "too_large", "document.create"),
            (f"PUT /documents/{doc}", auth, 9 * 2**20, 413, "too_large", "document.update"),
            (f"POST /documents/{doc}/chat", auth, 2**20, 413, "too_large", "ai.interaction"),
            ("POST /audit/events", auth, 100_000_000, 413, "too_large", "client.rejected"),
            ("POST /nowhere", auth, 100_000_000, 404, "not_found", None),
        ]
        sent: list[tuple[str, str]] = []
        for n, (line, extra, length, status, code, action) in enumerate(cases):
            rid = f"expect-{n}"
            head = (f"{line} HTTP/1.1\r\nHost: x\r\nX-Request-ID: {rid}\r\n{extra}"
                    f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
                    "Expect: 100-continue\r\n\r\n").encode()
            got, headers, body = await _first_answer(live.port, head)
            assert got.startswith(f"HTTP/1.1 {status} ".encode()), (line, got)
            assert json.loads(body)["error"]["code"] == code, (line, body)
            # The client may not send the body: the connection carries nothing more.
            assert headers.get("connection", "").lower() == "close", (line, headers)
            if action is not None:
                sent.append((rid, action))
        # Another expectation on a path no route has: the API's 404, not
        # aiohttp's plain-text 417 quoting the header back.
        got, headers, body = await _first_answer(
            live.port, b"POST /nowhere HTTP/1.1\r\nHost: x\r\nExpect: <b>x</b>\r\n"
                       b"Content-Length: 0\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 404 "), (got, body)
        assert json.loads(body)["error"]["code"] == "not_found" and "x-request-id" in headers
        # A body that may be read still gets its 100 Continue, then its answer.
        body = json.dumps({"title": "go on", "content": "c"}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        try:
            writer.write(f"POST /documents HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         "Expect: 100-continue\r\n\r\n".encode())
            await writer.drain()
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 100 ")
            writer.write(body)
            raw = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert raw.startswith(b"\r\nHTTP/1.1 201 "), raw[:200]
        # Every refused attempt of alice's is recorded, with its reason.
        admin = await _login(http, live, "admin", ADMIN_PASSWORD)
        url = f"{live.base}/audit/sessions/{alice['session_id']}"
        events: dict[str, Any] = {}

        async def recorded() -> bool:
            async with http.get(url, headers={
                    "Authorization": f"Bearer {admin['access_token']}"}) as r:
                events.update({e["request_id"]: e for e in (await r.json())["events"]})
            return all(rid in events for rid, _ in sent)

        await wait_for(recorded, timeout=10, message="the refused attempts recorded")
        for rid, action in sent:
            e = events[rid]
            assert (e["action"], e["outcome"], e["details"]["reason"]) == (
                action, "failure", "too_large"), e
    log = live.log_tail(100_000)
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]

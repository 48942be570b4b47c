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
- Connections that send nothing: aiohttp closes each 75 s after it came
  (its keep-alive timeout), and at the descriptor limit libuv closes new
  connections at once (no spin). Under a low soft limit with a higher hard
  one (1024 and 524288 are common), a few hundred such connections locked
  every other client out; ``serve`` now raises the soft limit to the hard one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
from pathlib import Path
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


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _nofile(pid: int) -> list[str]:
    """The process's soft and hard limits on open descriptors."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
    return line.split()[3:5]


async def _healthz(live: Live) -> int | str:
    try:
        async with aiohttp.ClientSession() as http, http.get(
                live.base + "/healthz", timeout=aiohttp.ClientTimeout(total=3)) as r:
            return r.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return type(exc).__name__


async def _hold_idle(live: Live, n: int) -> list[socket.socket]:
    """``n`` connections to the server that send nothing (as many as it takes)."""
    held: list[socket.socket] = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        held.append(s)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", live.port))
    await asyncio.sleep(0.5)  # (accepted, or refused, by now)
    return held


SOFT, HARD = 128, 2048


async def test_idle_connections_past_the_soft_descriptor_limit_do_not_lock_others_out(
    tmp_path: Path,
) -> None:
    """A server started under a low soft descriptor limit (1024 is the usual
    default) and a higher hard one: a few hundred connections that send
    nothing (each kept 75 s, aiohttp's keep-alive timeout, then made anew)
    took every descriptor, and every other client's connection was closed
    at once, for as long as they were held. ``serve`` raises the soft limit
    to the hard one at start."""
    live = Live(tmp_path)
    live.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))
    held: list[socket.socket] = []
    try:
        await live.start()
        assert live.proc is not None
        held = await _hold_idle(live, 3 * SOFT)
        assert await _healthz(live) == 200
        assert _nofile(live.proc.pid) == [str(HARD), str(HARD)]
    finally:
        for s in held:
            s.close()
        live.close()


async def test_at_the_descriptor_limit_new_connections_are_refused_without_a_spin(
    tmp_path: Path,
) -> None:
    """At the hard limit (nothing left to raise), connections past it are
    accepted and closed at once by libuv (its spare-descriptor trick): no
    busy loop, no error in the log, and once descriptors are free again
    the server serves."""
    live = Live(tmp_path)
    live.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, SOFT))
    held: list[socket.socket] = []
    try:
        await live.start()
        assert live.proc is not None
        held = await _hold_idle(live, 2 * SOFT)
        before = _cpu_seconds(live.proc.pid)
        for _ in range(10):  # refused, not queued for ever
            assert await _healthz(live) != 200
            await asyncio.sleep(0.1)
        assert _cpu_seconds(live.proc.pid) - before < 0.5  # (a spin is ≈ 1.5 s here)
        for s in held:
            s.close()
        held.clear()

        async def served() -> bool:
            return await _healthz(live) == 200

        await wait_for(served, timeout=5, message="served again")
        assert await live.stop() == 0
    finally:
        for s in held:
            s.close()
        live.close()
    log = live.log_tail(100_000)
    assert "Traceback" not in log and '"level": "error"' not in log, log[-3000:]

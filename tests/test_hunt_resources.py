"""Regressions of a hunt for resource exhaustion and slow or hostile clients.

- A request whose body stalls (the headers sent, then nothing, or a byte now
  and then): aiohttp bounds only the wait for headers (its keep-alive
  timeout); the handler read the body for ever, holding the connection and
  what it had read, anonymously on ``POST /token``. Now the body must have
  arrived within ``handlers.requests.BODY_SECONDS``: 400 ``invalid_request``,
  recorded like any unreadable body, and the connection closes.
- Out of file descriptors (a server under a low ``ulimit -n`` that many
  connections filled up): updating or deleting a large document (SQLite
  spills its statement journal to a temporary file) and the first document
  listing (its connection is opened on first use) failed alone, as 500
  ``internal_error`` with a traceback in the log. Now they are the 503
  ``audit_unavailable`` of a spool that cannot write: nothing done, nothing
  recorded; once descriptors are free again, they work. ``GET /openapi.yaml``
  read its file at each request: a 500 with a traceback; it is read once, at
  start.
- A client that never reads its answers: aiohttp waits for ever to send
  them, holding the connection and the answers' bytes in memory (200
  connections asking for a 1 MiB document 4 times each: 49 MB of RSS to
  786 MB, for good). Now an answer must be sent within
  ``server.SEND_SECONDS`` of being made, else the connection is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from api_fixtures import Api, Login, api, assert_clean, make_api
from live_server import ADMIN_PASSWORD, free_port, live_with_nofile
from waiting import wait_for

import server
from handlers import requests

__all__ = ["api", "make_api"]


async def _stalled(api: Api, head: bytes, body_start: bytes) -> tuple[int, dict[str, object]]:
    """Send ``head`` and the start of a body, then nothing: the answer, read
    to the end of the connection (the server must close it)."""
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head + b"\r\n" + body_start)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_text, _, text = raw.decode("latin-1").partition("\r\n\r\n")
    assert_clean(text)
    return int(head_text.split()[1]), json.loads(text)


async def test_a_stalled_body_is_refused_recorded_and_its_connection_closed(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline, short for the test; the client then sends nothing more.
    monkeypatch.setattr(requests, "BODY_SECONDS", 0.5)
    alice = await api.user("alice")
    doc = await api.create_doc(alice)
    status, body = await _stalled(
        api, f"PUT /documents/{doc['id']} HTTP/1.1\r\nHost: x\r\nX-Request-ID: stalled-put\r\n"
             f"Authorization: Bearer {alice.token}\r\nContent-Type: application/json\r\n"
             "Content-Length: 100\r\n".encode(), b'{"title": "st')
    assert status == 400 and body["error"]["code"] == "invalid_request", body  # type: ignore[index]
    (ev,) = [e for e in await api.events(alice.session_id) if e["request_id"] == "stalled-put"]
    assert (ev["action"], ev["outcome"]) == ("document.update", "failure")
    assert ev["details"]["reason"] == "invalid_request"
    # Anonymous: a login body, and a multipart one (aiohttp reads that itself).
    for ctype, start in (("application/json", b'{"username": "al'),
                         ("multipart/form-data; boundary=XyZ", b"--XyZ\r\n")):
        status, body = await _stalled(
            api, b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype.encode()
                 + b"\r\nContent-Length: 1000\r\n", start)
        assert status == 400 and body["error"]["code"] == "invalid_request", body  # type: ignore[index]
    # The server still answers, and the document is as it was.
    resp = await api.client.get(f"/documents/{doc['id']}", headers=alice.headers)
    assert resp.status == 200 and (await resp.json())["version"] == 1


async def test_a_body_trickled_a_byte_at_a_time_is_refused_while_it_trickles(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte now and then (far below MIN_BYTES_PER_SECOND) buys almost no
    time: the time since the last byte counts against the deadline. Had each
    byte reset it, a client sending one every 50 ms would hold its connection
    for as long as it liked; here it is refused long before its 200 bytes
    (10 s of trickle) are out."""
    monkeypatch.setattr(requests, "BODY_SECONDS", 0.3)
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    raw = bytearray()

    async def read_answer() -> None:
        # Chunk by chunk, what came before a reset kept: the server closes
        # once it has answered, and a byte of the trickle that crosses its
        # close is answered with a reset, which StreamReader.read() to the
        # end raises in place of the answer it already holds (1 run in 5).
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                raw.extend(chunk)

    answer = asyncio.ensure_future(read_answer())
    try:
        writer.write(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        sent = 0
        while not answer.done() and not raw and sent < 200:
            writer.write(b" ")
            sent += 1
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.wait([answer], timeout=0.05)
        assert raw or answer.done(), "a trickle of 200 bytes, one every 50 ms, was not refused"
        await asyncio.wait_for(answer, 10)  # the rest of the answer, to the close
    finally:
        answer.cancel()
        writer.close()
    head, _, text = raw.decode("latin-1").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400"), bytes(raw[:300])
    assert json.loads(text)["error"]["code"] == "invalid_request"


NOFILE = 64  # the server's descriptor limit: about 30 are in use once it serves


async def use_up_descriptors(live: Any, held: list[socket.socket]) -> None:
    """Connections the server accepts (kept in ``held``) until it has no
    descriptor left."""
    fds = f"/proc/{live.proc.pid}/fd"

    def exhausted() -> bool:
        if len(os.listdir(fds)) >= NOFILE:
            return True
        held.append(socket.create_connection(("127.0.0.1", live.port)))
        return False

    await wait_for(exhausted, message="the server's descriptors used up")


async def test_out_of_descriptors_document_changes_are_503_not_500(tmp_path: Path) -> None:
    async with live_with_nofile(tmp_path, NOFILE, NOFILE) as (live, held):
        assert live.proc is not None
        # One connection, opened before the descriptors run out, kept alive.
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(live.base, connector=conn) as http:
            async with http.post("/token", json={"username": "admin",
                                                 "password": ADMIN_PASSWORD}) as r:
                headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            headers["Content-Type"] = "application/json"

            def big(body: dict[str, str]) -> io.BytesIO:  # (aiohttp warns of large bytes)
                return io.BytesIO(json.dumps(body).encode())

            async with http.post("/documents", data=big({"title": "big", "content": "x" * 2**20}),
                                 headers=headers) as r:
                assert r.status == 201
                doc = (await r.json())["id"]

            await use_up_descriptors(live, held)
            for method, body in (("PUT", big({"content": "y" * 2**20})), ("DELETE", None),
                                 ("GET", None)):
                path = f"/documents/{doc}" if method != "GET" else "/documents"
                async with http.request(method, path, data=body, headers=headers) as r:
                    answer = await r.json()
                    assert r.status == 503, (method, answer)
                    assert answer["error"]["code"] == "audit_unavailable"
            # What needs no descriptor is served: the OpenAPI document (read
            # at each request, it was a 500 with a traceback).
            async with http.get("/openapi.yaml") as r:
                assert r.status == 200 and (await r.read()).startswith(b"openapi:")
            for s in held:
                s.close()
            held.clear()
            # Descriptors free again: the same requests work.
            async with http.get("/documents", headers=headers) as r:
                assert r.status == 200
                assert [d["version"] for d in (await r.json())["documents"]] == [1]
            async with http.put(f"/documents/{doc}", json={"content": "z"},
                                headers=headers) as r:
                assert r.status == 200 and (await r.json())["version"] == 2
        assert "Traceback" not in live.log_tail(100_000)


async def test_events_acknowledged_in_a_descriptor_flood_reach_the_http_sink_once(
    tmp_path: Path,
) -> None:
    """While connections hold every descriptor, the flusher cannot connect
    to the http sink (nothing was sent before, so no kept-alive connection
    to reuse): the session's part waits in the spool. Once they are gone, the
    sink's connection is made anew and the part, with every event answered
    during the flood, is stored once; /readyz answers a new connection."""
    rport = free_port()
    settings = {"flush": {"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.5},
                "sink": {"type": "http", "http": {"url": f"http://127.0.0.1:{rport}"}}}
    async with live_with_nofile(tmp_path, NOFILE, NOFILE, settings, rport) as (live, held):
        assert live.proc is not None
        conn = aiohttp.TCPConnector(limit=1)  # one connection, kept alive through the flood
        async with aiohttp.ClientSession(live.base, connector=conn) as http:
            session_id, headers = await live.admin_login(http)
            async with http.post("/documents", json={"title": "t", "content": "c"},
                                 headers=headers) as r:
                assert r.status == 201
                doc = (await r.json())["id"]

            await use_up_descriptors(live, held)
            answered = [f"in-flood-{i}" for i in range(3)]
            for rid in answered:
                async with http.get(f"/documents/{doc}",
                                    headers={**headers, "X-Request-ID": rid}) as r:
                    assert r.status == 200
            async with http.post("/logout", headers={**headers, "X-Request-ID": "in-flood-end"}
                                 ) as r:
                assert r.status == 200
            answered.append("in-flood-end")
            _, headers = await live.admin_login(http)

            async def status() -> dict[str, Any]:
                async with http.get("/audit/status", headers=headers) as r:
                    assert r.status == 200
                    body: dict[str, Any] = await r.json()
                    return body

            async def sink_failed() -> bool:
                st = await status()
                return st["sink"]["writes_failed"] > 0 and st["pending_parts"] == 1

            await wait_for(sink_failed, message="a sink write failing in the flood")
            for s in held:
                s.close()
            held.clear()

            async def all_sent() -> bool:
                st = await status()
                return st["pending_parts"] == 0 and st["sink"]["healthy"]

            await wait_for(all_sent, message="the part sent once the flood is gone")
        async with aiohttp.ClientSession(live.base) as fresh, fresh.get("/readyz") as r:
            assert r.status == 200
        await live.stop_receiver()
        with contextlib.closing(sqlite3.connect(tmp_path / "receiver.db")) as db:
            rows = db.execute("SELECT doc FROM parts WHERE id = ?",
                              (f"{session_id}:0",)).fetchall()
        assert len(rows) == 1
        events = json.loads(rows[0][0])["events"]
        rids = [e["request_id"] for e in events]
        assert all(rids.count(rid) == 1 for rid in answered), rids
        assert rids[-1] == "in-flood-end" and len(set(e["seq"] for e in events)) == len(events)
    assert "Traceback" not in live.log_tail(100_000)


async def _big_document(api: Api, user: Login) -> dict[str, Any]:
    """A document of 1 MiB of content, created by ``user``."""
    resp = await api.client.post(  # (aiohttp warns of large bytes: a file object)
        "/documents", data=io.BytesIO(json.dumps({"title": "big", "content": "x" * 2**20})
                                      .encode()),
        headers={**user.headers, "Content-Type": "application/json"})
    assert resp.status == 201
    doc: dict[str, Any] = await resp.json()
    return doc


async def test_a_client_that_never_reads_its_answers_is_dropped(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server, "SEND_SECONDS", 0.5)
    # (A second more for every MiB/s: nothing, here.)
    monkeypatch.setattr(requests, "MIN_BYTES_PER_SECOND", 2**30)
    alice = await api.user("alice")
    doc = await _big_document(api, alice)
    runner = api.client.server.runner
    assert runner is not None and runner.server is not None
    web_server = runner.server

    def connections() -> int:
        return len(web_server.connections)

    before = connections()
    host, port = api.client.server.host, api.client.server.port
    sock = socket.create_connection((host, port))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # 16 MiB of answers asked for: more than the kernel's buffers take.
        sock.sendall(f"GET /documents/{doc['id']} HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {alice.token}\r\n\r\n".encode() * 16)
        await wait_for(lambda: connections() > before, message="the connection")
        # Nothing is read: the server must let the connection go by itself.
        await wait_for(lambda: connections() == before, message="the connection dropped")
    finally:
        sock.close()
    accesses = [e for e in await api.events(alice.session_id) if e["action"] == "document.access"]
    assert accesses and all(e["outcome"] == "success" for e in accesses)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    # Other clients are served as before.
    resp = await api.client.get(f"/documents/{doc['id']}", headers=alice.headers)
    assert resp.status == 200 and (await resp.json())["version"] == 1


async def test_a_large_body_over_a_slow_link_is_given_its_time(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body's deadline grows with what comes: a fixed one refused a
    large body over a slow (but steady) link, which no retry could pass."""
    monkeypatch.setattr(requests, "BODY_SECONDS", 0.3)
    monkeypatch.setattr(requests, "MIN_BYTES_PER_SECOND", 64 * 1024)
    alice = await api.user("alice")
    doc = await api.create_doc(alice)
    body = json.dumps({"content": "y" * 256 * 1024}).encode()
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(f"PUT /documents/{doc['id']} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     f"Authorization: Bearer {alice.token}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        # 16 KiB every 50 ms (≈ 320 KiB/s, above the 64 KiB/s asked for), for
        # ≈ 0.8 s in all: past the first 0.3 s, which alone refused it.
        for i in range(0, len(body), 16 * 1024):
            writer.write(body[i:i + 16 * 1024])
            await writer.drain()
            await asyncio.sleep(0.05)
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, text = raw.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), raw[:300]
    assert json.loads(text)["version"] == 2


async def test_a_large_answer_to_a_slow_reader_is_given_its_time(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer's deadline grows with its size: a fixed one dropped a
    client taking large answers over a slow (but steady) link."""
    monkeypatch.setattr(server, "SEND_SECONDS", 0.2)
    monkeypatch.setattr(requests, "MIN_BYTES_PER_SECOND", 256 * 1024)
    alice = await api.user("alice")
    doc = await _big_document(api, alice)
    host, port = api.client.server.host, api.client.server.port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    asks = 4
    try:
        await loop.sock_sendall(sock, f"GET /documents/{doc['id']} HTTP/1.1\r\nHost: x\r\n"
                                      f"Authorization: Bearer {alice.token}\r\n\r\n"
                                      .encode() * asks)
        # Read at ≈ 1.6 MiB/s: a 1 MiB answer takes ≈ 0.6 s, past the first
        # 0.2 s (which alone dropped the connection), well within 0.2 + 4 s.
        got = bytearray()
        while got.count(b"HTTP/1.1 200") < asks or not got.endswith(b"}"):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 32 * 1024), 30)
            assert chunk, f"dropped after {len(got)} bytes"
            got += chunk
            await asyncio.sleep(len(chunk) / (1.6 * 2**20))
    finally:
        sock.close()
    assert got.count(b'"content":"' + b"x" * 1000) == asks

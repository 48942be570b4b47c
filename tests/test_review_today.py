"""Regressions found reviewing the day's changes (send deadline, body deadline,
signals, verify)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

import pytest
from aiohttp import web
from api_fixtures import ADMIN_PASSWORD, api_config
from test_verify import _security_chain

import server
from audit.verify import verify_sink
from sinks.sqlite import SqliteSink


async def test_a_multipart_login_cut_off_by_the_shutdown_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multipart login body cut off by the graceful shutdown: aiohttp ends
    its stream with CancelledError, which went through ``request.post()``
    uncaught (only ``read_body`` caught it): no answer, the connection just
    closed. It is 400 ``invalid_request`` like a JSON or form body's."""
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, ADMIN_PASSWORD)
    app = server.create_app(api_config(tmp_path))
    runner = web.AppRunner(app, shutdown_timeout=0.3)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
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
        stopping = asyncio.ensure_future(runner.cleanup())
        answer = await asyncio.wait_for(reader.read(), 10)
        await asyncio.wait_for(stopping, 20)
        writer.close()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert json.loads(text)["error"]["code"] == "invalid_request"


async def test_a_security_event_with_a_lone_surrogate_does_not_end_the_check(
    tmp_path: Path, audit_key: bytes
) -> None:
    """A row anyone can write into the sqlite sink (JSON text: ``"\\ud800"``
    is valid JSON, read by Python's json as a lone surrogate) made the
    chain's HMAC raise UnicodeEncodeError, which since the body is encoded
    once outside the check (``_security_body``) ended the whole security
    check: every later event went unchecked, a removed one among them
    unreported. It is one break, and the rest is checked."""
    chain = _security_chain(audit_key, 10, "u")
    forged = {**chain[3], "_id": "forged", "event_id": "forged", "action": "\ud800",
              "hash": "ab" * 32}
    path = tmp_path / "s.db"
    sink = SqliteSink(path)
    await sink.open()
    try:
        # chain[7] is never sent: a removed event, after the forged one.
        await sink.write_security_events(chain[:4] + chain[8:])
        # ... and one whose hash holds a lone surrogate: the next event
        # tried against it as a chain's head raised the same way.
        bad_hash = {**chain[5], "_id": "bad-hash", "event_id": "bad-hash",
                    "hash": "cd" * 20 + "\ud800"}
        await sink.write_security_events([{**forged, "action": "x"},
                                          {**bad_hash, "hash": "cd" * 20}])
        with contextlib.closing(sqlite3.connect(path)) as c, c:
            for doc in (forged, bad_hash):
                c.execute("UPDATE security_events SET doc = ? WHERE id = ?",
                          (json.dumps(doc), doc["_id"]))
        report = await verify_sink(sink, audit_key)
    finally:
        await sink.close()
    chain_problems = [p.detail for p in report.problems if p.kind == "security_chain"]
    assert not any("cannot be read to the end" in d for d in chain_problems), chain_problems
    assert any(d.startswith("event forged ") for d in chain_problems), chain_problems
    assert any(d.startswith("event bad-hash ") for d in chain_problems), chain_problems
    assert any(d.startswith(f"event {chain[8]['_id']} ") for d in chain_problems), chain_problems

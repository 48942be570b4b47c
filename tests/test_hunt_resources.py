"""Regressions of a hunt for resource exhaustion and slow or hostile clients.

- A request whose body stalls (the headers sent, then nothing, or a byte now
  and then): aiohttp bounds only the wait for headers (its keep-alive
  timeout); the handler read the body for ever, holding the connection and
  what it had read, anonymously on ``POST /token``. Now the body must have
  arrived within ``handlers.requests.BODY_SECONDS``: 400 ``invalid_request``,
  recorded like any unreadable body, and the connection closes.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from api_fixtures import Api, api, assert_clean, make_api

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

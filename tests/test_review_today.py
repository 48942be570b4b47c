"""Regressions found reviewing the day's changes (send deadline, body deadline,
signals, verify)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
from aiohttp import web
from api_fixtures import ADMIN_PASSWORD, api_config

import server


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

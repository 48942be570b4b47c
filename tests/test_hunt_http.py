"""Regressions of a hunt through the HTTP protocol layer with raw sockets.

- A body that cannot be read (a gzip body that does not inflate, a chunked
  framing that breaks) on a request answered without reading it (a 401 for
  want of a token, any GET, ``/healthz``): aiohttp's read of what is left of
  it after the answer failed, logged as an ERROR "Unhandled exception" with
  a traceback. Anybody could write those into the log at will. Now it is
  a warning line, like a request aiohttp cannot parse, and as those one a
  minute per kind.
"""

from __future__ import annotations

import asyncio

import aiohttp
from live_server import Live


async def test_an_unread_body_that_does_not_decode_is_one_warning_line(live: Live) -> None:
    await live.start()
    for path in ("/healthz", "/documents", "/audit/events"):
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                         "Content-Length: 10\r\n\r\n".encode() + b"\x1f\x8bSeCrEtXYZ")
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)  # answered, then closed
        finally:
            writer.close()
        assert raw.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 405 ")), raw[:200]
    async with aiohttp.ClientSession() as http, http.get(live.base + "/healthz") as r:
        assert r.status == 200
    # (serve writes its log from a thread of its own: all of it is out once it stopped)
    assert await live.stop() == 0
    log = live.log_tail(100_000)
    assert "Traceback" not in log and '"level": "error"' not in log, log[-3000:]
    # Three of one kind: the first is said, the others within the minute not.
    assert log.count("malformed HTTP request body dropped after its answer") == 1, log[-3000:]
    assert "SeCrEt" not in log

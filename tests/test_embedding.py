"""The app factory beside other aiohttp applications in one process (an
embedder's, a test suite's): what ``create_app`` sets for the process must
not change how those answer."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


async def test_another_app_in_the_process_still_sends_its_100_continue(make_config: Any) -> None:
    """``create_app`` makes its expect handler aiohttp's default for the
    process (for its own 404 and 405). A route of any other application
    made after it got that handler too, which leaves the ``100 Continue`` to
    this server's routes: none went out, and the client, waiting for it
    before sending its body, waited until its own timeout."""
    import server

    server.create_app(make_config(auth={"bcrypt_rounds": 4}))  # (not started)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    other = web.Application()
    other.router.add_post("/echo", echo)
    runner = web.AppRunner(other)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                         b"Connection: close\r\nExpect: 100-continue\r\n\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)  # (none came: a timeout)
            assert line.startswith(b"HTTP/1.1 100 "), line
            writer.write(b"hello")
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        assert answer.startswith(b"\r\nHTTP/1.1 200 "), answer  # (the 100's blank line first)
        assert answer.endswith(b"\r\n\r\nhello"), answer
    finally:
        await runner.cleanup()

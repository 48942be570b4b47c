"""The test harness's own ports (live_server.free_port): a server's port is
the test's from its choice to the test's end, across restarts."""

from __future__ import annotations

import socket

import aiohttp
from live_server import ADMIN_PASSWORD, Live


def _squat(port: int) -> socket.socket | None:
    """Bind ``port`` and listen, as a socket elsewhere does that took the
    port while it looked free (another xdist worker's free_port() and then
    its server; a client's ephemeral port); None if the bind is refused."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        s.listen()
    except OSError:
        s.close()
        return None
    return s


async def _login(live: Live) -> int:
    async with aiohttp.ClientSession() as http, http.post(
            live.base + "/token", json={"username": "admin", "password": ADMIN_PASSWORD}) as r:
        return r.status


async def test_nothing_else_takes_the_port_before_a_start_or_a_restart(live: Live) -> None:
    """The port was chosen with bind(0) and closed: free for anyone until the
    server bound it, and again between a kill -9 and the restart. A socket
    that took it meanwhile made the start fail ("cannot listen on")."""
    squatters: list[socket.socket] = []
    try:
        if (s := _squat(live.port)) is not None:  # between the choice and the start
            squatters.append(s)
        await live.start()
        await live.kill()
        if (s := _squat(live.port)) is not None:  # between the kill and the restart
            squatters.append(s)
        await live.start()
        assert await _login(live) == 200
    finally:
        for s in squatters:
            s.close()


"""The sink's token bucket outlives the process (real server subprocess,
kill -9, a real HTTP receiver on loopback): a server in a crash loop does not
send a whole ``flush.burst`` to a sink billed per request at every start."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from live_server import Live, free_port
from receiver import Receiver, serve
from waiting import wait_for

pytestmark = pytest.mark.timeout(180)

RATE, BURST = 1.0, 4
# Some leeway for the way from the server to the receiver (a write sent on
# time may arrive late, the next one not): far below one write at RATE.
JITTER = 0.5


class TimedReceiver(Receiver):
    """A receiver that notes when each write arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    async def _guard(self, request: web.Request) -> tuple[Any, Any] | web.Response:
        self.times.append(time.monotonic())
        return await super()._guard(request)


def over_budget(times: list[float]) -> list[tuple[int, float]]:
    """The windows (number of writes, seconds) holding more writes than a
    token bucket of RATE and BURST allows."""
    out = []
    for i in range(len(times)):
        for j in range(i, len(times)):
            n, span = j - i + 1, times[j] - times[i]
            if n > BURST + RATE * (span + JITTER):
                out.append((n, round(span, 3)))
    return out


async def _sessions(live: Live, n: int) -> None:
    """``n`` logins and logouts of the admin: ``n`` parts to send."""
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            _, headers = await live.admin_login(http)
            async with http.post(live.base + "/logout", headers=headers) as r:
                assert r.status == 200


async def test_a_crash_loop_sends_no_more_than_the_token_bucket_allows(
        tmp_path: Path) -> None:
    receiver = TimedReceiver()
    runner, port = await serve(receiver, "127.0.0.1", free_port())
    live = Live(tmp_path, {
        "flush": {"max_writes_per_second": RATE, "burst": BURST,
                  "backoff_base_seconds": 0.05, "backoff_max_seconds": 0.5},
        "sink": {"type": "http", "http": {"url": f"http://127.0.0.1:{port}"}}})
    try:
        await live.start()
        await _sessions(live, 20)
        for _ in range(4):  # killed as soon as each start has sent two writes
            seen = len(receiver.times)
            await wait_for(lambda seen=seen: len(receiver.times) >= seen + 2, 30,
                           "two writes of this start")
            await live.kill()
            await live.start()
        await wait_for(lambda: len(receiver.times) >= seen + 4, 30, "more writes")
        assert await live.stop() == 0
        # drain, after a graceful stop, goes on from where the server left.
        r = await live.cli("drain", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(receiver.parts) >= 20
        assert len(receiver.times) >= 14
        assert over_budget(receiver.times) == [], receiver.times
    finally:
        live.close()
        await runner.cleanup()
        receiver.close()

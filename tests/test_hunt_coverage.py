"""Coverage-guided hunt: paths the rest of the suite never reached."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from audit import queries
from audit.events import Draft, Source
from sinks.http import HttpSink


async def _receiver(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/sessions", handler)
    app.router.add_post("/security-events", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_close_with_a_write_hung_in_the_sink_is_bounded_and_loses_nothing(
    make_config, engines, wait_until
):
    """A shutdown while the flusher waits on a receiver that never answers
    (its timeout far off): close() returns within its flush window (the
    write is cut off), the part stays pending, and the next start sends it,
    once."""
    got: list[str] = []
    hung = asyncio.Event()
    answer = {"hang": True}

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if request.path == "/sessions":
            got.append(body["_id"])
            if answer["hang"]:
                hung.set()
                await asyncio.sleep(3600)
        return web.json_response({}, status=201)

    runner, url = await _receiver(handler)
    try:
        config = make_config(sink={"type": "http", "http": {"url": url,
                                                              "timeout_seconds": 600.0}})
        engine = await engines.open(config, HttpSink(config.sink.http), background=True)
        src = Source(user="alice", role="user")
        s = await engine.start_session("alice", "user", src, 3600)
        await engine.end_session(s.session_id, src)
        await asyncio.wait_for(hung.wait(), 10)

        engines._open.remove(engine)
        started = time.monotonic()
        await engine.close(flush_window=0.3)
        assert time.monotonic() - started < 3.0
        assert engine.spool._state == "closed"

        answer["hang"] = False
        again = await engines.open(config, HttpSink(config.sink.http))
        c = await again.spool.read(lambda conn: queries.counts(conn, 0))
        assert c["pending_parts"] == 1  # not marked stored: it did not land
        await engines.drain(again)
        c = await again.spool.read(lambda conn: queries.counts(conn, 0))
        assert c["pending_parts"] == 0
        assert got == [f"{s.session_id}:0", f"{s.session_id}:0"]  # cut off, then sent again
    finally:
        await runner.cleanup()


async def test_a_security_batch_with_one_poisonous_event_dead_letters_only_it(
    make_config, engines
):
    """A sink that raises an unclassified error (a bug) on one event of a
    security batch: after UNEXPECTED_LIMIT tries the batch is sent one event
    at a time, and only the culprit is dead-lettered; the others are stored."""
    from sinks.sqlite import SqliteSink

    config = make_config(flush={"backoff_base_seconds": 0.001, "backoff_max_seconds": 0.002,
                                "max_writes_per_second": 1000.0, "burst": 1000})

    class Picky(SqliteSink):
        async def write_security_events(self, events: list[dict[str, Any]]) -> None:
            if any(e["details"].get("poison") for e in events):
                raise KeyError("a sink bug")
            await super().write_security_events(events)

    engine = await engines.open(config, Picky(config.sqlite_sink_path))
    for n in range(3):
        await engine.record_security(
            Draft("access.denied", outcome="denied", source=Source(ip="192.0.2.1"),
                  details={"n": n, "poison": n == 1}), happened=True)
    await engines.drain(engine)
    c = await engine.spool.read(lambda conn: queries.counts(conn, 0))
    assert c["pending_security_events"] == 0
    dead = await engine.spool.read(lambda conn: conn.execute(
        "SELECT json FROM security_events WHERE state = 'dead'").fetchall())
    assert len(dead) == 1 and '"poison":true' in dead[0][0]
    stored, _ = await engine.sink.list_security_events(limit=10)
    assert sorted(e["details"]["n"] for e in stored) == [0, 2]

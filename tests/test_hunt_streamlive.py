"""GET /audit/sessions/{id} streamed (over 64 KiB, so chunked) while the
session moves under it: its parts stored and purged from the spool
(keep_stored_seconds = 0) between two parts of the answer, an open session
cutting new checkpoint parts meanwhile, a client that stops reading while
the flusher runs. The answer is whole JSON with every seq once, in order,
each event the bytes the spool or the sink holds, ``events_complete`` true.

The races are made certain, not likely: the flusher's writes are held
until the answer is at a chosen part (a gate on the detail's spool reads,
in front of the real spool), then let go and waited for."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from api_fixtures import ADMIN_PASSWORD, Api, Login, MakeApi, api_config, make_api, served_app
from waiting import wait_for

from audit import queries
from audit.engine import AuditEngine
from audit.events import Draft, Source
from audit.store import Writer
from handlers.keys import ENGINE

__all__ = ["make_api"]

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_SRC = Source("alice", "user", "127.0.0.1", "test", "req-live")


def _hold_the_flusher(engine: AuditEngine, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The sink's part writes wait for the event returned (the parts stay pending)."""
    go = asyncio.Event()
    real = engine.sink.write_part

    async def write_part(doc: dict[str, Any]) -> None:
        await go.wait()
        await real(doc)

    monkeypatch.setattr(engine.sink, "write_part", write_part)
    return go


class _Segments:
    """Counts the detail's spool reads of a part's events (the answer's
    progress) and holds the ``hold_at``-th until ``go`` is set."""

    def __init__(self, engine: AuditEngine, monkeypatch: pytest.MonkeyPatch,
                 hold_at: int) -> None:
        self.calls = 0
        self.reached, self.go = asyncio.Event(), asyncio.Event()
        real = engine.spool.read

        async def read(fn: Callable[..., Any]) -> Any:
            if isinstance(fn, functools.partial) and fn.func is queries.segment_events:
                self.calls += 1
                if self.calls == hold_at:
                    self.reached.set()
                    await self.go.wait()
            return await real(fn)

        monkeypatch.setattr(engine.spool, "read", read)


async def _session(engine: AuditEngine, events: int, pad: int, seal: bool) -> str:
    """A session of ``events`` events (with ``pad`` bytes of text each, and
    text JSON escapes), written as the server's requests write them."""
    s = await engine.spool.submit(lambda w: w.start_session(
        "alice", "user", 4102444800.0, [Draft("session.start", source=_SRC)]))
    sid: str = s.session_id
    await _grow(engine, sid, events - 1 - seal, pad)
    if seal:
        await engine.spool.submit(
            lambda w: w.seal(sid, "logout", Draft("session.end", source=_SRC)))
    return sid


async def _grow(engine: AuditEngine, sid: str, n: int, pad: int = 300) -> None:
    def job(w: Writer) -> None:
        for i in range(n):
            w.append(sid, Draft("document.access", source=_SRC,
                                target={"type": "document", "id": f"doc{i:06d}"},
                                details={"note": f"caf\u00e9 \"{i}\"\n\U0001f600" + "x" * pad,
                                         "x": i / 7}))

    await engine.spool.submit(job)


async def _held(engine: AuditEngine, sid: str) -> int:
    return int(await engine.spool.read(lambda c: c.execute(
        "SELECT COUNT(*) FROM events WHERE session_id = ?", (sid,)).fetchone()[0]))


def _purged(engine: AuditEngine, sid: str) -> Callable[[], Any]:
    async def purged() -> bool:
        return await _held(engine, sid) == 0

    return purged


async def _stored(engine: AuditEngine, sid: str) -> dict[int, str]:
    """Each event of ``sid`` by seq, as its text the spool holds (its copy
    wins, as in the answer) or else the sink's, encoded as the answer does."""
    found: dict[int, str] = {}
    for part in await engine.sink.get_session_parts(sid):
        for e in part["events"]:
            found[e["seq"]] = _encode(e)
    for seq, text in await engine.spool.read(lambda c: c.execute(
            "SELECT seq, json FROM events WHERE session_id = ?", (sid,)).fetchall()):
        found[seq] = text
    return found


def _check(body: bytes, stored: dict[int, str], event_count: int) -> dict[str, Any]:
    """Whole JSON; seqs 1..n once each, in order, n at least ``event_count``
    (the summary's, taken when the answer began: an open session's events
    cut into a part since come whole with it); the events' bytes those stored."""
    got = json.loads(body)
    seqs = [e["seq"] for e in got["events"]]
    assert seqs == list(range(1, len(seqs) + 1))
    assert got["event_count"] == event_count and len(seqs) >= event_count
    assert got["events_complete"] is True
    start = body.index(b'"events":[') + len(b'"events":[')
    end = body.rindex(b'],"events_complete":')
    assert body[start:end] == ",".join(stored[s] for s in seqs).encode()
    return got


async def _racing(make_api: MakeApi, monkeypatch: pytest.MonkeyPatch, sink: str
                  ) -> tuple[Api, Login, asyncio.Event]:
    """An app of 20-event parts, purged once stored, its flusher quick but
    held until the event returned is set; and its admin."""
    api: Api = await make_api(audit={"part_max_events": 20, "keep_stored_seconds": 0},
                              flush={"max_writes_per_second": 1000.0, "burst": 1000},
                              sink={"type": sink})
    admin = await api.admin()
    return api, admin, _hold_the_flusher(api.engine, monkeypatch)


@pytest.mark.parametrize("sink", ["sqlite", "jsonl"])
@pytest.mark.parametrize("hold_at", [3, 20, 0], ids=["before-headers", "mid-answer", "racing"])
async def test_parts_stored_and_purged_while_the_detail_streams(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch, sink: str, hold_at: int,
) -> None:
    """A sealed session of 40 parts (~300 KB), all pending when the answer
    begins; the flusher stores and purges every one of them while the answer
    is at its 3rd part (the first chunk not made yet), its 20th (headers and
    chunks out), or from its 3rd on without waiting (racing it)."""
    api, admin, flusher = await _racing(make_api, monkeypatch, sink)
    engine = api.engine
    sid = await _session(engine, 800, 300, seal=True)
    segments = _Segments(engine, monkeypatch, hold_at or 3)
    asking = asyncio.ensure_future(
        api.client.get(f"/audit/sessions/{sid}", headers=admin.headers))
    await asyncio.wait_for(segments.reached.wait(), 10)
    flusher.set()
    if hold_at:
        await wait_for(_purged(engine, sid), message="every part stored and purged")
    segments.go.set()
    r = await asyncio.wait_for(asking, 10)
    assert r.status == 200 and r.headers.get("Transfer-Encoding") == "chunked"
    body = await r.read()
    assert len(body) > 200_000
    await wait_for(_purged(engine, sid), message="every part stored and purged")
    got = _check(body, await _stored(engine, sid), 800)
    assert got["state"] == "pending" and segments.calls == 40  # all 40 pending at the plan


async def _parts_in_sink(engine: AuditEngine, sid: str) -> int:
    return len(await engine.sink.session_part_heads(sid))


@pytest.mark.parametrize("sink", ["sqlite", "jsonl"])
@pytest.mark.parametrize("flushed", [True, False], ids=["stored-purged", "pending"])
async def test_an_open_session_cuts_parts_while_the_detail_streams(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch, sink: str, flushed: bool,
) -> None:
    """An open session of 790 events (39 parts, 10 uncut), all pending at
    the answer's start; held at the uncut events (the last of the plan),
    the session grows by 105 events (part 39 cut from the 10 and 10 new,
    parts 40-43 more, 15 uncut) and, if ``flushed``, parts 0-43 are stored
    and purged. The answer has the 790 events; with the sink's part 39
    read in place of the purged uncut events, 800."""
    api, admin, flusher = await _racing(make_api, monkeypatch, sink)
    engine = api.engine
    sid = await _session(engine, 790, 300, seal=False)
    segments = _Segments(engine, monkeypatch, 40)
    asking = asyncio.ensure_future(
        api.client.get(f"/audit/sessions/{sid}", headers=admin.headers))
    await asyncio.wait_for(segments.reached.wait(), 10)
    await _grow(engine, sid, 105)
    if flushed:
        flusher.set()

        async def stored_purged() -> bool:
            return await _parts_in_sink(engine, sid) == 44 and await _held(engine, sid) == 15

        await wait_for(stored_purged, message="parts 0-43 stored and purged")
    segments.go.set()
    r = await asyncio.wait_for(asking, 10)
    assert r.status == 200 and r.headers.get("Transfer-Encoding") == "chunked"
    body = await r.read()
    got = _check(body, await _stored(engine, sid), 790)
    assert got["state"] == "open" and len(got["events"]) == (800 if flushed else 790)
    flusher.set()


def _dechunk(raw: bytes) -> bytes:
    """An HTTP/1.1 chunked body, whole (its last chunk there) or an error."""
    out = bytearray()
    at = 0
    while True:
        eol = raw.index(b"\r\n", at)
        size = int(raw[at:eol].split(b";")[0], 16)
        at = eol + 2
        if size == 0:
            assert raw[at:] == b"\r\n", "trailing bytes after the last chunk"
            return bytes(out)
        out += raw[at:at + size]
        assert raw[at + size:at + size + 2] == b"\r\n", "a chunk cut short"
        at += size + 2


@pytest.mark.parametrize("sink", ["sqlite", "jsonl"])
async def test_a_client_that_stops_reading_while_the_flusher_purges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sink: str,
) -> None:
    """A real socket whose client reads the headers and the first 64 KiB,
    then stops (a 4 KiB receive buffer): the server's writes wait for it,
    the answer at a part well before its end (its body ~6.5 MB, more than
    the kernel and the transport can buffer). Meanwhile the flusher
    stores and purges all 50 parts; then the client reads on, to the end."""
    config = api_config(tmp_path, audit={"part_max_events": 100, "keep_stored_seconds": 0},
                        sink={"type": sink})
    async with served_app(config, monkeypatch) as (app, _runner, port):
        engine: AuditEngine = app[ENGINE]
        async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{port}/token",
                json={"username": "admin", "password": ADMIN_PASSWORD}) as r:
            assert r.status == 200
            token = (await r.json())["access_token"]
        flusher = _hold_the_flusher(engine, monkeypatch)
        sid = await _session(engine, 5000, 1000, seal=True)
        segments = _Segments(engine, monkeypatch, 0)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        try:
            writer.write(f"GET /audit/sessions/{sid} HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"transfer-encoding: chunked" in head.lower()
            raw = bytearray(await asyncio.wait_for(reader.readexactly(65536), 10))
            flusher.set()
            await wait_for(_purged(engine, sid), message="every part stored and purged")
            paused_at = segments.calls
            raw += await asyncio.wait_for(reader.read(), 20)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert paused_at < 45, f"the answer was at part {paused_at} of 50: never held back"
        assert segments.calls == 50
        body = _dechunk(bytes(raw))
        assert len(body) > 6_000_000
        _check(body, await _stored(engine, sid), 5000)

"""GET /audit/sessions/{id} streamed: the same bytes as the answer built
whole, in memory for about one part, and an answer cut off, not passed off
as whole, when a part turns out unreadable after the headers went out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
import tracemalloc

import aiohttp
import pytest
from api_fixtures import Api, Login, MakeApi, make_api, wait_for
from test_hunt_streamlive import _dechunk

import server
from audit import queries
from audit.events import Draft, Source
from audit.store import Writer
from sinks.base import Doc, QueryNotSupported, SinkError, summarize_parts

__all__ = ["make_api"]


async def _old_answer(api: Api, sid: str) -> bytes:
    """The answer as the handler built it whole before it streamed (its code,
    less the error answers): the spool's summary and events, the sink's
    parts, merged by seq, the spool's copy winning; one json.dumps."""
    engine = api.engine
    spooled = await engine.spool.read(lambda c: queries.get_session(c, sid))
    parts: list[Doc] = []
    with contextlib.suppress(QueryNotSupported):
        parts = await engine.sink.get_session_parts(sid)
    assert spooled is not None or parts
    events: dict[int, Doc] = {}
    for part in parts:
        for e in part.get("events") or []:
            events[e["seq"]] = e
    if spooled is not None:
        for e in spooled.pop("events"):
            events[e["seq"]] = e
        summary = spooled
    else:
        summary = summarize_parts(parts)
    seqs = sorted(events)
    summary["events"] = [events[k] for k in seqs]
    summary["events_complete"] = (len(seqs) >= summary["event_count"]
                                  and seqs == list(range(1, len(seqs) + 1)))
    return json.dumps(summary, ensure_ascii=False, separators=(",", ":")).encode()


async def _client_events(api: Api, who: Login, n: int, pad: int = 0) -> None:
    """``n`` client events, with text JSON may escape (non-ASCII, quotes,
    control characters) and numbers of each kind (and ``pad`` bytes more),
    in batches."""
    for start in range(0, n, 100):
        batch = [{"action": f"client.e{i}", "target": {"type": "doc", "id": f"d{i}"},
                  "details": {"text": f"caf\u00e9 \u2603 \"{i}\"\n\t\U0001f600", "n": i,
                              "x": i / 7, "big": 2 ** 62, "exp": 1e300, "none": None,
                              "ok": i % 2 == 0, "pad": "p" * pad}}
                 for i in range(start, min(n, start + 100))]
        r = await api.client.post("/audit/events", json=batch, headers=who.headers)
        assert r.status == 202, await r.text()


async def _stored_parts(api: Api, sid: str) -> int:
    try:
        return len(await api.engine.sink.session_part_heads(sid))
    except SinkError:
        return 0


async def _gone_from_the_spool(api: Api, sid: str) -> None:
    """Until every part of ``sid`` is stored and purged from the spool."""
    async def gone() -> bool:
        return await api.engine.spool.read(lambda c: queries.get_session(c, sid)) is None

    await wait_for(gone, message="every part stored and purged")


async def _detail(api: Api, admin: Login, sid: str) -> tuple[aiohttp.ClientResponse, bytes]:
    r = await api.client.get(f"/audit/sessions/{sid}", headers=admin.headers)
    return r, await r.read()


@pytest.mark.parametrize("sink", ["sqlite", "jsonl"])
@pytest.mark.parametrize("keep", [0, 3600], ids=["dropped", "kept"])
async def test_a_session_in_the_sink_the_spool_and_its_open_tail_is_the_old_answer(
    make_api: MakeApi, sink: str, keep: int,
) -> None:
    """Parts 0-2 in the sink (with keep, in the spool too), part 3 pending
    (the token bucket's burst of 3 spent, the next token 1000 s away) and two
    uncut events: the streamed answer is the old one's bytes."""
    api = await make_api(audit={"part_max_events": 5, "keep_stored_seconds": keep},
                         flush={"max_writes_per_second": 0.001, "burst": 3},
                         sink={"type": sink}, flush_at_close=False)
    admin = await api.admin()
    alice = await api.user("alice")
    await _client_events(api, alice, 20)  # 22 events: parts 0-3 of 5 events, 2 uncut

    async def three_stored() -> bool:
        # In the sink, and marked so in the spool (the sink has it first).
        return (await _stored_parts(api, alice.session_id) == 3
                and (await api.engine.status())["pending_parts"] == 1)  # part 3 waits

    await wait_for(three_stored, message="parts 0-2 in the sink")
    r, body = await _detail(api, admin, alice.session_id)
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert r.headers["Cache-Control"] == "no-store" and r.headers["X-Request-ID"]
    assert body == await _old_answer(api, alice.session_id)
    got = json.loads(body)
    assert (got["state"], got["event_count"], got["events_complete"]) == ("open", 22, True)
    assert [e["seq"] for e in got["events"]] == list(range(1, 23))


@pytest.mark.parametrize("sink", ["sqlite", "jsonl"])
async def test_a_session_in_the_sink_alone_is_the_old_answer(
    make_api: MakeApi, sink: str,
) -> None:
    api = await make_api(audit={"part_max_events": 4}, sink={"type": sink})
    admin = await api.admin()
    alice = await api.user("alice")
    await _client_events(api, alice, 13)
    r = await api.client.post("/logout", headers=alice.headers)
    assert r.status == 200

    await _gone_from_the_spool(api, alice.session_id)
    r, body = await _detail(api, admin, alice.session_id)
    assert r.status == 200 and body == await _old_answer(api, alice.session_id)
    got = json.loads(body)
    assert (got["state"], got["parts"], got["events_complete"]) == ("stored", 4, True)


async def test_a_part_found_unreadable_mid_answer_cuts_it_off(
    make_api: MakeApi, caplog: pytest.LogCaptureFixture,
) -> None:
    """A stored part whose events another writer changed (a seq that is
    text) is found when its turn comes, after the headers and part 0 went
    out: the answer cannot become a 503 any more. The connection is closed
    without the chunked body's last chunk (the client's read fails) and the
    body so far is no JSON (its closing brace is the last byte written)."""
    api = await make_api(audit={"part_max_events": 50})
    admin = await api.admin()
    alice = await api.user("alice")
    await _client_events(api, alice, 118, pad=1000)  # 120 events of ~1.3 KB: 3 parts
    r = await api.client.post("/logout", headers=alice.headers)
    assert r.status == 200

    await _gone_from_the_spool(api, alice.session_id)
    with contextlib.closing(sqlite3.connect(api.config.sqlite_sink_path)) as db, db:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("UPDATE parts SET doc = json_set(doc, '$.events[1].seq', 'x')"
                   " WHERE session_id = ? AND part = 2", (alice.session_id,))
    caplog.set_level(logging.WARNING)
    r = await api.client.get(f"/audit/sessions/{alice.session_id}",
                             headers={**admin.headers, "X-Request-ID": "cut-1"})
    assert r.status == 200  # the headers were out before part 2 was read
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in r.content.iter_any():
            received += chunk
    assert received.startswith(b'{"session_id":') and len(received) >= 65536
    with pytest.raises(ValueError):
        json.loads(received)
    assert b"events_complete" not in received
    assert any("cut short" in rec.getMessage() and alice.session_id in rec.getMessage()
               for rec in caplog.records)
    # Counted apart in /metrics, whose request count took it for a 200.
    r = await api.client.get("/metrics", headers=admin.headers)
    assert r.status == 200
    assert 'session_audit_http_answers_cut_total{route="admin_session"} 1.0' in await r.text()
    # The server goes on answering.
    r = await api.client.get("/audit/status", headers=admin.headers)
    assert r.status == 200


async def _long_session(api: Api, events: int) -> str:
    """A sealed session of ``events`` events, appended through the engine's
    writer (as the server's requests do, in fewer transactions)."""
    src = Source("alice", "user", "127.0.0.1", "test", "req-long")
    s = await api.engine.spool.submit(lambda w: w.start_session(
        "alice", "user", 4102444800.0, [Draft("session.start", source=src)]))
    sid = s.session_id

    def job(w: Writer) -> None:
        for i in range(events - 2):
            w.append(sid, Draft("document.access", source=src,
                                target={"type": "document", "id": f"doc{i:06d}"},
                                details={"note": "x" * 200}))
        w.seal(sid, "logout", Draft("session.end", source=src))

    await api.engine.spool.submit(job)
    return sid


@pytest.mark.parametrize("where", ["spool", "sink"])
async def test_the_answer_holds_about_one_part_in_memory(
    make_api: MakeApi, where: str,
) -> None:
    """3,000 events of ~500 bytes (1.5 MB of JSON) in parts of 100: the
    allocations while the server answers (tracemalloc's peak, client and
    server in this process; the client reads in pieces) stay under 3 MB
    (about 1 MB: a part parsed and encoded, a 64 KiB chunk, the client's
    buffer). Built whole, the answer held every event parsed, and its text:
    12.6 MB here, and it grows with the session."""
    flush = {"max_writes_per_second": 1000.0} if where == "sink" else {
        "max_writes_per_second": 0.001, "burst": 1}
    api = await make_api(audit={"part_max_events": 100}, flush=flush,
                         flush_at_close=where == "sink")
    admin = await api.admin()
    if where == "spool":
        # The one token goes to another session's part: the long one stays pending.
        other = await api.user("bob")
        r = await api.client.post("/logout", headers=other.headers)
        assert r.status == 200

        async def spent() -> bool:
            return await _stored_parts(api, other.session_id) == 1

        await wait_for(spent, message="bob's part in the sink")
    sid = await _long_session(api, 3000)
    if where == "sink":
        async def gone_from_the_spool() -> bool:
            return await api.engine.spool.read(lambda c: queries.get_session(c, sid)) is None

        await wait_for(gone_from_the_spool, message="every part stored and purged")
    else:
        assert (await api.engine.status())["pending_parts"] == 30
    size = 0
    tracemalloc.start()
    try:
        r = await api.client.get(f"/audit/sessions/{sid}", headers=admin.headers)
        assert r.status == 200
        async for chunk in r.content.iter_chunked(16384):
            size += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 1_500_000
    assert peak < 3_000_000, f"{peak:,} bytes at the peak"


async def test_a_chunk_larger_than_the_buffers_is_given_its_transfer_time(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A streamed answer gets the send allowance a built one gets: SEND_SECONDS
    plus a second for every MIN_BYTES_PER_SECOND handed over. A part is one
    chunk (up to part_max_bytes, 1 MiB by default: 256 s at the minimum
    rate); its bytes counted only once written, a client on a slow link that
    kept to the minimum rate was dropped SEND_SECONDS after the answer
    began, mid-chunk, where the same answer built whole was given its time.
    Here one part of ~10 MB (more than the socket buffers hold), SEND_SECONDS
    0.2, and a client that reads nothing for 0.6 s: it gets the whole body."""
    monkeypatch.setattr(server, "SEND_SECONDS", 0.2)
    api = await make_api(audit={"part_max_events": 5000, "part_max_bytes": 64 << 20},
                         flush={"max_writes_per_second": 0.001, "burst": 1},
                         flush_at_close=False)
    admin = await api.admin()
    src = Source("alice", "user", "127.0.0.1", "test", "req-big")
    s = await api.engine.spool.submit(lambda w: w.start_session(
        "alice", "user", 4102444800.0, [Draft("session.start", source=src)]))
    sid = s.session_id

    def job(w: Writer) -> None:
        for i in range(2500):
            w.append(sid, Draft("document.access", source=src,
                                target={"type": "document", "id": f"doc{i:06d}"},
                                details={"note": "x" * 4000}))
        w.seal(sid, "logout", Draft("session.end", source=src))

    await api.engine.spool.submit(job)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", api.client.server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    try:
        writer.write(f"GET /audit/sessions/{sid} HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {admin.headers['Authorization']}\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding: chunked" in head.lower()
        await asyncio.sleep(0.6)  # a slow link: past SEND_SECONDS, with ~10 MB to go
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    body = json.loads(_dechunk(raw))
    assert body["events_complete"] is True and len(body["events"]) == 2502


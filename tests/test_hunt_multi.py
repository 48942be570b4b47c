"""Several servers, each with its own data directory, flushing to one sink
(DESIGN.md: Scaling past one machine), with one audit key as a fleet behind a
load balancer has it: every spool's security chain starts from the same
genesis value, and the others' events are the sink's newest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from live_server import Live
from waiting import wait_for

from audit.events import canonical_json, chain_hash, format_ts, genesis, new_id
from audit.rollback import FIRST_PAGE, sink_ahead
from audit.store import SECURITY_STREAM
from sinks.base import Doc
from sinks.sqlite import SqliteSink

KEY = b"one-audit-key-for-the-whole-fleet-0123"

pytestmark = pytest.mark.timeout(120)


def _pair(tmp_path: Path) -> list[Live]:
    """Two servers (data directories a/ and b/, one audit key and JWT secret)
    writing to one sqlite sink file."""
    sink = {"type": "sqlite", "sqlite": {"path": str(tmp_path / "shared" / "audit.db")}}
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        servers.append(Live(tmp_path / name, {
            "sink": sink, "audit": {"part_max_events": 3},
            "flush": {"max_writes_per_second": 100.0, "burst": 20}}))
    return servers


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[Live, Live]]:
    """:func:`_pair`, started; killed at teardown."""
    servers = _pair(tmp_path)
    try:
        for live in servers:
            await live.start()
        yield servers[0], servers[1]
    finally:
        for live in servers:
            live.close()


async def _detail(http: aiohttp.ClientSession, live: Live, headers: dict[str, str],
                  sid: str) -> dict[str, Any]:
    async with http.get(f"{live.base}/audit/sessions/{sid}", headers=headers) as r:
        body: dict[str, Any] = await r.json()
        assert r.status == 200, body
    return body


def _chain(n: int, t0: float, prev: str | None = None, step: float = 0.001) -> list[Doc]:
    """``n`` security events of one server's chain (after ``prev``, else from
    genesis), their times from ``t0`` on."""
    prev = prev or genesis(KEY, SECURITY_STREAM)
    out = []
    for i in range(n):
        eid = new_id()
        ev: dict[str, Any] = {
            "event_id": eid, "session_id": None, "seq": None, "ts": format_ts(t0 + i * step),
            "action": "auth.invalid_token", "outcome": "denied", "actor": None,
            "target": None, "source": {"ip": "127.0.0.1", "user_agent": None},
            "request_id": eid, "details": {"reason": "malformed"}}
        ev["hash"] = prev = chain_hash(KEY, prev, canonical_json(ev))
        ev["_id"] = eid
        out.append(ev)
    return out


class CountingSink(SqliteSink):
    """The sqlite sink, counting the queries of its newest security events."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.listings = 0

    async def list_security_events(self, **kw: Any) -> tuple[list[Doc], str | None]:
        self.listings += 1
        return await super().list_security_events(**kw)


async def _sink(tmp_path: Path, *chains: list[Doc]) -> CountingSink:
    sink = CountingSink(tmp_path / "audit.db")
    await sink.open()
    for events in chains:
        for i in range(0, len(events), 500):
            await sink.write_security_events(events[i:i + 500])
    return sink


async def test_the_start_check_reads_other_servers_newer_security_events_in_two_queries(
        tmp_path: Path) -> None:
    # Server A's last security event, then 2,100 of server B's (a flood of bad
    # tokens at B): at each of A's starts the check looked for A's head a
    # page of 1,000 at a time; up to 20 queries, each a scan of the whole
    # index on the jsonl sink (5 s with 200,000 events, before serving).
    a = _chain(1, 1_000_000.0)
    b = _chain(2_100, 1_000_001.0)
    sink = await _sink(tmp_path, a, b)
    try:
        # Found, and nothing of B's taken for a continuation of A's chain
        # (both chains start from the one genesis value of the shared key).
        assert await sink_ahead(sink, KEY, a[-1]["hash"], None) == (a[-1]["hash"], 0)
        assert sink.listings == 2
        sink.listings = 0
        assert await sink_ahead(sink, KEY, "0" * 64, None) is None  # (not there)
        assert sink.listings == 2
    finally:
        await sink.close()


async def test_the_start_check_follows_its_chain_through_other_servers_events(
        tmp_path: Path) -> None:
    # A spool restored from an older backup, on a shared sink: after its head
    # come its own later events, interleaved with B's (which started from the
    # same genesis), deeper than the first page. Only A's are followed.
    head = _chain(1, 2_000_000.0)
    later = _chain(300, 2_000_001.0, prev=head[-1]["hash"], step=0.01)
    b = _chain(3_000, 2_000_001.005, step=0.001)
    sink = await _sink(tmp_path, head, b, later)
    try:
        assert len(later) + len(b) > FIRST_PAGE
        assert await sink_ahead(sink, KEY, head[-1]["hash"], None) == (later[-1]["hash"], 300)
    finally:
        await sink.close()


async def test_another_servers_open_session_is_not_shown_complete(
        fleet: tuple[Live, Live]) -> None:
    # B's session is open, 3 of its 6 events in a checkpoint part in the
    # shared sink. A's spool does not know it: A answered its detail from
    # the sink with those 3 events and events_complete true, as if that were
    # all of it (its summary counts only the stored parts' events).
    a, b = fleet
    async with aiohttp.ClientSession() as http:
        sid, on_b = await b.admin_login(http)
        for _ in range(4):
            async with http.post(b.base + "/documents", json={"title": "t", "content": "c"},
                                 headers=on_b) as r:
                assert r.status == 201
        _, on_a = await a.admin_login(http)

        async def cut() -> bool:
            async with http.get(f"{a.base}/audit/sessions/{sid}", headers=on_a) as r:
                return r.status == 200

        await wait_for(cut, 60, "B's checkpoint part in the shared sink")
        seen = await _detail(http, a, on_a, sid)
        assert seen["state"] == "pending"  # (open or pending: A cannot tell)
        assert seen["event_count"] == len(seen["events"]) == 3
        assert seen["events_complete"] is False
        whole = await _detail(http, b, on_b, sid)  # B's own spool knows it all
        assert whole["state"] == "open" and whole["events_complete"] is True

        async with http.post(b.base + "/logout", headers=on_b) as r:
            assert r.status == 200

        async def stored() -> bool:
            return (await _detail(http, a, on_a, sid))["state"] == "stored"

        await wait_for(stored, 60, "B's session stored")
        seen = await _detail(http, a, on_a, sid)
        assert seen["event_count"] == len(seen["events"]) == 8  # (with B's audit.query)
        assert seen["events_complete"] is True
    for live in (a, b):
        assert await live.stop() == 0
    for live in (a, b):
        r = await live.cli("verify")
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stderr == ""
    a.env = {**a.env, "SESSION_AUDIT_LOG_LEVEL": "info"}
    await a.start()  # (its start looks at the sink's sessions, while it serves: all of one key)
    await wait_for(lambda: "are chained under this server's audit key" in a.log_tail(100_000),
                   message="the shared-key check's line")
    assert await a.stop() == 0
    assert "not chained under this server's audit key" not in a.log_tail(100_000)


async def _session(live: Live) -> str:
    """A session on ``live``, logged out and stored."""
    async with aiohttp.ClientSession() as http:
        sid, headers = await live.admin_login(http)
        async with http.post(live.base + "/logout", headers=headers) as r:
            assert r.status == 200

        async def stored() -> bool:
            async with http.get(f"{live.base}/audit/sessions/{sid}", headers=(
                    await live.admin_login(http))[1]) as r:
                return r.status == 200 and (await r.json())["state"] == "stored"

        await wait_for(stored, 60, "the session stored")
    return sid


async def test_a_server_sharing_the_sink_with_another_audit_key_is_told(
        tmp_path: Path) -> None:
    # Each data directory makes its own audit.key unless one is set: two
    # servers started so share a sink, each verify reports every record of
    # the other as changed (8 lines a session), and nothing said why.
    a, b = _pair(tmp_path)
    b.env = {"SESSION_AUDIT_AUDIT_KEY": "another-audit-key-0123456789abcdefgh"}
    try:
        await a.start()
        await b.start()
        theirs = await _session(b)
        await _session(a)
        assert await a.stop() == 0
        await a.start()  # the start looks at the sink's newest sessions, while it serves
        await wait_for(lambda: "newest sessions" in a.log_tail(100_000),
                       message="the shared-key check's line")
        assert await a.stop() == 0
        log = a.log_tail(100_000)
        assert "1 of the sqlite sink's 2 newest sessions" in log, log
        assert theirs in log and "servers sharing a sink must share one audit key" in log
        r = await a.cli("verify")
        assert r.returncode == 1
        assert f"{theirs}: changed: seq 1: hash does not verify" in r.stdout
        assert r.stderr.startswith("verify: sessions of the sink not begun from this audit"
                                   " key's genesis value: 1; chained under another key"), r.stderr
    finally:
        a.close()
        b.close()


async def test_the_start_check_names_the_sessions_of_another_key_and_no_others(
    make_config: Any, engines: Any, audit_key: bytes, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Two servers' engines (own data directories and keys) sharing one sink
    # file, their sessions of several parts each: the check of each names
    # exactly the other's sessions, by their part 0; a sink of one key's
    # sessions gives nothing to say.
    from audit.engine import AuditEngine
    from audit.events import Draft, Source
    from audit.sharing import check_shared_key

    sink = {"type": "sqlite", "sqlite": {"path": str(tmp_path / "shared" / "audit.db")}}
    a_config, b_config = (
        make_config(server={"data_dir": str(tmp_path / n)}, sink=sink,
                    audit={"part_max_events": 2}) for n in ("a", "b"))
    other_key = b"another-servers-audit-key-012345"
    sids: dict[str, list[str]] = {"a": [], "b": []}

    async def sessions(name: str, engine: Any) -> None:
        src = Source(user="alice", role="user")
        for _ in range(2):
            s = await engine.start_session("alice", "user", src, 3600)
            for _ in range(4):
                await engine.record(s.session_id, Draft("document.list"))
            await engine.end_session(s.session_id, src)
            sids[name].append(s.session_id)
        await engines.drain(engine)

    await sessions("a", await engines.open(a_config))
    shared = SqliteSink(a_config.sqlite_sink_path)
    await shared.open()
    try:
        assert len(await shared.session_part_heads(sids["a"][0])) > 1  # (part 0, and more)
        with caplog.at_level(logging.INFO, logger="session_audit.sharing"):
            assert await check_shared_key(shared, audit_key) == []  # one key's: nothing said
        assert "sink's 2 newest sessions are chained under this server's audit key" \
            in caplog.text
        b = AuditEngine(b_config, SqliteSink(b_config.sqlite_sink_path), other_key)
        await b.open(background=False)
        try:
            await sessions("b", b)
        finally:
            await b.close(flush_window=0)
        with caplog.at_level(logging.INFO, logger="session_audit.sharing"):
            assert sorted(await check_shared_key(shared, audit_key)) == sorted(sids["b"])
        assert "2 of the sqlite sink's 4 newest sessions" in caplog.text
        assert sorted(await check_shared_key(shared, other_key)) == sorted(sids["a"])
    finally:
        await shared.close()


async def test_a_new_sink_file_another_server_holds_is_waited_for_at_open(
        tmp_path: Path) -> None:
    # Servers of a fleet started at once open the new shared file together:
    # while one held its write lock (on its way to making it WAL), another's
    # journal_mode=WAL failed at once with "database is locked" (SQLite does
    # not wait there: it could deadlock), 7 of 600 opens with four processes:
    # its sink was unavailable at start, its start's checks skipped.
    path = tmp_path / "audit.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        sink = SqliteSink(path)
        opening = asyncio.ensure_future(sink.open())
        # Without the wait it fails at once; with it, it is still waiting
        # for the lock at this deadline (a slow start only makes this weaker).
        done, _ = await asyncio.wait({opening}, timeout=0.3)
        assert not done, opening.exception()
        other.execute("COMMIT")
    await asyncio.wait_for(opening, 10)
    try:
        await sink.write_security_events(_chain(1, 3_000_000.0))
    finally:
        await sink.close()

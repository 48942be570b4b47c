"""One contract suite for every sink (sinks/base.py), run against real backends.

* sqlite: a file in ``tmp_path``;
* jsonl: a directory in ``tmp_path``;
* http: a real aiohttp receiver (tests/receiver.py) on 127.0.0.1; the sink
  cannot be queried, so what it delivered is checked in the receiver's store
  and the query tests are skipped for it;
* mongodb: a real server, only when ``SESSION_AUDIT_TEST_MONGODB_URI`` is set;
  each test uses its own database, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from receiver import Receiver, sample_part, sample_security_event, serve

from audit.config import HttpSinkConfig, MongoSinkConfig
from sinks.base import (
    Doc,
    QueryNotSupported,
    Sink,
    SinkConflict,
    SinkUnavailable,
    summarize_parts,
)

MONGO_URI_ENV = "SESSION_AUDIT_TEST_MONGODB_URI"
SINK_URI_ENV = "SESSION_AUDIT_TEST_SINK_MONGODB_URI"


@dataclass
class Harness:
    name: str
    make: Callable[[], Sink]  # a new sink over the same backing store
    receiver: Receiver | None = None

    async def stored_part(self, sink: Sink, part_id: str) -> Doc | None:
        if self.receiver is not None:
            return self.receiver.parts.get(part_id)
        session_id, _, n = part_id.rpartition(":")
        for p in await sink.get_session_parts(session_id):
            if p["part"] == int(n):
                return p
        return None

    async def stored_part_ids(self, sink: Sink, session_ids: list[str]) -> list[str]:
        if self.receiver is not None:
            wanted = set(session_ids)
            return sorted(k for k, v in self.receiver.parts.items() if v["session_id"] in wanted)
        ids = []
        for sid in session_ids:
            ids += [p["_id"] for p in await sink.get_session_parts(sid)]
        return sorted(ids)

    async def stored_security_ids(self, sink: Sink) -> list[str]:
        if self.receiver is not None:
            return sorted(self.receiver.security_events)
        out: list[str] = []
        cursor = None
        while True:
            page, cursor = await sink.list_security_events(limit=100, cursor=cursor)
            out += [e["_id"] for e in page]
            if cursor is None:
                return sorted(out)


SINK_NAMES = ["sqlite", "jsonl", "http", "mongodb"]


@pytest.fixture(params=SINK_NAMES)
async def harness(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    name: str = request.param
    if name == "sqlite":
        from sinks.sqlite import SqliteSink

        path = tmp_path / "audit.db"
        yield Harness(name, lambda: SqliteSink(path))
    elif name == "jsonl":
        from sinks.jsonl import JsonlSink

        directory = tmp_path / "jsonl"
        yield Harness(name, lambda: JsonlSink(directory))
    elif name == "http":
        from sinks.http import HttpSink

        receiver = Receiver()
        runner, port = await serve(receiver, "127.0.0.1", 0)
        cfg = HttpSinkConfig(url=f"http://127.0.0.1:{port}/", timeout_seconds=5.0)
        try:
            yield Harness(name, lambda: HttpSink(cfg), receiver)
        finally:
            receiver.close()
            await runner.cleanup()
    else:
        uri = os.environ.get(MONGO_URI_ENV)
        if not uri:
            pytest.skip(f"set {MONGO_URI_ENV} to run the contract suite against a real MongoDB")
        from pymongo import AsyncMongoClient

        from sinks.mongodb import MongoSink

        monkeypatch.setenv(SINK_URI_ENV, uri)
        cfg = MongoSinkConfig(uri_env=SINK_URI_ENV, database=f"sa_test_{uuid.uuid4().hex[:12]}")
        try:
            yield Harness(name, lambda: MongoSink(cfg))
        finally:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
                uri, serverSelectionTimeoutMS=5000
            )
            try:
                await client.drop_database(cfg.database)
            finally:
                await client.close()


@pytest.fixture
async def sink(harness: Harness) -> AsyncIterator[Sink]:
    s = harness.make()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def needs_queries(harness: Harness, sink: Sink) -> None:
    if not sink.queryable:
        pytest.skip(
            f"the {harness.name} sink is not queryable (checked: raises QueryNotSupported);"
            " its deliveries are checked in the receiver's store by the other tests"
        )


def without_type(doc: Doc | None) -> Doc | None:
    if doc is None:
        return None
    return {k: v for k, v in doc.items() if k != "type"}


# -- writing ------------------------------------------------------------------


async def test_write_part_then_identical_retry_is_success(harness: Harness, sink: Sink) -> None:
    part = sample_part("s-idem")
    await sink.write_part(part)
    await sink.write_part(part)
    await sink.write_part(dict(part))
    assert without_type(await harness.stored_part(sink, "s-idem:0")) == part
    assert await harness.stored_part_ids(sink, ["s-idem"]) == ["s-idem:0"]


async def test_same_id_with_another_hash_is_a_conflict(harness: Harness, sink: Sink) -> None:
    part = sample_part("s-conf")
    await sink.write_part(part)
    other = sample_part("s-conf", salt="tampered")
    assert other["_id"] == part["_id"] and other["hash"] != part["hash"]
    with pytest.raises(SinkConflict):
        await sink.write_part(other)
    # The first write is untouched and still idempotent.
    assert without_type(await harness.stored_part(sink, "s-conf:0")) == part
    await sink.write_part(part)


async def test_security_events_batch_and_retries(harness: Harness, sink: Sink) -> None:
    batch = [sample_security_event(f"ev{i}", ts=f"2026-11-26T14:00:0{i}.000Z") for i in range(5)]
    await sink.write_security_events(batch)
    await sink.write_security_events(batch)  # the same batch retried
    # A retry that overlaps: three old, two new (the flusher may re-batch).
    more = [sample_security_event(f"ev{i}", ts=f"2026-11-26T14:00:0{i}.000Z") for i in range(3, 7)]
    await sink.write_security_events(more)
    await sink.write_security_events([])
    assert await harness.stored_security_ids(sink) == [f"ev{i}" for i in range(7)]
    with pytest.raises(SinkConflict):
        await sink.write_security_events(
            [sample_security_event("ev1", ts="2026-11-26T14:00:01.000Z", salt="x")]
        )
    assert await harness.stored_security_ids(sink) == [f"ev{i}" for i in range(7)]


async def test_concurrent_writes(harness: Harness, sink: Sink) -> None:
    sids = [f"c{i:03d}" for i in range(40)]
    parts = [sample_part(sid, start=f"2026-11-26T10:00:{i:02d}.000Z") for i, sid in enumerate(sids)]
    events = [sample_security_event(f"cev{i:03d}") for i in range(30)]
    batches = [events[i : i + 5] for i in range(0, 30, 5)]
    work = [sink.write_part(p) for p in parts]
    work += [sink.write_part(p) for p in parts[::4]]  # concurrent duplicates
    work += [sink.write_security_events(b) for b in batches + batches[:2]]
    await asyncio.gather(*work)
    assert await harness.stored_part_ids(sink, sids) == sorted(p["_id"] for p in parts)
    assert await harness.stored_security_ids(sink) == sorted(e["_id"] for e in events)


async def test_close_and_reopen_keeps_data_and_duplicate_detection(harness: Harness) -> None:
    part = sample_part("s-reopen")
    event = sample_security_event("ev-reopen")
    first = harness.make()
    await first.open()
    try:
        await first.write_part(part)
        await first.write_security_events([event])
    finally:
        await first.close()
    await first.close()  # safe twice
    second = harness.make()
    await second.open()
    try:
        assert without_type(await harness.stored_part(second, "s-reopen:0")) == part
        await second.write_part(part)
        await second.write_security_events([event])
        with pytest.raises(SinkConflict):
            await second.write_part(sample_part("s-reopen", salt="other"))
        with pytest.raises(SinkConflict):
            await second.write_security_events([sample_security_event("ev-reopen", salt="o")])
        assert await harness.stored_part_ids(second, ["s-reopen"]) == ["s-reopen:0"]
        assert await harness.stored_security_ids(second) == ["ev-reopen"]
    finally:
        await second.close()


async def test_a_closed_sink_takes_no_write_and_answers_no_query(harness: Harness) -> None:
    """After close (the end of a shutdown) the sink is unavailable, as before
    open: it does not open itself again behind the owner's back (a
    connection nobody closes), and what it was handed is not stored."""
    closed = harness.make()
    await closed.open()
    await closed.close()
    try:
        with pytest.raises(SinkUnavailable):
            await closed.write_part(sample_part("s-closed"))
        with pytest.raises(SinkUnavailable):
            await closed.write_security_events([sample_security_event("ev-closed")])
        if closed.queryable:
            with pytest.raises(SinkUnavailable):
                await closed.list_sessions()
            with pytest.raises(SinkUnavailable):
                await closed.get_session_parts("s-closed")
    finally:
        await closed.close()  # (whatever a failing sink opened again)
    again = harness.make()
    await again.open()
    try:
        assert await harness.stored_part(again, "s-closed:0") is None
        assert await harness.stored_security_ids(again) == []
    finally:
        await again.close()


# -- queries ------------------------------------------------------------------


async def test_not_queryable_sink_says_so(harness: Harness, sink: Sink) -> None:
    if sink.queryable:
        pytest.skip(f"the {harness.name} sink is queryable; covered by the query tests")
    with pytest.raises(QueryNotSupported):
        await sink.list_sessions()
    with pytest.raises(QueryNotSupported):
        await sink.get_session_parts("x")
    with pytest.raises(QueryNotSupported):
        await sink.list_security_events()


async def _write_sessions(sink: Sink) -> list[Doc]:
    """17 sessions; some share a start time, so ties are broken by session id."""
    parts = []
    for i in range(17):
        start = f"2026-11-2{i % 5}T12:00:{i // 5:02d}.000Z"
        user = "alice" if i % 3 else "bob"
        parts.append(sample_part(f"sess-{i:02d}", user=user, start=start))
    # Same start time as sess-00, other ids: explicit ties.
    parts.append(sample_part("sess-tie-a", start=parts[0]["session_start_time"]))
    parts.append(sample_part("sess-tie-b", start=parts[0]["session_start_time"]))
    for p in reversed(parts):
        await sink.write_part(p)
    return parts


def _expected(parts: list[Doc]) -> list[str]:
    key = sorted(((p["session_start_time"], p["session_id"]) for p in parts), reverse=True)
    return [sid for _, sid in key]


async def _all_pages(sink: Sink, limit: int, **filters: Any) -> list[str]:
    seen: list[str] = []
    cursor = None
    for _ in range(100):
        page, cursor = await sink.list_sessions(limit=limit, cursor=cursor, **filters)
        assert len(page) <= limit
        # A page that ends at the last session has no cursor: a cursor that
        # leads to an empty page is one request too many for every client.
        assert page or not seen, "a cursor that led to an empty page"
        seen += [s["session_id"] for s in page]
        if cursor is None:
            return seen
        assert page, "a cursor after an empty page"
    raise AssertionError("paging did not end")


async def test_list_sessions_newest_first_with_cursor_paging(harness: Harness, sink: Sink) -> None:
    needs_queries(harness, sink)
    parts = await _write_sessions(sink)
    expected = _expected(parts)
    for limit in (1, 4, 5, 19, 50):
        got = await _all_pages(sink, limit)
        assert got == expected, f"limit={limit}"
    first, cursor = await sink.list_sessions(limit=50)
    assert cursor is None and len(first) == len(parts)
    summary = first[0]
    assert set(summary) == {
        "session_id", "user", "state", "session_start_time", "session_end_time",
        "session_duration_seconds", "event_count", "seal_reason", "parts",
    }  # fmt: skip
    assert summary["state"] == "stored" and summary["parts"] == 1
    assert summary["event_count"] == 2


async def test_list_sessions_filters(harness: Harness, sink: Sink) -> None:
    needs_queries(harness, sink)
    parts = await _write_sessions(sink)
    bob = [p for p in parts if p["user"] == "bob"]
    assert await _all_pages(sink, 2, user="bob") == _expected(bob)
    since, until = "2026-11-21T00:00:00.000Z", "2026-11-23T12:00:01.000Z"
    window = [p for p in parts if since <= p["session_start_time"] <= until]
    assert await _all_pages(sink, 3, since=since, until=until) == _expected(window)
    # Bounds are inclusive.
    exact = parts[0]["session_start_time"]
    same = [p for p in parts if p["session_start_time"] == exact]
    assert await _all_pages(sink, 2, since=exact, until=exact) == _expected(same)
    alice_window = [p for p in window if p["user"] == "alice"]
    got = await _all_pages(sink, 2, user="alice", since=since, until=until)
    assert got == _expected(alice_window)
    assert await sink.list_sessions(user="nobody") == ([], None)


async def test_session_parts_sorted_and_summarised(harness: Harness, sink: Sink) -> None:
    needs_queries(harness, sink)
    p0 = sample_part("multi", 0, final=False, events=3)
    p1 = sample_part("multi", 1, final=False, events=2)
    p2 = sample_part("multi", 2, final=True, events=4)
    for p in (p2, p0, p1):
        await sink.write_part(p)
    got = [without_type(p) for p in await sink.get_session_parts("multi")]
    assert got == [p0, p1, p2]
    assert await sink.get_session_parts("unknown") == []
    (summary,), _ = await sink.list_sessions()
    assert summary["session_id"] == "multi"
    assert summary["parts"] == 3 and summary["event_count"] == 9
    assert summary["state"] == "stored" and summary["seal_reason"] == "logout"
    # The last part written first: the summary is still the stored parts'.
    assert summary == summarize_parts([p0, p1, p2])
    # Only checkpoints stored: still pending.
    await sink.write_part(sample_part("ckpt", 0, final=False, start="2026-11-27T00:00:00.000Z"))
    newest, _ = await sink.list_sessions(limit=1)
    assert newest[0]["session_id"] == "ckpt" and newest[0]["state"] == "pending"
    assert newest[0]["session_end_time"] is None
    assert newest[0]["seal_reason"] is None  # a checkpoint's is not the session's


async def test_session_parts_one_at_a_time(harness: Harness, sink: Sink) -> None:
    """What the admin API streams a session by: its parts without events
    (as get_session_parts gives them, less the events), then each part
    alone by its number."""
    needs_queries(harness, sink)
    p0 = sample_part("multi", 0, final=False, events=3)
    p1 = sample_part("multi", 1, final=False, events=2)
    p2 = sample_part("multi", 2, final=True, events=4)
    for p in (p2, p0, p1):
        await sink.write_part(p)
    await sink.write_part(sample_part("other", 1, final=True))
    whole = await sink.get_session_parts("multi")
    heads = await sink.session_part_heads("multi")
    assert heads == [{k: v for k, v in p.items() if k != "events"} for p in whole]
    assert [p["part"] for p in heads] == [0, 1, 2]
    for n, p in enumerate((p0, p1, p2)):
        assert [without_type(x) for x in await sink.session_part("multi", n)] == [p]
    assert await sink.session_part("multi", 3) == []
    assert await sink.session_part_heads("unknown") == []
    assert await sink.session_part("unknown", 0) == []


async def test_session_ids_include_a_session_without_part_0(harness: Harness, sink: Sink) -> None:
    """verify walks ``session_ids()``: a session whose part 0 is missing from
    the sink must be in it (once), or its loss would never be reported."""
    needs_queries(harness, sink)
    await sink.write_part(sample_part("whole", 0, final=False))
    await sink.write_part(sample_part("whole", 1, final=True))
    await sink.write_part(sample_part("headless", 1, final=True))
    ids = [sid async for sid in sink.session_ids()]
    assert sorted(ids) == ["headless", "whole"]


async def test_list_security_events_order_paging_filters(harness: Harness, sink: Sink) -> None:
    needs_queries(harness, sink)
    kinds = ["auth.login_failed", "auth.invalid_token", "access.denied"]
    events = [
        sample_security_event(
            f"se-{i:02d}", ts=f"2026-11-26T14:00:{i // 3:02d}.000Z", action=kinds[i % 3]
        )
        for i in range(20)
    ]
    for b in range(0, 20, 6):
        await sink.write_security_events(events[b : b + 6][::-1])
    expected = [e["_id"] for e in sorted(events, key=lambda e: (e["ts"], e["_id"]), reverse=True)]

    async def pages(limit: int, **filters: Any) -> list[str]:
        out: list[str] = []
        cursor = None
        for _ in range(100):
            page, cursor = await sink.list_security_events(limit=limit, cursor=cursor, **filters)
            assert page or not out, "a cursor that led to an empty page"
            out += [e["_id"] for e in page]
            if cursor is None:
                return out
        raise AssertionError("paging did not end")

    for limit in (1, 3, 7, 20, 100):
        assert await pages(limit) == expected, f"limit={limit}"
    since = "2026-11-26T14:00:03.000Z"
    assert await pages(4, since=since) == [
        i for i in expected if next(e for e in events if e["_id"] == i)["ts"] >= since
    ]
    denied = [e["_id"] for e in events if e["action"] == "access.denied"]
    assert await pages(2, kind="access.denied") == sorted(
        denied, key=lambda i: (next(e for e in events if e["_id"] == i)["ts"], i), reverse=True
    )
    page, _ = await sink.list_security_events(limit=1)
    assert without_type(page[0]) == next(e for e in events if e["_id"] == expected[0])


async def test_security_events_at_one_ts_page_by_id(harness: Harness, sink: Sink) -> None:
    """Events of one ts sort by ``_id`` (newest first), whatever order they
    were written in: the cursor is ``(ts, _id)``, and a page ordered any
    other way would skip or repeat events from one page to the next."""
    needs_queries(harness, sink)
    ts = "2026-11-26T14:00:00.000Z"
    await sink.write_security_events([sample_security_event(f"t{i}", ts=ts) for i in range(3)])
    await sink.write_security_events([sample_security_event(f"t{i}", ts=ts) for i in range(3, 6)])
    for limit in (1, 2, 4):
        got: list[str] = []
        cursor = None
        for _ in range(10):
            page, cursor = await sink.list_security_events(limit=limit, cursor=cursor)
            got += [e["_id"] for e in page]
            if cursor is None:
                break
        assert got == [f"t{i}" for i in reversed(range(6))], f"limit={limit}"


async def test_http_receiver_is_real(harness: Harness, sink: Sink) -> None:
    """The http harness talks to a real server: requests are counted there."""
    if harness.receiver is None:
        pytest.skip("only the http sink has a receiver")
    await sink.write_part(sample_part("s-count"))
    assert harness.receiver.stats["requests"] == 1


async def test_security_events_come_back_oldest_first(harness: Harness, sink: Sink) -> None:
    """What verify follows the security chains through: every event once, in
    the order written where the sink keeps it (sqlite, jsonl), else by ts.
    The times are equal and the ids run backwards, so neither a sort by ts
    nor one by _id gives the order written."""
    needs_queries(harness, sink)
    ids = [f"ord{j:04d}" for j in reversed(range(1200))]
    for i in range(0, 1200, 400):  # more than one page of the default (1,000)
        await sink.write_security_events([
            sample_security_event(eid, ts="2026-11-26T10:00:00.000Z") for eid in ids[i:i + 400]])
    got = [d["_id"] async for d in sink.security_events_oldest_first()]
    if harness.name in ("sqlite", "jsonl"):
        assert got == ids
    else:
        assert sorted(got) == sorted(ids) and len(got) == len(ids)

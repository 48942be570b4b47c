"""Verify finds tampering in the sink: changed, removed and swapped events, missing parts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from typing import Any

import pytest

from audit.events import Draft, Source
from audit.verify import verify_sink
from sinks.sqlite import SqliteSink


@pytest.fixture
async def stored(make_config, engines, audit_key):
    """Six sessions of 8 events (parts of 3, 3, 2) flushed into a SqliteSink."""
    config = make_config(
        audit={"part_max_events": 3}, flush={"max_writes_per_second": 1000.0, "burst": 100}
    )
    engine = await engines.open(config)
    src = Source(user="alice", role="user", ip="127.0.0.1")
    sids = []
    for _ in range(6):
        s = await engine.start_session("alice", "user", src, 3600)
        for i in range(5):
            await engine.record(
                s.session_id, Draft("document.access", target={"type": "document", "id": str(i)})
            )
        await engine.end_session(s.session_id, src)
        sids.append(s.session_id)
    await engines.drain(engine)
    report = await verify_sink(engine.sink, audit_key)
    assert report.ok and (report.sessions, report.parts, report.events) == (6, 18, 48)
    return config, sids


def tamper(config, session_id: str, part: int, edit) -> None:
    """Edit one stored part document directly in the sink's SQLite file."""
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as conn, conn:
        (text,) = conn.execute(
            "SELECT doc FROM parts WHERE session_id = ? AND part = ?", (session_id, part)
        ).fetchone()
        doc = json.loads(text)
        edit(doc)
        conn.execute(
            "UPDATE parts SET doc = ? WHERE session_id = ? AND part = ?",
            (json.dumps(doc), session_id, part),
        )


def delete_part(config, session_id: str, part: int) -> None:
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as conn, conn:
        conn.execute("DELETE FROM parts WHERE session_id = ? AND part = ?", (session_id, part))


async def report_of(config, key) -> Any:
    """verify over the SQLite sink file of ``config``, by a sink opened anew."""
    sink = SqliteSink(config.sqlite_sink_path)
    await sink.open()
    try:
        return await verify_sink(sink, key)
    finally:
        await sink.close()


async def problems(config, key) -> dict[str, set[str]]:
    report = await report_of(config, key)
    out: dict[str, set[str]] = {}
    for p in report.problems:
        out.setdefault(p.session_id, set()).add(p.kind)
    return out


async def test_verify_detects_each_kind_of_tampering(stored, audit_key):
    config, sids = stored
    changed, removed, swapped, gap, head, untouched = sids

    def change_details(doc):
        doc["events"][1]["details"] = {"note": "edited"}

    def remove_event(doc):
        del doc["events"][1]
        doc["event_count"] -= 1  # a careful forger fixes the count, not the chain

    def swap_pair(doc):
        ev = doc["events"]
        ev[0], ev[1] = ev[1], ev[0]

    tamper(config, changed, 1, change_details)
    tamper(config, removed, 1, remove_event)
    tamper(config, swapped, 0, swap_pair)
    delete_part(config, gap, 1)  # a middle part
    delete_part(config, head, 0)  # the first part
    found = await problems(config, audit_key)

    assert "changed" in found[changed]
    assert "removed" in found[removed]
    assert "reordered" in found[swapped]
    assert "missing_part" in found[gap]
    assert "missing_part" in found.get(head, set())
    assert untouched not in found


async def test_verify_detects_a_forged_event_with_a_recomputed_count(stored, audit_key):
    """Changing the actor of the last event of the final part is also caught."""
    config, sids = stored

    def forge(doc):
        doc["events"][-1]["actor"]["user"] = "mallory"

    tamper(config, sids[0], 2, forge)
    found = await problems(config, audit_key)
    assert found == {sids[0]: {"changed"}}


async def test_verify_checks_a_parts_own_fields_against_its_events(stored, audit_key):
    """A part's ``user``, times and ``seal_reason`` are outside the hash chain;
    verify holds them to the chained ``session.start`` and ``session.end``
    (an edited ``user`` would hide the session from ``?user=`` queries)."""
    from audit.events import format_ts, parse_ts

    config, sids = stored
    user, reason, end, start, checkpoint, untouched = sids

    def later(text: str) -> str:
        return format_ts(parse_ts(text) + 3600)

    def move_end(doc):  # a careful forger keeps the duration consistent
        doc["session_end_time"] = later(doc["session_end_time"])
        doc["session_duration_seconds"] += 3600

    tamper(config, user, 2, lambda d: d.update(user="bob"))
    tamper(config, reason, 2, lambda d: d.update(seal_reason="idle_timeout"))
    tamper(config, end, 2, move_end)
    tamper(config, start, 1, lambda d: d.update(session_start_time=later(
        d["session_start_time"])))
    tamper(config, checkpoint, 1, lambda d: d.update(seal_reason="logout"))

    report = await report_of(config, audit_key)
    found: dict[str, list[str]] = {}
    for p in report.problems:
        assert p.kind == "bad_part", p
        found.setdefault(p.session_id, []).append(p.detail)
    assert set(found) == {user, reason, end, start, checkpoint}
    assert any("user 'bob'" in d for d in found[user])
    assert any("seal_reason" in d for d in found[reason])
    assert any("session_end_time" in d for d in found[end])
    assert any("session_start_time" in d for d in found[start])
    assert any("checkpoint" in d for d in found[checkpoint])
    assert untouched not in found


async def test_a_sessions_times_are_its_start_and_end_events_times(stored):
    config, sids = stored
    sink = SqliteSink(config.sqlite_sink_path)
    await sink.open()
    try:
        parts = await sink.get_session_parts(sids[-1])
    finally:
        await sink.close()
    first, final = parts[0], parts[-1]
    assert first["session_start_time"] == first["events"][0]["ts"]
    assert final["session_end_time"] == final["events"][-1]["ts"]
    assert final["events"][-1]["action"] == "session.end"


@pytest.mark.parametrize("kind", ["sqlite", "jsonl"])
async def test_verify_follows_the_security_stream(make_config, engines, audit_key, tmp_path, kind):
    """Security events are chained in one stream (API.md): a changed or a
    removed one breaks it where it happened, once; a new spool with the same
    key starts a new stream, which is counted, not a problem."""
    from sinks.jsonl import JsonlSink

    config = make_config(flush={"max_writes_per_second": 1000.0, "burst": 100})

    def new_sink() -> Any:
        if kind == "sqlite":
            return SqliteSink(config.sqlite_sink_path)
        return JsonlSink(tmp_path / "jsonl")

    async def record(engine: Any, n: int) -> None:
        for i in range(n):
            await engine.record_security(
                Draft("auth.login_failed", outcome="denied", source=Source(ip="10.0.0.1"),
                      details={"username": f"u{i:03d}"}), happened=True)
        await engines.drain(engine)

    engine = await engines.open(config, new_sink())
    await record(engine, 40)
    report = await verify_sink(engine.sink, audit_key)
    assert report.ok and (report.security_events, report.security_chains) == (40, 1)

    async def verify_again() -> Any:
        sink = new_sink()
        await sink.open()
        try:
            return await verify_sink(sink, audit_key)
        finally:
            await sink.close()

    if kind == "jsonl":  # the same length, so the file's other lines stay where they were
        path = next((tmp_path / "jsonl").glob("*.jsonl"))
        path.write_text(path.read_text().replace('"username":"u007"', '"username":"x007"'))
        report = await verify_again()
        assert [p.kind for p in report.problems] == ["security_chain"]
        assert report.security_events == 40
        return

    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as c, c:
        rows = c.execute("SELECT id, doc FROM security_events ORDER BY rowid").fetchall()
        doc = json.loads(rows[7][1])
        doc["actor"]["user"] = "mallory"
        c.execute("UPDATE security_events SET doc = ? WHERE id = ?", (json.dumps(doc), rows[7][0]))
        c.execute("DELETE FROM security_events WHERE id = ?", (rows[20][0],))
    report = await verify_again()
    assert [p.kind for p in report.problems] == ["security_chain", "security_chain"]
    assert rows[7][0] in report.problems[0].detail  # the changed one
    assert rows[21][0] in report.problems[1].detail  # the one after the removed one
    assert report.security_events == 39

    # A new spool (a fresh data directory), the same key and sink.
    fresh = make_config(server={"data_dir": str(tmp_path / "fresh")},
                        flush={"max_writes_per_second": 1000.0, "burst": 100})
    engine2 = await engines.open(fresh, SqliteSink(config.sqlite_sink_path))
    await record(engine2, 5)
    report = await verify_again()
    assert len(report.problems) == 2 and report.security_chains == 2
    assert report.security_events == 44


async def test_the_default_oldest_first_pages_the_newest_first_listing() -> None:
    """What a sink without an ordered stream of its own (MongoDB) uses."""
    from sinks.base import Sink, decode_cursor, encode_cursor

    class Listed(Sink):
        type = "listed"

        def __init__(self, docs: list[dict[str, Any]]) -> None:
            self.docs = docs

        async def write_part(self, part: dict[str, Any]) -> None: ...

        async def write_security_events(self, events: list[dict[str, Any]]) -> None: ...

        async def list_security_events(self, *, since: Any = None, kind: Any = None,
                                       limit: int = 50, cursor: Any = None) -> Any:
            newest = sorted(self.docs, key=lambda d: (d["ts"], d["_id"]), reverse=True)
            at = int(decode_cursor(cursor)[0]) if cursor else 0
            page = newest[at:at + limit]
            more = at + limit < len(newest)
            return page, encode_cursor(at + limit) if more else None

    docs = [{"_id": f"e{i:04d}", "ts": f"2026-11-26T10:{i // 60:02d}:{i % 60:02d}.000Z"}
            for i in range(2500)]
    got = [d["_id"] async for d in Listed(docs).security_events_oldest_first()]
    assert got == [d["_id"] for d in docs]


async def test_verify_follows_interleaved_chains_of_servers_sharing_a_sink(
    make_config, engines, audit_key, tmp_path
):
    """DESIGN.md: several instances flush to one database. Each spool chains
    its security events from the same genesis; verify follows every chain."""
    flush = {"max_writes_per_second": 1000.0, "burst": 100}
    first = make_config(flush=flush)
    second = make_config(server={"data_dir": str(tmp_path / "second")}, flush=flush)
    a = await engines.open(first, SqliteSink(first.sqlite_sink_path))
    b = await engines.open(second, SqliteSink(first.sqlite_sink_path))
    for i in range(30):
        for engine, who in ((a, "a"), (b, "b")):
            await engine.record_security(
                Draft("auth.login_failed", outcome="denied", source=Source(ip="10.0.0.2"),
                      details={"username": f"{who}{i:03d}"}), happened=True)
            if i % 3 == 0:
                await engines.drain(engine)
    for engine in (a, b):
        await engines.drain(engine)
    report = await verify_sink(a.sink, audit_key)
    assert report.ok, report.problems
    assert (report.security_events, report.security_chains) == (60, 2)

    with contextlib.closing(sqlite3.connect(first.sqlite_sink_path)) as c, c:
        eid, text = next(r for r in c.execute("SELECT id, doc FROM security_events")
                         if json.loads(r[1])["details"]["username"] == "b017")
        doc = json.loads(text)
        doc["outcome"] = "failure"
        c.execute("UPDATE security_events SET doc = ? WHERE id = ?", (json.dumps(doc), eid))
    report = await verify_sink(a.sink, audit_key)
    assert [p.detail.split()[1] for p in report.problems] == [eid]
    assert report.security_events == 60


def _security_chain(key: bytes, n: int, who: str, t0: float = 1.79e9) -> list[dict[str, Any]]:
    """n security events chained from genesis, as a spool seals them."""
    from audit.events import genesis, seal_event
    from audit.store import SECURITY_STREAM

    head, out = genesis(key, SECURITY_STREAM), []
    for i in range(n):
        ev, _ = seal_event(key, head, Draft("auth.login_failed", outcome="denied",
                                            details={"username": f"{who}{i}"}), None, None,
                           t0 + i)
        ev["_id"] = ev["event_id"]
        out.append(ev)
        head = ev["hash"]
    return out


async def _verify_security(path: Any, key: bytes, batches: list[list[dict[str, Any]]]) -> Any:
    sink = SqliteSink(path)
    await sink.open()
    try:
        for batch in batches:
            await sink.write_security_events(batch)
        return await verify_sink(sink, key)
    finally:
        await sink.close()


async def _three_security_events(tmp_path: Any, key: bytes) -> tuple[list[dict[str, Any]], Any]:
    """A chain of three security events in a new sqlite sink that verifies
    OK, and the sink's path (for a test to change a row of it)."""
    chain = _security_chain(key, 3, "c")
    path = tmp_path / "sec.db"
    assert (await _verify_security(path, key, [chain])).ok
    return chain, path


async def test_a_quiet_chain_is_still_followed_after_many_others(tmp_path, audit_key):
    """A long-lived server writes rarely while hundreds of one-event chains
    (servers started with fresh data directories) come and go."""
    quiet = _security_chain(audit_key, 2, "quiet")
    others = [_security_chain(audit_key, 1, f"o{i}-") for i in range(300)]
    report = await _verify_security(tmp_path / "s.db", audit_key,
                                    [quiet[:1], *others, quiet[1:]])
    assert report.ok, report.problems[:3]
    assert (report.security_events, report.security_chains) == (302, 301)


async def test_a_dead_letter_retried_late_breaks_nothing(tmp_path, audit_key):
    """Event 100 was dead-lettered and sent by retry-dead after 500 later ones:
    the sink holds every event, so the chain is whole."""
    chain = _security_chain(audit_key, 600, "u")
    late = chain[100]
    report = await _verify_security(tmp_path / "s.db", audit_key,
                                    [chain[:100], chain[101:], [late]])
    assert report.ok, report.problems[:3]
    assert (report.security_events, report.security_chains) == (600, 1)
    # Never sent at all: one problem, at the event after the gap.
    report = await _verify_security(tmp_path / "gap.db", audit_key, [chain[:100], chain[101:]])
    assert [p.kind for p in report.problems] == ["security_chain"]
    assert chain[101]["_id"] in report.problems[0].detail


async def test_odd_documents_are_findings_not_crashes(stored, audit_key, tmp_path):
    """Verify reads what anyone could have written into the sink: it reports,
    it does not raise."""
    config, sids = stored
    edits = [
        (0, 0, lambda d: d["events"][0].update(actor="alice")),
        (1, 2, lambda d: d["events"][-1].update(details=["logout"])),
        (2, 2, lambda d: d.update(seal_reason=["logout"])),
        (3, 2, lambda d: d.update(session_duration_seconds=float("nan"))),
        (4, 2, lambda d: d.update(final="yes")),
        (5, 1, lambda d: d["events"].append(None)),
    ]
    for i, part, edit in edits:
        tamper(config, sids[i], part, edit)
    found = await problems(config, audit_key)
    assert set(found) == set(sids)

    chain = _security_chain(audit_key, 5, "n")
    chain[2]["details"] = {"score": float("nan")}
    report = await _verify_security(tmp_path / "nan.db", audit_key, [chain])
    # NaN is not JSON: SQLite cannot read the document's fields either.
    assert sorted((p.kind, p.detail.split()[:3]) for p in report.problems) == [
        ("changed", ["security", "event", f"{chain[2]['_id']}:"]),
        ("security_chain", ["event", chain[2]["_id"], f"({chain[2]['ts']},"])]


async def test_a_sealed_session_relabelled_as_a_checkpoint_is_found(stored, audit_key):
    config, sids = stored

    def relabel(doc):
        doc.update(final=False, seal_reason="checkpoint", session_end_time=None,
                   session_duration_seconds=None)

    tamper(config, sids[0], 2, relabel)
    found = await problems(config, audit_key)
    assert found == {sids[0]: {"bad_part"}}


async def test_a_refused_logout_inside_a_checkpoint_part_is_not_an_end(
    make_config, engines, audit_key
):
    """A refused logout records session.end with outcome failure and the
    session goes on; a checkpoint part may end with it."""
    config = make_config(audit={"part_max_events": 3},
                         flush={"max_writes_per_second": 1000.0, "burst": 100})
    engine = await engines.open(config)
    src = Source(user="alice", role="user", ip="127.0.0.1")
    s = await engine.start_session("alice", "user", src, 3600)
    await engine.record(s.session_id, Draft("session.end", outcome="failure",
                                            details={"reason": "invalid_request"}))
    await engine.record(s.session_id, Draft("document.list"))
    await engine.end_session(s.session_id, src)
    await engines.drain(engine)
    parts = await engine.sink.get_session_parts(s.session_id)
    assert parts[0]["events"][-1]["action"] == "session.end" and not parts[0]["final"]
    report = await verify_sink(engine.sink, audit_key)
    assert report.ok, report.problems


async def test_security_copies_and_joined_gaps(tmp_path, audit_key):
    chain = _security_chain(audit_key, 8, "u")
    copy = {**chain[0], "_id": "a-copy"}
    report = await _verify_security(tmp_path / "copy.db", audit_key, [[chain[0], copy], chain[1:]])
    assert [p.detail.split()[1] for p in report.problems] == ["a-copy"]
    assert "copy" in report.problems[0].detail and report.security_chains == 1

    # e1 removed; e4, e5 arrive before e2, e3: one break, at e2, not at e4.
    order = [chain[0], chain[4], chain[5], chain[2], chain[3], chain[6], chain[7]]
    report = await _verify_security(tmp_path / "gap.db", audit_key, [[e] for e in order])
    assert [p.detail.split()[1] for p in report.problems] == [chain[2]["_id"]]
    assert report.security_events == 7


async def test_security_breaks_and_copies_are_the_streams_findings(tmp_path, audit_key):
    """Copies and breaks are security_chain findings of the security stream,
    a copy counted once among the events; a row whose hash is not text is a
    break, and the events after it are still followed."""
    chain = _security_chain(audit_key, 6, "u")
    copy = {**chain[1], "_id": "a-copy"}
    report = await _verify_security(tmp_path / "copy.db", audit_key, [chain[:2], [copy], chain[2:]])
    assert [(p.session_id, p.kind) for p in report.problems] == [("security", "security_chain")]
    assert report.security_events == 7
    odd = {**chain[2], "hash": 5}
    report = await _verify_security(tmp_path / "odd.db", audit_key,
                                    [[e] for e in [*chain[:2], odd, *chain[3:]]])
    breaks = [(p.session_id, p.detail.split()[1]) for p in report.problems
              if p.kind == "security_chain"]
    assert breaks == [("security", chain[2]["_id"]), ("security", chain[3]["_id"])]
    assert report.security_events == 6


def _count_hmacs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count verify's HMACs from now on (in the list's one item)."""
    from audit import verify

    calls = [0]
    real = verify.chain_hash

    def counted(key: bytes, prev: str, body: str) -> str:
        calls[0] += 1
        return real(key, prev, body)

    monkeypatch.setattr(verify, "chain_hash", counted)
    return calls


async def test_many_short_chains_stay_quick(tmp_path, audit_key, monkeypatch):
    """Thousands of servers' one- or two-event chains, then a long chain with
    a gap: each event is found among the recent chains, or as a new chain,
    without trying every chain that ever ended (a count of HMACs, not time)."""

    shorts = [e for i in range(1500) for e in _security_chain(audit_key, 2, f"s{i}-")]
    long = _security_chain(audit_key, 3000, "long")
    del long[1000]
    calls = _count_hmacs(monkeypatch)
    report = await _verify_security(tmp_path / "s.db", audit_key, [shorts, long])
    assert [p.detail.split()[1] for p in report.problems] == [long[1000]["_id"]]
    assert report.security_events == 3000 + 2999
    assert calls[0] < 20 * report.security_events, calls



async def test_forged_security_events_that_continue_nothing_stay_linear(
    tmp_path, audit_key, monkeypatch
):
    """Rows forged (without the key) to continue no chain: each was tried
    against every chain seen so far, its JSON encoded anew each time, and
    verify's time grew with the square of their number (1,000 took 11 s,
    50,000 would take hours). Now at most SECURITY_WAITING waiting chains
    are kept to be tried (a count of HMACs, not time), each forged row is
    still one problem, and the server's chain across the flood is still
    followed: a chain of two events or more stays (only the key makes one)."""
    from audit import verify

    monkeypatch.setattr(verify, "SECURITY_WAITING", 50)
    chain = _security_chain(audit_key, 40, "real")
    forged = [{**chain[0], "_id": f"forged-{i}", "event_id": f"forged-{i}",
               "hash": f"{i:032x}" * 2, "ts": chain[19]["ts"]} for i in range(2000)]
    calls = _count_hmacs(monkeypatch)
    report = await _verify_security(tmp_path / "f.db", audit_key,
                                    [chain[:20], forged, chain[20:]])
    assert calls[0] < 200 * len(forged), calls  # (unbounded: ≈ 6,000,000)
    details = [p.detail.split()[1] for p in report.problems]
    assert sorted(details) == sorted(f["_id"] for f in forged)
    assert report.security_chains == 1


async def test_past_the_waiting_bound_a_single_forged_row_goes_not_a_chain(
    tmp_path, audit_key, monkeypatch
):
    """Of the chains waiting for their first event's predecessor, a run of
    two or more (only the key makes one) is kept past SECURITY_WAITING and
    linked once the predecessor comes; single rows are given up first (found
    by mutation testing: every chain counted as two events, and the run was
    reported as a break)."""
    from audit import verify

    monkeypatch.setattr(verify, "SECURITY_WAITING", 3)
    chain = _security_chain(audit_key, 3, "real")
    forged = [{**chain[0], "_id": f"forged-{i}", "event_id": f"forged-{i}",
               "hash": f"{i:032x}" * 2} for i in range(5)]
    report = await _verify_security(tmp_path / "w.db", audit_key,
                                    [chain[1:], forged, chain[:1]])
    assert sorted(p.detail.split()[1] for p in report.problems) == [
        f["_id"] for f in forged]
    assert (report.security_events, report.security_chains) == (8, 1)


async def test_a_run_joined_from_events_that_came_backwards_is_kept_past_the_waiting_bound(
    tmp_path, audit_key, monkeypatch
):
    """A run of a chain's events that came newest first (a sink ordering by
    ts alone, equal times) is joined into one waiting chain of two: it is
    kept past SECURITY_WAITING as a run built forwards is, and linked when
    its predecessor comes; only the single forged rows are given up (found
    by mutation testing: a joined run's size not counted, it was given up
    as a single row and reported as a break)."""
    from audit import verify

    monkeypatch.setattr(verify, "SECURITY_WAITING", 2)
    chain = _security_chain(audit_key, 4, "real")
    forged = [{**chain[0], "_id": f"forged-{i}", "event_id": f"forged-{i}",
               "hash": f"{i:032x}" * 2} for i in range(3)]
    report = await _verify_security(tmp_path / "b.db", audit_key,
                                    [[chain[0]], [chain[3]], [chain[2]], forged, [chain[1]]])
    assert sorted(p.detail.split()[1] for p in report.problems) == [
        f["_id"] for f in forged]
    assert (report.security_events, report.security_chains) == (7, 1)


async def test_events_linked_late_no_longer_count_toward_the_window(
    tmp_path, audit_key, monkeypatch
):
    """SECURITY_WINDOW bounds the events waiting for a predecessor; once a
    waiting run is linked its events wait no more. Two runs that came
    before their predecessors, each of exactly the window, one after the
    other, are whole (found by mutation testing: linked events still
    counted, and the second run, or one at the bound, was taken for a
    break)."""
    from audit import verify

    monkeypatch.setattr(verify, "SECURITY_WINDOW", 3)
    c = _security_chain(audit_key, 9, "late")
    order = [c[1], c[2], c[3], c[0], c[5], c[6], c[7], c[4], c[8]]
    report = await _verify_security(tmp_path / "w.db", audit_key, [[e] for e in order])
    assert report.ok, report.problems
    assert (report.security_events, report.security_chains) == (9, 1)


async def test_rows_the_sink_cannot_decode_are_findings(stored, audit_key):
    config, sids = stored
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as c, c:
        c.execute("UPDATE parts SET doc = '{' WHERE session_id = ? AND part = 1", (sids[0],))
        c.execute("INSERT INTO security_events (id, ts, action, hash, doc)"
                  " VALUES ('bad', '2026-11-26T10:00:00.000Z', 'auth.login_failed', 'x', '{')")
    report = await report_of(config, audit_key)
    kinds = {(p.session_id, p.kind) for p in report.problems}
    assert (sids[0], "bad_part") in kinds and ("security", "security_chain") in kinds
    assert ("the sink's security events cannot be read to the end (JSONDecodeError)"
            in {p.detail for p in report.problems})


async def failed_logins(engine: Any, n: int) -> None:
    """``n`` security events (failed logins) recorded by ``engine``."""
    for i in range(n):
        await engine.record_security(
            Draft("auth.login_failed", outcome="denied", source=Source(ip="10.0.0.3"),
                  details={"username": f"x{i}"}), happened=True)


async def test_the_newest_security_events_cannot_go_missing_unseen(
    make_config, engines, audit_key
):
    """The end of a chain has no successor to miss it; this server's spool
    knows where its chain stands (its head, its first unsent event)."""
    from audit.verify import spool_anchor

    config = make_config(flush={"max_writes_per_second": 1000.0, "burst": 100})
    engine = await engines.open(config)

    async def record(n: int) -> None:
        await failed_logins(engine, n)

    async def verified() -> Any:
        anchor = await engine.spool.read(lambda c: spool_anchor(c, audit_key))
        return await verify_sink(engine.sink, audit_key, anchor)

    def drop_newest_stored() -> None:
        with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as c, c:
            c.execute("DELETE FROM security_events WHERE rowid ="
                      " (SELECT MAX(rowid) FROM security_events)")

    await engines.drain(engine)  # opens the sink
    assert (await verified()).ok  # nothing written yet: the genesis head
    await record(5)
    assert (await verified()).ok  # nothing sent yet: the first unsent continues genesis
    await engines.drain(engine)
    assert (await verified()).ok
    await record(3)  # unsent, behind the five in the sink
    assert (await verified()).ok
    drop_newest_stored()
    assert [(p.session_id, p.kind, p.detail.split(":")[0]) for p in
            (await verified()).problems] == [
        ("security", "security_chain", "the sink lacks this server's newest security events")]
    await engines.drain(engine)  # the three are sent: the spool's head is the check now
    report = await verified()
    assert len(report.problems) == 1  # the gap the drop left, nothing more
    drop_newest_stored()
    assert len((await verified()).problems) == 2


async def test_security_events_sent_between_reading_the_spool_and_the_sink_are_no_gap(
    make_config, engines, audit_key
):
    """verify reads the spool first, then the sink: a flush in between stores
    the spool's first unsent event and more after it. The sink's chain then
    ends past that event, which it holds: the chain is whole."""
    from audit.verify import spool_anchor

    config = make_config(flush={"max_writes_per_second": 1000.0, "burst": 100})
    engine = await engines.open(config)

    async def record(n: int) -> None:
        await failed_logins(engine, n)

    await engines.drain(engine)  # opens the sink
    await record(2)
    await engines.drain(engine)
    await record(3)
    anchor = await engine.spool.read(lambda c: spool_anchor(c, audit_key))
    assert anchor.first_unsent is not None
    await engines.drain(engine)  # the three are sent after the spool was read
    report = await verify_sink(engine.sink, audit_key, anchor)
    assert report.ok, report.problems
    assert report.security_events == 5


async def test_a_removed_final_part_is_found_once_the_session_cannot_be_open(
    stored, audit_key
):
    """Without its final part a session looks open with checkpoint parts. Once
    it started longer ago than any session lasts (max_session_seconds and a
    margin), and the server's spool does not hold it, the missing end is a
    finding."""
    from audit.events import parse_ts
    from audit.spool import connect
    from audit.verify import SpoolAnchor, spool_anchor

    config, sids = stored
    delete_part(config, sids[0], 2)
    sink = SqliteSink(config.sqlite_sink_path)
    await sink.open()
    try:
        (first, *_) = await sink.get_session_parts(sids[1])
        start = parse_ts(first["session_start_time"])
        overdue = config.audit.max_session_seconds + 86400
        with contextlib.closing(connect(config.spool_path, "normal", readonly=True)) as conn:
            remembered = spool_anchor(conn, audit_key)
        assert sids[0] not in remembered.unfinished  # stored: the spool no longer holds it
        # The spool remembers the sessions it stored whole lately: at once.
        soon = await verify_sink(sink, audit_key, remembered, overdue_after=overdue,
                                 now=start + 3600)
        assert [(p.session_id, p.kind) for p in soon.problems] == [(sids[0], "missing_part")]
        assert "which this server's spool stored in this sink" in soon.problems[0].detail
        # A spool that does not remember it (another sink, or long ago):
        anchor = SpoolAnchor(remembered.head, remembered.first_unsent, remembered.unfinished)
        soon = await verify_sink(sink, audit_key, anchor, overdue_after=overdue,
                                 now=start + 3600)
        assert soon.ok, soon.problems  # it could still be open
        late = await verify_sink(sink, audit_key, anchor, overdue_after=overdue,
                                 now=start + overdue + 60)
        assert [(p.session_id, p.kind) for p in late.problems] == [(sids[0], "missing_part")]
        assert "no final part" in late.problems[0].detail
        # Without the server's spool, verify cannot tell an open session from it.
        assert (await verify_sink(sink, audit_key, None, overdue_after=overdue,
                                  now=start + overdue + 60)).ok
        # Still open (or its final part pending) in the spool: not a finding.
        held = SpoolAnchor(anchor.head, anchor.first_unsent, frozenset({sids[0]}))
        assert (await verify_sink(sink, audit_key, held, overdue_after=overdue,
                                  now=start + overdue + 60)).ok
    finally:
        await sink.close()


@pytest.mark.parametrize("same_hash", [False, True])
async def test_a_second_jsonl_copy_with_other_content_is_found(
    make_config, engines, audit_key, same_hash
):
    """An append-only file can hold a second line with a stored _id: readers
    that keep the last one would see it instead of the original. Whoever
    appends it chooses its hash; an identical copy is harmless."""
    from sinks.jsonl import JsonlSink

    config = make_config(sink={"type": "jsonl"},
                         flush={"max_writes_per_second": 1000.0, "burst": 100})
    engine = await engines.open(config, JsonlSink(config.jsonl_dir))
    src = Source(user="alice", role="user", ip="127.0.0.1")
    s = await engine.start_session("alice", "user", src, 3600)
    await engine.record(s.session_id, Draft("document.access"))
    await engine.end_session(s.session_id, src)
    await engines.drain(engine)
    (path,) = config.jsonl_dir.glob("*.jsonl")
    (line,) = [ln for ln in path.read_text().splitlines() if s.session_id in ln]
    forged = json.loads(line)
    forged["events"][2]["actor"]["user"] = "mallory"
    if not same_hash:
        forged["hash"] = "f" * 64
    with path.open("a") as f:
        f.write(line + "\n")  # an identical copy: not a finding
        f.write(json.dumps(forged) + "\n")
    sink = JsonlSink(config.jsonl_dir)
    await sink.open()
    try:
        report = await verify_sink(sink, audit_key)
    finally:
        await sink.close()
    assert [(p.session_id, p.kind) for p in report.problems] == [(s.session_id, "changed")]
    assert "another copy" in report.problems[0].detail


def stored_part(config, session_id: str, part: int) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as conn:
        (text,) = conn.execute("SELECT doc FROM parts WHERE session_id = ? AND part = ?",
                               (session_id, part)).fetchone()
    doc: dict[str, Any] = json.loads(text)
    return doc


def insert_part(config, doc: dict[str, Any]) -> None:
    """A new row whose query columns agree with its document (as the sink
    writes them): only the document's content is wrong."""
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as conn, conn:
        conn.execute(
            "INSERT INTO parts (id, session_id, part, user, session_start_time, final, hash,"
            " doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (doc["_id"], doc["session_id"], doc["part"], doc["user"],
             doc["session_start_time"], int(doc["final"]), doc["hash"], json.dumps(doc)))


async def findings(config, key) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for p in (await report_of(config, key)).problems:
        out.setdefault(p.session_id, []).append((p.kind, p.detail))
    return out


async def test_parts_that_cannot_be_the_sessions_own_are_found(stored, audit_key):
    """The admin API shows the events of every stored part of a session: a
    forged part must not pass verify because its number, _id or session is
    not one verify looks at (found by a review: all six passed before)."""
    config, sids = stored
    after, twice, negative, wrong_id, wrong_session, extra_field = sids

    def forged(sid: str, part: int, **fields: Any) -> dict[str, Any]:
        doc = stored_part(config, sid, 1)  # a checkpoint: events 4-6
        doc["events"][0]["action"] = "document.delete"
        return {**doc, "part": part, "_id": f"{sid}:{part}", **fields}

    insert_part(config, forged(after, 3))  # past the final part 2
    insert_part(config, forged(twice, 1, _id="another-id"))  # a second part 1
    insert_part(config, forged(negative, -1))
    # The same part under another _id, and naming another session.
    tamper(config, wrong_id, 1, lambda d: d.update(_id=f"{wrong_id}:7"))
    tamper(config, wrong_session, 1, lambda d: d.update(session_id="f" * 32))
    tamper(config, extra_field, 0, lambda d: d.update(approved_by="the CFO"))

    found = await findings(config, audit_key)
    assert set(found) == set(sids)
    assert ("bad_part", "part 3 comes after the final part 2") in found[after]
    assert any(k == "changed" and d.startswith("part 1 is stored twice")
               and "'another-id'" in d for k, d in found[twice])
    assert ("bad_part", f"a part numbered -1 ('{negative}:-1')") in found[negative]
    assert ("bad_part", f"part 1 is stored under _id '{wrong_id}:7'") in found[wrong_id]
    assert any(d.startswith(f"part 1 ('{wrong_session}:1') names session 'fff")
               for _, d in found[wrong_session])
    assert found[extra_field] == [
        ("bad_part", "part 0: fields outside the record: approved_by")]


async def test_a_final_parts_hash_and_a_parts_last_event_are_checked(stored, audit_key):
    """Found by mutation testing (each check removed, the suite passed):
    the final part's own ``hash`` (outside the chain; what a sink compares a
    retried write with) edited; and the last event of a checkpoint part
    removed by a forger who fixes the count and the part's hash but leaves
    ``last_seq``: verify names the missing seq."""
    config, sids = stored
    edited, truncated, *_, untouched = sids

    def drop_last(doc):
        doc["events"].pop()
        doc["event_count"] -= 1
        doc["hash"] = doc["events"][-1]["hash"]

    tamper(config, edited, 2, lambda d: d.update(hash="0" * 64))
    tamper(config, truncated, 1, drop_last)  # a checkpoint of seq 4-6
    found = await findings(config, audit_key)
    # (The sink's own hash column, not edited, is found as well.)
    assert ("bad_part", "part 2: hash is not the last event's") in found[edited]
    assert ("removed", "part 1: seq [6] missing") in found[truncated]
    assert untouched not in found


@pytest.mark.parametrize(("field", "value", "finding"), [
    ("prev_hash", "0" * 64, "part 1: prev_hash does not continue the chain"),
    ("first_seq", 5, "part 1: first_seq 5 != 4"),
], ids=["prev_hash", "first_seq"])
async def test_a_parts_chain_fields_edited_alone_are_named(
    stored, audit_key, field, value, finding
):
    """A part's ``prev_hash`` or ``first_seq`` edited alone is reported as
    that field of that part, not only as the events that then fail (found by
    mutation testing: either check removed, the suite passed)."""
    config, sids = stored
    tamper(config, sids[0], 1, lambda d: d.update({field: value}))
    found = await findings(config, audit_key)
    assert set(found) == {sids[0]}
    assert ("bad_part", finding) in found[sids[0]]


async def test_an_empty_part_is_found(stored, audit_key):
    """Every cut takes at least one event: an empty part slipped in (the
    later parts renumbered, its hash its prev_hash) was not found before."""
    config, sids = stored
    sid = sids[0]
    parts = [stored_part(config, sid, n) for n in range(3)]
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as conn, conn:
        conn.execute("DELETE FROM parts WHERE session_id = ?", (sid,))
    empty = {**parts[0], "part": 1, "_id": f"{sid}:1", "events": [], "event_count": 0,
             "first_seq": 4, "last_seq": 3, "prev_hash": parts[0]["hash"]}
    renumbered = [{**p, "part": n + 1, "_id": f"{sid}:{n + 1}"} for n, p in enumerate(parts)]
    for doc in (parts[0], empty, *renumbered[1:]):
        insert_part(config, doc)
    found = await findings(config, audit_key)
    assert found == {sid: [("bad_part", "part 1: holds no events")]}


async def test_the_sinks_query_columns_are_held_to_its_documents(stored, audit_key, tmp_path):
    """The sqlite sink's listings filter on columns copied from the documents:
    a column changed alone hid a session from ?user= or a security event from
    ?kind= while verify, reading the documents, said OK."""
    config, sids = stored
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as conn, conn:
        conn.execute("UPDATE parts SET user = 'mallory' WHERE session_id = ?", (sids[0],))
        conn.execute("UPDATE parts SET session_start_time = '2001-01-01T00:00:00.000Z',"
                     " final = 1 WHERE session_id = ? AND part = 1", (sids[1],))
    found = await findings(config, audit_key)
    assert set(found) == {sids[0], sids[1]}
    assert [k for k, _ in found[sids[0]]] == ["bad_part"] * 3  # one a part
    assert "query columns (user)" in found[sids[0]][0][1]
    assert found[sids[1]] == [("bad_part", f"part {sids[1]}:1: the sink's query columns"
                               " (session_start_time, final) are not the stored document's:"
                               " the admin API's listings filter on them")]

    chain, path = await _three_security_events(tmp_path, audit_key)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE security_events SET action = 'auth.logout' WHERE id = ?",
                     (chain[1]["_id"],))
    report = await _verify_security(path, audit_key, [])
    assert [(p.session_id, p.kind, p.detail.split(":")[0]) for p in report.problems] == [
        ("security", "changed", f"security event {chain[1]['_id']}")]


async def test_a_security_event_under_another_id_is_found(tmp_path, audit_key):
    chain = _security_chain(audit_key, 3, "i")
    chain[1]["_id"] = "chosen-by-someone"
    report = await _verify_security(tmp_path / "s.db", audit_key, [chain])
    assert [(p.session_id, p.kind, p.detail) for p in report.problems] == [
        ("security", "security_chain",
         f"event {chain[1]['event_id']!r} is stored under _id 'chosen-by-someone'")]


async def test_verify_reads_the_sqlite_sink_without_writing_it(stored, audit_key):
    """verify opened the sink as the server does: a file whose tables were
    dropped got them back, empty, and then verified as OK."""
    from sinks.base import SinkUnavailable

    config, _ = stored
    path = config.sqlite_sink_path
    sink = SqliteSink(path, readonly=True)
    await sink.open()
    try:
        assert (await verify_sink(sink, audit_key)).ok
    finally:
        await sink.close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TABLE parts")
    before = path.read_bytes()
    sink = SqliteSink(path, readonly=True)
    with pytest.raises(SinkUnavailable, match="holds no audit tables"):
        await sink.open()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
    assert "parts" not in tables and path.read_bytes() == before


def test_the_fields_verify_accepts_are_those_the_server_writes() -> None:
    from audit.store import part_document
    from audit.verify import PART_FIELDS

    meta = {"session_id": "s", "part": 0, "final": 1, "end_ts": 2.0, "user": "u",
            "start_ts": 1.0, "first_seq": 1, "last_seq": 1, "seal_reason": "logout",
            "prev_hash": "p", "hash": "h"}
    assert set(part_document(meta, [])) == PART_FIELDS


async def test_a_recently_stored_session_removed_whole_is_found(stored, audit_key, fake_clock):
    """A session removed from the sink whole left nothing for verify to find.
    The spool remembers the sessions it stored whole in which sink, for as
    long as a session may look open (open_window): within that time the
    sink must hold them; another sink's are not asked of this one."""
    from audit.config import open_window, sink_identity
    from audit.spool import connect
    from audit.verify import spool_anchor

    config, sids = stored
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as conn, conn:
        conn.execute("DELETE FROM parts WHERE session_id = ?", (sids[2],))

    async def verified(sink_id: str | None) -> Any:
        with contextlib.closing(connect(config.spool_path, "normal", readonly=True)) as conn:
            anchor = spool_anchor(conn, audit_key, sink_id)
        sink = SqliteSink(config.sqlite_sink_path, readonly=True)
        await sink.open()
        try:
            return await verify_sink(sink, audit_key, anchor, overdue_after=open_window(config))
        finally:
            await sink.close()

    report = await verified(sink_identity(config))
    assert [(p.session_id, p.kind) for p in report.problems] == [(sids[2], "missing_part")]
    assert report.problems[0].detail.startswith("the sink holds no part of this session")
    assert (await verified("jsonl /elsewhere")).ok  # stored in another sink: not this one's
    with contextlib.closing(sqlite3.connect(config.spool_path)) as conn:
        remembered = conn.execute("SELECT COUNT(*) FROM stored_sessions").fetchone()[0]
    assert remembered == len(sids)

    # Two removed: each is named (found by mutation testing: one alone passed).
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as conn, conn:
        conn.execute("DELETE FROM parts WHERE session_id = ?", (sids[0],))
    report = await verified(sink_identity(config))
    assert [(p.session_id, p.kind) for p in report.problems] == [
        (sid, "missing_part") for sid in sorted((sids[0], sids[2]))]


async def test_sessions_stored_whole_are_remembered_only_so_long(
        make_config, engines, fake_clock):
    from audit.config import open_window

    config = make_config(flush={"max_writes_per_second": 1000.0, "burst": 100})
    engine = await engines.open(config, clock=fake_clock)
    src = Source(user="alice", role="user")

    async def one_session() -> str:
        s = await engine.start_session("alice", "user", src, 3600)
        await engine.end_session(s.session_id, src)
        await engines.drain(engine)
        return str(s.session_id)

    async def remembered() -> list[str]:
        return await engine.spool.read(lambda c: [r[0] for r in c.execute(
            "SELECT session_id FROM stored_sessions ORDER BY stored_ts")])

    first = await one_session()
    fake_clock.advance(open_window(config) - 1)
    second = await one_session()
    assert await remembered() == [first, second]
    fake_clock.advance(2)
    third = await one_session()
    assert await remembered() == [second, third]  # the first's time is over


@pytest.mark.timeout(10)
async def test_a_huge_part_number_or_last_seq_is_one_finding_not_a_hang(stored, audit_key):
    """verify counted up to a part's number (and to its last_seq), listing
    every number below it: one forged row with part 10**7 in a session of its
    own took 20 s and printed ten million lines; with 10**12 verify ran out of
    memory, printing nothing, and so hid every other finding."""
    config, sids = stored
    huge = 10**7
    doc = stored_part(config, sids[0], 1)
    insert_part(config, {**doc, "session_id": "f" * 32, "part": huge,
                         "_id": f"{'f' * 32}:{huge}"})
    tamper(config, sids[1], 1, lambda d: d.update(last_seq=huge))
    found = await findings(config, audit_key)
    assert set(found) == {"f" * 32, sids[1]}
    assert ("missing_part", f"parts 0 to {huge - 1} are not stored") in found["f" * 32]
    assert ("removed", f"part 1: seq [7-{huge}] missing") in found[sids[1]]


async def _jsonl_session(make_config, engines) -> tuple[Any, str, Any]:
    """One session of three events and one security event in a JsonlSink:
    the config, the session id and the day file."""
    from sinks.jsonl import JsonlSink

    config = make_config(sink={"type": "jsonl"},
                         flush={"max_writes_per_second": 1000.0, "burst": 100})
    engine = await engines.open(config, JsonlSink(config.jsonl_dir))
    src = Source(user="alice", role="user", ip="127.0.0.1")
    s = await engine.start_session("alice", "user", src, 3600)
    await engine.record(s.session_id, Draft("document.access",
                                            target={"type": "document", "id": "d1"}))
    await engine.record_security(Draft("auth.login_failed", outcome="denied",
                                       details={"username": "bob"}), happened=True)
    await engine.end_session(s.session_id, src)
    await engines.drain(engine)
    await engines.close(engine)
    (path,) = config.jsonl_dir.glob("*.jsonl")
    return config, s.session_id, path


async def _jsonl_report(config, key) -> Any:
    from sinks.jsonl import JsonlSink

    sink = JsonlSink(config.jsonl_dir, readonly=True)
    await sink.open()
    try:
        return await verify_sink(sink, key)
    finally:
        await sink.close()


async def test_a_forged_jsonl_copy_behind_10000_identical_ones_is_found(
    make_config, engines, audit_key
):
    """The index kept the first 10,000 repeated lines to compare: 10,000
    identical copies of a part (harmless, not reported), then one with other
    content, and verify said OK."""
    config, sid, path = await _jsonl_session(make_config, engines)
    (line,) = [ln for ln in path.read_text().splitlines() if f'"{sid}:0"' in ln]
    forged = json.loads(line)
    forged["events"][2]["target"]["id"] = "the-board-minutes"
    with path.open("a") as f:
        f.write((line + "\n") * 10_000 + json.dumps(forged) + "\n")
    report = await _jsonl_report(config, audit_key)
    assert [(p.kind, p.detail) for p in report.problems] == [(
        "changed", "1 more lines with an _id stored already, not compared with its first"
        " line (past the 10,000 that were): verify cannot check it, and a reader of the sink"
        " may take it")]


async def test_jsonl_lines_verify_cannot_place_are_found(make_config, engines, audit_key):
    """Lines the index skipped were never checked, and verify said OK, while
    jq (which reads invalid UTF-8 as U+FFFD) or a shipper takes them: a forged
    part with one byte that is not UTF-8, one whose part is a string, one
    without a type; a security event whose ts is a number; an array; a part
    without its _id."""
    config, sid, path = await _jsonl_session(make_config, engines)
    lines = path.read_text().splitlines()
    (part,) = [json.loads(ln) for ln in lines if f'"{sid}:0"' in ln]
    (sec,) = [json.loads(ln) for ln in lines if '"security_event"' in ln]
    assert (await _jsonl_report(config, audit_key)).ok
    other = "e" * 32

    def forged(**fields: Any) -> dict[str, Any]:
        return {**part, "session_id": other, "_id": f"{other}:{fields.get('part', 0)}",
                **fields}

    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(json.dumps(forged(user="mallory"), ensure_ascii=False).encode()
                .replace(b'"mallory"', b'"mall\xffory"') + b"\n")
        f.write(json.dumps(forged(part="1")).encode() + b"\n")
        f.write(json.dumps({k: v for k, v in forged(part=2).items() if k != "type"}).encode()
                + b"\n")
        f.write(json.dumps({**sec, "_id": "x", "event_id": "x", "ts": 1.8e9}).encode() + b"\n")
        f.write(b"[1, 2]\n")
        f.write(json.dumps({k: v for k, v in forged(part=3).items() if k != "_id"}).encode()
                + b"\n")  # an object, but no _id (was a KeyError: no sink, no verify)
    report = await _jsonl_report(config, audit_key)
    where = [int(p.detail.split(", byte ")[1].split(":")[0]) for p in report.problems]
    assert where[0] == size and where == sorted(where) and len(where) == 6
    assert [p.detail.split(": ")[1] for p in report.problems] == [
        "a line that is not JSON (or not UTF-8)",
        "a session part without a string session_id, an integer part and a string"
        " session_start_time",
        "a line of type None, neither 'session_part' nor 'security_event'",
        "a security event without a string ts and _id",
        "a line that is not an object with an _id",
        "a line that is not an object with an _id"]
    assert {(p.session_id, p.kind) for p in report.problems} == {("", "changed")}


async def test_a_second_jsonl_copy_of_a_security_event_is_the_sinks_finding(
    make_config, engines, audit_key
):
    """A forged copy of a stored security event appended to the file (verify
    follows the first): "changed", named by the event, under no session."""
    config, _, path = await _jsonl_session(make_config, engines)
    (line,) = [ln for ln in path.read_text().splitlines() if '"security_event"' in ln]
    forged = json.loads(line)
    forged["details"]["username"] = "mallory"
    with path.open("a") as f:
        f.write(json.dumps(forged) + "\n")
    report = await _jsonl_report(config, audit_key)
    assert [(p.session_id, p.kind, p.detail.split(": ")[0]) for p in report.problems] == [
        ("", "changed", f"security event {forged['_id']}")]
    assert "another copy" in report.problems[0].detail


async def test_a_key_given_twice_or_escaped_cannot_steer_the_sqlite_listings(
    stored, audit_key, tmp_path
):
    """The query columns were held to json_extract's reading of the document,
    which takes the first of two equal keys and does not match an escaped
    one; verify and the admin API read them with Python's json (the last
    one; the key unescaped). A part listed under ?user=mallory (and missing
    from ?user=alice) while every reader above showed alice, one with no
    user column at all (its key escaped: in no ?user= listing), a security
    event missing from ?kind=auth.login_failed, and an event whose actor
    json_extract reads as mallory all passed verify as OK."""
    config, sids = stored
    twice, escaped, nested = sids[:3]
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as conn, conn:
        def rewrite(sid: str, old: str, new: str, **columns: str) -> None:
            (doc,) = conn.execute("SELECT doc FROM parts WHERE session_id = ? AND part = 0",
                                  (sid,)).fetchone()
            assert old in doc
            sets = "".join(f", {c} = {v}" for c, v in columns.items())
            conn.execute(f"UPDATE parts SET doc = ?{sets} WHERE session_id = ? AND part = 0",
                         (doc.replace(old, new, 1), sid))

        rewrite(twice, '{"_id"', '{"user":"mallory","_id"', user="'mallory'")
        rewrite(escaped, '"user":"alice"', '"us\\u0065r":"alice"', user="NULL")
        rewrite(nested, '"actor":{', '"actor":{"user":"mallory",')
        assert conn.execute("SELECT json_extract(doc, '$.user'), json_extract(doc,"
                            " '$.events[0].actor.user') FROM parts WHERE part = 0 AND"
                            " session_id IN (?, ?) ORDER BY session_id = ?", (twice, nested, nested)
                            ).fetchall() == [("mallory", "alice"), ("alice", "mallory")]
    for sid in (twice, escaped, nested):
        assert stored_part(config, sid, 0)["user"] == "alice"
    found = await findings(config, audit_key)
    assert set(found) == {twice, escaped, nested}
    assert found[escaped] == [("bad_part", f"part {escaped}:0: the sink's query columns"
                               " (user) are not the stored document's: the admin API's"
                               " listings filter on them")]
    for sid in (twice, nested):
        assert found[sid] == [("bad_part", f"part {sid}:0: the stored document is not JSON,"
                               " or has a key twice in one object (readers differ on which"
                               " value counts)")]

    chain, path = await _three_security_events(tmp_path, audit_key)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        (doc,) = conn.execute("SELECT doc FROM security_events WHERE id = ?",
                              (chain[1]["_id"],)).fetchone()
        conn.execute("UPDATE security_events SET doc = ?, action = 'admin.denied' WHERE id = ?",
                     ('{"action":"admin.denied",' + doc[1:], chain[1]["_id"]))
    report = await _verify_security(path, audit_key, [])
    assert [(p.kind, p.detail.split(":")[0]) for p in report.problems] == [
        ("changed", f"security event {chain[1]['_id']}")]


async def test_a_security_event_with_a_lone_surrogate_does_not_end_the_check(
    tmp_path: Any, audit_key: bytes
) -> None:
    """A row anyone can write into the sqlite sink (JSON text: ``"\\ud800"``
    is valid JSON, read by Python's json as a lone surrogate) made the
    chain's HMAC raise UnicodeEncodeError, which since the body is encoded
    once outside the check (``_security_body``) ended the whole security
    check: every later event went unchecked, a removed one among them
    unreported. It is one break, and the rest is checked."""
    chain = _security_chain(audit_key, 10, "u")
    forged = {**chain[3], "_id": "forged", "event_id": "forged", "action": "\ud800",
              "hash": "ab" * 32}
    path = tmp_path / "s.db"
    sink = SqliteSink(path)
    await sink.open()
    try:
        # chain[7] is never sent: a removed event, after the forged one.
        await sink.write_security_events(chain[:4] + chain[8:])
        # ... and one whose hash holds a lone surrogate: the next event
        # tried against it as a chain's head raised the same way.
        bad_hash = {**chain[5], "_id": "bad-hash", "event_id": "bad-hash",
                    "hash": "cd" * 20 + "\ud800"}
        await sink.write_security_events([{**forged, "action": "x"},
                                          {**bad_hash, "hash": "cd" * 20}])
        with contextlib.closing(sqlite3.connect(path)) as c, c:
            for doc in (forged, bad_hash):
                c.execute("UPDATE security_events SET doc = ? WHERE id = ?",
                          (json.dumps(doc), doc["_id"]))
        report = await verify_sink(sink, audit_key)
    finally:
        await sink.close()
    chain_problems = [p.detail for p in report.problems if p.kind == "security_chain"]
    assert not any("cannot be read to the end" in d for d in chain_problems), chain_problems
    assert any(d.startswith("event forged ") for d in chain_problems), chain_problems
    assert any(d.startswith("event bad-hash ") for d in chain_problems), chain_problems
    assert any(d.startswith(f"event {chain[8]['_id']} ") for d in chain_problems), chain_problems


async def test_a_part_of_a_session_with_an_empty_id_is_verified(stored, audit_key):
    """The sqlite sink listed session ids from after "": a part forged under
    the session id "" (which the admin API's listing shows) was never
    checked, and verify said OK."""
    config, sids = stored
    doc = stored_part(config, sids[0], 0)
    doc["events"][1]["action"] = "document.delete"
    insert_part(config, {**doc, "session_id": "", "_id": ":0"})
    report = await report_of(config, audit_key)
    assert report.sessions == 7
    assert "" in {p.session_id for p in report.problems}


async def test_a_part_whose_session_id_is_a_blob_ends_the_listing(stored, audit_key):
    """A row another writer gave a BLOB session_id sorts after every text:
    the sqlite sink paged on past its str(), where the text sessions came
    again, and verify listed them for ever (report.sessions growing). It
    ends, and the row is a finding."""
    config, sids = stored
    doc = stored_part(config, sids[0], 0)
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as conn, conn:
        conn.execute(
            "INSERT INTO parts (id, session_id, part, user, session_start_time, final, hash,"
            " doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ("blob:0", sids[0].encode(), 0, doc["user"], doc["session_start_time"], 0,
             doc["hash"], json.dumps({**doc, "_id": "blob:0"})))
    async with asyncio.timeout(30):  # (a hang guard)
        report = await report_of(config, audit_key)
    assert report.sessions == 7
    assert any("blob:0" in p.detail for p in report.problems), report.problems


async def test_verify_on_a_spool_from_before_stored_sessions(
    make_config, engines, audit_key, monkeypatch, capsys
):
    """A spool of a release before stored_sessions, not served since (verify
    opens it read only: nothing makes the table). verify said "the spool
    cannot be read (no such table: stored_sessions); the end of this
    server's security chain is not checked", which was not so: the spool
    reads, and the newest security event removed from the sink went
    unreported (exit 0, OK). Such a spool noted no session stored whole:
    the rest is checked."""
    import server

    config = make_config(flush={"max_writes_per_second": 1000.0, "burst": 100})
    engine = await engines.open(config)
    for i in range(3):
        await engine.record_security(Draft("auth.login_failed", outcome="denied",
                                           source=Source(ip="10.0.0.3"),
                                           details={"username": f"x{i}"}), happened=True)
    await engines.drain(engine)
    await engines.close(engine)
    with contextlib.closing(sqlite3.connect(config.spool_path)) as c, c:
        c.execute("DROP TABLE stored_sessions")
    monkeypatch.setenv(server.AUDIT_KEY_ENV, audit_key.decode())

    assert await server._verify(config) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out.endswith(": OK\n"), out
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as c, c:
        c.execute("DELETE FROM security_events WHERE rowid = (SELECT MAX(rowid)"
                  " FROM security_events)")
    assert await server._verify(config) == 1
    out = capsys.readouterr()
    assert out.err == "" and "security_chain" in out.out, out


def _tampered(parts: list[dict[str, Any]], edit: Any) -> list[dict[str, Any]]:
    out = json.loads(json.dumps(parts))
    result = edit(out)
    return out if result is None else result


async def test_each_finding_names_its_part_kind_and_what_is_wrong(stored, audit_key):
    """One session's parts (seq 1-3, 4-6, 7-8), each tampered alone, give
    exactly the findings named (found by mutation testing: a finding's kind
    or text could be changed, an extra false one added after a missing part,
    and the parts after a bad-numbered or doubled one left unchecked, all
    with the suite passing)."""
    from audit.verify import check_session

    config, sids = stored
    sid = sids[0]
    parts = [stored_part(config, sid, n) for n in range(3)]
    assert check_session(audit_key, sid, parts) == []
    changed_8 = ("changed", "seq 8: hash does not verify")

    def edit_event(n: int, i: int, **fields: Any) -> Any:
        return lambda ps: ps[n]["events"][i].update(fields)

    def and_8_changed(extra: Any) -> Any:
        def edit(ps: list[dict[str, Any]]) -> list[dict[str, Any]]:
            ps[2]["events"][1]["details"] = {"reason": "logout", "note": "edited"}
            return [*ps, extra(ps)]
        return edit

    cases: dict[str, tuple[Any, list[tuple[str, str]]]] = {
        # A missing middle part is that finding alone: the next part is
        # checked from its own prev_hash and first_seq.
        "middle_part_removed": (lambda ps: [ps[0], ps[2]],
                                [("missing_part", "part 1 is not stored")]),
        "part_0_prev_hash": (lambda ps: ps[0].update(prev_hash="0" * 64), [
            ("bad_part", "part 0: prev_hash does not continue the chain"),
            ("changed", "seq 1: hash does not verify")]),
        "part_0_first_seq": (lambda ps: ps[0].update(first_seq=2), [
            ("bad_part", "part 0: first_seq 2 != 1"),
            ("changed", "part 0: unexpected seq [1]")]),
        "event_count": (lambda ps: ps[1].update(event_count=9),
                        [("bad_part", "part 1: event_count 9 != 3")]),
        "event_session_id": (edit_event(1, 0, session_id="f" * 32), [
            ("changed", "seq 4: session_id changed"),
            ("changed", "seq 4: hash does not verify")]),
        "event_seq": (edit_event(1, 0, seq=99), [
            ("removed", "part 1: seq [4] missing"),
            ("changed", "part 1: unexpected seq [99]"),
            ("changed", "seq 99: hash does not verify")]),
        "swapped": (lambda ps: ps[1]["events"].reverse(), [
            ("reordered", "part 1: events out of seq order"),
            ("changed", "seq 6: hash does not verify"),
            ("changed", "seq 5: hash does not verify"),
            ("changed", "seq 4: hash does not verify"),
            ("bad_part", "part 1: hash is not the last event's")]),
        "part_names_another_session": (lambda ps: ps[1].update(session_id="f" * 32), [
            ("bad_part", f"part 1 ('{sid}:1') names session '{'f' * 32}'")]),
        # A bad-numbered or doubled part does not stop the check of the rest.
        "bad_number_and_a_change": (
            and_8_changed(lambda ps: {**ps[1], "part": "1"}),
            [("bad_part", f"a part numbered '1' ('{sid}:1')"), changed_8]),
        "twice_and_a_change": (
            and_8_changed(lambda ps: {**ps[0], "_id": "another"}),
            [("bad_part", "part 0 is stored under _id 'another'"),
             ("changed", f"part 0 is stored twice ('{sid}:0', 'another'):"
              " the first is the one checked"), changed_8]),
        "start_time_unreadable": (lambda ps: ps[0].update(session_start_time="soon"), [
            ("bad_part", "part 0: session_start_time is not the time of session.start")]),
        "checkpoint_with_an_end_time": (
            lambda ps: ps[1].update(session_end_time=ps[2]["session_end_time"]),
            [("bad_part", "part 1: a non-final part must be a checkpoint"
              " without end time or duration")]),
        "final_not_a_bool": (lambda ps: ps[2].update(final="yes"),
                             [("bad_part", "part 2: final is not true or false")]),
        "final_unmarked": (lambda ps: ps[2].update(
            final=False, seal_reason="checkpoint", session_end_time=None,
            session_duration_seconds=None),
            [("bad_part", "part 2: a part that ends with session.end is not marked final")]),
        "final_without_its_end": (lambda ps: ps[1].update(final=True), [
            ("bad_part", "part 1: the final part does not end with session.end"),
            ("bad_part", "part 2 comes after the final part 1")]),
        "end_time": (lambda ps: ps[2].update(session_end_time="2000-01-01T00:00:00Z"), [
            ("bad_part", "part 2: session_end_time is not the time of session.end"),
            ("bad_part", "part 2: session_duration_seconds is not end - start")]),
        "duration": (lambda ps: ps[2].update(session_duration_seconds=3600),
                     [("bad_part", "part 2: session_duration_seconds is not end - start")]),
        # Fields of the wrong type or unreadable are findings, not a crash.
        "duration_a_string": (lambda ps: ps[2].update(session_duration_seconds="0"), [
            ("bad_part", "part 2: session_duration_seconds is not end - start")]),
        "start_time_a_number": (lambda ps: ps[0].update(session_start_time=0), [
            ("bad_part", "part 0: session_start_time is not the time of session.start")]),
        "final_start_time_unreadable": (lambda ps: ps[2].update(session_start_time="soon"), [
            ("bad_part", "part 2: session_start_time is not the time of session.start"),
            ("bad_part", "part 2: session_duration_seconds is not end - start")]),
        "end_time_unreadable": (lambda ps: ps[2].update(session_end_time="soon"), [
            ("bad_part", "part 2: session_end_time is not the time of session.end"),
            ("bad_part", "part 2: session_duration_seconds is not end - start")]),
        "start_event_time_unreadable": (edit_event(0, 0, ts="soon"), [
            ("changed", "seq 1: hash does not verify"),
            *[("bad_part", f"part {n}: session_start_time is not the time of session.start")
              for n in range(3)]]),
    }
    for name, (edit, expected) in cases.items():
        found = [(p.kind, p.detail) for p in check_session(
            audit_key, sid, _tampered(parts, edit))]
        assert sorted(found) == sorted(expected), name


async def test_a_session_still_open_in_the_spool_is_not_called_overdue(
    make_config, engines, audit_key
):
    """A long session with checkpoint parts in the sink has no final part
    yet: the spool anchor names it (open, or a part not yet sent) and verify
    does not call its final part removed, however old it is (the anchor's
    query of them was never run on such a spool by a test)."""
    from audit.events import parse_ts
    from audit.verify import spool_anchor

    config = make_config(  # stored parts and security events kept in the spool
        audit={"part_max_events": 3, "keep_stored_seconds": 3600},
        flush={"max_writes_per_second": 1000.0, "burst": 100})
    engine = await engines.open(config)
    src = Source(user="alice", role="user", ip="127.0.0.1")
    done = await engine.start_session("alice", "user", src, 3600)
    await engine.end_session(done.session_id, src)
    await engine.record_security(Draft("auth.login_failed", outcome="denied", source=src),
                                 happened=True)
    s = await engine.start_session("alice", "user", src, 3600)
    for i in range(4):  # a checkpoint part cut
        await engine.record(s.session_id, Draft("document.access",
                                                target={"type": "document", "id": str(i)}))
    await engines.drain(engine)
    ended = await engine.start_session("alice", "user", src, 3600)
    await engine.end_session(ended.session_id, src)  # its parts wait in the spool
    anchor = await engine.spool.read(lambda c: spool_anchor(c, audit_key))
    assert anchor.unfinished == {s.session_id, ended.session_id}
    assert anchor.first_unsent is None and anchor.stored == {done.session_id}
    (first, *_) = await engine.sink.get_session_parts(s.session_id)
    much_later = parse_ts(first["session_start_time"]) + 10 * 86400
    report = await verify_sink(engine.sink, audit_key, anchor, overdue_after=86400,
                               now=much_later)
    assert report.ok, report.problems
    assert (report.sessions, report.parts, report.security_events) == (2, 2, 1)

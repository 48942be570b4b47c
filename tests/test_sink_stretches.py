"""The stretches of the security chain each sink took, across sink switches
(engine level, real SQLite and JSONL sinks).

verify accepts a chain in a sink that begins where one of its stretches
began; so it must also hold the sink to the end of every stretch it took,
and a stretch may only move forward (found by a review of the change that
added them).
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any

from audit.config import Config, sink_identity
from audit.events import Draft, Source
from audit.verify import Report, spool_anchor, verify_sink
from sinks.base import SinkRejected, SinkUnavailable
from sinks.jsonl import JsonlSink
from sinks.sqlite import SqliteSink

FLUSH = {"max_writes_per_second": 1000.0, "burst": 100}


async def _failed_logins(engines: Any, engine: Any, names: list[str]) -> None:
    for name in names:
        await engine.record_security(
            Draft("auth.login_failed", outcome="denied", source=Source(ip="10.0.0.1"),
                  details={"username": name}), happened=True)
    await engines.drain(engine)


async def _verify(engine: Any, config: Config, key: bytes) -> Report:
    anchor = await engine.spool.read(lambda c: spool_anchor(c, key, sink_identity(config)))
    return await verify_sink(engine.sink, key, anchor)


def _delete(config: Config, where: str) -> None:
    """An attacker with write access to the sqlite sink removes security events."""
    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as c, c:
        c.execute(f"DELETE FROM security_events WHERE {where}")


async def _a_b_a(make_config: Any, engines: Any) -> tuple[Any, Config]:
    """5 events to sqlite, 3 to jsonl, 3 to sqlite again; the sqlite engine open."""
    a = make_config(flush=FLUSH)
    b = make_config(flush=FLUSH, sink={"type": "jsonl"})
    for config, sink, names in ((a, SqliteSink, ["a0", "a1", "a2", "a3", "a4"]),
                                (b, lambda _: JsonlSink(b.jsonl_dir), ["b0", "b1", "b2"])):
        engine = await engines.open(config, sink(config.sqlite_sink_path))
        await _failed_logins(engines, engine, names)
        await engines.close(engine)
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await _failed_logins(engines, engine, ["c0", "c1", "c2"])
    return engine, a


async def test_after_a_switch_back_the_end_of_the_first_stretch_is_held(
    make_config, engines, audit_key
):
    engine, a = await _a_b_a(make_config, engines)
    assert (await _verify(engine, a, audit_key)).ok
    _delete(a, "rowid IN (4, 5)")  # the end of the first stretch (a3, a4)
    report = await _verify(engine, a, audit_key)
    assert [(p.session_id, p.kind, p.detail) for p in report.problems] == [
        ("security", "security_chain",
         "the sink lacks the last security event of 1 earlier stretch(es) of this server's"
         " chain it took (between sink switches): removed")]


async def test_after_a_switch_back_a_whole_first_stretch_removed_is_found(
    make_config, engines, audit_key
):
    engine, a = await _a_b_a(make_config, engines)
    _delete(a, "rowid <= 5")
    assert not (await _verify(engine, a, audit_key)).ok


class RefusingOnce(SqliteSink):
    """Refuses the event of one user name for good until told otherwise."""

    refuse: str | None = "a1"

    async def write_security_events(self, events: list[dict[str, Any]]) -> None:
        if any(e["details"].get("username") == self.refuse for e in events):
            raise SinkRejected("no")
        await super().write_security_events(events)


async def test_a_dead_letter_retried_late_does_not_move_a_stretch_back(
    make_config, engines, audit_key
):
    a = make_config(flush=FLUSH)
    b = make_config(flush=FLUSH, sink={"type": "jsonl"})
    sink = RefusingOnce(a.sqlite_sink_path)
    engine = await engines.open(a, sink)
    await _failed_logins(engines, engine, ["a0", "a1", "a2", "a3", "a4"])
    sink.refuse = None
    assert await engine.retry_dead_letters() == 1
    await engines.drain(engine)  # a1 stored last: the chain's end is still a4
    await engines.close(engine)
    engine = await engines.open(b, JsonlSink(b.jsonl_dir))
    await _failed_logins(engines, engine, ["b0", "b1"])
    report = await _verify(engine, b, audit_key)
    assert report.ok, report.problems  # b0 goes on from a4, not from a1
    await engines.close(engine)
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await engines.drain(engine)  # (the flusher opens the sink)
    assert (await _verify(engine, a, audit_key)).ok
    _delete(a, "rowid = 4")  # a4, the end of sqlite's stretch (stored before a1)
    assert not (await _verify(engine, a, audit_key)).ok



class FailingOn(SqliteSink):
    """Fails (retryably: a receiver's 5xx) every batch holding one user name's event."""

    fail: str | None = "a1"

    async def write_security_events(self, events: list[dict[str, Any]]) -> None:
        if any(e["details"].get("username") == self.fail for e in events):
            raise SinkUnavailable("HTTP 503")
        await super().write_security_events(events)


async def _put_aside(engine: Any, fake_monotonic: Any) -> None:
    """Flush a0..a4 with a1 failing: the others stored, a1 put aside, pending."""
    for name in ["a0", "a1", "a2", "a3", "a4"]:
        await engine.record_security(
            Draft("auth.login_failed", outcome="denied", source=Source(ip="10.0.0.1"),
                  details={"username": name}), happened=True)
    for _ in range(100):
        if (await engine.status())["pending_security_events"] == 1:
            break
        fake_monotonic.advance(await engine.flusher.step() or 0)
    assert (await engine.status())["pending_security_events"] == 1


async def test_a_security_event_put_aside_and_stored_late_keeps_the_chain_whole(
    make_config, engines, audit_key, fake_monotonic
):
    """One event the sink keeps failing (retryably) is put aside while the
    later ones are stored: stored late, in the same sink, the chain there
    is whole."""
    a = make_config(flush={**FLUSH, "backoff_base_seconds": 0.01, "backoff_max_seconds": 0.1})
    sink = FailingOn(a.sqlite_sink_path)
    engine = await engines.open(a, sink, monotonic=fake_monotonic)
    await _put_aside(engine, fake_monotonic)
    sink.fail = None
    await engines.drain(engine, fake_monotonic)
    assert (await engine.status())["pending_security_events"] == 0
    report = await _verify(engine, a, audit_key)
    assert report.ok, report.problems


async def test_a_security_event_put_aside_then_stored_in_another_sink_breaks_neither(
    make_config, engines, audit_key, fake_monotonic
):
    """The same event still pending when the sink is switched is stored in
    the new one: a gap in the first sink's chain and an event alone in the
    second, noted as for a dead letter retried there, not a break in either."""
    a = make_config(flush={**FLUSH, "backoff_base_seconds": 0.01, "backoff_max_seconds": 0.1})
    b = make_config(flush=FLUSH, sink={"type": "jsonl"})
    engine = await engines.open(a, FailingOn(a.sqlite_sink_path), monotonic=fake_monotonic)
    await _put_aside(engine, fake_monotonic)
    await engines.close(engine)
    engine = await engines.open(b, JsonlSink(b.jsonl_dir))
    await _failed_logins(engines, engine, ["b0", "b1"])
    assert (await engine.status())["pending_security_events"] == 0
    report = await _verify(engine, b, audit_key)
    assert report.ok, report.problems
    await engines.close(engine)
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await engines.drain(engine)
    report = await _verify(engine, a, audit_key)
    assert report.ok, report.problems


async def _a_stored_session(engines: Any, engine: Any) -> None:
    src = Source(user="u", role="user", ip="10.0.0.1")
    s = await engine.start_session("u", "user", src, 3600)
    await engine.end_session(s.session_id, src)
    await engines.drain(engine)
    await engine._save_sink_status()  # as a server's reaper does every second


async def test_an_old_sink_given_none_of_the_chain_is_not_held_to_its_end(
    make_config, engines, audit_key
):
    """Found by a review (a newcomer's first hour): a session stored in
    sqlite, then a switch to jsonl, where the first security events went.
    verify with the old (sqlite) configuration, as README says to run it,
    reported "the sink lacks this server's newest security events ... (they
    were removed)": it had never been given one."""
    a = make_config(flush=FLUSH)
    b = make_config(flush=FLUSH, sink={"type": "jsonl"})
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await _a_stored_session(engines, engine)
    await engines.close(engine)
    engine = await engines.open(b, JsonlSink(b.jsonl_dir))
    await _failed_logins(engines, engine, ["b0", "b1"])
    assert (await _verify(engine, b, audit_key)).ok
    await engines.close(engine)
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await engines.drain(engine)
    report = await _verify(engine, a, audit_key)
    assert report.ok, report.problems


async def test_a_new_sink_given_none_yet_is_not_held_but_the_old_one_is(
    make_config, engines, audit_key
):
    """The same review: verify on a sink switched to before any security
    event went there reported the old sink's events as removed from it. The
    old sink, which took them, is still held to them."""
    a = make_config(flush=FLUSH)
    b = make_config(flush=FLUSH, sink={"type": "jsonl"})
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await _failed_logins(engines, engine, ["a0", "a1", "a2"])
    await engines.close(engine)
    engine = await engines.open(b, JsonlSink(b.jsonl_dir))
    await engines.drain(engine)  # (the flusher opens the sink)
    report = await _verify(engine, b, audit_key)
    assert report.ok, report.problems
    await engines.close(engine)
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await engines.drain(engine)
    assert (await _verify(engine, a, audit_key)).ok
    _delete(a, "rowid = 3")  # a2, the newest: sqlite took it
    assert not (await _verify(engine, a, audit_key)).ok


async def test_the_newest_event_removed_from_the_sink_in_use_is_one_finding(
    make_config, engines, audit_key
):
    """One sink, one stretch (still going on): its end is the spool head's
    check, not also an earlier stretch's (found by mutation testing: the
    last stretch counted as an earlier one reported the removal twice)."""
    a = make_config(flush=FLUSH)
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await _failed_logins(engines, engine, ["a0", "a1", "a2"])
    assert (await _verify(engine, a, audit_key)).ok
    _delete(a, "rowid = 3")
    report = await _verify(engine, a, audit_key)
    assert [p.detail for p in report.problems] == [
        "the sink lacks this server's newest security events: its chain there ends before"
        " where the spool has it (they were removed, or the spool and the sink do not"
        " belong together)"]


async def test_a_saved_sink_state_that_is_not_utf8_does_not_stop_the_security_flush(
    make_config: Any, engines: Any
) -> None:
    """The sink's state saved for ``status`` (meta ``sink_status``), damaged
    into a text that is not UTF-8 (a flipped byte): only a display, the
    start goes on (see test_mut_cli). But noting a sink's stretch read it as
    text: the first security event stored after the start failed with
    SQLite's decode error, and the spool was declared damaged (readyz 503
    for good, "stop the server and repair the file"), its event left
    pending though the sink had it."""
    a = make_config(flush=FLUSH)
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await _failed_logins(engines, engine, ["a0"])
    await engines.close(engine)
    with contextlib.closing(sqlite3.connect(a.spool_path)) as c, c:
        c.execute("INSERT INTO meta (key, value) VALUES ('sink_status', CAST(? AS TEXT))"
                  " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                  (b'{"type": "sqlite", "where": "Q3 layoffs \xff"}',))
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await _failed_logins(engines, engine, ["b0"])
    assert engine.spool.is_open
    with contextlib.closing(sqlite3.connect(a.spool_path)) as c:
        assert c.execute("SELECT count(*) FROM security_events"
                         " WHERE state = 'pending'").fetchone() == (0,)
    with contextlib.closing(sqlite3.connect(a.sqlite_sink_path)) as c:
        assert c.execute("SELECT count(*) FROM security_events").fetchone() == (2,)

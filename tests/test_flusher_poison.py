"""A document on which the sink keeps raising an unclassified error is
dead-lettered after a few tries, so it cannot block what is queued behind it."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
from waiting import wait_for

from audit import queries
from audit.events import Draft, Source
from audit.flusher import UNEXPECTED_LIMIT
from sinks.base import SinkRejected
from sinks.sqlite import SqliteSink


async def _dead_parts(engine: Any) -> int:
    counts = await engine.spool.read(lambda c: queries.counts(c, 0))
    return int(counts["dead_letter_parts"])


class PoisonedSink(SqliteSink):
    """A real SQLite sink with a bug: it crashes on one session's part."""

    def __init__(self, path: Any, poisoned: set[str]) -> None:
        super().__init__(path)
        self.poisoned = poisoned
        self.crashes = 0

    async def write_part(self, part: dict[str, Any]) -> None:
        if part["session_id"] in self.poisoned:
            self.crashes += 1
            raise KeyError("bug in the sink")
        await super().write_part(part)


async def test_poison_part_is_dead_lettered_and_the_rest_flows(
    make_config, engines, fake_clock, fake_monotonic
):
    wall, mono = fake_clock, fake_monotonic
    config = make_config(flush={"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05})
    poisoned: set[str] = set()
    sink = PoisonedSink(config.sqlite_sink_path, poisoned)
    engine = await engines.open(config, sink, clock=wall, monotonic=mono)
    src = Source(user="alice", role="user")
    first = await engine.start_session("alice", "user", src, 3600)
    second = await engine.start_session("alice", "user", src, 3600)
    poisoned.add(first.session_id)
    for s in (first, second):
        await engine.record(s.session_id, Draft("document.list"))
        wall.advance(1)
        await engine.end_session(s.session_id, src)
    await engines.drain(engine, mono)

    assert sink.crashes == UNEXPECTED_LIMIT
    counts = await engine.spool.read(lambda c: queries.counts(c, wall()))
    assert counts["pending_parts"] == 0
    assert counts["dead_letter_parts"] == 1
    assert await sink.get_session_parts(second.session_id)  # not blocked behind it
    assert await sink.get_session_parts(first.session_id) == []
    assert "unexpected sink error" in (engine.flusher.last_error or "")

    # Fixed sink, retried by command: nothing was lost.
    poisoned.clear()
    assert await engine.retry_dead_letters() == 1
    await engines.drain(engine, mono)
    (part,) = await sink.get_session_parts(first.session_id)
    assert [e["action"] for e in part["events"]] == [
        "session.start", "token.issue", "document.list", "session.end"]


async def _one_poisoned_session(make_config: Any, engines: Any, wall: Any, mono: Any
                                ) -> tuple[Any, PoisonedSink]:
    """An engine on fake clocks over a sink that crashes on its one ended
    session's part."""
    config = make_config(flush={"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05})
    poisoned: set[str] = set()
    sink = PoisonedSink(config.sqlite_sink_path, poisoned)
    engine = await engines.open(config, sink, clock=wall, monotonic=mono)
    src = Source(user="alice", role="user")
    s = await engine.start_session("alice", "user", src, 3600)
    poisoned.add(s.session_id)
    await engine.end_session(s.session_id, src)
    return engine, sink


async def test_a_poison_part_is_logged_in_full_once_a_minute_not_at_each_try(
    make_config, engines, fake_clock, fake_monotonic, caplog: pytest.LogCaptureFixture
):
    """The first unexpected error's traceback goes out; the tries after it
    within the minute are left out (the warning line counts them)."""
    mono = fake_monotonic
    engine, sink = await _one_poisoned_session(make_config, engines, fake_clock, mono)
    with caplog.at_level(logging.WARNING, logger="session_audit.flusher"):
        await engines.drain(engine, mono)
    assert sink.crashes == UNEXPECTED_LIMIT
    full = [r for r in caplog.records if r.getMessage().startswith("unexpected sink error")]
    assert len(full) == 1 and full[0].exc_info is not None


async def test_a_poison_part_is_dead_lettered_while_other_writes_go_through(
    make_config, engines, fake_clock, fake_monotonic
):
    """The tries in a row that dead-letter a document are its own: security
    events stored between them (a part gets the token after each) did not
    start its count over, and the part, retried for ever, held every part
    behind it back."""
    mono = fake_monotonic
    engine, sink = await _one_poisoned_session(make_config, engines, fake_clock, mono)
    for n in range(3 * UNEXPECTED_LIMIT):
        if await _dead_parts(engine):
            break
        # A denied request's security event arrives while the part fails.
        await engine.record_security(
            Draft("access.denied", outcome="denied", source=Source(ip="192.0.2.1"),
                  details={"n": n}), happened=True)
        crashes = sink.crashes
        for _ in range(20):
            mono.advance(await engine.flusher.step() or 0.0)
            if sink.crashes > crashes:
                break
    assert await _dead_parts(engine) == 1
    assert sink.crashes == UNEXPECTED_LIMIT
    stored, _ = await sink.list_security_events(limit=100)
    assert len(stored) >= UNEXPECTED_LIMIT - 1  # written between the part's tries


async def test_a_running_flusher_takes_up_what_another_process_retried(
    make_config, engines, monkeypatch
):
    """``server.py retry-dead`` runs in its own process beside the server: it
    puts dead letters back to pending in the file, which wakes nothing in the
    server. Its idle flusher looks at the spool again on its own."""
    from audit import flusher

    monkeypatch.setattr(flusher, "IDLE_RECHECK_SECONDS", 0.05)
    config = make_config(flush={"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05})
    poisoned: set[str] = set()
    sink = PoisonedSink(config.sqlite_sink_path, poisoned)
    engine = await engines.open(config, sink, background=True)
    src = Source(user="alice", role="user")
    s = await engine.start_session("alice", "user", src, 3600)
    poisoned.add(s.session_id)
    await engine.end_session(s.session_id, src)
    await wait_for(lambda: _dead_parts(engine), message="the part dead-lettered")
    await wait_for(engine.flusher._idle.is_set, message="the flusher idle")

    poisoned.clear()
    other = await engines.open(config, SqliteSink(config.sqlite_sink_path))  # the command's
    assert await other.retry_dead_letters() == 1
    await wait_for(lambda: sink.get_session_parts(s.session_id), message="the part stored")
    (part,) = await sink.get_session_parts(s.session_id)
    assert part["final"] and part["events"][-1]["action"] == "session.end"


class RefusingSink(SqliteSink):
    """A real SQLite sink behind a gate that refuses every write for good
    while ``refusing`` (as an http receiver answering 401 to a wrong token)."""

    refusing = True

    async def write_part(self, part: dict[str, Any]) -> None:
        if self.refusing:
            raise SinkRejected("http sink: POST /sessions: HTTP 401: bad token")
        await super().write_part(part)


async def test_a_sink_that_refuses_every_write_is_not_healthy(
    make_config, engines, fake_clock, fake_monotonic
):
    """Every part dead-lettered is no healthy sink, though it answers: status
    and /metrics said healthy (only a retryable error counted)."""
    wall, mono = fake_clock, fake_monotonic
    config = make_config(flush={"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05})
    sink = RefusingSink(config.sqlite_sink_path)
    engine = await engines.open(config, sink, clock=wall, monotonic=mono)
    src = Source(user="alice", role="user")
    s = await engine.start_session("alice", "user", src, 3600)
    await engine.end_session(s.session_id, src)
    await engines.drain(engine, mono)
    assert await _dead_parts(engine) == 1
    status = await engine.status()
    assert status["sink"]["healthy"] is False and "HTTP 401" in status["sink"]["last_error"]
    # Accepted again: healthy again.
    sink.refusing = False
    assert await engine.retry_dead_letters() == 1
    await engines.drain(engine, mono)
    assert (await engine.status())["sink"]["healthy"] is True


class TwoBugsSink(SqliteSink):
    """A real SQLite sink with two bugs: one session's part raises KeyError,
    another's AttributeError."""

    def __init__(self, path: Any, bugs: dict[str, type[Exception]]) -> None:
        super().__init__(path)
        self.bugs = bugs
        self.crashes: list[str] = []

    async def write_part(self, part: dict[str, Any]) -> None:
        bug = self.bugs.get(part["session_id"])
        if bug is not None:
            self.crashes.append(part["session_id"])
            raise bug("bug in the sink")
        await super().write_part(part)


async def test_a_second_bug_of_the_sink_is_logged_in_full_at_once(
    make_config, engines, fake_clock, fake_monotonic, caplog: pytest.LogCaptureFixture
):
    """Two unexpected errors of different types within the minute: the
    second one's traceback was left out as the first's repeat (and each
    minute after, only the one that happened to come first was shown). Each
    type of error is logged in full at once; each part is dead-lettered
    after its own UNEXPECTED_LIMIT tries."""
    wall, mono = fake_clock, fake_monotonic
    config = make_config(flush={"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05})
    bugs: dict[str, type[Exception]] = {}
    sink = TwoBugsSink(config.sqlite_sink_path, bugs)
    engine = await engines.open(config, sink, clock=wall, monotonic=mono)
    src = Source(user="alice", role="user")
    for bug in (KeyError, AttributeError):
        s = await engine.start_session("alice", "user", src, 3600)
        bugs[s.session_id] = bug
        await engine.end_session(s.session_id, src)
    with caplog.at_level(logging.WARNING, logger="session_audit.flusher"):
        await engines.drain(engine, mono)
    assert sorted(Counter(sink.crashes).values()) == [UNEXPECTED_LIMIT] * 2, sink.crashes
    assert await _dead_parts(engine) == 2
    full = [r for r in caplog.records if r.getMessage().startswith("unexpected sink error")]
    assert sorted(type(r.exc_info[1]).__name__ for r in full if r.exc_info) == [
        "AttributeError", "KeyError"], [r.getMessage() for r in full]

"""On-call review: what an operator sees while a cause lasts, and after."""

from __future__ import annotations

import logging
import time

import pytest
from live_server import free_port

from audit.events import Source, parse_ts
from sinks.base import SinkRateLimited, SinkUnavailable
from sinks.sqlite import SqliteSink


class Scripted(SqliteSink):
    """A sqlite sink that raises ``fail`` for the next ``left`` writes of parts."""

    fail: Exception | None = None
    left = 0

    async def write_part(self, part):  # type: ignore[no-untyped-def]
        if self.left > 0:
            self.left -= 1
            assert self.fail is not None
            raise self.fail
        await super().write_part(part)


async def _parts(engine, n: int) -> None:  # type: ignore[no-untyped-def]
    src = Source(user="alice", role="user")
    for _ in range(n):
        s = await engine.start_session("alice", "user", src, 3600)
        await engine.end_session(s.session_id, src)


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_a_sink_rate_limiting_hard_logs_once_a_minute_not_once_a_429(
    make_config, engines, caplog
):
    """A sink answering every other write with 429 logged a warning for each
    (one a second for as long as it went on); the rate-limited writes are
    counted in /metrics (sink_writes_total{outcome="rate_limited"})."""
    config = make_config(flush={"max_writes_per_second": 1000.0, "burst": 1000,
                                "backoff_base_seconds": 0.0001, "backoff_max_seconds": 0.0001})
    sink = Scripted(config.sqlite_sink_path)
    engine = await engines.open(config, sink)
    await _parts(engine, 20)
    with caplog.at_level(logging.WARNING, logger="session_audit.flusher"):
        for _ in range(20):
            sink.fail, sink.left = SinkRateLimited("HTTP 429", retry_after=0.0), 1
            while await engine.flusher.step() not in (None, 0.0):
                pass
    assert engine.stats.rate_limited == 20 and engine.stats.parts_written == 20
    assert len(_lines(caplog, "HTTP 429")) == 1


async def test_a_sink_back_after_an_outage_says_so_once(make_config, engines, caplog):
    config = make_config(flush={"backoff_base_seconds": 0.0001, "backoff_max_seconds": 0.0001})
    sink = Scripted(config.sqlite_sink_path)
    engine = await engines.open(config, sink)
    assert (await engine.status())["sink"]["last_error_at"] is None
    await _parts(engine, 1)
    sink.fail, sink.left = SinkUnavailable("connection refused"), 10
    with caplog.at_level(logging.WARNING, logger="session_audit.flusher"):
        for _ in range(10):
            await engine.flusher.step()
        assert not engine.flusher.healthy
        await engine.flusher.step()
        while await engine.flusher.step() is not None:
            pass
    assert engine.flusher.healthy and engine.stats.parts_written == 1
    assert len(_lines(caplog, "connection refused")) == 1
    assert _lines(caplog, "writes succeed again") == [
        "sink sqlite: writes succeed again, after 10 failed attempts"]
    # The last error stays in the status beside healthy: true, with its time
    # (the soak run saw it taken for a current one).
    sink_status = (await engine.status())["sink"]
    assert sink_status["healthy"] and "connection refused" in sink_status["last_error"]
    assert abs(parse_ts(sink_status["last_error_at"]) - time.time()) < 60


async def test_a_crashed_background_task_is_started_again(
    make_config, engines, wait_until, monkeypatch
):
    """A reaper (or flusher) that crashed stayed dead for the rest of the
    process: /readyz 503 for good while /healthz said 200 (so no supervisor
    restarted it), idle sessions never sealed, and /audit/status did not say
    why. Now it is started again after a pause, and status and /metrics
    (session_audit_background_task_crashes_total) say what happened."""
    import audit.engine as engine_module
    from audit.engine import AuditEngine

    monkeypatch.setattr(engine_module, "TASK_RESTART_SECONDS", 0.05, raising=False)
    real = AuditEngine.reap_once
    crashes = {"left": 1}

    async def flaky(self):  # type: ignore[no-untyped-def]
        if crashes["left"] > 0:
            crashes["left"] -= 1
            raise KeyError("a bug")
        return await real(self)

    monkeypatch.setattr(AuditEngine, "reap_once", flaky)
    config = make_config()
    engine = await engines.open(config, background=True)
    engine.reaper_interval = 0.01

    async def crashed() -> bool:
        return engine.task_crashes.get("reaper") == 1

    await wait_until(crashed, timeout=5, message="the reaper to crash")
    status = await engine.status()
    assert status["task_crashes"] == {"reaper": 1}
    src = Source(user="alice", role="user")
    s = await engine.start_session("alice", "user", src, 0.2)  # expires at once

    async def reaped() -> bool:
        return engine.ready and engine.spool.open_session(s.session_id) is None

    await wait_until(reaped, timeout=5, message="the reaper started again, sealing")
    assert engine.task_failure is None
    assert (await engine.status())["task_failure"] is None


async def test_parts_put_aside_during_an_outage_are_due_once_the_sink_is_back(
    make_config, engines, fake_monotonic
):
    """Found by the on-call review: every failure during an outage counted
    toward the failing part's own pause (put aside after DEFER_AFTER, for
    up to 15 minutes), and nothing ended those pauses when the sink came
    back: the oldest parts waited on, the oldest-pending alert kept firing.
    Several documents failing is the sink's outage: once a write goes
    through, the parts put aside during it go at once. (One part the sink
    cannot take, while others go through, still waits: test_review_flusher.)"""
    from audit.flusher import DEFER_AFTER

    config = make_config(flush={"max_writes_per_second": 1000.0, "burst": 1000,
                                "backoff_base_seconds": 1.0, "backoff_max_seconds": 1.0})
    sink = Scripted(config.sqlite_sink_path)
    engine = await engines.open(config, sink, monotonic=fake_monotonic)
    await _parts(engine, 3)
    sink.fail, sink.left = SinkUnavailable("connection refused"), 10**6  # the outage
    for _ in range(2 * DEFER_AFTER):  # the first part put aside, then the second
        fake_monotonic.advance(await engine.flusher.step() or 0)
    assert len(engine.flusher._deferred) == 2
    sink.left = 0  # the sink is back
    for _ in range(3):
        fake_monotonic.advance(min(1.0, await engine.flusher.step() or 0))
    assert (await engine.status())["pending_parts"] == 0
    assert engine.flusher._deferred == {}


async def test_a_part_put_aside_again_and_again_is_logged_once_a_minute(
    make_config, engines, fake_monotonic, caplog
):
    """A receiver that refuses connections: the part is put aside after
    DEFER_AFTER tries, then again after each single retry; its line went out
    at each, without the throttle the other failure lines have."""
    from audit.flusher import DEFER_AFTER
    from sinks.http import HttpSink

    port = free_port()  # a loopback port nothing listens on
    config = make_config(sink={"type": "http", "http": {"url": f"http://127.0.0.1:{port}"}},
                         flush={"max_writes_per_second": 1000.0, "burst": 1000,
                                "backoff_base_seconds": 0.05, "backoff_max_seconds": 1.0})
    engine = await engines.open(config, HttpSink(config.sink.http), monotonic=fake_monotonic)
    await _parts(engine, 1)
    with caplog.at_level(logging.WARNING, logger="session_audit.flusher"):
        for _ in range(DEFER_AFTER + 8):
            fake_monotonic.advance(await engine.flusher.step() or 0)
        ((_, times),) = engine.flusher._deferred.values()
        assert times >= 3  # put aside again and again
        assert len(_lines(caplog, "keeps failing")) == 1
        fake_monotonic.advance(60.0)
        for _ in range(4):
            fake_monotonic.advance(await engine.flusher.step() or 0)
    lines = _lines(caplog, "keeps failing")
    assert len(lines) == 2 and "more like it since the last such line" in lines[1], lines


async def test_the_put_aside_log_line_gives_a_wait_under_a_second_as_it_is(
    make_config, engines, fake_monotonic, caplog
):
    """Found by a soak run: with ``backoff_base_seconds = 0.05`` a part put
    aside waits 0.05 x 2 ** DEFER_AFTER = 0.4 s, and the log line said "0 s"."""
    from audit.flusher import DEFER_AFTER

    config = make_config(flush={"max_writes_per_second": 1000.0, "burst": 1000,
                                "backoff_base_seconds": 0.05, "backoff_max_seconds": 1.0})
    sink = Scripted(config.sqlite_sink_path)
    engine = await engines.open(config, sink, monotonic=fake_monotonic)
    await _parts(engine, 1)
    sink.fail, sink.left = SinkUnavailable("down"), 10**6
    with caplog.at_level(logging.WARNING, logger="session_audit.flusher"):
        for _ in range(DEFER_AFTER):
            fake_monotonic.advance(await engine.flusher.step() or 0)
    lines = [r.getMessage() for r in caplog.records if "keeps failing" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(
        f"tried again within {0.05 * 2 ** DEFER_AFTER:.1f} s"
        " (sooner while nothing else is pending)"), lines

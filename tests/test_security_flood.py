"""A flood of unauthenticated requests cannot fill the spool one security
event a request: past a client IP's budget, events are counted into
summary events (audit/ratelimit.py FloodGuard), and nothing goes unrecorded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3

import pytest
from api_fixtures import MakeApi, expect_error, make_api

from audit.events import parse_ts

__all__ = ["make_api"]

FLOOD = {"security_events_per_ip_burst": 3, "security_events_per_ip_per_second": 0.001}


async def test_bad_tokens_past_the_budget_become_one_summary(make_api: MakeApi) -> None:
    api = await make_api(audit=FLOOD)
    for i in range(10):
        resp = await api.client.get("/me", headers={"Authorization": f"Bearer junk{i}"})
        await expect_error(resp, 401, "invalid_token")  # the answer does not change
    one_by_one = await api.security("auth.invalid_token")
    assert len(one_by_one) == 3
    assert all(e["details"]["reason"] != "over_budget" for e in one_by_one)

    assert await api.engine.record_summaries() == 1
    events = await api.security("auth.invalid_token")
    assert len(events) == 4
    summary = events[-1]
    assert summary["outcome"] == "denied" and summary["session_id"] is None
    assert summary["source"]["ip"] == one_by_one[0]["source"]["ip"]
    d = summary["details"]
    assert (d["reason"], d["count"], d["usernames"]) == ("over_budget", 7, [])
    assert (d["addresses"], d["more_addresses"]) == ([summary["source"]["ip"]], False)
    assert parse_ts(d["first_ts"]) <= parse_ts(d["last_ts"])
    status = await api.engine.status()
    assert status["security_events_summarised"] == 7
    metrics = await (await api.client.get("/metrics")).text()
    assert "session_audit_security_events_summarised_total 7.0" in metrics
    assert await api.engine.record_summaries() == 0  # nothing counted since


async def test_counted_events_are_recorded_at_shutdown(make_api: MakeApi) -> None:
    api = await make_api(audit=FLOOD)
    await asyncio.gather(*(api.client.post("/token", json={"username": "x", "password": "y"})
                           for _ in range(6)))
    # Failed, then throttled (429): six security events, three within budget.
    assert len(await api.security()) == 3
    engine, spool_path = api.engine, api.config.spool_path
    await engine.close(flush_window=0)
    conn = sqlite3.connect(spool_path)
    rows = [json.loads(r[0]) for r in conn.execute("SELECT json FROM security_events")]
    conn.close()
    rows += [json.loads(doc) for (doc,) in api._sink("SELECT doc FROM security_events")]
    rows = list({e["event_id"]: e for e in rows}.values())
    summaries = [e for e in rows if e["details"].get("reason") == "over_budget"]
    assert len(rows) - len(summaries) == 3
    assert sum(e["details"]["count"] for e in summaries) == 3
    assert {e["action"] for e in summaries} <= {"auth.login_failed", "auth.login_throttled"}
    assert all(e["details"]["usernames"] == ["x"] for e in summaries), summaries


async def test_off_by_default_every_event_recorded(make_api: MakeApi) -> None:
    api = await make_api()
    for i in range(30):
        resp = await api.client.get("/me", headers={"Authorization": f"Bearer junk{i}"})
        assert resp.status == 401
    assert len(await api.security("auth.invalid_token")) == 30
    assert api.engine.flood is None


async def test_the_reaper_records_summaries_every_interval(make_config, engines, fake_monotonic,
                                                          wait_until) -> None:
    from audit.engine import SUMMARY_INTERVAL
    from audit.events import Draft, Source

    config = make_config(audit=FLOOD)
    engine = await engines.open(config, background=True, monotonic=fake_monotonic,
                                reaper_interval=0.01)
    src = Source(ip="192.0.2.7")
    for _ in range(5):
        await engine.record_security(Draft("auth.invalid_token", "denied", source=src))

    def summaries() -> list[tuple]:
        """Summary events in the spool or, once flushed, in the sink."""
        found = []
        for path, col in ((config.spool_path, "json"), (config.sqlite_sink_path, "doc")):
            conn = sqlite3.connect(path)
            try:
                found += conn.execute(f"SELECT {col} FROM security_events"
                                      f" WHERE {col} LIKE '%over_budget%'").fetchall()
            except sqlite3.OperationalError:  # the sink has no tables yet
                pass
            finally:
                conn.close()
        return found

    rounds = {"n": 0}
    reap_once = engine.reap_once

    async def counted_reap() -> int:
        rounds["n"] += 1
        return await reap_once()

    engine.reap_once = counted_reap
    await wait_until(lambda: rounds["n"] >= 3)  # reaper rounds, the interval not yet passed
    assert summaries() == [] and engine.flood.suppressed == 2
    fake_monotonic.advance(SUMMARY_INTERVAL)
    rows = await wait_until(summaries)
    event = json.loads(rows[0][0])
    assert (event["source"]["ip"], event["details"]["count"]) == ("192.0.2.7", 2)


async def test_a_logged_in_callers_security_events_are_never_counted_away(
    make_api: MakeApi,
) -> None:
    """The budget is for callers without a valid session. A logged-in user
    cannot use junk tokens to have their own denied admin requests merged
    into an anonymous count: each is recorded, with its user and session."""
    api = await make_api(audit=FLOOD)
    bob = await api.user("bob")
    for i in range(5):  # use up the IP's budget
        await api.client.get("/me", headers={"Authorization": f"Bearer junk{i}"})
    for _ in range(4):
        resp = await api.client.get("/audit/sessions", headers=bob.headers)
        await expect_error(resp, 403, "forbidden")
    denied = await api.security("admin.denied")
    assert len(denied) == 4
    assert all((e["actor"]["user"], e["session_id"]) == ("bob", bob.session_id)
               for e in denied)


async def _engine_with_counts(make_config, engines, **kwargs):
    from audit.events import Draft, Source

    config = make_config(audit=FLOOD)
    engine = await engines.open(config, **kwargs)
    for _ in range(5):
        await engine.record_security(Draft("auth.invalid_token", "denied",
                                           source=Source(ip="192.0.2.9")))
    assert engine.flood.suppressed == 2
    return config, engine


def _summary_counts(config) -> list[int]:
    found = []
    for path, col in ((config.spool_path, "json"), (config.sqlite_sink_path, "doc")):
        conn = sqlite3.connect(path)
        try:
            rows = conn.execute(f"SELECT {col} FROM security_events").fetchall()
        except sqlite3.OperationalError:
            rows = []
        finally:
            conn.close()
        found += [json.loads(r[0]) for r in rows]
    unique = {e["event_id"]: e for e in found}.values()
    return [e["details"]["count"] for e in unique if e["details"].get("reason") == "over_budget"]


async def test_summaries_refused_by_a_full_spool_are_kept(make_config, engines) -> None:
    from audit.spool import SpoolFull

    config, engine = await _engine_with_counts(make_config, engines)
    max_bytes, engine.spool.max_bytes = engine.spool.max_bytes, 0  # full, under "reject"
    with pytest.raises(SpoolFull):
        await engine.record_summaries()
    engine.spool.max_bytes = max_bytes
    assert await engine.record_summaries() == 1
    assert _summary_counts(config) == [2]


async def test_a_failed_summary_commit_keeps_counts_and_the_reaper(
    make_config, engines, fake_monotonic, wait_until, monkeypatch
) -> None:
    from audit.engine import SUMMARY_INTERVAL
    from audit.store import Writer

    config, engine = await _engine_with_counts(
        make_config, engines, background=True, monotonic=fake_monotonic, reaper_interval=0.01)
    real = Writer.run_batch
    calls = {"n": 0}

    def flaky(self, jobs):
        # The summary's whole batch fails (a COMMIT that hits an I/O error):
        # its caller hears SpoolUnavailable.
        if calls["n"] == 0 and any("record_summaries" in getattr(j, "__qualname__", "")
                                   for j in jobs):
            calls["n"] += 1
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, jobs)

    monkeypatch.setattr(Writer, "run_batch", flaky)
    fake_monotonic.advance(SUMMARY_INTERVAL)
    await wait_until(lambda: calls["n"] == 1)
    fake_monotonic.advance(SUMMARY_INTERVAL)
    await wait_until(lambda: _summary_counts(config) == [2])
    assert engine.task_failure is None and engine.ready


async def test_a_summary_whose_caller_is_cancelled_is_recorded_once(
    make_config, engines, wait_until
) -> None:
    import threading

    config, engine = await _engine_with_counts(make_config, engines)
    gate = threading.Event()
    blocker = engine.spool.submit_nowait(lambda w: gate.wait(10))  # holds the writer
    task = asyncio.create_task(engine.record_summaries())
    await wait_until(lambda: not engine.flood._counts)  # taken and queued, not committed
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    gate.set()
    await blocker
    await engine.spool.submit(lambda w: None)  # a later batch: the summary's has committed
    assert await engine.record_summaries() == 0
    assert _summary_counts(config) == [2]

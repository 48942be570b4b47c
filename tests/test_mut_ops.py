"""/metrics and /readyz (handlers/ops.py) pinned where hand mutants of it
passed the suite: each sink write outcome and parts_written moved by a real
HTTP receiver's answers, the flusher's pause, the spool gauges, each metric's
type and labels as README gives them, /readyz's reasons, nothing secret
shown, and /metrics served while the spool is damaged."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest
from api_fixtures import USER_PASSWORD, Api, MakeApi, api, make_api, wait_for
from receiver import Fault, Receiver, ReceiverOptions, serve
from test_hunt_corrupt import zero_pages

from audit.events import parse_ts

__all__ = ["api", "make_api"]

FAST = {"max_writes_per_second": 1000.0, "burst": 1000,
        "backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05}


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    recv = Receiver(ReceiverOptions())
    runner, port = await serve(recv, "127.0.0.1", 0)
    try:
        yield recv, f"http://127.0.0.1:{port}"
    finally:
        recv.close()
        await runner.cleanup()


def _series(text: str) -> dict[str, float]:
    """Each sample line of /metrics: ``name{labels}`` -> value."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


async def _metrics(api: Api) -> dict[str, float]:
    resp = await api.client.get("/metrics")
    assert resp.status == 200, await resp.text()
    return _series(await resp.text())


def _outcomes(m: dict[str, float]) -> dict[str, float]:
    return {o: m[f'session_audit_sink_writes_total{{outcome="{o}"}}']
            for o in ("ok", "failed", "rate_limited", "dead_lettered")}


README = Path(__file__).resolve().parent.parent / "README.md"


async def test_every_metric_has_the_type_and_labels_readme_gives(api: Api) -> None:
    """README's table of every metric gives each one's type and labels: an
    alert on ``rate(...)`` needs a counter, one on a value a gauge."""
    alice = await api.user("alice")
    await api.client.get("/documents", headers=alice.headers)
    text = await (await api.client.get("/metrics")).text()
    served = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    rows = re.findall(r"^\| (`session_audit_[^|]+) \| (counter|gauge|histogram)"
                      r"(?:; ((?:\\\||[^|])+))? \|", README.read_text(encoding="utf-8"), re.M)
    documented: dict[str, tuple[str, set[str]]] = {}
    for names, kind, labels in rows:
        # "`method`, `route`, `status`" or "`kind` = `session` \| `security`"
        named = {re.findall(r"`(\w+)`", item)[0] for item in labels.split(", ") if item}
        for name in re.findall(r"`(session_audit_\w+)`", names):
            documented[name] = (kind, named)
    assert set(documented) == set(served), set(documented) ^ set(served)
    for name, (kind, labels) in documented.items():
        assert served[name] == kind, name
        sample = "_bucket" if kind == "histogram" else ""
        for m in re.finditer(rf"^{name}{sample}(?:{{([^}}]*)}})? ", text, re.M):
            assert set(re.findall(r'(\w+)="', m[1] or "")) - {"le"} == labels, (m[0], labels)
    m = _series(text)
    assert m["session_audit_spool_max_bytes"] == api.config.audit.spool_max_bytes
    assert 0 < m["session_audit_spool_bytes"] == api.engine.spool.spool_bytes
    assert m["session_audit_ready"] == 1 and m["session_audit_sink_healthy"] == 1
    # Each commit takes one job or more; its seconds in buckets under a second.
    count = m["session_audit_group_commit_batch_size_count"]
    assert count == m["session_audit_group_commit_seconds_count"] > 0
    assert m["session_audit_group_commit_batch_size_sum"] >= count
    assert 'session_audit_group_commit_seconds_bucket{le="0.001"}' in m
    assert 'session_audit_group_commit_batch_size_bucket{le="1.0"}' in m
    assert m['session_audit_events_recorded_total{kind="session"}'] == 3  # start, token, list
    assert m['session_audit_events_recorded_total{kind="security"}'] == 0
    assert "session_audit_group_commit_batch_size_created" not in m


async def test_each_sink_write_is_counted_in_its_own_outcome(
    make_api: MakeApi, receiver: tuple[Receiver, str]
) -> None:
    """README: ``session_audit_sink_writes_total{outcome}``, each write in
    one outcome (``failed``: retried, not dead-lettered), and
    ``session_audit_parts_written_total``: parts the sink acknowledged.
    A real receiver answers one part 429, 503, then 400 (dead-lettered),
    another part and a security event 201/200."""
    recv, url = receiver
    recv.script(Fault(429, {"Retry-After": "0"}), Fault(503), Fault(400))
    # Credentials in the URL: shown nowhere (status, metrics, readyz).
    url = url.replace("://", "://user:pw-s3cret@") + "/?key=k3y-s3cret"
    api = await make_api(sink={"type": "http", "http": {"url": url}}, flush=FAST)
    alice = await api.user("alice")
    assert (await api.client.post("/logout", headers=alice.headers)).status == 200

    async def dead() -> dict[str, float] | None:
        m = await _metrics(api)
        return m if m["session_audit_dead_letter"] == 1 else None

    m = await wait_for(dead, message="the part dead-lettered (and the counts read again)")
    assert _outcomes(m) == {"ok": 0, "failed": 1, "rate_limited": 1, "dead_lettered": 1}
    assert m["session_audit_parts_written_total"] == 0
    assert m["session_audit_sink_healthy"] == 0  # it answers, but stores nothing
    assert m["session_audit_pending_parts"] == 0

    # A security event (a failed login) and a part, both taken.
    resp = await api.client.post("/token", json={"username": "bob", "password": "wrong"})
    assert resp.status == 401
    bob = await api.user("bob")
    assert (await api.client.post("/logout", headers=bob.headers)).status == 200
    await wait_for(lambda: len(recv.parts) == 1 and recv.security_events,
                   message="bob's part and the failed login in the receiver")
    m = await _metrics(api)
    # Two writes taken (a batch of security events, a part): one part written.
    assert _outcomes(m) == {"ok": 2, "failed": 1, "rate_limited": 1, "dead_lettered": 1}
    assert m["session_audit_parts_written_total"] == 1
    assert m["session_audit_sink_healthy"] == 1
    assert m['session_audit_events_recorded_total{kind="security"}'] == 1
    # /audit/status's writes_failed counts the dead-lettered write too (README).
    admin = await api.admin()
    resp = await api.client.get("/audit/status", headers=admin.headers)
    sink = (await resp.json())["sink"]
    assert (sink["writes_ok"], sink["writes_failed"], sink["rate_limited"]) == (2, 2, 1)
    assert "HTTP 400" in sink["last_error"]
    shown = [await resp.text(), await (await api.client.get("/metrics")).text(),
             await (await api.client.get("/readyz")).text()]
    for secret in ("pw-s3cret", "k3y-s3cret", str(api.config.data_dir)):
        assert not [text for text in shown if secret in text], secret


async def test_backoff_seconds_is_what_is_left_of_the_pause_a_429_asked_for(
    make_api: MakeApi, receiver: tuple[Receiver, str]
) -> None:
    recv, url = receiver
    recv.script(Fault(429, {"Retry-After": "120"}))
    api = await make_api(sink={"type": "http", "http": {"url": url}}, flush=FAST,
                         flush_at_close=False)  # the part waits two minutes
    assert (await _metrics(api))["session_audit_backoff_seconds"] == 0
    alice = await api.user("alice")
    assert (await api.client.post("/logout", headers=alice.headers)).status == 200
    await wait_for(lambda: api.engine.stats.rate_limited == 1, message="the 429")
    # Meanwhile: a security event waiting too (the pause holds every write),
    # and a session open.
    resp = await api.client.post("/token", json={"username": "bob", "password": "wrong"})
    assert resp.status == 401
    await api.user("bob")

    async def counted() -> dict[str, float] | None:
        m = await _metrics(api)  # (the spool's counts are read once a second)
        return m if m["session_audit_pending_security_events"] == 1 else None

    m = await wait_for(counted, message="the security event counted as pending")
    assert m["session_audit_pending_parts"] == 1
    assert m["session_audit_active_sessions"] == 1
    assert m["session_audit_oldest_pending_age_seconds"] > 0
    assert m["session_audit_dead_letter"] == 0
    assert 100 < m["session_audit_backoff_seconds"] <= 120
    assert m["session_audit_sink_healthy"] == 1  # rate limited is not down (README)
    assert _outcomes(m)["rate_limited"] == 1
    # /audit/status says when the pause ends, and not where the sink is.
    admin = await api.admin()
    sink = (await (await api.client.get("/audit/status", headers=admin.headers)).json())["sink"]
    assert 100 < parse_ts(sink["backoff_until"]) - time.time() <= 121
    assert "where" not in sink and sink["healthy"] is True and sink["rate_limited"] == 1


async def test_a_crashed_background_task_is_the_readyz_reason_by_its_kind_only(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A crashed flusher: /readyz 503 says which task and the exception's
    kind, not its message (unauthenticated; the message may carry a path
    or a secret); /metrics says not ready, and counts the crash, still once
    it is started again."""
    import audit.engine as engine_module
    from audit.flusher import Flusher

    monkeypatch.setattr(engine_module, "TASK_RESTART_SECONDS", 3600.0)

    real, runs = Flusher.run, []

    async def crash(self: Flusher) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise KeyError(f"{tmp_path}/spool.db token=s3cr3t")
        await real(self)

    monkeypatch.setattr(Flusher, "run", crash)
    api = await make_api()
    await wait_for(lambda: api.engine.task_crashes.get("flusher") == 1,
                   message="the flusher to crash")
    resp = await api.client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {"status": "not_ready",
                                 "reason": "background task failed: audit-flusher: KeyError"}
    m = await _metrics(api)
    assert m["session_audit_ready"] == 0
    assert m['session_audit_background_task_crashes_total{task="flusher"}'] == 1
    assert m['session_audit_background_task_crashes_total{task="reaper"}'] == 0
    assert m["session_audit_sink_healthy"] == 0  # never opened (README: "while it is open")
    # Started again (its timer due now): ready, and the crash still counted.
    api.engine._restarts.pop("flusher").cancel()
    api.engine._restart("flusher")
    await wait_for(lambda: api.engine.ready and api.engine.flusher.sink_open,
                   message="the flusher started again, the sink open")
    assert (await api.client.get("/readyz")).status == 200
    m = await _metrics(api)
    assert m["session_audit_ready"] == 1 and m["session_audit_sink_healthy"] == 1
    assert m['session_audit_background_task_crashes_total{task="flusher"}'] == 1


async def test_a_failed_spool_commit_is_counted_and_is_the_readyz_reason(
    make_api: MakeApi,
) -> None:
    """README: ``session_audit_spool_commit_failures_total`` counts spool
    commits that failed; ``/readyz`` then says ``spool cannot commit: ...``
    (no file path)."""
    api = await make_api()
    alice = await api.user("alice")
    assert (await _metrics(api))["session_audit_spool_commit_failures_total"] == 0
    spool = api.engine.spool
    pages = await spool.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await spool.submit(lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages}"),
                       needs_space=False)  # a disk with no page left
    seen = []  # (the reaper's own commits may fail meanwhile too)
    for _ in range(2):
        resp = await api.client.post("/documents", headers=alice.headers,
                                     json={"title": "t", "content": "x" * 100_000})
        assert resp.status == 503
        m = await _metrics(api)
        seen.append(m["session_audit_spool_commit_failures_total"])
        assert m["session_audit_ready"] == 0
    assert 1 <= seen[0] < seen[1]
    body = await (await api.client.get("/readyz")).json()
    assert body["status"] == "not_ready"
    assert body["reason"].startswith("spool cannot commit: "), body
    assert str(api.config.data_dir) not in body["reason"]
    await spool.submit(lambda w: w.conn.execute("PRAGMA max_page_count = 1073741823"),
                       needs_space=False)
    assert (await _metrics(api))["session_audit_spool_commit_failures_total"] >= seen[1]


async def test_metrics_are_served_while_the_spool_is_damaged(make_api: MakeApi) -> None:
    """README's alert for a damaged spool is ``session_audit_ready``. With
    the damage in the pending parts' pages, the gauges /metrics reads from
    the spool failed, and so did every scrape (503 audit_unavailable, for
    an action nobody asked for): no session_audit_ready 0, nor any other
    metric, for as long as the damage lasted. Now the rest is served."""
    api = await make_api(flush_at_close=False)  # (the parts cannot be read)
    admin = await api.admin()
    assert (await api.client.post("/logout", headers=admin.headers)).status == 200
    with closing(sqlite3.connect(api.config.spool_path)) as conn, conn:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE tbl_name = 'parts' AND rootpage > 0")]
    for name in names:
        zero_pages(api.config.spool_path, name)
    await api.add_user("bob")

    async def logged_in() -> bool:  # a commit: the reader sees the file as it is now
        resp = await api.client.post("/token", json={"username": "bob",
                                                     "password": USER_PASSWORD})
        # A commit can fail on the damaged pages (the flusher's next step on
        # them may share the login's batch): 503, nothing done. Seen once on
        # Python 3.13, not reproduced alone; the next login commits.
        assert resp.status in (200, 503), await resp.text()
        return resp.status == 200

    await wait_for(logged_in, timeout=10, message="a login committed")
    for _ in range(2):
        m = await _metrics(api)
        assert m["session_audit_ready"] == 0
        assert m['session_audit_http_requests_total{method="POST",route="token",status="200"}'] == 2
        assert "session_audit_pending_parts" not in m  # not read: not made up
    resp = await api.client.get("/readyz")
    assert resp.status == 503 and "is damaged" in (await resp.json())["reason"]

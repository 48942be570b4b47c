"""Operations: /healthz, /readyz (and a full spool), /metrics, X-Request-ID."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import Api, Login, MakeApi, api, expect_error, make_api, wait_for

import handlers.admin as admin_handlers

__all__ = ["api", "make_api"]

SPOOL_MAX = 200_000  # an empty spool is about 120 KiB


async def test_healthz_and_readyz(api: Api) -> None:
    resp = await api.client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    assert resp.content_type == "application/json"
    resp = await api.client.get("/readyz")
    assert resp.status == 200
    for path in ("/healthz", "/readyz"):  # load balancers probe with HEAD too
        resp = await api.client.head(path)
        assert resp.status == 200 and await resp.read() == b""
        assert resp.headers.get("X-Request-ID")


async def test_the_smallest_spool_limit_allowed_still_serves(make_api: MakeApi) -> None:
    """An empty spool's own tables take about 72 KiB: the smallest
    spool_max_bytes the configuration takes must leave room for events."""
    api = await make_api(audit={"spool_max_bytes": 131072})
    resp = await api.client.get("/readyz")
    assert resp.status == 200, await resp.text()
    admin = await api.admin()
    resp = await api.client.get("/audit/status", headers=admin.headers)
    assert resp.status == 200 and (await resp.json())["spool_bytes"] < 131072


_EMPTY_SPOOL_SAID = re.compile(r"an empty spool takes about (\d+) KiB")


def _read(name: str) -> str:
    return (Path(__file__).resolve().parent.parent / name).read_text()


@pytest.mark.parametrize("where", ["config.toml", "audit/config.py"])
async def test_the_empty_spool_is_as_large_as_the_minimum_says(
    make_api: MakeApi, where: str
) -> None:
    """spool_max_bytes' minimum is explained by what an empty spool takes:
    the figure given (72 KiB) was 48 KiB short of the 120 KiB measured, so
    the smallest limit allowed left room for 8 KiB of events (about seven
    audited requests), not the 56 KiB it promised."""
    said = _EMPTY_SPOOL_SAID.search(_read(where))
    assert said is not None, where
    api = await make_api(audit={"spool_max_bytes": 131072})
    measured = api.engine.spool.spool_bytes
    assert abs(measured - int(said.group(1)) * 1024) <= 8 * 1024, (measured, said.group(0))


async def _fill(api: Api, who: Login) -> None:
    """Client events with 4 kB details until the spool is over its limit."""
    batch = [{"action": "client.fill", "details": {"pad": "p" * 4000}} for _ in range(100)]
    for _ in range(10):
        if api.engine.spool.full:
            return
        resp = await api.client.post("/audit/events", json=batch, headers=who.headers)
        assert resp.status == 202
    assert api.engine.spool.full


async def test_a_full_spool_refuses_a_listing_before_it_reads(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /documents reads apart, before its record: with the spool full it
    is refused first (it read every document, then got its 503)."""
    api = await make_api(audit={"spool_max_bytes": SPOOL_MAX})
    alice = await api.user("alice")
    await api.create_doc(alice, title="A")
    await _fill(api, alice)

    async def not_read(fn: object) -> None:
        raise AssertionError("read with the spool full")

    monkeypatch.setattr(api.engine.spool, "read_apart", not_read)
    resp = await api.client.get("/documents", headers=alice.headers)
    await expect_error(resp, 503, "audit_unavailable")
    # A client is told when to try again, as for the sink's own 503s.
    assert resp.headers.get("Retry-After") == "5"


async def test_a_body_that_does_not_decode_closes_the_connection(make_api: MakeApi) -> None:
    """After a body that does not decode, aiohttp's parser cannot read the
    connection's next request: whatever the answer (400 if its record is
    taken, 503 if the spool is full), the connection closes after it."""
    api = await make_api(audit={"spool_max_bytes": SPOOL_MAX})
    alice = await api.user("alice")
    garbage = {"Content-Encoding": "gzip", "Content-Type": "application/json",
               **alice.headers}
    for status in (400, 503):
        if status == 503:
            await _fill(api, alice)
        resp = await api.client.post("/documents", data=b"\x1f\x8b junk", headers=garbage)
        assert resp.status == status, await resp.text()
        assert resp.headers.get("Connection", "").lower() == "close"
    resp = await api.client.get("/me", headers=alice.headers)  # a new connection
    assert resp.status == 200
    assert resp.headers.get("Connection", "").lower() != "close"


async def test_spool_full_refuses_audited_actions(make_api: MakeApi) -> None:
    api = await make_api(audit={"spool_max_bytes": SPOOL_MAX})
    alice = await api.user("alice")
    doc = await api.create_doc(alice, content="original")
    before = api.documents_in_db()
    events_before = len(await api.events(alice.session_id))
    assert (await api.client.get("/readyz")).status == 200
    await _fill(api, alice)
    events_before = len(await api.events(alice.session_id))

    resp = await api.client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {"status": "not_ready", "reason": "spool full"}
    assert (await api.client.get("/healthz")).status == 200  # still serving

    url = f"/documents/{doc['id']}"
    attempts = [
        ("POST", "/documents", {"title": "new", "content": "x"}),
        ("PUT", url, {"content": "changed", "version": 1}),
        ("DELETE", url, None),
        ("GET", url, None),
        ("GET", "/documents", None),
        ("POST", url + "/chat", {"message": "hi"}),
        ("POST", "/audit/events", {"action": "client.more"}),
    ]
    for method, path, body in attempts:
        resp = await api.client.request(method, path, json=body, headers=alice.headers)
        await expect_error(resp, 503, "audit_unavailable")
    resp = await api.client.post("/token", json={"username": "alice",
                                                 "password": "user-password-for-tests"})
    await expect_error(resp, 503, "audit_unavailable")
    # Nothing happened, and nothing was recorded for the refused actions.
    assert api.documents_in_db() == before
    assert len(await api.events(alice.session_id)) == events_before
    # Logging out still works: sealing the session needs no new space.
    resp = await api.client.post("/logout", headers=alice.headers)
    assert resp.status == 200
    assert (await resp.json())["event_count"] == events_before + 1


async def _fill_in_small_steps(api: Any, admin: Any) -> None:
    """Client events until the spool is full: past the limit by less than
    the admin's reserve."""
    while not api.engine.spool.full:
        resp = await api.client.post("/audit/events", headers=admin.headers, json=[
            {"action": "client.fill", "details": {"pad": "p" * 4000}} for _ in range(5)])
        assert resp.status == 202


async def test_spool_full_leaves_status_and_flush_to_the_admin(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full spool refuses audited actions, but the admin's status and flush,
    the way to see and clear it, answer, and are recorded all the same."""
    api = await make_api(audit={"spool_max_bytes": SPOOL_MAX})
    admin = await api.admin()
    await _fill_in_small_steps(api, admin)
    resp = await api.client.get("/audit/sessions", headers=admin.headers)
    await expect_error(resp, 503, "audit_unavailable")
    resp = await api.client.get("/audit/status",
                                headers={**admin.headers, "X-Request-ID": "status-full"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["spool_bytes"] >= SPOOL_MAX
    resp = await api.client.post("/audit/flush",
                                 headers={**admin.headers, "X-Request-ID": "flush-full"})
    assert resp.status == 202, await resp.text()
    recorded = {e["request_id"]: e for e in await api.events(admin.session_id)
                if e["action"] == "audit.query"}
    assert recorded["status-full"]["outcome"] == "success"
    assert recorded["flush-full"]["details"]["endpoint"] == "/audit/flush"
    # Only small records go past the limit: with parameters (which these
    # endpoints do not take, and which the record would copy) it is 503.
    junk = "&".join(f"junk{i}={'x' * 200}" for i in range(20))
    resp = await api.client.get(f"/audit/status?{junk}", headers=admin.headers)
    await expect_error(resp, 503, "audit_unavailable")
    # And only up to a reserve past the limit: a monitor polling status for
    # days cannot grow a full spool without bound.
    monkeypatch.setattr(admin_handlers, "operational_reserve", lambda max_bytes: 0)
    resp = await api.client.get("/audit/status", headers=admin.headers)
    await expect_error(resp, 503, "audit_unavailable")


async def test_a_flush_the_spool_cannot_record_is_not_done(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /audit/flush past the spool's reserve is 503 audit_unavailable,
    "nothing was done": the flusher's pause after failures is left as it
    was (the flush used to be done before its record was refused)."""
    api = await make_api(audit={"spool_max_bytes": SPOOL_MAX})
    admin = await api.admin()
    await _fill_in_small_steps(api, admin)
    monkeypatch.setattr(admin_handlers, "operational_reserve", lambda max_bytes: 0)
    backoff = api.engine.flusher.backoff
    backoff.until = backoff.clock() + 3600  # as after a run of sink failures
    resp = await api.client.post("/audit/flush", headers=admin.headers)
    await expect_error(resp, 503, "audit_unavailable")
    assert backoff.remaining() > 3000
    assert "/audit/flush" not in [e["details"].get("endpoint")
                                  for e in await api.events(admin.session_id)]


async def test_spool_full_recovers_when_flushed(make_api: MakeApi) -> None:
    api = await make_api(audit={"spool_max_bytes": SPOOL_MAX})
    alice = await api.user("alice")
    await _fill(api, alice)
    assert (await api.client.get("/readyz")).status == 503
    await api.client.post("/logout", headers=alice.headers)

    async def ready() -> bool:
        return (await api.client.get("/readyz")).status == 200

    await wait_for(ready, message="the spool draining to the sink")
    bob = await api.user("bob")
    assert (await api.client.get("/documents", headers=bob.headers)).status == 200


async def test_metrics(api: Api) -> None:
    alice = await api.user("alice")
    await api.client.get("/documents", headers=alice.headers)
    await api.client.post("/logout", headers=alice.headers)
    resp = await api.client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain" and resp.charset == "utf-8"
    text = await resp.text()
    assert "_created" not in text  # one series per counter, not two
    for name in (
        "session_audit_http_requests_total",
        "session_audit_events_recorded_total",
        "session_audit_sink_writes_total",
        "session_audit_pending_parts",
        "session_audit_spool_bytes",
        "session_audit_oldest_pending_age_seconds",
        "session_audit_group_commit_batch_size_bucket",
        "session_audit_group_commit_batch_size_count",
        "session_audit_group_commit_seconds_bucket",
        "session_audit_group_commit_seconds_sum",
        # From the on-call review: a ratio to alert on before the spool is
        # full, and a crash of the flusher or reaper.
        "session_audit_spool_max_bytes",
        'session_audit_background_task_crashes_total{task="flusher"}',
        'session_audit_background_task_crashes_total{task="reaper"}',
        "session_audit_spool_commit_failures_total",
    ):
        assert f"\n{name}" in text, name
    assert 'route="document_list",status="200"' in text
    # Latency by route (from the on-call review: there was none): one list, one logout.
    for route in ("document_list", "logout"):
        buckets = {m[1]: float(m[2]) for m in re.finditer(
            rf'^session_audit_http_request_duration_seconds_bucket\{{le="([^"]+)",route="{route}"\}}'
            r" (\S+)$", text, re.M)}
        assert buckets["+Inf"] == buckets["60.0"] == 1.0, buckets
        assert list(buckets.values()) == sorted(buckets.values()), buckets  # cumulative
        assert f'session_audit_http_request_duration_seconds_count{{route="{route}"}} 1.0' in text
    for line in text.splitlines():
        assert line.startswith("#") or " " in line
    # Counts only: no user names, tokens or session ids.
    assert "alice" not in text and alice.session_id not in text and alice.token not in text


async def _metrics_text(api: Api) -> str:
    resp = await api.client.get("/metrics")
    assert resp.status == 200
    return await resp.text()


async def test_metrics_count_each_standard_method_by_its_name(api: Api) -> None:
    """Only a made-up method is counted as method="other" (test_review_privacy):
    each standard one keeps its own label, whatever the route answers."""
    alice = await api.user("alice")
    sent = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
    for method in sent:
        resp = await api.client.request(method, "/documents/no-such-doc", headers=alice.headers)
        await resp.read()
    text = await _metrics_text(api)
    methods = set(re.findall(r'^session_audit_http_requests_total\{method="([^"]*)"', text, re.M))
    assert methods == set(sent), methods
    assert 'method="DELETE",route="document_delete",status="404"} 1.0' in text


async def test_request_durations_are_the_time_the_request_took(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The latency histogram observes how long each request took: a listing
    held 70 ms before it is recorded is observed above the 50 ms bucket
    (a lower bound the test makes, not a measure of this machine's speed)."""
    import asyncio

    alice = await api.user("alice")
    spool = api.engine.spool
    real = spool.read_apart

    async def held(fn):  # type: ignore[no-untyped-def]
        result = await real(fn)
        await asyncio.sleep(0.07)
        return result

    monkeypatch.setattr(spool, "read_apart", held)
    assert (await api.client.get("/documents", headers=alice.headers)).status == 200
    text = await _metrics_text(api)
    name = "session_audit_http_request_duration_seconds"
    buckets = {m[1]: float(m[2]) for m in re.finditer(
        rf'^{name}_bucket\{{le="([^"]+)",route="document_list"\}} (\S+)$', text, re.M)}
    assert buckets["0.05"] == 0.0 and buckets["+Inf"] == 1.0, buckets
    total = re.search(rf'^{name}_sum\{{route="document_list"\}} (\S+)$', text, re.M)
    assert total is not None and float(total[1]) > 0.05, text


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("abc-123_X.y", True),
        ("r" * 128, True),
        ("r" * 129, False),
        ("has space", False),
        ("semi;colon", False),
        ("<script>", False),
        ("caf\u00e9", False),
        ("", False),
    ],
)
async def test_request_id_echoed_when_sane(api: Api, sent: str, echoed: bool) -> None:
    for path in ("/healthz", "/no/such/path", "/me"):
        resp = await api.client.get(path, headers={"X-Request-ID": sent})
        rid = resp.headers["X-Request-ID"]
        if echoed:
            assert rid == sent
        else:
            assert rid != sent and 0 < len(rid) <= 128
            assert rid.replace("-", "").replace("_", "").replace(".", "").isalnum()
        if resp.status >= 400:
            assert (await resp.json())["error"]["request_id"] == rid


async def test_request_id_generated_and_unique(api: Api) -> None:
    ids = set()
    for _ in range(5):
        resp = await api.client.get("/healthz")
        ids.add(resp.headers["X-Request-ID"])
    assert len(ids) == 5


async def test_request_id_reaches_the_events(api: Api) -> None:
    alice = await api.user("alice")
    resp = await api.client.get("/documents", headers={**alice.headers,
                                                       "X-Request-ID": "x" * 129})
    rid = resp.headers["X-Request-ID"]
    assert (await api.events(alice.session_id))[-1]["request_id"] == rid


async def test_metrics_scrapes_share_one_spool_count(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics needs no token: however often it is scraped, the spool's
    counts (a count over every pending row) are read at most once a second,
    by one query that concurrent scrapes share."""
    import asyncio

    from audit import queries
    from handlers import ops

    calls = []
    real = queries.counts

    def counted(conn, now):  # type: ignore[no-untyped-def]
        calls.append(now)
        return real(conn, now)

    monkeypatch.setattr(queries, "counts", counted)
    monkeypatch.setattr(ops, "COUNTS_MAX_AGE", 60.0)  # however slow this machine is
    resps = await asyncio.gather(*(api.client.get("/metrics") for _ in range(20)))
    assert all(r.status == 200 for r in resps)
    for _ in range(10):
        assert (await api.client.get("/metrics")).status == 200
    assert len(calls) == 1
    # The counts stay at most COUNTS_MAX_AGE old: with 0, each scrape reads them.
    monkeypatch.setattr(ops, "COUNTS_MAX_AGE", 0.0)
    for _ in range(3):
        assert (await api.client.get("/metrics")).status == 200
    assert len(calls) == 4


async def test_a_spool_that_cannot_commit_is_not_ready_until_it_can(
    make_api: MakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    """From an on-call review: with the spool's disk full (or read-only) every
    audited request got 503 audit_unavailable, yet /readyz said 200 and
    session_audit_ready 1, and each failed commit logged its own error line.
    Now: not ready, in words, while commits fail; one line, not one a commit;
    ready again by itself after the first commit that succeeds."""
    api = await make_api()
    alice = await api.user("alice")
    spool = api.engine.spool
    pages = await spool.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await spool.submit(  # a disk with 2 pages left
        lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages + 2}"), needs_space=False)
    with caplog.at_level(logging.WARNING, logger="session_audit.spool"):
        for _ in range(5):
            resp = await api.client.post("/documents", headers=alice.headers,
                                         json={"title": "t", "content": "x" * 100_000})
            await expect_error(resp, 503, "audit_unavailable")
        resp = await api.client.get("/readyz")
        assert resp.status == 503
        assert "cannot commit" in (await resp.json())["reason"]
        metrics = await (await api.client.get("/metrics")).text()
        assert "session_audit_ready 0.0" in metrics
        failed = [r for r in caplog.records if "spool commit failed" in r.getMessage()]
        assert len(failed) == 1, [r.getMessage() for r in failed]

        await spool.submit(lambda w: w.conn.execute("PRAGMA max_page_count = 1073741823"),
                           needs_space=False)  # space again: this commit succeeds
        assert (await api.client.get("/readyz")).status == 200
        assert any("succeed again" in r.getMessage() for r in caplog.records)
    resp = await api.client.post("/documents", headers=alice.headers,
                                 json={"title": "t", "content": "x" * 100_000})
    assert resp.status == 201

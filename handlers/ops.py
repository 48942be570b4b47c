"""Operations endpoints: ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from audit import queries
from audit.engine import AuditEngine
from audit.metrics import Histogram
from audit.spool import SpoolUnavailable

from .errors import json_response, not_found, without_paths
from .keys import CONFIG, ENGINE, REGISTRY

log = logging.getLogger("session_audit")

REQUESTS = web.AppKey("requests_total", Counter)
DURATIONS = web.AppKey("request_seconds", PromHistogram)
CUT = web.AppKey("answers_cut_total", Counter)
# Seconds from the request's headers read to its response made (not sent), by
# route: an audited request waits for its group commit (an fsync), a chat for
# the AI provider.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
# The document's bytes, read once when the routes are set up (None: no file).
# Read at each request, it needed a descriptor: with every one taken by
# connections, GET /openapi.yaml was a 500 with a traceback in the log.
OPENAPI: web.AppKey[bytes | None] = web.AppKey("openapi")


def read_openapi() -> bytes | None:
    """The OpenAPI document, or None when there is none to read."""
    try:
        return OPENAPI_PATH.read_bytes()
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("cannot read %s: %s; GET /openapi.yaml answers 404",
                        OPENAPI_PATH.name, exc.strerror or exc)
        return None


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if engine.ready:
        return json_response({"status": "ready"})
    reason = "spool full" if engine.spool.full else "spool unavailable"
    if engine.spool.commit_error is not None:
        reason = f"spool cannot commit: {engine.spool.commit_error}"
    if engine.spool.damaged is not None:
        reason = engine.spool.damaged
    if engine.task_failure:
        reason = f"background task failed: {engine.task_failure}"
    # Unauthenticated: the reason says what is wrong, not where (API.md).
    reason = without_paths(reason, request.app[CONFIG])
    return json_response({"status": "not_ready", "reason": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    collector = EngineCollector(engine, await request.app[COUNTS].get())
    registry = request.app[REGISTRY]
    registry.register(collector)
    try:
        body = generate_latest(registry)
    finally:
        registry.unregister(collector)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.StreamResponse:
    body = request.app[OPENAPI]
    if body is None:
        raise not_found("no OpenAPI document")
    return web.Response(body=body,
                        headers={"Content-Type": "application/yaml; charset=utf-8"})


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.total)


# /metrics needs no authentication: the spool's counts (a count over every
# pending row, ~50 ms with a million pending) are read at most once a second,
# by one query that concurrent scrapes share, so that scraping in a loop cannot
# keep the reader thread (which logins wait on) busy.
COUNTS_MAX_AGE = 1.0


class SharedCounts:
    """The spool's counts for /metrics: at most :data:`COUNTS_MAX_AGE` old,
    one query at a time, shared by the scrapes waiting for it; None while
    the spool cannot be read (damaged, failing): the rest is served, and
    session_audit_ready and /readyz say why."""

    def __init__(self, engine: AuditEngine) -> None:
        self.engine = engine
        self._counts: dict[str, Any] | None = {}
        self._read_at = -float("inf")
        self._reading: asyncio.Future[dict[str, Any] | None] | None = None

    async def get(self) -> dict[str, Any] | None:
        if time.monotonic() - self._read_at <= COUNTS_MAX_AGE:
            return self._counts
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
        return await asyncio.shield(self._reading)

    async def _read(self) -> dict[str, Any] | None:
        started = time.monotonic()
        counts: dict[str, Any] | None
        try:
            counts = await self.engine.spool.read(lambda c: queries.counts(c, time.time()))
        except SpoolUnavailable:  # (the spool logs it; not ready says so)
            counts = None
        self._counts, self._read_at = counts, started
        return counts


COUNTS = web.AppKey("spool_counts", SharedCounts)


# The gauges of the spool's counts (SharedCounts): name, help, key.
SPOOL_GAUGES = (
    ("session_audit_active_sessions", "Open sessions", "active_sessions"),
    ("session_audit_pending_parts", "Parts waiting for the sink", "pending_parts"),
    ("session_audit_pending_security_events", "Security events waiting",
     "pending_security_events"),
    ("session_audit_dead_letter", "Dead-lettered parts and events", "dead_letter"),
    ("session_audit_oldest_pending_age_seconds", "Age of the oldest pending item",
     "oldest_pending_age_seconds"),
)


class EngineCollector(Collector):
    """Engine counters and spool gauges, read at scrape time."""

    def __init__(self, engine: AuditEngine, counts: dict[str, Any] | None) -> None:
        self.engine = engine
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        st = e.stats
        ev = CounterMetricFamily("session_audit_events_recorded", "Audit events committed",
                                 labels=["kind"])
        ev.add_metric(["session"], st.events_recorded)
        ev.add_metric(["security"], st.security_events_recorded)
        yield ev
        # Disjoint outcomes (their sum is every write): a dead-lettered write
        # counts as failed in the stats too, here only as dead_lettered.
        w = CounterMetricFamily("session_audit_sink_writes", "Sink writes by outcome",
                                labels=["outcome"])
        w.add_metric(["ok"], st.writes_ok)
        w.add_metric(["failed"], st.writes_failed - st.dead_lettered)
        w.add_metric(["rate_limited"], st.rate_limited)
        w.add_metric(["dead_lettered"], st.dead_lettered)
        yield w
        yield CounterMetricFamily("session_audit_parts_written", "Session parts stored",
                                  value=st.parts_written)
        yield CounterMetricFamily(
            "session_audit_security_events_summarised",
            "Security events over their client IP's budget, counted into summary events",
            value=e.flood.suppressed if e.flood else 0)
        yield CounterMetricFamily("session_audit_spool_commit_failures", "Failed spool commits",
                                  value=st.commit_failures)
        crashes = CounterMetricFamily(
            "session_audit_background_task_crashes",
            "Crashes of a background task (started again after a pause)", labels=["task"])
        for task in ("flusher", "reaper"):
            crashes.add_metric([task], e.task_crashes.get(task, 0))
        yield crashes
        # Not read (the spool damaged or failing): left out, not made up.
        if self.counts is not None:
            for name, doc, key in SPOOL_GAUGES:
                yield GaugeMetricFamily(name, doc, value=self.counts.get(key, 0))
        yield GaugeMetricFamily("session_audit_spool_bytes", "Bytes used in the spool",
                                value=e.spool.spool_bytes)
        yield GaugeMetricFamily("session_audit_spool_max_bytes", "audit.spool_max_bytes",
                                value=e.spool.max_bytes)
        yield GaugeMetricFamily("session_audit_sink_healthy", "1 when the sink accepts writes",
                                value=1 if e.flusher.healthy and e.flusher.sink_open else 0)
        yield GaugeMetricFamily("session_audit_backoff_seconds", "Remaining sink pause",
                                value=e.flusher.backoff.remaining())
        yield GaugeMetricFamily("session_audit_ready", "1 when accepting audited actions",
                                value=1 if e.ready else 0)
        yield _histogram("session_audit_group_commit_batch_size", "Jobs per spool commit",
                         st.batch_sizes)
        yield _histogram("session_audit_group_commit_seconds", "Spool commit latency",
                         st.commit_seconds)


def new_registry() -> tuple[CollectorRegistry, Counter, PromHistogram, Counter]:
    # No *_created series beside each counter: they double the series and
    # carry nothing an operator uses (process-wide in prometheus_client).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=False)
    requests = Counter("session_audit_http_requests", "HTTP requests by route and status",
                       ["method", "route", "status"], registry=registry)
    durations = PromHistogram(
        "session_audit_http_request_duration_seconds",
        "Time to answer an HTTP request, by route (an audited one includes its group commit)",
        ["route"], buckets=REQUEST_BUCKETS, registry=registry)
    cut = Counter("session_audit_http_answers_cut",
                  "Answers cut short after their status 200 and first bytes went out (a"
                  " streamed answer's source failed mid-way: no complete JSON reached the"
                  " client), by route", ["route"], registry=registry)
    return registry, requests, durations, cut

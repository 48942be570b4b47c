"""Spool append benchmark: durable group commit vs raw sqlite3 executemany.

    python bench/spool_bench.py [--json] [--repeats 3] [--events 100000]

Measures, in one run on one machine:

* ``raw``: plain ``sqlite3`` ``executemany`` of event-sized rows of 256
  interleaved sessions, 100 rows per commit, WAL + ``synchronous = FULL`` --
  the physical reference; ``raw_events_per_second`` into the spool's events
  layout (an unindexed rowid table, plus ``event_keys`` filled from it every
  ``KEYS_EVERY`` rows), ``raw_sk_index_events_per_second`` into the layout
  before it (the same table with a unique ``(sk, seq)`` index),
  ``raw_plain_events_per_second`` into a bare table without index;
* the engine: ``AuditEngine.record`` (a real append job through the spool's
  group commit, ``synchronous = "full"``, ``ack = "durable"``) from 1, 16 and
  256 concurrent producers on uvloop, with throughput and per-call latency
  (p50/p99 from the caller's side: submit to acknowledged commit), under the
  garbage collector settings ``serve`` runs it under
  (:func:`audit.runtime.tune_gc`; ``--default-gc`` for CPython's own).

Each figure is the median of ``--repeats`` runs. With ``--json`` it prints
one JSON object: ``raw_events_per_second`` and ``producers`` ->
``{"1": {"events_per_second", "p50_ms", "p99_ms", ...}, "16": ..., "256": ...}``;
``raw_events_per_second_runs`` and each producer count's
``events_per_second_runs`` keep every repeat's figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from audit.config import parse_config
from audit.engine import AuditEngine
from audit.events import Draft, Source, new_id
from audit.runtime import tune_gc
from audit.store import KEYS_EVERY
from sinks.sqlite import SqliteSink

KEY = b"bench-audit-key-0123456789abcdef"
PRODUCERS = (1, 16, 256)
SAMPLE_EVENT = {
    "event_id": "0" * 32,
    "session_id": "1" * 32,
    "seq": 1,
    "ts": "2026-11-26T14:31:07.123Z",
    "action": "document.access",
    "outcome": "success",
    "actor": {"user": "alice", "role": "user"},
    "target": {"type": "document", "id": "3f2a"},
    "source": {"ip": "127.0.0.1", "user_agent": "curl/8.5.0"},
    "request_id": "r" * 22,
    "details": {},
    "hash": "a" * 64,
}


RAW_SCHEMAS = {
    # The spool's own events layout (audit/store.py): an unindexed rowid
    # table, plus event_keys filled from it every KEYS_EVERY rows.
    "spool": (
        "CREATE TABLE events (sk INTEGER NOT NULL, session_id TEXT NOT NULL,"
        " seq INTEGER NOT NULL, ts REAL NOT NULL, json TEXT NOT NULL);"
        "CREATE TABLE event_keys (sk INTEGER NOT NULL, seq INTEGER NOT NULL,"
        " rid INTEGER NOT NULL, PRIMARY KEY (sk, seq)) WITHOUT ROWID;"
    ),
    # The layout before event_keys: the same table with a unique (sk, seq) index.
    "sk_index": (
        "CREATE TABLE events (sk INTEGER NOT NULL, session_id TEXT NOT NULL,"
        " seq INTEGER NOT NULL, ts REAL NOT NULL, json TEXT NOT NULL);"
        "CREATE UNIQUE INDEX events_sk_seq ON events (sk, seq);"
    ),
    # The physical floor: one bare append-only table, no index.
    "plain": (
        "CREATE TABLE events (session_id TEXT NOT NULL, seq INTEGER NOT NULL,"
        " ts REAL NOT NULL, json TEXT NOT NULL);"
    ),
}


def raw_sqlite(events: int, layout: str, per_commit: int = 100, sessions: int = 256) -> float:
    """Plain sqlite3: executemany, ``per_commit`` rows per transaction, WAL + FULL.

    Rows are event-sized JSON texts of ``sessions`` interleaved sessions, as
    256 producers would write them.
    """
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        conn = sqlite3.connect(os.path.join(d, "raw.db"), isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(RAW_SCHEMAS[layout])
        text = json.dumps(SAMPLE_EVENT, separators=(",", ":"))
        sids = [new_id() for _ in range(sessions)]
        if layout in ("spool", "sk_index"):
            rows: list[tuple[Any, ...]] = [
                (1 + i % sessions, sids[i % sessions], i // sessions, time.time(), text)
                for i in range(events)
            ]
            insert = "INSERT INTO events VALUES (?, ?, ?, ?, ?)"
        else:
            rows = [(sids[i % sessions], i // sessions, time.time(), text) for i in range(events)]
            insert = "INSERT INTO events VALUES (?, ?, ?, ?)"
        started = time.perf_counter()
        mark = tail = 0
        for i in range(0, events, per_commit):
            conn.execute("BEGIN")
            conn.executemany(insert, rows[i : i + per_commit])
            tail += per_commit
            if layout == "spool" and tail >= KEYS_EVERY:
                conn.execute(
                    "INSERT INTO event_keys SELECT sk, seq, rowid FROM events"
                    " WHERE rowid > ? ORDER BY sk, seq", (mark,))
                mark, tail = conn.execute("SELECT MAX(rowid) FROM events").fetchone()[0], 0
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
        conn.close()
    return events / elapsed


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def engine_run(producers: int, events: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        config = parse_config({"server": {"data_dir": d}, "audit": {"synchronous": "full"}})
        engine = AuditEngine(config, SqliteSink(config.sqlite_sink_path), KEY)
        await engine.open(background=False)  # the sink is not written during the run
        src = Source(user="alice", role="user", ip="127.0.0.1", user_agent="curl/8.5.0")
        sessions = [
            (await engine.start_session("alice", "user", src, 3600)).session_id
            for _ in range(producers)
        ]
        per_producer = max(1, events // producers)
        latencies: list[float] = []
        clock = time.perf_counter

        async def produce(session_id: str) -> None:
            lat = latencies.append
            for i in range(per_producer):
                draft = Draft(
                    "document.access",
                    target={"type": "document", "id": f"doc-{i}"},
                    source=src,
                )
                t0 = clock()
                await engine.record(session_id, draft)
                lat(clock() - t0)

        commits0 = engine.stats.commits
        started = clock()
        await asyncio.gather(*(produce(sid) for sid in sessions))
        elapsed = clock() - started
        commits = engine.stats.commits - commits0
        await engine.close(flush_window=0)
    latencies.sort()
    n = len(latencies)
    return {
        "events": n,
        "events_per_second": n / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "commits": commits,
        "mean_batch": n / commits if commits else 0.0,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--default-gc", action="store_true",
                    help="CPython's own collector settings, not the server's (tune_gc)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--events", type=int, default=100_000, help="events per run at 256 producers")
    args = ap.parse_args()
    if not args.default_gc:
        tune_gc()  # the collector settings `serve` runs the engine under
    sizes = {1: max(2000, args.events // 25), 16: max(2000, args.events // 2), 256: args.events}

    raw_runs: dict[str, list[float]] = {layout: [] for layout in RAW_SCHEMAS}
    engine_runs: dict[int, list[dict[str, Any]]] = {p: [] for p in PRODUCERS}
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits all alike
        for layout in RAW_SCHEMAS:
            raw_runs[layout].append(raw_sqlite(args.events, layout))
        for p in PRODUCERS:
            engine_runs[p].append(uvloop.run(engine_run(p, sizes[p])))
    raw = statistics.median(raw_runs["spool"])
    result: dict[str, Any] = {
        "raw_events_per_second": round(raw, 1),
        "raw_sk_index_events_per_second": round(statistics.median(raw_runs["sk_index"]), 1),
        "raw_plain_events_per_second": round(statistics.median(raw_runs["plain"]), 1),
        "producers": {str(p): median_of(engine_runs[p]) for p in PRODUCERS},
        "repeats": args.repeats,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
        "gc": "default" if args.default_gc else "server (audit.runtime.tune_gc)",
    }
    # Each repeat's figure beside the median: the spread of one run says how
    # noisy the machine was while it ran.
    result["raw_events_per_second_runs"] = [round(r) for r in raw_runs["spool"]]
    for p in PRODUCERS:
        entry = result["producers"][str(p)]
        entry["ratio_to_raw"] = round(entry["events_per_second"] / raw, 3)
        entry["events_per_second_runs"] = [round(r["events_per_second"]) for r in engine_runs[p]]
    if args.json:
        print(json.dumps(result))
        return
    print(
        "raw sqlite3 executemany (100/commit, WAL, FULL):"
        f" {raw:,.0f} events/s in the spool's layout,"
        f" {result['raw_sk_index_events_per_second']:,.0f} events/s in the (sk, seq) index"
        " layout before it,"
        f" {result['raw_plain_events_per_second']:,.0f} events/s into a bare table"
    )
    for p in PRODUCERS:
        r = result["producers"][str(p)]
        print(
            f"{p:>4} producers: {r['events_per_second']:>9,.0f} events/s"
            f"  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
            f"  mean batch {r['mean_batch']:6.1f}  ({r['ratio_to_raw']:.2f} x raw;"
            f" repeats: {', '.join(f'{x:,}' for x in r['events_per_second_runs'])})"
        )


if __name__ == "__main__":
    main()

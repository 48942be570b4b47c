"""RSS and start-to-ready time with 1,000,000 events pending and the sink down.

1. Build the backlog in a separate process with :class:`audit.engine.AuditEngine`
   directly (no HTTP, flusher not started, ``synchronous = "normal"``):
   ``--sessions`` (2000) sessions of ``--events`` (500) events each --
   ``session.start``, ``token.issue``, 497 ``document.access``, ``session.end``
   -- all sealed, so every one is a pending part (500 events = 1 part).
2. Start ``python server.py serve`` over that data directory with the http
   sink pointing at a closed port (the sink is down), ``--starts`` times;
   each time measure spawn -> first ``/readyz`` 200, then sample the server
   process's RSS (``/proc/PID/status`` VmRSS, and VmHWM = peak) for
   ``--watch`` seconds while the flusher keeps failing and backing off.

    python bench/startup_bench.py [--sessions 2000] [--events 500] [--starts 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    AUDIT_KEY,
    PYTHON,
    ROOT,
    Server,
    add_users,
    free_port,
    http,
    rss_kb,
    save,
    wait_ready,
    workdir,
    write_config,
)

CONCURRENT_JOBS = 8


async def build(cfg: Path, sessions: int, events: int) -> dict[str, Any]:
    from audit.config import load_config
    from audit.engine import AuditEngine
    from audit.events import Draft, Source
    from sinks import create_sink

    config = load_config(str(cfg))
    engine = AuditEngine(config, create_sink(config), AUDIT_KEY.encode())
    await engine.open(background=False)
    actions = events - 3
    t0 = time.perf_counter()

    def session_job(i: int) -> Any:
        user = f"user{i % 200:03d}"
        src = Source(user, "user", "10.0.0.1", "backlog-builder/1.0", f"req-{i}")

        def job(w: Any) -> int:
            s = w.start_session(user, "user", time.time() + 3600,
                                [Draft("session.start", source=src),
                                 Draft("token.issue", source=src)])
            target = {"type": "document", "id": f"doc{i:06d}"}
            for _ in range(actions):
                w.append(s.session_id, Draft("document.access", target=target, source=src))
            w.seal(s.session_id, "logout",
                   Draft("session.end", source=src, details={"reason": "logout"}))
            return int(s.session_id != "")

        return job

    done = 0
    try:
        for start in range(0, sessions, CONCURRENT_JOBS):
            futs = [engine.spool.submit(session_job(i))
                    for i in range(start, min(sessions, start + CONCURRENT_JOBS))]
            done += sum(await asyncio.gather(*futs))
        status = await engine.status()
    finally:
        await engine.close(flush_window=0)
    elapsed = time.perf_counter() - t0
    return {"sessions": done, "events": done * events, "build_seconds": round(elapsed, 1),
            "events_per_s": round(done * events / elapsed),
            "pending_parts": status["pending_parts"], "spool_bytes": status["spool_bytes"]}


def measure_start(cfg: Path, port: int, watch: float) -> dict[str, Any]:
    srv = Server(cfg, port)
    srv.start(wait=False)
    try:
        ready_at = wait_ready(srv.base, srv.proc, timeout=120, interval=0.005)
        ready_s = ready_at - srv.spawned_at
        rss_ready = rss_kb(srv.pid)
        samples = [rss_ready["VmRSS"]]
        t_end = time.monotonic() + watch
        while time.monotonic() < t_end:
            time.sleep(0.25)
            samples.append(rss_kb(srv.pid)["VmRSS"])
        pending = srv.metric("session_audit_pending_parts")
        healthy = srv.metric("session_audit_sink_healthy")
        ok_me = http("GET", srv.base + "/healthz")[0]
        peak = rss_kb(srv.pid)["VmHWM"]
    finally:
        srv.stop()
    return {"ready_seconds": round(ready_s, 3),
            "rss_at_ready_mb": round(rss_ready["VmRSS"] / 1024, 1),
            "rss_max_mb": round(max(samples) / 1024, 1), "rss_peak_hwm_mb": round(peak / 1024, 1),
            "pending_parts": pending, "sink_healthy": healthy, "healthz": ok_me}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--events", type=int, default=500)
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--watch", type=float, default=10.0, help="seconds of RSS sampling")
    ap.add_argument("--build-only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        out = asyncio.run(build(Path(args.build_only), args.sessions, args.events))
        print(json.dumps(out))
        return
    with workdir("startup") as wd:
        dead_port = free_port()  # nothing listens there: the sink is down
        port = free_port()
        cfg = write_config(wd, port, sink="http", sink_url=f"http://127.0.0.1:{dead_port}",
                           synchronous="normal", http_timeout=2.0)
        # an admin exists, as on any restart (else the first start would spend a
        # bcrypt hash creating one)
        add_users(cfg, ["admin"], rounds=4, role="admin")
        t0 = time.monotonic()
        proc = subprocess.run([PYTHON, __file__, "--build-only", str(cfg), "--sessions",
                               str(args.sessions), "--events", str(args.events)],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        built = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"backlog: {built['events']:,} events in {built['pending_parts']} pending parts,"
              f" {built['spool_bytes'] / 2**20:.0f} MiB, built in {time.monotonic() - t0:.0f} s",
              flush=True)
        starts = []
        for k in range(args.starts):
            m = measure_start(cfg, port, args.watch)
            starts.append(m)
            print(f"start {k + 1}: ready in {m['ready_seconds']:.2f} s, RSS at ready"
                  f" {m['rss_at_ready_mb']} MB, max {m['rss_max_mb']} MB over {args.watch:g} s,"
                  f" peak (VmHWM) {m['rss_peak_hwm_mb']} MB, pending parts"
                  f" {m['pending_parts']:.0f}", flush=True)
    summary = {
        "events_pending": built["events"],
        "ready_seconds_median": statistics.median(s["ready_seconds"] for s in starts),
        "rss_max_mb_median": statistics.median(s["rss_max_mb"] for s in starts),
        "rss_peak_hwm_mb_max": max(s["rss_peak_hwm_mb"] for s in starts),
        "targets": {"ready_seconds": 3.0, "rss_mb": 150},
    }
    summary["ready_ok"] = summary["ready_seconds_median"] <= 3.0
    summary["rss_ok"] = summary["rss_peak_hwm_mb_max"] <= 150
    print(json.dumps(summary, indent=2))
    save("startup", {"config": {"sink": "http to a closed port", "synchronous": "normal",
                                "sessions": args.sessions, "events_per_session": args.events,
                                "watch_seconds": args.watch},
                     "backlog": built, "starts": starts, "summary": summary})


if __name__ == "__main__":
    main()

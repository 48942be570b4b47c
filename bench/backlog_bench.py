"""Memory while a 1,000,000-event backlog flushes to a slow sink.

    python bench/backlog_bench.py [--json] [--sessions 2000] [--events 500]
                                  [--sink-delay 0.005] [--max-seconds 120]

Two child processes, so each phase's peak RSS is its own:

1. ``build``: a real AuditEngine over a fresh spool with the sink down
   (never flushed): ``--sessions`` sessions of ``--events`` events each
   (``session.start``, ``token.issue``, N - 3 ``document.access``,
   ``session.end``), each session written by one spool job through the real
   Writer (start, appends, seal) so a million events take seconds, not minutes.
2. ``flush``: a fresh process opens an AuditEngine over that spool with a slow
   sink (``--sink-delay`` seconds per write, which it counts and checks) and
   the real background flusher; it samples VmRSS every 50 ms until the backlog
   is gone (or ``--max-seconds``), and reports the peak (VmHWM).

With ``--json`` it prints one JSON object (``flush.peak_rss_mb`` is the
figure the target, <= 150 MB, applies to).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audit.config import Config, parse_config
from audit.engine import AuditEngine
from audit.events import Draft, Source
from audit.store import Writer
from sinks.base import Sink, SinkUnavailable

KEY = b"bench-audit-key-0123456789abcdef"


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def config_for(data_dir: str, synchronous: str) -> Config:
    return parse_config(
        {
            "server": {"data_dir": data_dir},
            "audit": {"synchronous": synchronous, "part_max_events": 500},
            "flush": {"max_writes_per_second": 10_000.0, "burst": 100},
        }
    )


class DownSink(Sink):
    type = "down"

    async def open(self) -> None:
        raise SinkUnavailable("down while the backlog is built")

    async def write_part(self, part: dict[str, Any]) -> None:
        raise SinkUnavailable("down")

    async def write_security_events(self, events: list[dict[str, Any]]) -> None:
        raise SinkUnavailable("down")


class SlowSink(Sink):
    """A remote store that takes ``delay`` seconds per write and keeps only counts."""

    type = "slow"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.parts = 0
        self.events = 0
        self.largest_part_bytes = 0

    async def write_part(self, part: dict[str, Any]) -> None:
        await asyncio.sleep(self.delay)
        assert len(part["events"]) == part["event_count"]
        self.parts += 1
        self.events += part["event_count"]
        self.largest_part_bytes = max(
            self.largest_part_bytes, len(json.dumps(part, separators=(",", ":")))
        )

    async def write_security_events(self, events: list[dict[str, Any]]) -> None:
        await asyncio.sleep(self.delay)


async def build(data_dir: str, sessions: int, events: int) -> dict[str, Any]:
    engine = AuditEngine(config_for(data_dir, "normal"), DownSink(), KEY)
    await engine.open(background=False)
    src = Source(user="alice", role="user", ip="10.1.2.3", user_agent="Mozilla/5.0 bench")

    def one_session(w: Writer) -> int:
        start = [Draft("session.start", source=src), Draft("token.issue", source=src)]
        s = w.start_session("alice", "user", time.time() + 3600, start)
        for i in range(events - 3):
            w.append(
                s.session_id,
                Draft(
                    "document.access",
                    target={"type": "document", "id": f"doc-{i % 37}"},
                    source=src,
                    details={"bytes": 1200 + i},
                ),
            )
        end = Draft("session.end", source=src, details={"reason": "logout"})
        return w.seal(s.session_id, "logout", end).event_count

    started = time.perf_counter()
    done = 0
    for _ in range(0, sessions, 10):  # ten sessions per group commit
        counts = await asyncio.gather(*(engine.spool.submit(one_session) for _ in range(10)))
        done += sum(counts)
    elapsed = time.perf_counter() - started
    status = await engine.status()
    await engine.close(flush_window=0)
    return {
        "events": done,
        "seconds": round(elapsed, 2),
        "events_per_second": round(done / elapsed),
        "pending_parts": status["pending_parts"],
        "spool_mb": round(status["spool_bytes"] / 2**20, 1),
        "peak_rss_mb": round(status_kb("VmHWM") / 1024, 1),
    }


async def flush(data_dir: str, delay: float, max_seconds: float) -> dict[str, Any]:
    rss_before_open = status_kb("VmRSS")
    sink = SlowSink(delay)
    engine = AuditEngine(config_for(data_dir, "full"), sink, KEY)
    t0 = time.perf_counter()
    await engine.open()  # background flusher and reaper
    ready_s = time.perf_counter() - t0
    rss_open = status_kb("VmRSS")
    first = await engine.status()
    samples: list[int] = []
    deadline = time.monotonic() + max_seconds
    pending = first["pending_parts"]
    while time.monotonic() < deadline:
        samples.append(status_kb("VmRSS"))
        await asyncio.sleep(0.05)
        if len(samples) % 20 == 0:
            pending = (await engine.status())["pending_parts"]
            if pending == 0:
                break
    elapsed = time.perf_counter() - t0
    last = await engine.status()
    await engine.close(flush_window=0)
    return {
        "start_to_ready_seconds": round(ready_s, 3),
        "pending_parts_at_start": first["pending_parts"],
        "pending_events_at_start": first["pending_part_events"],
        "parts_written": sink.parts,
        "events_written": sink.events,
        "pending_parts_at_end": last["pending_parts"],
        "seconds": round(elapsed, 1),
        "parts_per_second": round(sink.parts / elapsed, 1),
        "largest_part_kb": round(sink.largest_part_bytes / 1024, 1),
        "rss_before_open_mb": round(rss_before_open / 1024, 1),
        "rss_after_open_mb": round(rss_open / 1024, 1),
        "rss_median_mb": round(sorted(samples)[len(samples) // 2] / 1024, 1),
        "peak_rss_mb": round(status_kb("VmHWM") / 1024, 1),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def child(args: argparse.Namespace) -> None:
    import uvloop

    if args.phase == "build":
        out = uvloop.run(build(args.dir, args.sessions, args.events))
    else:
        out = uvloop.run(flush(args.dir, args.sink_delay, args.max_seconds))
    print(json.dumps(out))


def run_phase(phase: str, data_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--phase", phase, "--dir", data_dir,
        "--sessions", str(args.sessions), "--events", str(args.events),
        "--sink-delay", str(args.sink_delay), "--max-seconds", str(args.max_seconds),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{phase} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--events", type=int, default=500, help="events per session")
    ap.add_argument("--sink-delay", type=float, default=0.005, help="seconds per sink write")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="flush phase limit")
    ap.add_argument("--phase", choices=["build", "flush"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="backlog-bench-", dir=os.environ.get("BENCH_DIR")) as d:
        built = run_phase("build", d, args)
        flushed = run_phase("flush", d, args)
    result = {
        "backlog_events": built["events"],
        "sessions": args.sessions,
        "events_per_session": args.events,
        "sink_delay_seconds": args.sink_delay,
        "build": built,
        "flush": flushed,
        "target_peak_rss_mb": 150,
    }
    if args.json:
        print(json.dumps(result))
        return
    f = flushed
    print(
        f"backlog: {built['events']:,} events in {built['pending_parts']} parts,"
        f" spool {built['spool_mb']} MB (built in {built['seconds']} s)"
    )
    print(
        f"flush to a sink taking {args.sink_delay * 1000:.0f} ms per write:"
        f" {f['parts_written']} parts / {f['events_written']:,} events in {f['seconds']} s"
        f" ({f['parts_per_second']} parts/s), {f['pending_parts_at_end']} left"
    )
    print(
        f"RSS: {f['rss_before_open_mb']} MB before open, {f['rss_after_open_mb']} MB open,"
        f" median {f['rss_median_mb']} MB, peak {f['peak_rss_mb']} MB (target <= 150 MB)"
    )


if __name__ == "__main__":
    main()

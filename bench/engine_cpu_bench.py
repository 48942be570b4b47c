"""CPU per audited read in the engine alone (no HTTP): what the writer costs.

64 concurrent readers over 16 open sessions record ``document.access``
events, each a read-only job of the spool, with the shipped durable
settings (``synchronous = "full"``); the flusher stores the 500-event parts
in the embedded sqlite sink and deletes them (``keep_stored_seconds = 0``).
Reported: the process's CPU per event, and that of the writer thread and of
the event loop. Two ways of reading the document, alternated in one run:

- ``conn``: the job reads its row itself (``read(conn, draft)``, one
  ``SELECT`` of its own on the writer's connection);
- ``document``: ``engine.record(..., document=id)``, as ``GET
  /documents/{id}`` does: the batch's reads are one statement
  (``Writer.read_ahead``).

    python bench/engine_cpu_bench.py [--events 40000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = b"bench-audit-key-0123456789abcdef"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _thread_cpu(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _one(reads: str, events: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from audit.config import parse_config
    from audit.engine import AuditEngine
    from audit.events import Draft, Source
    from sinks.sqlite import SqliteSink

    with tempfile.TemporaryDirectory() as d:
        config = parse_config({"server": {"data_dir": d},
                               "flush": {"max_writes_per_second": 1000, "burst": 100}})
        engine = AuditEngine(config, SqliteSink(config.sqlite_sink_path), KEY)
        await engine.open()
        try:
            def create(conn, draft):  # type: ignore[no-untyped-def]
                conn.execute("INSERT INTO documents VALUES ('doc1', 'a title', ?, 'alice', 1,"
                             " 'x', 'x')", ("lorem ipsum " * 100,))

            src = Source(user="alice", role="user", ip="127.0.0.1", user_agent="bench")
            sids = [(await engine.start_session("alice", "user", src, 3600)).session_id
                    for _ in range(16)]
            await engine.record(sids[0], Draft("document.create"), create)
            assert engine.spool._wexec is not None
            writer = await asyncio.get_running_loop().run_in_executor(
                engine.spool._wexec, threading.get_native_id)
            loop_tid = threading.get_native_id()

            def by_conn(conn, draft):  # type: ignore[no-untyped-def]
                return conn.execute("SELECT id, title, content, owner, version, created_at,"
                                    " updated_at FROM documents WHERE id = 'doc1'").fetchone()

            per = events // 64

            async def reader(k: int) -> None:
                sid = sids[k % 16]
                for _ in range(per):
                    draft = Draft("document.access", target={"type": "document", "id": "doc1"},
                                  source=src)
                    if reads == "document":
                        await engine.record(sid, draft, lambda row, d: row, read_only=True,
                                            document="doc1")
                    else:
                        await engine.record(sid, draft, by_conn, read_only=True)

            c0, w0, l0, t0 = _cpu(), _thread_cpu(writer), _thread_cpu(loop_tid), time.perf_counter()
            await asyncio.gather(*(reader(k) for k in range(64)))

            def parts(conn):  # type: ignore[no-untyped-def]
                return conn.execute("SELECT COUNT(*) FROM parts WHERE final = 0").fetchone()[0]

            while await engine.spool.read(parts):  # noqa: ASYNC110 - polls another thread's work
                await asyncio.sleep(0.02)
            n = per * 64
            return {"cpu_us": 1e6 * (_cpu() - c0) / n,
                    "writer_us": 1e6 * (_thread_cpu(writer) - w0) / n,
                    "loop_us": 1e6 * (_thread_cpu(loop_tid) - l0) / n,
                    "wall_us": 1e6 * (time.perf_counter() - t0) / n}
        finally:
            await engine.close(flush_window=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=40000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--one", choices=("conn", "document"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        import uvloop

        from audit.runtime import tune_gc
        tune_gc()
        print(json.dumps(uvloop.run(_one(args.one, args.events))))
        return
    runs: dict[str, list[dict[str, float]]] = {"conn": [], "document": []}
    for r in range(args.rounds):
        order = ("conn", "document") if r % 2 == 0 else ("document", "conn")
        for reads in order:  # each in a fresh process
            out = subprocess.run([sys.executable, __file__, "--one", reads,
                                  "--events", str(args.events)],
                                 capture_output=True, text=True, check=True).stdout
            runs[reads].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {reads:8s} " + " ".join(
                f"{k} {v:.1f}" for k, v in runs[reads][-1].items()), flush=True)
    med = {reads: {k: round(statistics.median(x[k] for x in rs), 1) for k in rs[0]}
           for reads, rs in runs.items()}
    print(json.dumps({"medians": med, "document_vs_conn_cpu": round(
        med["document"]["cpu_us"] / med["conn"]["cpu_us"], 3)}))


if __name__ == "__main__":
    main()

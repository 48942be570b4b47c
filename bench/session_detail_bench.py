"""Peak RSS of the server answering ``GET /audit/sessions/{id}`` for one long session.

1. Build one session of ``--events`` (200,000) events in a separate process
   with :class:`audit.engine.AuditEngine` directly (no HTTP, no flusher,
   ``synchronous = "normal"``): ``session.start``, ``token.issue``,
   ``document.access`` events, ``session.end``; sealed, so it is
   ``events / part_max_events`` pending parts (400 of 500 events).
2. Two copies of that data directory:

   * ``stored``: ``python server.py drain`` moves every part into the sqlite
     sink, so the spool holds nothing of it (the sink's query path);
   * ``pending``: the sink is http to a closed port, so every event is still
     in the spool (the spool's path; the http sink cannot be queried).

3. For each, start ``python server.py serve``, log in as admin, and read the
   answer in 64 KiB pieces (never held whole by the client), while sampling
   the server's RSS (``/proc/PID/status`` VmRSS every 20 ms, and VmHWM, the
   kernel's peak, before and after). Prints the body's size and SHA-256:
   the same before and after a change of how it is produced means the same
   bytes.

    python bench/session_detail_bench.py [--events 200000]

With ``BENCH_KEEP=1`` the work directory stays (its path is printed);
``--reuse DIR`` reads the session of such a directory again instead of
building one (say with the code before and after a change: same SHA-256,
same bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    ADMIN_PASSWORD,
    AUDIT_KEY,
    PYTHON,
    ROOT,
    Server,
    add_users,
    free_port,
    rss_kb,
    save,
    server_env,
    workdir,
    write_config,
)

JOB_EVENTS = 5000  # appends per spool job while building


async def build(cfg: Path, events: int) -> dict[str, Any]:
    from audit.config import load_config
    from audit.engine import AuditEngine
    from audit.events import Draft, Source
    from sinks import create_sink

    config = load_config(str(cfg))
    engine = AuditEngine(config, create_sink(config), AUDIT_KEY.encode())
    await engine.open(background=False)
    src = Source("alice", "user", "10.0.0.1", "session-builder/1.0", "req-1")
    t0 = time.perf_counter()
    try:
        s = await engine.spool.submit(lambda w: w.start_session(
            "alice", "user", time.time() + 86400,
            [Draft("session.start", source=src), Draft("token.issue", source=src)]))
        sid = s.session_id
        left = events - 3
        while left > 0:
            n = min(left, JOB_EVENTS)

            def job(w: Any, n: int = n) -> None:
                for i in range(n):
                    w.append(sid, Draft("document.access", source=src,
                                        target={"type": "document", "id": f"doc{i % 997:06d}"}))

            await engine.spool.submit(job)
            left -= n
        await engine.spool.submit(lambda w: w.seal(
            sid, "logout", Draft("session.end", source=src, details={"reason": "logout"})))
        status = await engine.status()
    finally:
        await engine.close(flush_window=0)
    return {"session_id": sid, "events": events, "build_seconds":
            round(time.perf_counter() - t0, 1), "pending_parts": status["pending_parts"],
            "spool_bytes": status["spool_bytes"]}


def read_session(srv: Server, sid: str) -> dict[str, Any]:
    """One admin read of the session, its RSS sampled meanwhile."""
    from _harness import http

    status, body = http("POST", srv.base + "/token",
                        {"username": "admin", "password": ADMIN_PASSWORD})
    assert status == 200, body
    token = body["access_token"]
    before = rss_kb(srv.pid)
    samples = [before["VmRSS"]]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_kb(srv.pid)["VmRSS"])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    digest, size, t0 = hashlib.sha256(), 0, time.perf_counter()
    try:
        req = urllib.request.Request(srv.base + f"/audit/sessions/{sid}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            status = resp.status
            headers = dict(resp.headers)
            while chunk := resp.read(65536):
                digest.update(chunk)
                size += len(chunk)
    finally:
        done.set()
        sampler.join()
    elapsed = time.perf_counter() - t0
    after = rss_kb(srv.pid)
    return {"status": status, "seconds": round(elapsed, 2), "body_bytes": size,
            "body_sha256": digest.hexdigest(),
            "framing": "chunked" if "Transfer-Encoding" in headers else "content-length",
            "rss_before_mb": round(before["VmRSS"] / 1024, 1),
            "hwm_before_mb": round(before["VmHWM"] / 1024, 1),
            "rss_max_sampled_mb": round(max(samples) / 1024, 1),
            "hwm_after_mb": round(after["VmHWM"] / 1024, 1)}


def read_both(wd: Path, sid: str) -> dict[str, Any]:
    results = {}
    for name in ("pending", "stored"):
        cfg = wd / name / "config.toml"
        found = re.search(r"^port = (\d+)$", cfg.read_text(), re.M)
        assert found is not None
        port = int(found.group(1))
        with Server(cfg, port) as srv:
            m = read_session(srv, sid)
        results[name] = m
        print(f"{name}: {m['status']} {m['body_bytes']:,} bytes ({m['framing']}) in"
              f" {m['seconds']} s; RSS before {m['rss_before_mb']} MB, max sampled"
              f" {m['rss_max_sampled_mb']} MB, VmHWM {m['hwm_before_mb']} ->"
              f" {m['hwm_after_mb']} MB; sha256 {m['body_sha256']}", flush=True)
    return results


def reread(wd: Path) -> None:
    read_both(wd, (wd / "session_id").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--reuse", help="a work directory kept by BENCH_KEEP=1")
    ap.add_argument("--build-only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        print(json.dumps(asyncio.run(build(Path(args.build_only), args.events))))
        return
    if args.reuse:
        reread(Path(args.reuse))
        return
    results: dict[str, Any] = {}
    with workdir("session-detail") as wd:
        print(f"work directory {wd}")
        port = free_port()
        stored_cfg = write_config(wd / "stored", port, synchronous="normal", bcrypt_rounds=4,
                                  max_writes_per_second=1000.0, burst=1000)
        add_users(stored_cfg, ["admin"], rounds=4, password=ADMIN_PASSWORD, role="admin")
        proc = subprocess.run([PYTHON, __file__, "--build-only", str(stored_cfg), "--events",
                               str(args.events)], cwd=ROOT, capture_output=True, text=True,
                              check=True)
        built = json.loads(proc.stdout.strip().splitlines()[-1])
        sid = built["session_id"]
        print(f"session {sid}: {built['events']:,} events in {built['pending_parts']} parts,"
              f" built in {built['build_seconds']} s", flush=True)
        # The pending copy: the same spool behind a sink that is down.
        shutil.copytree(wd / "stored" / "data", wd / "pending" / "data")
        write_config(wd / "pending", port, sink="http", synchronous="normal", bcrypt_rounds=4,
                     sink_url=f"http://127.0.0.1:{free_port()}", http_timeout=2.0)
        subprocess.run([PYTHON, str(ROOT / "server.py"), "drain", "--config", str(stored_cfg)],
                       cwd=ROOT, env=server_env(), capture_output=True, check=True)
        (wd / "session_id").write_text(sid)
        results = read_both(wd, sid)
    save("session_detail", {"config": {"events": args.events, "sink": "sqlite (stored),"
                                       " http to a closed port (pending)",
                                       "synchronous": "normal"},
                            "built": built, "reads": results})


if __name__ == "__main__":
    main()

"""HTTP throughput: audited ``GET /documents/{id}`` vs ``GET /me``, and login.

The server runs as its own process (``python server.py serve``) on the
embedded sqlite sink with the shipped defaults (``ack = "durable"``,
``synchronous = "full"``); the load comes from wrk (Debian package ``wrk``)
in another process, ``-t2 -c64``, each request rotating over the sessions of
``--users`` logged-in users (one document each).

Each round runs ``/me`` and ``/documents/{id}`` back to back (``/me`` first
in even rounds, ``/documents`` first in odd ones), so their ratio is measured
within one round on the same noisy machine; the figures reported are medians
over ``--rounds`` rounds. Login (``POST /token``) is bcrypt-bound
(``bcrypt_rounds = 12``, two hashes at a time on the 2 cores).

    python bench/http_bench.py [--duration 10] [--rounds 3] [--users 16]

Without wrk on the PATH, a small aiohttp load client runs as a separate
process instead (same connection count; its figures are lower than wrk's,
since the client shares the 2 cores and is Python).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    PYTHON,
    USER_PASSWORD,
    Server,
    add_users,
    free_port,
    http,
    save,
    workdir,
    write_config,
)

CONNECTIONS = 64
THREADS = int(os.environ.get("BENCH_WRK_THREADS", "2"))
# Login is bcrypt-bound (0.6 s a hash here, two at a time): 64 connections would
# only queue ~30 s of work in the server; a few connections saturate it.
LOGIN_CONNECTIONS = 8

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in ([0-9.]+)(\w+)", out)
    res["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return res


def _lua(requests: list[tuple[str, str, dict[str, str], str | None]]) -> str:
    """A wrk script that rotates over pre-formatted requests."""
    items = []
    for method, path, headers, body in requests:
        hdrs = ", ".join(f'["{k}"] = {json.dumps(v)}' for k, v in headers.items())
        b = json.dumps(body) if body is not None else "nil"
        items.append(f'  {{"{method}", {json.dumps(path)}, {{{hdrs}}}, {b}}},')
    return (
        "local spec = {\n" + "\n".join(items) + "\n}\n"
        "local reqs = {}\nlocal i = 0\n"
        "init = function(args)\n"
        "  for k, v in ipairs(spec) do reqs[k] = wrk.format(v[1], v[2], v[3], v[4]) end\n"
        "  i = math.random(#reqs)\nend\n"
        "request = function()\n  i = i % #reqs + 1\n  return reqs[i]\nend\n"
    )


def run_wrk(base: str, script: Path, duration: float, timeout: str = "10s",
            connections: int = CONNECTIONS) -> dict[str, Any]:
    cmd = ["wrk", f"-t{THREADS}", f"-c{connections}", f"-d{duration:g}s", "--latency",
           f"--timeout={timeout}", "-s", str(script), base]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = parse_wrk(out)
    res["tool"] = "wrk"
    res["connections"] = connections
    return res


# -- fallback: an aiohttp load client in its own process ----------------------


async def _client_main(spec_path: str, base: str, duration: float, conns: int) -> None:
    import aiohttp

    spec = json.loads(Path(spec_path).read_text())  # noqa: ASYNC240 - before the clock
    lat: list[float] = []
    counts = {"ok": 0, "non_2xx": 0, "errors": 0}
    stop_at = time.monotonic() + duration

    async def worker(session: aiohttp.ClientSession, start: int) -> None:
        i = start
        while time.monotonic() < stop_at:
            method, path, headers, body = spec[i % len(spec)]
            i += 1
            t0 = time.perf_counter()
            try:
                async with session.request(method, base + path, headers=headers,
                                           data=body) as resp:
                    await resp.read()
                    counts["ok" if resp.status < 400 else "non_2xx"] += 1
            except aiohttp.ClientError:
                counts["errors"] += 1
                continue
            lat.append((time.perf_counter() - t0) * 1000)

    conn = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.monotonic()
        await asyncio.gather(*(worker(session, k) for k in range(conns)))
        elapsed = time.monotonic() - t0
    lat.sort()

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

    print(json.dumps({"rps": (counts["ok"] + counts["non_2xx"]) / elapsed,
                      "requests": counts["ok"] + counts["non_2xx"],
                      "p50_ms": pct(0.50), "p75_ms": pct(0.75), "p90_ms": pct(0.90),
                      "p99_ms": pct(0.99), "non_2xx": counts["non_2xx"],
                      "socket_errors": counts["errors"], "tool": "aiohttp-client"}))


def run_client(base: str, spec: Path, duration: float,
               connections: int = CONNECTIONS) -> dict[str, Any]:
    out = subprocess.run([PYTHON, __file__, "--client", str(spec), "--base", base,
                          "--duration", str(duration), "--connections", str(connections)],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of the event loop's thread (the main one) and of all the others
    (the spool's writer and reader, bcrypt's pool): Python does not name OS threads."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text(encoding="ascii").rpartition(")")[2].split()
        except OSError:  # the thread has ended
            continue
        name = "loop" if task.name == str(pid) else "other_threads"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) \
            / os.sysconf("SC_CLK_TCK")
    return out


def load(base: str, wd: Path, name: str,
         requests: list[tuple[str, str, dict[str, str], str | None]],
         duration: float, timeout: str = "10s",
         connections: int = CONNECTIONS, pid: int | None = None) -> dict[str, Any]:
    """One load run; with ``pid``, also the server's CPU time per request."""
    cpu0 = cpu_seconds(pid) if pid else 0.0
    threads0 = thread_cpu_seconds(pid) if pid else {}
    if shutil.which("wrk"):
        script = wd / f"{name}.lua"
        script.write_text(_lua(requests))
        res = run_wrk(base, script, duration, timeout, connections)
    else:
        spec = wd / f"{name}.json"
        spec.write_text(json.dumps(requests))
        res = run_client(base, spec, duration, connections)
    if pid and res["requests"]:
        cpu = cpu_seconds(pid) - cpu0
        res["server_cpu_s"] = round(cpu, 2)
        res["server_cpu_ms_per_request"] = round(1000 * cpu / res["requests"], 4)
        threads = thread_cpu_seconds(pid)
        res["thread_cpu_ms_per_request"] = {
            t: round(1000 * (v - threads0.get(t, 0.0)) / res["requests"], 4)
            for t, v in sorted(threads.items()) if v - threads0.get(t, 0.0) > 0
        }
    return res


def wait_idle(srv: Server, user: str, limit: float = 2.0, timeout: float = 120.0) -> None:
    """After a login run, wait until the bcrypt queue is empty (a login is quick again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        srv.login(user)
        if time.monotonic() - t0 < limit:
            return


def _spy(pid: int, name: str, duration: float) -> subprocess.Popen[bytes] | None:
    """py-spy (if installed) sampling the server, collapsed stacks to results/;
    with ``BENCH_PERF`` set, Linux perf instead (CPU samples of every thread,
    kernel included: results/perf_NAME.data, read with ``perf report``)."""
    if os.environ.get("BENCH_PERF"):
        data = Path(__file__).resolve().parent / "results" / f"perf_{name}.data"
        return subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(pid),
                                 "-o", str(data), "--", "sleep", str(int(duration))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exe = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return None
    out = Path(__file__).resolve().parent / "results" / f"profile_{name}.txt"
    out.parent.mkdir(exist_ok=True)
    extra = ["--gil"] if os.environ.get("BENCH_PYSPY_GIL") else []
    if os.environ.get("BENCH_PYSPY_NATIVE"):  # SQLite's C frames too (pauses the server)
        extra.append("--native")
    else:
        extra.append("--nonblocking")
    return subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(int(duration)),
                             "-r", os.environ.get("BENCH_PYSPY_RATE", "100"),
                             "-f", "raw", "-t", *extra,
                             "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _spy_done(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.wait(timeout=60)


# -- the benchmark --------------------------------------------------------------


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--no-login", action="store_true")
    ap.add_argument("--login-connections", type=int, default=LOGIN_CONNECTIONS)
    ap.add_argument("--profile", action="store_true",
                    help="record the server with py-spy during the documents runs")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="experiment: run the server with sys.setswitchinterval(S)")
    ap.add_argument("--synchronous", choices=("full", "normal"), default="full",
                    help="the spool's audit.synchronous (default: full, the shipped default)")
    ap.add_argument("--content-bytes", type=int, default=1200,
                    help="size of each benchmark document's content (default 1200)")
    ap.add_argument("--out", default="http", help="results name (bench/results/NAME.json)")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--connections", type=int, default=CONNECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        asyncio.run(_client_main(args.client, args.base, args.duration, args.connections))
        return

    with workdir("http") as wd:
        port = free_port()
        cfg = write_config(wd, port, bcrypt_rounds=12, synchronous=args.synchronous)
        users = [f"bench{i:03d}" for i in range(args.users)]
        content = ("lorem ipsum " * (args.content_bytes // 12 + 1))[:args.content_bytes]
        add_users(cfg, users, rounds=12)
        srv = Server(cfg, port, switch_interval=args.switch_interval).start()
        try:
            me_reqs: list[tuple[str, str, dict[str, str], str | None]] = []
            doc_reqs: list[tuple[str, str, dict[str, str], str | None]] = []
            for u in users:
                token = srv.login(u)["access_token"]
                auth = {"Authorization": f"Bearer {token}"}
                status, doc = http("POST", srv.base + "/documents",
                                   {"title": f"doc of {u}", "content": content},
                                   token=token)
                assert status == 201, (status, doc)
                me_reqs.append(("GET", "/me", auth, None))
                doc_reqs.append(("GET", f"/documents/{doc['id']}", auth, None))
            login_reqs = [("POST", "/token", {"Content-Type": "application/json"},
                           json.dumps({"username": u, "password": USER_PASSWORD}))
                          for u in users]
            # warm-up, not reported
            load(srv.base, wd, "warm_me", me_reqs, 2)
            load(srv.base, wd, "warm_doc", doc_reqs, 2)
            srv.wait_flushed()
            rounds = []
            for r in range(args.rounds):
                # The events of the last /documents run reach the sink at the flush
                # rate, for seconds after it (parts of 500 events, 5 writes/s): that
                # work must not run inside the /me window, where it would be billed
                # to /me and lift the ratio. It is billed to /documents below.
                # Odd rounds run /documents first: a drift of the machine's
                # speed within a round then favours neither side of the median.
                srv.wait_flushed()
                for name in ("me", "documents") if r % 2 == 0 else ("documents", "me"):
                    spy = _spy(srv.pid, name, args.duration) if args.profile and r == 0 \
                        else None
                    if name == "me":
                        me = load(srv.base, wd, "me", me_reqs, args.duration, pid=srv.pid)
                        _spy_done(spy)
                        continue
                    doc = load(srv.base, wd, "doc", doc_reqs, args.duration, pid=srv.pid)
                    _spy_done(spy)
                    cpu0 = cpu_seconds(srv.pid)
                    doc["flush_wait_s"] = round(srv.wait_flushed(), 2)
                    doc["flush_cpu_ms_per_request"] = round(
                        1000 * (cpu_seconds(srv.pid) - cpu0) / max(doc["requests"], 1), 4)
                ratio = doc["rps"] / me["rps"] if me["rps"] else 0.0
                cpu_ratio = (me["server_cpu_ms_per_request"] / doc["server_cpu_ms_per_request"]
                             if doc.get("server_cpu_ms_per_request") else None)
                full_cost = (doc["server_cpu_ms_per_request"] + doc["flush_cpu_ms_per_request"]
                             if doc.get("server_cpu_ms_per_request") else None)
                rounds.append({"me": me, "documents": doc, "ratio": round(ratio, 3),
                               "cpu_cost_ratio_with_flush":
                                   round(me["server_cpu_ms_per_request"] / full_cost, 3)
                                   if full_cost and me.get("server_cpu_ms_per_request")
                                   else None,
                               "loadavg_1m": round(os.getloadavg()[0], 2),
                               "cpu_cost_ratio": round(cpu_ratio, 3) if cpu_ratio else None})
                print(f"round {r + 1}: /me {me['rps']:.0f} req/s p50 {me['p50_ms']:.2f} ms"
                      f" p99 {me['p99_ms']:.2f} ms | /documents/{{id}} {doc['rps']:.0f} req/s"
                      f" p50 {doc['p50_ms']:.2f} ms p99 {doc['p99_ms']:.2f} ms"
                      f" | ratio {ratio:.3f} | server CPU ms/request"
                      f" {me.get('server_cpu_ms_per_request')} vs"
                      f" {doc.get('server_cpu_ms_per_request')}", flush=True)
            logins = []
            if not args.no_login:
                for r in range(args.rounds):
                    wait_idle(srv, users[0])
                    lg = load(srv.base, wd, "login", login_reqs, args.duration, timeout="30s",
                              connections=args.login_connections)
                    logins.append(lg)
                    print(f"login round {r + 1}: {lg['rps']:.1f} logins/s"
                          f" p50 {lg['p50_ms']:.0f} ms p99 {lg['p99_ms']:.0f} ms"
                          f" non-2xx {lg['non_2xx']}", flush=True)
            _, metrics_text = http("GET", srv.base + "/metrics")
            commits = re.search(r"^session_audit_group_commit_batch_size_count ([0-9.e+]+)",
                                str(metrics_text), re.M)
            events_rec = re.search(r'^session_audit_events_recorded_total\{kind="session"\} '
                                   r"([0-9.e+]+)", str(metrics_text), re.M)
        finally:
            srv.stop()

    summary = {
        "me_rps": _median([r["me"] for r in rounds], "rps"),
        "me_p50_ms": _median([r["me"] for r in rounds], "p50_ms"),
        "me_p99_ms": _median([r["me"] for r in rounds], "p99_ms"),
        "documents_rps": _median([r["documents"] for r in rounds], "rps"),
        "documents_p50_ms": _median([r["documents"] for r in rounds], "p50_ms"),
        "documents_p99_ms": _median([r["documents"] for r in rounds], "p99_ms"),
        "ratio_median": round(statistics.median(r["ratio"] for r in rounds), 3),
        "ratios": [r["ratio"] for r in rounds],
        "me_cpu_ms_per_request": _median([r["me"] for r in rounds], "server_cpu_ms_per_request"),
        "documents_cpu_ms_per_request": _median([r["documents"] for r in rounds],
                                                "server_cpu_ms_per_request"),
        "documents_flush_cpu_ms_per_request": _median([r["documents"] for r in rounds],
                                                      "flush_cpu_ms_per_request"),
        "cpu_cost_ratio_with_flush_median": _median(rounds, "cpu_cost_ratio_with_flush"),
        "target_ratio": 0.75,
    }
    if logins:
        summary.update({
            "login_rps": _median(logins, "rps"),
            "login_p50_ms": _median(logins, "p50_ms"),
            "login_p99_ms": _median(logins, "p99_ms"),
        })
    summary["ratio_ok"] = summary["ratio_median"] >= 0.75
    errors = sum(r["me"]["non_2xx"] + r["documents"]["non_2xx"] + r["me"]["socket_errors"]
                 + r["documents"]["socket_errors"] for r in rounds)
    summary["errors"] = errors
    print(json.dumps(summary, indent=2))
    save(args.out, {
        "config": {"connections": CONNECTIONS, "threads": THREADS, "duration_s": args.duration,
                   "rounds": args.rounds, "users": args.users, "sink": "sqlite",
                   "ack": "durable", "synchronous": args.synchronous, "bcrypt_rounds": 12,
                   "switch_interval": args.switch_interval,
                   "content_bytes": args.content_bytes},
        "summary": summary,
        "rounds": rounds,
        "logins": logins,
        "server_counters": {
            "events_recorded": float(events_rec.group(1)) if events_rec else None,
            "commits": float(commits.group(1)) if commits else None,
        },
    })


if __name__ == "__main__":
    main()

"""Soak: memory, fds and threads of a server under a steady mixed load.

One ``python server.py serve`` (subprocess; the embedded sqlite sink, or with
``--sink http`` a flaky ``tests/receiver.py`` on loopback: 8 writes/s,
12 % of the answers failing, hung writes longer than the sink's 2 s timeout)
runs with short timeouts (``idle_timeout_seconds = 5``,
``max_session_seconds = 15``, ``checkpoint_seconds = 10``,
``part_max_events = 50``, tokens valid 40 s), so that sessions are sealed,
cut and flushed all the time. ``--users`` virtual users (an aiohttp client in
this process) loop for ``--minutes`` over mixed scenarios: log in, work on
documents (create, read, update, list, chat with the built-in extractive
provider, client events, a mismatched session header, a 404) and log out;
leave the session open; run past ``max_session_seconds``; idle past the idle
timeout and come back; failed logins (real and unknown names); bad tokens;
an admin reading the audit API, and a user denied it. Client addresses vary
through ``X-Forwarded-For`` (documentation ranges only; the server trusts
127.0.0.1 as its proxy), so the per-IP login throttle and flood guard fill
and prune.

Every ``--interval`` seconds the server process is sampled: RSS and its peak
(``/proc/PID/status`` VmRSS, VmHWM), threads, open fds (``/proc/PID/fd``),
CPU seconds, the spool file and its WAL, the sqlite sink's file and WAL,
and the counts of ``/metrics`` (open sessions, pending parts and security
events, dead letters, events recorded, parts written). After the load stops
the server idles one interval and is sampled again; then it flushes what is
pending, is stopped with SIGTERM (by its PID), and ``server.py drain`` and
``server.py verify`` run on its data directory. The http sink cannot be read
back by ``verify``: the receiver's copy is loaded into a sqlite sink file and
checked with the same :func:`audit.verify.verify_sink`, anchored on the
server's spool.

    python bench/soak.py [--minutes 5] [--users 8] [--interval 30] [--sink sqlite|http]

Writes ``bench/results/soak.json`` (``soak_http.json`` with ``--sink http``;
``--out NAME`` for another name); ``--json`` also prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    ADMIN_PASSWORD,
    AUDIT_KEY,
    PYTHON,
    ROOT,
    USER_PASSWORD,
    Receiver,
    Server,
    add_users,
    free_port,
    machine,
    save,
    server_env,
    workdir,
)

NAMES = [f"user{i}" for i in range(12)]
METRICS = {
    "active": "session_audit_active_sessions",
    "pending_parts": "session_audit_pending_parts",
    "pending_security": "session_audit_pending_security_events",
    "dead_letter": "session_audit_dead_letter",
    "events_session": 'session_audit_events_recorded_total{kind="session"}',
    "events_security": 'session_audit_events_recorded_total{kind="security"}',
    "parts_written": "session_audit_parts_written_total",
    "sink_healthy": "session_audit_sink_healthy",
}


def write_soak_config(wd: Path, port: int, sink: str, url: str = "") -> Path:
    cfg = wd / "config.toml"
    cfg.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
data_dir = "{wd / 'data'}"
trusted_proxies = "127.0.0.1"

[auth]
token_ttl_seconds = 40
bcrypt_rounds = 4
login_max_failures = 5
login_window_seconds = 20

[audit]
idle_timeout_seconds = 5
max_session_seconds = 15
checkpoint_seconds = 10
part_max_events = 50
keep_stored_seconds = 30
security_events_per_ip_per_second = 2.0
security_events_per_ip_burst = 10

[flush]
max_writes_per_second = 20.0
burst = 20
backoff_base_seconds = 0.2
backoff_max_seconds = 5.0

[sink]
type = "{sink}"

[sink.http]
url = "{url}"
timeout_seconds = 2.0
""", encoding="utf-8")
    return cfg


# -- the load -------------------------------------------------------------------


class Load:
    """``users`` virtual users looping over mixed scenarios until ``deadline``."""

    def __init__(self, base: str, users: int, seed: int) -> None:
        self.base = base
        self.users = users
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.scenarios: Counter[str] = Counter()

    def ip(self) -> str:
        r = self.rng
        if r.random() < 0.3:  # IPv6 documentation prefix, a /64 of its own
            a, b, c = r.randrange(65536), r.randrange(65536), r.randrange(1, 65536)
            return f"2001:db8:{a:x}:{b:x}::{c:x}"
        net = r.choice(("192.0.2", "198.51.100", "203.0.113"))  # TEST-NET-1..3
        return f"{net}.{r.randrange(1, 255)}"

    async def req(self, s: aiohttp.ClientSession, method: str, path: str,
                  token: str | None = None, ip: str | None = None,
                  headers: dict[str, str] | None = None,
                  json_body: Any = None) -> tuple[int, Any]:
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        if ip:
            h["X-Forwarded-For"] = ip
        route = path.split("?")[0].split("/")[1]
        try:
            async with s.request(method, self.base + path, headers=h, json=json_body,
                                 timeout=aiohttp.ClientTimeout(total=30)) as r:
                body = await r.read()
                self.counts[f"{method} /{route} {r.status}"] += 1
                try:
                    return r.status, json.loads(body) if body else None
                except ValueError:
                    return r.status, None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.counts[f"client error {type(exc).__name__}"] += 1
            return 0, None

    async def login(self, s: aiohttp.ClientSession, name: str, password: str,
                    ip: str | None) -> str | None:
        st, b = await self.req(s, "POST", "/token", ip=ip,
                               json_body={"username": name, "password": password})
        return str(b["access_token"]) if st == 200 and isinstance(b, dict) else None

    async def work(self, s: aiohttp.ClientSession, tok: str, ip: str, n: int) -> None:
        r = self.rng
        docs: list[str] = []
        for _ in range(n):
            x = r.random()
            if x < 0.2 or not docs:
                st, b = await self.req(s, "POST", "/documents", tok, ip, json_body={
                    "title": "soak", "content": "alpha beta gamma. " * r.randint(1, 40)})
                if st == 201 and isinstance(b, dict):
                    docs.append(b["id"])
            elif x < 0.5:
                await self.req(s, "GET", f"/documents/{r.choice(docs)}", tok, ip)
            elif x < 0.65:
                await self.req(s, "PUT", f"/documents/{r.choice(docs)}", tok, ip,
                               json_body={"content": "updated gamma " * 5})
            elif x < 0.75:
                await self.req(s, "POST", f"/documents/{r.choice(docs)}/chat", tok, ip,
                               json_body={"message": "what about gamma?"})
            elif x < 0.85:
                await self.req(s, "POST", "/audit/events", tok, ip,
                               json_body={"action": "client.click", "details": {"x": 1}})
            elif x < 0.9:
                await self.req(s, "GET", "/documents", tok, ip)
            elif x < 0.95:  # another session's id in the header: 403
                await self.req(s, "GET", "/me", tok, ip,
                               headers={"X-Audit-Session-ID": "0" * 32})
            else:
                await self.req(s, "GET", "/documents/doesnotexist", tok, ip)
            await asyncio.sleep(r.uniform(0.05, 0.3))

    def fake_jwt(self) -> str:
        def seg(d: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
        sig = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
        return (seg({"alg": "HS256", "typ": "JWT"}) + "."
                + seg({"sub": "user1", "sid": os.urandom(16).hex(), "exp": 9999999999})
                + "." + sig)

    async def vuser(self, s: aiohttp.ClientSession, deadline: float) -> None:
        r = self.rng
        while time.monotonic() < deadline:
            x = r.random()
            ip = self.ip() if r.random() < 0.5 else f"192.0.2.{r.randrange(1, 20)}"
            name = r.choice(NAMES)
            if x < 0.35:
                scn = "logout"
                tok = await self.login(s, name, USER_PASSWORD, ip)
                if tok:
                    await self.work(s, tok, ip, r.randint(3, 15))
                    await self.req(s, "POST", "/logout", tok, ip)
                    await self.req(s, "GET", "/me", tok, ip)  # 401 session_ended
            elif x < 0.5:
                scn = "abandon"  # never logs out: the idle timeout seals it
                tok = await self.login(s, name, USER_PASSWORD, ip)
                if tok:
                    await self.work(s, tok, ip, r.randint(1, 5))
            elif x < 0.56:
                scn = "long"  # runs past max_session_seconds
                tok = await self.login(s, name, USER_PASSWORD, ip)
                t0 = time.monotonic()
                while tok and time.monotonic() - t0 < 22 and time.monotonic() < deadline:
                    st, _ = await self.req(s, "GET", "/me", tok, ip)
                    if st == 401:
                        break
                    await self.work(s, tok, ip, 2)
                    await asyncio.sleep(1.5)
            elif x < 0.62:
                scn = "idle"  # idles past the timeout, then comes back
                tok = await self.login(s, name, USER_PASSWORD, ip)
                if tok:
                    await self.work(s, tok, ip, 2)
                    await asyncio.sleep(7)
                    await self.req(s, "GET", "/documents", tok, ip)  # 401 session_ended
            elif x < 0.8:
                scn = "bad_login"
                for _ in range(r.randint(1, 6)):
                    who = r.choice([*NAMES, f"ghost{r.randrange(10**6)}"])
                    await self.req(s, "POST", "/token", ip=self.ip(),
                                   json_body={"username": who, "password": "wrongpassword"})
            elif x < 0.92:
                scn = "bad_token"
                for _ in range(r.randint(1, 5)):
                    t = r.choice([self.fake_jwt(), "garbage", "a.b.c", ""])
                    await self.req(s, "GET", "/documents", t or None, self.ip())
            else:
                scn = "admin"
                tok = await self.login(s, "admin", ADMIN_PASSWORD, None)
                if tok:
                    await self.req(s, "GET", "/audit/status", tok)
                    st, b = await self.req(s, "GET", "/audit/sessions?limit=20", tok)
                    if st == 200 and isinstance(b, dict) and b.get("sessions"):
                        sid = r.choice(b["sessions"])["session_id"]
                        await self.req(s, "GET", f"/audit/sessions/{sid}", tok)
                    await self.req(s, "GET", "/audit/security-events?limit=50", tok)
                    await self.req(s, "POST", "/logout", tok)
                tok = await self.login(s, name, USER_PASSWORD, ip)
                if tok:  # a user on the admin API: 403, admin.denied
                    await self.req(s, "GET", "/audit/status", tok, ip)
                    await self.req(s, "POST", "/logout", tok, ip)
            self.scenarios[scn] += 1

    async def run(self, deadline: float) -> None:
        conn = aiohttp.TCPConnector(limit=self.users * 2)
        async with aiohttp.ClientSession(connector=conn) as s:
            await asyncio.gather(*(self.vuser(s, deadline) for _ in range(self.users)))


# -- the samples ----------------------------------------------------------------


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def proc_sample(pid: int) -> dict[str, Any]:
    status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    field = dict(re.findall(r"^(VmRSS|VmHWM|Threads):\s+(\d+)", status, re.M))
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rpartition(")")[2].split()
    return {"rss_kb": int(field["VmRSS"]), "hwm_kb": int(field["VmHWM"]),
            "threads": int(field["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "cpu_s": round((int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"), 1)}


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for key, name in METRICS.items():
        m = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.M)
        if m:
            out[key] = float(m.group(1))
    return out


async def sample(s: aiohttp.ClientSession, srv: Server, data: Path, t0: float, phase: str,
                 load: Load) -> dict[str, Any]:
    row: dict[str, Any] = {"t_s": round(time.monotonic() - t0, 1), "phase": phase,
                           **proc_sample(srv.pid)}
    row.update({"spool_bytes": _size(data / "spool.db"),
                "spool_wal_bytes": _size(data / "spool.db-wal"),
                "sink_bytes": _size(data / "audit.db"),
                "sink_wal_bytes": _size(data / "audit.db-wal")})
    try:
        async with s.get(srv.base + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            row.update(parse_metrics(await r.text()))
    except (aiohttp.ClientError, TimeoutError) as exc:
        row["metrics_error"] = type(exc).__name__
    row["requests"] = sum(load.counts.values())
    return row


def _mb(kb_or_bytes: float | None, unit: int = 1024) -> str:
    return "-" if kb_or_bytes is None else f"{kb_or_bytes / unit:.1f}"


def print_row(r: dict[str, Any], header: bool = False) -> None:
    if header:
        print(f"{'t':>6} {'phase':5} {'RSS MB':>7} {'peak':>6} {'thr':>4} {'fds':>4}"
              f" {'cpu s':>7} {'spool':>6} {'wal':>5} {'sink':>6} {'swal':>5} {'open':>5}"
              f" {'pend':>5} {'psec':>5} {'dead':>5} {'events':>7} {'requests':>8}", flush=True)

    def n(key: str) -> str:
        return "-" if key not in r else f"{r[key]:.0f}"

    events = r.get("events_session", 0) + r.get("events_security", 0)
    print(f"{r['t_s']:>6.0f} {r['phase']:5} {_mb(r['rss_kb']):>7} {_mb(r['hwm_kb']):>6}"
          f" {r['threads']:>4} {r['fds']:>4} {r['cpu_s']:>7.1f}"
          f" {_mb(r['spool_bytes'], 2**20):>6} {_mb(r['spool_wal_bytes'], 2**20):>5}"
          f" {_mb(r['sink_bytes'], 2**20):>6} {_mb(r['sink_wal_bytes'], 2**20):>5}"
          f" {n('active'):>5} {n('pending_parts'):>5} {n('pending_security'):>5}"
          f" {n('dead_letter'):>5} {events:>7.0f} {r['requests']:>8}", flush=True)


async def soak(srv: Server, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    load = Load(srv.base, args.users, args.seed)
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    async with aiohttp.ClientSession() as s:
        samples.append(await sample(s, srv, data, t0, "start", load))
        print_row(samples[-1], header=True)
        runner = asyncio.ensure_future(load.run(end))
        k = 1
        while True:
            at = t0 + k * args.interval
            if at > end:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            samples.append(await sample(s, srv, data, t0, "load", load))
            print_row(samples[-1])
            k += 1
        await runner  # (users finish the request under way)
        load_end = time.monotonic()
        if samples[-1]["t_s"] < args.minutes * 60 - 1:  # the load's end, if not on a tick
            samples.append(await sample(s, srv, data, t0, "load", load))
            print_row(samples[-1])
        await asyncio.sleep(max(0.0, load_end + args.interval - time.monotonic()))
        samples.append(await sample(s, srv, data, t0, "idle", load))
        print_row(samples[-1])
    return {"samples": samples, "requests": dict(sorted(load.counts.items())),
            "scenarios": dict(sorted(load.scenarios.items())),
            "load_seconds": round(load_end - t0, 1)}


# -- the summary ----------------------------------------------------------------


def slope_mb_per_min(rows: list[dict[str, Any]]) -> float | None:
    if len(rows) < 2:
        return None
    xs = [r["t_s"] / 60 for r in rows]
    ys = [r["rss_kb"] / 1024 for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den, 3) \
        if den else None


def summarise(run: dict[str, Any], warmup: float) -> dict[str, Any]:
    rows = run["samples"]
    loaded = [r for r in rows if r["phase"] == "load"]
    warm = next((r for r in loaded if r["t_s"] >= warmup), loaded[0] if loaded else rows[0])
    last = loaded[-1] if loaded else rows[-1]
    idle = rows[-1]
    half = run["load_seconds"] / 2
    second_half = [r for r in loaded if r["t_s"] >= half]

    def pick(r: dict[str, Any]) -> dict[str, Any]:
        return {"t_s": r["t_s"], "rss_mb": round(r["rss_kb"] / 1024, 1), "fds": r["fds"],
                "threads": r["threads"], "active_sessions": r.get("active"),
                "pending_parts": r.get("pending_parts"),
                "spool_wal_mb": round((r["spool_wal_bytes"] or 0) / 2**20, 2)}

    reqs = run["requests"]
    total = sum(v for k, v in reqs.items() if not k.startswith("client error"))
    return {
        "start": pick(rows[0]), "after_warmup": pick(warm), "last_under_load": pick(last),
        "idle_after": pick(idle),
        "rss_growth_warm_to_last_mb": round((last["rss_kb"] - warm["rss_kb"]) / 1024, 1),
        "rss_slope_second_half_mb_per_min": slope_mb_per_min(second_half),
        "second_half_samples": len(second_half),
        "rss_peak_mb": round(max(r["hwm_kb"] for r in rows) / 1024, 1),
        "requests": total, "requests_per_s": round(total / max(run["load_seconds"], 1), 1),
        "server_errors_5xx": sum(v for k, v in reqs.items() if re.search(r" 5\d\d$", k)),
        "client_errors": sum(v for k, v in reqs.items() if k.startswith("client error")),
        "events_recorded": int(idle.get("events_session", 0) + idle.get("events_security", 0)),
        "parts_written": int(idle.get("parts_written", 0)),
    }


# -- drain and verify -----------------------------------------------------------


def cli(cfg: Path, *argv: str, timeout: float = 300) -> dict[str, Any]:
    proc = subprocess.run([PYTHON, str(ROOT / "server.py"), *argv, "--config", str(cfg)],
                          cwd=ROOT, env=server_env(), capture_output=True, text=True,
                          timeout=timeout)
    err = proc.stderr.strip().rpartition("\r")[2].strip()  # (drain's progress line: its last)
    return {"rc": proc.returncode, "out": proc.stdout.strip()[-2000:], "err": err[-2000:]}


async def verify_receiver_copy(cfg: Path, recv: Receiver, copy: Path) -> dict[str, Any]:
    """The receiver's parts and security events in a sqlite sink file, checked
    as ``server.py verify`` checks a sink (anchored on the server's spool)."""
    from audit.config import load_config, sink_identity
    from audit.spool import connect
    from audit.verify import spool_anchor, verify_sink
    from sinks.sqlite import SqliteSink

    config = load_config(str(cfg))
    key = AUDIT_KEY.encode()
    conn = connect(config.spool_path, config.audit.synchronous, readonly=True)
    try:
        anchor = spool_anchor(conn, key, sink_identity(config))
    finally:
        conn.close()
    src = sqlite3.connect(f"file:{recv.store}?mode=ro", uri=True)
    try:
        parts = [json.loads(d) for (d,) in src.execute("SELECT doc FROM parts ORDER BY rowid")]
        events = [json.loads(d) for (d,) in
                  src.execute("SELECT doc FROM security_events ORDER BY rowid")]
    finally:
        src.close()
    sink = SqliteSink(copy)
    await sink.open()
    try:
        for part in parts:
            await sink.write_part(part)
        for i in range(0, len(events), 500):
            await sink.write_security_events(events[i:i + 500])
        report = await verify_sink(sink, key, anchor)
    finally:
        await sink.close()
    for p in report.problems[:20]:
        print(f"  {p.session_id or 'sink'}: {p.kind}: {p.detail}")
    line = (f"verified {report.sessions} sessions, {report.parts} parts, {report.events}"
            f" events, {report.security_events} security events:"
            f" {'OK' if report.ok else f'{len(report.problems)} problems'}")
    return {"ok": report.ok, "out": line, "receiver": recv.stats()}


def finish(srv: Server, cfg: Path, recv: Receiver | None, wd: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t = time.monotonic()
    try:
        srv.wait_flushed(timeout=300)
        out["flushed_after_idle_s"] = round(time.monotonic() - t, 1)
    except TimeoutError:
        out["flushed_after_idle_s"] = None
    srv.stop()  # SIGTERM to its PID
    assert srv.proc is not None
    out["server_exit"] = srv.proc.returncode
    out["drain"] = cli(cfg, "drain")
    print(f"drain (exit {out['drain']['rc']}): {out['drain']['out'] or out['drain']['err']}")
    out["verify"] = cli(cfg, "verify")
    print(f"server.py verify (exit {out['verify']['rc']}):"
          f" {out['verify']['out'] or out['verify']['err']}")
    out["verify_ok"] = out["verify"]["rc"] == 0 and out["verify"]["out"].endswith(": OK")
    line = out["verify"]["out"]
    if recv is not None:  # the http sink is not read back: check the receiver's copy
        out["receiver_verify"] = asyncio.run(
            verify_receiver_copy(cfg, recv, wd / "receiver-copy.db"))
        print(f"receiver's copy: {out['receiver_verify']['out']}")
        out["verify_ok"] = out["receiver_verify"]["ok"]
        line = out["receiver_verify"]["out"]
    m = re.search(r"(\d+) events, (\d+) security events", line)
    out["events_in_sink"] = int(m.group(1)) + int(m.group(2)) if m else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="minutes of load (default 5)")
    ap.add_argument("--users", type=int, default=8, help="virtual users (default 8)")
    ap.add_argument("--interval", type=float, default=30.0,
                    help="seconds between samples (default 30)")
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="seconds of load before the reference sample (default 60)")
    ap.add_argument("--sink", choices=("sqlite", "http"), default="sqlite")
    ap.add_argument("--seed", type=int, default=1, help="the load's random seed")
    ap.add_argument("--out", default=None,
                    help="results name (bench/results/NAME.json; default soak, soak_http)")
    ap.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = ap.parse_args()
    out_name = args.out or ("soak" if args.sink == "sqlite" else "soak_http")

    with workdir("soak") as wd:
        port = free_port()
        recv: Receiver | None = None
        try:
            if args.sink == "http":
                recv = Receiver(wd, rate=8, fail_share=0.12, seed=2, hang_seconds=4)
                recv.args += ["--burst", "8"]
                recv.__enter__()
            cfg = write_soak_config(wd, port, args.sink, recv.url if recv else "")
            add_users(cfg, NAMES, rounds=4)
            add_users(cfg, ["admin"], rounds=4, password=ADMIN_PASSWORD, role="admin")
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip()
            load_at_start = round(os.getloadavg()[0], 2)
            print(f"soak: {args.minutes:g} min, {args.users} users, {args.sink} sink,"
                  f" a sample every {args.interval:g} s; commit {commit or '?'},"
                  f" load average {load_at_start}", flush=True)
            srv = Server(cfg, port).start()
            try:
                run = asyncio.run(soak(srv, wd / "data", args))
                end = finish(srv, cfg, recv, wd)
            finally:
                srv.stop()
        finally:
            if recv is not None:
                recv.__exit__(None, None, None)

    summary = summarise(run, args.warmup)
    w, last, idle = summary["after_warmup"], summary["last_under_load"], summary["idle_after"]
    print(f"RSS: {summary['start']['rss_mb']} MB at start, {w['rss_mb']} MB after warm-up"
          f" ({w['t_s']:.0f} s), {last['rss_mb']} MB at the last sample under load"
          f" ({last['t_s']:.0f} s): {summary['rss_growth_warm_to_last_mb']:+.1f} MB;"
          f" slope over the second half {summary['rss_slope_second_half_mb_per_min']}"
          f" MB/min ({summary['second_half_samples']} samples); idle after:"
          f" {idle['rss_mb']} MB; peak {summary['rss_peak_mb']} MB")
    print(f"fds: {w['fds']} after warm-up, {last['fds']} last, {idle['fds']} idle"
          f" (start {summary['start']['fds']}); threads: {w['threads']}, {last['threads']},"
          f" {idle['threads']}; open sessions idle: {idle['active_sessions']}")
    print(f"load: {summary['requests']} requests ({summary['requests_per_s']}/s),"
          f" {summary['server_errors_5xx']} answered 5xx, {summary['client_errors']} client"
          f" errors; {summary['events_recorded']} events recorded,"
          f" {summary['parts_written']} parts written, {end['events_in_sink']} events in"
          f" the sink; verify"
          f" {'OK' if end['verify_ok'] else 'NOT OK'}")
    result = {"config": {"minutes": args.minutes, "users": args.users,
                         "interval_s": args.interval, "warmup_s": args.warmup,
                         "sink": args.sink, "seed": args.seed, "commit": commit,
                         "loadavg_1m_at_start": load_at_start,
                         "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
              "summary": summary, "end": end, "requests": run["requests"],
              "scenarios": run["scenarios"], "samples": run["samples"]}
    save(out_name, result)
    if args.json:
        print(json.dumps({"benchmark": out_name, "machine": machine(), **result}, indent=2))
    if not end["verify_ok"] or summary["server_errors_5xx"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

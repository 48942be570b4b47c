"""Shared helpers for the benchmarks: config files, server and receiver subprocesses.

Everything runs as separate processes: the server (``python server.py serve``),
the HTTP receiver (``python tests/receiver.py``) and the load generator (wrk,
or this process's aiohttp client), as in production.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable
ADMIN_PASSWORD = "bench-admin-password-0123456789"
USER_PASSWORD = "bench-user-password"
JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
AUDIT_KEY = "bench-audit-key-0123456789abcdef0123456789"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from handlers.ops import COUNTS_MAX_AGE  # noqa: E402 - after the path is set


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    workdir: Path,
    port: int,
    *,
    sink: str = "sqlite",
    sink_url: str = "",
    bcrypt_rounds: int = 12,
    synchronous: str = "full",
    max_writes_per_second: float = 5.0,
    burst: int = 5,
    extra_audit: str = "",
    http_timeout: float = 10.0,
) -> Path:
    """A config file for one benchmark server; data under ``workdir/data``."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "config.toml"
    cfg.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
data_dir = "{workdir / 'data'}"

[auth]
bcrypt_rounds = {bcrypt_rounds}
login_max_failures = 1000

[audit]
synchronous = "{synchronous}"
{extra_audit}

[flush]
max_writes_per_second = {max_writes_per_second}
burst = {burst}

[sink]
type = "{sink}"

[sink.http]
url = "{sink_url}"
timeout_seconds = {http_timeout}
""",
        encoding="utf-8",
    )
    return cfg


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["SESSION_AUDIT_JWT_SECRET"] = JWT_SECRET
    env["SESSION_AUDIT_AUDIT_KEY"] = AUDIT_KEY
    env["SESSION_AUDIT_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    env["SESSION_AUDIT_LOG_LEVEL"] = "WARNING"
    env.pop("SESSION_AUDIT_CONFIG", None)
    return env


def add_users(cfg: Path, names: list[str], rounds: int, password: str = USER_PASSWORD,
              role: str = "user") -> None:
    """Add users straight into the spool file, as ``server.py adduser`` does."""
    from audit.config import load_config
    from audit.spool import connect
    from audit.store import SCHEMA
    from handlers.auth import hash_password

    config = load_config(str(cfg))
    config.spool_path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(config.spool_path, config.audit.synchronous)
    try:
        conn.executescript(SCHEMA)
        stored = hash_password(password, rounds)  # one hash serves every bench user
        now = "2026-01-01T00:00:00.000Z"
        conn.executemany(
            "INSERT OR IGNORE INTO users (username, password_hash, role, created_at)"
            " VALUES (?, ?, ?, ?)",
            [(n, stored, role, now) for n in names],
        )
    finally:
        conn.close()


def http(method: str, url: str, body: Any = None, token: str | None = None,
         timeout: float = 30.0) -> tuple[int, Any]:
    data = None
    headers = {}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    ctype = ""
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace") + ctype


def wait_ready(base: str, proc: subprocess.Popen[Any] | None = None,
               timeout: float = 60.0, interval: float = 0.01) -> float:
    """Poll ``/readyz`` until 200; returns the monotonic time it answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1.0) as resp:
                if resp.status == 200:
                    return time.monotonic()
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"{base} not ready within {timeout} s")


class Server:
    """``python server.py serve --config CFG`` as a subprocess."""

    def __init__(self, cfg: Path, port: int, log: Path | None = None,
                 switch_interval: float | None = None) -> None:
        self.cfg = cfg
        self.switch_interval = switch_interval  # an experiment: sys.setswitchinterval
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = log or cfg.parent / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    def start(self, wait: bool = True) -> Server:
        logf = open(self.log, "ab")  # noqa: SIM115 - owned by the subprocess
        self.spawned_at = time.monotonic()
        cmd = [PYTHON, str(ROOT / "server.py"), "serve", "--config", str(self.cfg)]
        if self.switch_interval is not None:
            cmd = [PYTHON, "-c",
                   "import runpy, sys; sys.setswitchinterval(float(sys.argv[1]));"
                   " sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                   str(self.switch_interval), *cmd[1:]]
        if os.environ.get("BENCH_SERVER_NICE"):  # experiment: server scheduling priority
            cmd = ["nice", "-n", os.environ["BENCH_SERVER_NICE"], *cmd]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT, env=server_env(), stdout=logf, stderr=logf,
        )
        logf.close()
        if wait:
            try:
                wait_ready(self.base, self.proc)
            except (RuntimeError, TimeoutError) as exc:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{exc}; server log:\n{tail}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def login(self, user: str, password: str = USER_PASSWORD) -> dict[str, Any]:
        status, body = http("POST", self.base + "/token",
                            {"username": user, "password": password})
        if status != 200:
            raise RuntimeError(f"login {user}: {status} {body}")
        return dict(body)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        m = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.M)
        if m is None:
            raise KeyError(name)
        return float(m.group(1))

    def wait_flushed(self, timeout: float = 120.0) -> float:
        """Wait until no part or security event is pending; returns seconds waited.

        /metrics serves the spool's counts up to COUNTS_MAX_AGE old: a zero
        counts only once it was read after this call began (else a part
        sealed just before it could still be pending unseen)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            fresh = time.monotonic() - t0 > COUNTS_MAX_AGE
            if (fresh and self.metric("session_audit_pending_parts") == 0
                    and self.metric("session_audit_pending_security_events") == 0):
                return time.monotonic() - t0
            time.sleep(0.2)
        raise TimeoutError("the flusher did not drain in time")


class Receiver:
    """``python tests/receiver.py`` as a subprocess."""

    def __init__(self, workdir: Path, *, rate: float = 0.0, fail_share: float = 0.0,
                 seed: int = 1, hang_seconds: float = 30.0) -> None:
        self.store = workdir / "receiver.db"
        self.args = [PYTHON, str(ROOT / "tests" / "receiver.py"), "--port", "0",
                     "--rate", str(rate), "--fail-share", str(fail_share),
                     "--store", str(self.store), "--seed", str(seed),
                     "--hang-seconds", str(hang_seconds)]
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> Receiver:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line)
        if m is None:
            self.proc.kill()
            raise RuntimeError(f"receiver did not start: {line!r}")
        self.url = m.group(1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stats(self) -> dict[str, Any]:
        status, body = http("GET", self.url + "/stats")
        assert status == 200, body
        return dict(body)

    def stored_parts(self) -> list[dict[str, Any]]:
        """Every part in the receiver's store file (read-only, while it runs)."""
        conn = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True)
        try:
            return [json.loads(doc) for (doc,) in conn.execute("SELECT doc FROM parts")]
        finally:
            conn.close()

    def stored_security_events(self) -> list[dict[str, Any]]:
        conn = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True)
        try:
            return [json.loads(doc) for (doc,) in
                    conn.execute("SELECT doc FROM security_events")]
        finally:
            conn.close()


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"wrote {shown}")
    return path


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix=f"sa-bench-{name}-"))
    try:
        yield d
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(d, ignore_errors=True)

"""Real processes for end-to-end tests: the server and the HTTP receiver.

:class:`Live` starts ``server.py serve`` and ``tests/receiver.py`` as
subprocesses on loopback ports, kills them with SIGKILL on demand, runs the
CLI commands against the same configuration, and kills whatever is still
running when the test ends (``Live.close``, called from fixture teardown even
after a failure). Every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server.py"
RECEIVER = Path(__file__).resolve().with_name("receiver.py")

ADMIN_PASSWORD = "admin-password-for-tests"
JWT_SECRET = "jwt-secret-for-tests-0123456789abcdef"
AUDIT_KEY = "audit-key-for-tests-0123456789abcdef"


# The sockets free_port() holds its ports with: closed when the test ends
# (conftest's release_ports fixture).
_HELD: list[socket.socket] = []


def free_port() -> int:
    """A loopback port that stays this test's until it ends.

    Chosen with bind(0) and then closed, the port was free for anyone until
    the server bound it, and again between a kill -9 and the restart: another
    xdist worker's free_port(), the receiver it started, or any client's
    ephemeral port could take it, and the start failed ("cannot listen on").
    Held instead by a socket bound with SO_REUSEADDR that never listens: a
    bind(0) or connect() elsewhere does not pick a bound port, and a plain
    bind of it is refused, while a server (SO_REUSEADDR, as server.py,
    aiohttp and asyncio set it) can still bind and listen on it, and a
    connection to it, with nothing listening, is refused as before. A test
    that must show a port in use takes it with SO_REUSEADDR and listens."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
    except BaseException:
        s.close()
        raise
    _HELD.append(s)
    port: int = s.getsockname()[1]
    return port


def release_ports() -> None:
    """Let go of the ports free_port() gave out (at the end of each test)."""
    while _HELD:
        _HELD.pop().close()


def take_port(port: int) -> socket.socket:
    """A socket listening on ``port``, as another server holding it would
    (with SO_REUSEADDR: beside free_port()'s hold, not refused by it)."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    except BaseException:
        s.close()
        raise
    return s


def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is (no client library checks it) to the server
    on ``port`` and read the answer to the end of the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for nested tables of scalars."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and scalars:
        lines.append(f"[{prefix}]")
    for k, v in scalars.items():
        lines.append(f"{k} = {_toml_value(v)}")
    for k, v in tables.items():
        lines.append(to_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(lines) + "\n"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SESSION_AUDIT_ADMIN_PASSWORD=ADMIN_PASSWORD,
        SESSION_AUDIT_JWT_SECRET=JWT_SECRET,
        SESSION_AUDIT_AUDIT_KEY=AUDIT_KEY,
        SESSION_AUDIT_LOG_LEVEL=env.get("SESSION_AUDIT_LOG_LEVEL", "WARNING"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("SESSION_AUDIT_CONFIG", None)
    return env


@contextlib.asynccontextmanager
async def live_with_nofile(workdir: Path, soft: int, hard: int,
                           settings: dict[str, Any] | None = None, receiver_port: int = 0,
                           ) -> AsyncIterator[tuple[Live, list[socket.socket]]]:
    """A started server whose descriptor limit is (soft, hard), and a list
    for the connections the test holds open: closed, with the server, at
    the end (a test may close and clear them earlier). With
    ``receiver_port``, tests/receiver.py is started on it first (its store
    ``receiver.db`` in ``workdir``) and stopped at the end."""
    live = Live(workdir, settings)
    live.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    held: list[socket.socket] = []
    try:
        if receiver_port:
            await live.start_receiver(receiver_port, workdir / "receiver.db")
        await live.start()
        yield live, held
    finally:
        for s in held:
            s.close()
        live.close()


class Live:
    """One test's server (restartable), optional receiver, and CLI runs."""

    def __init__(self, workdir: Path, settings: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        defaults = {
            "server": {"host": "127.0.0.1", "port": self.port, "data_dir": str(self.data_dir)},
            "auth": {"bcrypt_rounds": 4},
        }
        self.settings = merge(defaults, settings or {})
        self.config_path = workdir / "config.toml"
        self.config_path.write_text(to_toml(self.settings), encoding="utf-8")
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.receiver: subprocess.Popen[bytes] | None = None
        self.receiver_log = workdir / "receiver.log"
        self.starts = 0
        # Run in the server's process before it starts (e.g. a lower rlimit).
        self.preexec_fn: Callable[[], None] | None = None
        # Set in the environment of the server and the CLI over server_env()'s
        # (e.g. another locale, another audit key).
        self.env: dict[str, str] = {}
        self.kills = 0

    # -- the server --------------------------------------------------------

    def spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, str(SERVER), "serve", "--config", str(self.config_path)],
                cwd=self.workdir, env={**server_env(), **self.env}, stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self.preexec_fn,
            )
        self.starts += 1

    async def start(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 - a deadline
        self.spawn()
        await self.wait_healthy(timeout)

    async def wait_healthy(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(
                        f"server exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with http.get(self.base + "/healthz",
                                        timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise AssertionError(f"server not healthy after {timeout}s:\n"
                                         f"{self.log_tail()}")
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL the server and reap it."""
        proc = self.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        self.kills += 1

    async def stop(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """SIGTERM (graceful shutdown) and wait; SIGKILL at the deadline."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc is not None else 0
        proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
            raise AssertionError("the server did not stop on SIGTERM") from None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    # -- the CLI -----------------------------------------------------------

    async def admin_login(self, http: aiohttp.ClientSession) -> tuple[str, dict[str, str]]:
        """Log in as the first start's admin: the session id and the headers to send."""
        async with http.post(self.base + "/token", json={
                "username": "admin", "password": ADMIN_PASSWORD}) as r:
            body = await r.json()
            assert r.status == 200, body
        return body["session_id"], {"Authorization": "Bearer " + body["access_token"]}

    async def cli(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
                  timeout: float = 90.0) -> subprocess.CompletedProcess[str]:  # noqa: ASYNC109
        cmd = [sys.executable, str(SERVER), *args[:1], "--config", str(self.config_path),
               *args[1:]]
        return await asyncio.to_thread(
            subprocess.run, cmd, cwd=self.workdir,
            env={**server_env(), **self.env, **(env or {})},
            input=stdin, capture_output=True, text=True, timeout=timeout,
        )

    async def adduser(self, name: str, password: str, *, admin: bool = False) -> None:
        """A user for the test's setup, as ``server.py adduser`` adds it: its
        own functions on the same spool file (beside the server, if it runs),
        but in this process. A command's start (its imports: half a second
        of CPU) per user made setups of several users take seconds (7 at
        once: 4 s). The command itself is tested through ``cli("adduser")``."""
        if self.env:  # another locale or key for this test's commands: the command
            args = ["adduser", name, "--password-stdin"] + (["--admin"] if admin else [])
            r = await self.cli(*args, stdin=password + "\n")
            assert r.returncode == 0, r.stderr
            return
        await asyncio.to_thread(self._adduser_here, name, password, admin)

    def _adduser_here(self, name: str, password: str, admin: bool) -> None:
        import server
        from audit.config import parse_config
        from handlers.auth import add_user_sync

        settings = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        config = parse_config(settings, base_dir=str(self.workdir))  # (the command's cwd)
        conn = server._spool_conn(config)
        try:
            add_user_sync(conn, name, password, "admin" if admin else "user",
                          config.auth.bcrypt_rounds)
        finally:
            conn.close()

    # -- the receiver ------------------------------------------------------

    def spawn_receiver(self, port: int, store: Path, *, rate: float = 0.0,
                       fail_share: float = 0.0, hang_seconds: float = 2.0,
                       seed: int = 1) -> subprocess.Popen[bytes]:
        with self.receiver_log.open("ab") as log:
            self.receiver = subprocess.Popen(
                [sys.executable, str(RECEIVER), "--port", str(port), "--rate", str(rate),
                 "--fail-share", str(fail_share), "--hang-seconds", str(hang_seconds),
                 "--store", str(store), "--seed", str(seed)],
                cwd=self.workdir, stdout=subprocess.PIPE, stderr=log,
            )
        return self.receiver

    async def start_receiver(self, port: int, store: Path, *, rate: float = 0.0,
                             fail_share: float = 0.0, hang_seconds: float = 2.0,
                             seed: int = 1, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Start tests/receiver.py on ``port`` and wait for its banner."""
        proc = self.spawn_receiver(port, store, rate=rate, fail_share=fail_share,
                                   hang_seconds=hang_seconds, seed=seed)
        assert proc.stdout is not None
        stdout = proc.stdout
        try:
            line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), timeout)
        except TimeoutError:
            raise AssertionError("the receiver did not start") from None
        assert line.startswith(b"listening on http://"), line

    async def stop_receiver(self) -> None:
        proc, self.receiver = self.receiver, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
        if proc.stdout is not None:
            proc.stdout.close()

    # -- teardown ----------------------------------------------------------

    def close(self) -> None:
        """Kill everything still running (fixture teardown, also after failures)."""
        for proc in (self.proc, self.receiver):
            if proc is None:
                continue
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()

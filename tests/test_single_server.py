"""One server per spool: a second ``serve`` on the same data directory is
refused before it opens anything, while the first one runs; once the first
has stopped, by SIGTERM or by ``kill -9``, the next one starts (real server
subprocesses). And the log says "serving on" only once the port listens."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from live_server import SERVER, Live, free_port, server_env, take_port, to_toml

pytestmark = pytest.mark.timeout(180)
INFO_ENV = {**server_env(), "SESSION_AUDIT_LOG_LEVEL": "INFO"}  # to see "serving on"


def second_config(lv: Live, port: int) -> Path:
    """The first server's configuration on another port: same data directory."""
    settings = dict(lv.settings)
    settings["server"] = {**settings["server"], "port": port}
    path = lv.workdir / "second.toml"
    path.write_text(to_toml(settings), encoding="utf-8")
    return path


def serve(lv: Live, config: Path) -> subprocess.CompletedProcess[str]:
    # A guard against a hang (a second server that serves runs forever).
    return subprocess.run([sys.executable, str(SERVER), "serve", "--config", str(config)],
                          cwd=lv.workdir, env=INFO_ENV, capture_output=True, text=True,
                          timeout=60)


def spawn(lv: Live, config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SERVER), "serve", "--config", str(config)],
                            cwd=lv.workdir, env=INFO_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def login(base: str) -> int:
    async with aiohttp.ClientSession() as http, http.post(
            base + "/token", json={"username": "admin",
                                   "password": "admin-password-for-tests"}) as r:
        return r.status


async def test_a_second_server_on_the_same_spool_is_refused(live: Live) -> None:
    await live.start()
    assert live.proc is not None
    port = free_port()
    done = await asyncio.to_thread(serve, live, second_config(live, port))
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert err.startswith("session-audit: another server is running on"), err
    assert f"(pid {live.proc.pid})" in err
    assert "Traceback" not in err and "serving on" not in err
    # It opened nothing: it never listened, and the first one serves on.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert await login(live.base) == 200
    assert live.proc.poll() is None


@pytest.mark.parametrize("how", ["sigterm", "kill -9"])
async def test_the_next_server_starts_once_the_first_is_gone(live: Live, how: str) -> None:
    await live.start()
    if how == "sigterm":
        assert await live.stop() == 0
    else:
        await live.kill()  # the kernel drops the lock with the process
    await live.start()
    assert await login(live.base) == 200


async def test_serving_is_logged_only_once_the_port_listens(live: Live) -> None:
    with take_port(live.port):
        done = await asyncio.to_thread(serve, live, live.config_path)
    assert done.returncode == 2
    assert "cannot listen on 127.0.0.1:" in done.stderr
    assert "serving on" not in done.stdout + done.stderr
    # The port free, the same directory serves, and says so.
    port = free_port()
    cfg = second_config(live, port)
    proc = spawn(live, cfg)
    try:
        assert proc.stdout is not None
        lines = await asyncio.to_thread(_until_serving, proc.stdout)
        assert lines[-1] == f"serving on http://127.0.0.1:{port} with the sqlite sink"
        assert await login(f"http://127.0.0.1:{port}") == 200
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        assert proc.stdout is not None
        proc.stdout.close()


def _until_serving(stream: object) -> list[str]:
    import json

    msgs: list[str] = []
    for line in stream:  # type: ignore[attr-defined]
        try:
            msgs.append(json.loads(line)["msg"])
        except (ValueError, KeyError):
            continue
        if msgs[-1].startswith("serving on"):
            return msgs
    raise AssertionError(f"the server stopped without serving: {msgs}")

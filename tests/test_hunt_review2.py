"""Found reviewing the session's merged work at the seams between its parts:
the streamed session detail (handlers/streaming.py) beside the sinks' checks
of a part's events; the listening socket bound before the spool opens; the
-wal check at open beside SQLite's locks."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from api_fixtures import MakeApi, expect_error, make_api, plant_part
from live_server import SERVER, Live, server_env
from receiver import sample_part

import server
from audit import queries

__all__ = ["make_api"]


@pytest.mark.parametrize("sink", ["sqlite", "jsonl"])
async def test_a_short_session_with_an_unreadable_part_is_a_503_recorded_as_a_failure(
    make_api: MakeApi, sink: str,
) -> None:
    """The streamed detail read a stored part's events only after its
    headers went out: a one-part session whose events another writer left
    without a seq (the sinks' check, 2fc4239) became a 200 whose body was
    cut off, and the admin's audit.query said success, where the answer
    built whole was the documented 503 sink_unavailable, recorded as a
    failure. The answer's first chunk (here all of it) is now produced
    before anything is sent."""
    api = await make_api(sink={"type": sink})
    admin = await api.admin()
    part = sample_part("forged")
    del part["events"][1]["seq"]
    plant_part(api.config, sink, part)
    r = await api.client.get("/audit/sessions/forged",
                             headers={**admin.headers, "X-Request-ID": "forged-1"})
    await expect_error(r, 503, "sink_unavailable")
    mine = await api.engine.spool.read(lambda c: queries.get_session(c, admin.session_id))
    assert mine is not None
    query = [e for e in mine["events"] if e["request_id"] == "forged-1"]
    assert [(e["action"], e["outcome"], e["details"].get("reason")) for e in query] == [
        ("audit.query", "failure", "sink_unavailable")]


async def test_a_short_session_is_sent_whole_with_its_length(make_api: MakeApi) -> None:
    """Produced whole before anything is sent, a short detail goes out as
    the answer built whole did: with its Content-Length, not chunked."""
    api = await make_api()
    admin = await api.admin()
    r = await api.client.get(f"/audit/sessions/{admin.session_id}", headers=admin.headers)
    body = await r.read()
    assert r.status == 200
    assert r.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in r.headers
    assert json.loads(body)["events_complete"] is True


async def test_a_start_holds_its_port_from_the_first_step(live: Live) -> None:
    """The socket was bound before the spool opened, but listened only once
    the server was ready to serve: under SO_REUSEADDR a second server started
    meanwhile on the same port bound it too (both then 'serving on' it; the
    one that listened second, on uvloop, listened on nothing). Bound and
    listening at once, the port is taken: the second start stops at once,
    its spool untouched."""
    held = server.listening_sockets("127.0.0.1", live.port)  # a start under way
    try:
        with pytest.raises(server.StartupError, match="cannot listen"):
            server.listening_sockets("127.0.0.1", live.port)
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(SERVER), "serve", "--config",
                             str(live.config_path)],
            cwd=live.workdir, env=server_env(), capture_output=True, text=True, timeout=60)
    finally:
        for sock in held:
            sock.close()
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{live.port}" in done.stderr
    assert not (live.data_dir / "spool.db").exists()
    # A restart beside the last run's connections in TIME_WAIT still binds.
    await live.start()
    with socket.create_connection(("127.0.0.1", live.port)) as c:
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.1 200")
    assert await live.stop() == 0
    await live.start()


def test_a_host_name_that_is_none_is_a_startup_error() -> None:
    """A label over 63 characters made serve die with a UnicodeError
    traceback (the IDNA codec's, raised before any lookup)."""
    with pytest.raises(server.StartupError, match=r"cannot listen on a+\.example"):
        server.listening_sockets("a" * 64 + ".example", 8080)


def _shm_in_use(shm: Path) -> bool:
    """Whether a process holds SQLite's lock marking ``shm`` in use (its
    "DMS" byte, 128; a process that opens the database and can lock it
    alone takes itself for the only user, and truncates and rebuilds the
    -shm). Probed with a lock taken and released at once."""
    fd = os.open(shm, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
    except OSError:
        return True
    finally:
        os.close(fd)  # (and the lock, if it was taken)
    return False


async def test_a_command_run_beside_the_server_leaves_its_shm_alone(live: Live) -> None:
    """The -wal check at open (walcheck) read mxFrame from the -shm file and
    closed it, which dropped every POSIX lock SQLite held on the -shm in the
    server's process, among them the one marking it in use: the next
    command run beside the server (status) truncated the -shm and rebuilt
    it under the server, which died of SIGBUS (here after its second
    status). It reads mxFrame through SQLite now."""
    await live.start()
    shm = live.data_dir / "spool.db-shm"
    assert _shm_in_use(shm)
    for _ in range(3):
        r = await live.cli("status")
        assert r.returncode == 0, r.stderr
        assert live.proc is not None and live.proc.poll() is None, live.log_tail()
    async with aiohttp.ClientSession() as http, http.get(live.base + "/readyz") as r:
        assert r.status == 200, await r.text()

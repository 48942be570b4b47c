"""A disk that fills up (found by running the server on a real, tiny tmpfs
and ext4 image and filling it): the first start and a restart say which file
could not be written, and do not fail for what they do not need. The tests
stand in for the full disk with RLIMIT_FSIZE (a real subprocess) or an
injected ENOSPC at the one call."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import live_server
import pytest
from live_server import Live

import server
from audit.config import Config


def _no_space(*_: object) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_the_serve_lock_is_taken_when_its_pid_cannot_be_written(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pid in the serve lock's file only names the holder in the message
    a second server gets. A new or empty lock file on a full disk (the pid's
    write needs a block) stopped the start with "serve: [Errno 28] No space
    left on device", naming no file, where a server could otherwise start,
    answer /healthz and say on /readyz that it cannot record; and the file
    was left empty by the truncate before the write."""
    config = make_config()
    server.ensure_data_dir(config)
    path = config.spool_path.with_name(config.spool_path.name + ".serve-lock")
    path.write_text("4242\n")  # a server before this one
    monkeypatch.setattr(os, "pwrite", _no_space)
    with caplog.at_level(logging.WARNING):
        dfd, fd = server.serve_lock(config)
    try:
        monkeypatch.undo()
        assert "pid could not be written" in caplog.text and str(path) in caplog.text
        assert path.read_text() == ""  # no stale pid named as the holder
        other = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # the lock is held all the same
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    finally:
        os.close(fd)
        os.close(dfd)


def _keys_from_files(monkeypatch: pytest.MonkeyPatch) -> None:
    env = live_server.server_env()
    for name in ("SESSION_AUDIT_JWT_SECRET", "SESSION_AUDIT_AUDIT_KEY"):
        env.pop(name)
    monkeypatch.setattr(live_server, "server_env", lambda: dict(env))


def _no_file_growth() -> None:
    # Python ignores SIGXFSZ: a write past the limit fails (EFBIG), as on a
    # full disk (ENOSPC) a write that needs a new block does.
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))


@pytest.mark.timeout(120)
async def test_a_first_start_that_cannot_write_its_keys_names_the_file_and_leaves_none(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first start on a full disk: the audit key's file was made (O_EXCL)
    and its write failed. The start ended with "serve: [Errno 28] No space
    left on device", naming no file; the empty audit.key stayed, and the
    next start, with room again, warned it was "empty (a crash while it was
    made)"."""
    _keys_from_files(monkeypatch)
    # (Its output to a pipe: a log file would be past the limit too.)
    r = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(live_server.SERVER), "serve", "--config", str(live.config_path)],
        cwd=live.workdir, env=live_server.server_env(), preexec_fn=_no_file_growth,
        capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    key = live.data_dir / "audit.key"
    assert r.returncode == 2, out
    assert f"cannot write {key}" in out, out
    assert "Traceback" not in out, out
    assert not key.exists() and not (live.data_dir / "jwt.key").exists()

    await live.start()
    assert await live.stop() == 0
    assert "empty" not in live.log_tail(), live.log_tail()
    assert len(key.read_text().strip()) >= 32


def _stderr_full(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    with open("/dev/full", "w") as full:
        return subprocess.run(cmd, cwd=cwd, env=live_server.server_env(),
                              stdout=subprocess.PIPE, stderr=full, text=True, timeout=60)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
async def test_drain_with_its_stderr_on_a_full_disk_still_drains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``drain 2>>drain.log`` with that log's disk full (here /dev/full,
    where every write fails with ENOSPC): the progress bar's first write
    raised, and drain exited 1 having sent nothing. Its progress is only a
    display; the spool and the sink are elsewhere."""
    rport = live_server.free_port()
    live = Live(tmp_path, {
        "sink": {"type": "http", "http": {"url": f"http://127.0.0.1:{rport}",
                                          "timeout_seconds": 2.0}},
        "flush": {"max_writes_per_second": 50.0, "burst": 10},
    })
    try:
        await live.adduser("alice", "alice-password")
        await live.start()
        async with aiohttp.ClientSession() as http:
            for _ in range(3):  # three sessions, each a pending part (the sink is down)
                async with http.post(live.base + "/token", json={
                        "username": "alice", "password": "alice-password"}) as r:
                    assert r.status == 200
                    token = (await r.json())["access_token"]
                async with http.post(live.base + "/logout", json={},
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200
        assert await live.stop() == 0
        await live.start_receiver(rport, tmp_path / "received.db")
        r = await asyncio.to_thread(
            _stderr_full, [sys.executable, str(live_server.SERVER), "drain", "--config",
                           str(live.config_path)], tmp_path)
        assert r.returncode == 0, r.stdout
        assert "drained; 0 dead-lettered" in r.stdout
        status = json.loads((await live.cli("status")).stdout)
        assert status["pending_parts"] == 0 and status["pending_security_events"] == 0
    finally:
        await live.stop_receiver()
        live.close()

"""Damaged or odd local files (found by a hunt for them): a spool the
server may not write, lock files planted in the data directory. Real
server subprocesses and commands, real files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from live_server import SERVER, Live, free_port, server_env, to_toml


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` not writable by this process: mode 0400, or, for root (whom
    modes do not stop), the immutable attribute."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        os.chmod(path, 0o400)
        try:
            yield
        finally:
            os.chmod(path, mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)],
                                        capture_output=True).returncode != 0:
        pytest.skip("root, and the file cannot be made immutable here")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


async def test_a_spool_the_server_may_not_write_is_refused_at_start(live: Live) -> None:
    """SQLite opens a database file it may not write read-only, without a
    word, and a spool of the current layout needs no write to open: ``serve``
    on it said it was ready (``/readyz`` 200, then and later) and answered
    every login 500 ``internal_error``, a traceback in the log; ``drain``
    would send parts it could not mark stored. Now each refuses in one line."""
    await live.start()
    assert await live.stop() == 0
    spool = live.data_dir / "spool.db"
    before = spool.read_bytes()
    with read_only(spool):
        r = await live.cli("serve", timeout=60)  # (a guard against one that serves)
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("session-audit: serve: the spool ") and (
            "attempt to write a readonly database") in last, r.stderr
        for command in ("drain", "retry-dead"):
            r = await live.cli(command)
            assert r.returncode == 1 and "readonly database" in r.stderr, (command, r.stderr)
            assert "Traceback" not in r.stderr
        r = await live.cli("status")  # reading it still works
        assert r.returncode == 0, r.stderr
    assert spool.read_bytes() == before
    await live.start()  # writable again: it serves
    assert await live.stop() == 0


@pytest.mark.parametrize("lock", ["serve-lock", "schema-lock", "flush-lock"])
async def test_a_lock_file_planted_as_a_symlink_is_not_followed(live: Live, lock: str) -> None:
    """A symlink planted at a lock file's name in the data directory (its
    group may write there: a warning, not a refusal) was followed: the serve
    lock, truncated to take the server's pid, truncated the file it named
    (here one outside the data directory, as the sqlite sink's may be), and
    the others created their target. Now the command stops in one line
    naming the file, and the target is left as it was."""
    live.settings["sink"] = {"type": "http", "http": {"url": "http://127.0.0.1:9/x"}}
    live.config_path.write_text(to_toml(live.settings), encoding="utf-8")
    await live.start()
    async with aiohttp.ClientSession() as http, http.post(
            live.base + "/token", json={"username": "admin", "password": "wrong"}) as r:
        assert r.status == 401  # a security event the down sink leaves pending
    assert await live.stop() == 0
    victim = live.workdir / "victim"
    victim.write_text("someone's data\n")
    link = live.data_dir / f"spool.db.{lock}"
    link.unlink()
    link.symlink_to(victim if lock == "serve-lock" else live.workdir / "made-by-the-server")
    # serve takes the serve lock and the schema lock before it serves; drain
    # (with a security event pending) the flush lock.
    args = ("drain", "--timeout", "5") if lock == "flush-lock" else ("serve",)
    r = await live.cli(*args, timeout=60)  # (a guard against one that serves)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"{link} is not a regular file" in last, r.stderr
    assert victim.read_text() == "someone's data\n"
    assert not (live.workdir / "made-by-the-server").exists()


async def test_a_deleted_serve_lock_file_lets_no_second_server_in(live: Live) -> None:
    """The one-server lock was a ``flock`` on ``spool.db.serve-lock`` only:
    with that file deleted while the server ran (a clean-up of the data
    directory), a second ``serve`` on the same directory made a new file,
    locked it and served on the same spool, each server with its own cache
    of the chain heads; four failed logins, two on each, left the security
    chain forked in two, which ``verify`` took for two spools' chains and
    called OK. The directory itself is locked now."""
    await live.start()
    (live.data_dir / "spool.db.serve-lock").unlink()
    settings = dict(live.settings)
    settings["server"] = {**settings["server"], "port": free_port()}
    second = live.workdir / "second.toml"
    second.write_text(to_toml(settings), encoding="utf-8")
    r = await asyncio.to_thread(  # (the timeout: a guard against one that serves)
        subprocess.run, [sys.executable, str(SERVER), "serve", "--config", str(second)],
        cwd=live.workdir, env=server_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"session-audit: another server is running on"
                                f" {live.data_dir / 'spool.db'}: stop it first, or give this"
                                " one another server.data_dir"), r.stderr
    assert live.proc is not None and live.proc.poll() is None
    assert await live.stop() == 0
    await live.start()  # the first one gone, the next one starts
    assert await live.stop() == 0

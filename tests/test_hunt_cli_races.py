"""The command line racing a busy server and itself: real server and
command processes on one spool, the interleaving driven where it can be.
Each test failed before its fix."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from live_server import Live
from waiting import wait_for

import server
from audit.spool import open_lock
from handlers.auth import Accounts, add_user_sync, check_password
from handlers.keys import ACCOUNTS, CONFIG


def _waiting_on(path: Path) -> int:
    """How many processes wait for a flock on ``path`` (Linux /proc/locks)."""
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line and line.split()[-3] == ident)


async def test_adduser_of_names_alike_in_case_at_once_adds_one(tmp_path: Path) -> None:
    """``adduser`` refuses a name that differs from an existing one only in
    case. The check and the insert were two statements with the password's
    hash between them (a quarter of a second at the default cost, no lock
    held): ``adduser Bob`` and ``adduser bob`` run at once each found no
    such name, and both were added. The three here are let go together
    (each waits for the spool's schema lock, which the test holds)."""
    live = Live(tmp_path, {"auth": {"bcrypt_rounds": 12}})
    try:
        await live.start()
        lock = live.data_dir / "spool.db.schema-lock"
        fd = open_lock(lock)
        names = ["Bob", "bob", "BOB"]
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            runs = [asyncio.create_task(live.cli("adduser", n, "--password-stdin",
                                                 stdin="a-password-1\n")) for n in names]
            await wait_for(lambda: _waiting_on(lock) == len(names), timeout=60)
        finally:
            os.close(fd)
        results = await asyncio.gather(*runs)
        assert sorted(r.returncode for r in results) == [0, 1, 1], [
            (r.returncode, r.stderr) for r in results]
        for r in results:
            if r.returncode:
                assert "exists already" in r.stderr, r.stderr
        users = await live.cli("users")
        listed = [line.split("\t")[0] for line in users.stdout.splitlines()]
        assert len([n for n in listed if n.lower() == "bob"]) == 1, listed
    finally:
        live.close()


@pytest.mark.parametrize(("name", "role"), [("admin", "admin"), ("Admin", "admin"),
                                            ("admin", "user")])
async def test_adduser_beside_a_first_start_between_its_check_and_its_insert(
    make_config: Any, engines: Any, monkeypatch: pytest.MonkeyPatch, name: str, role: str,
) -> None:
    """A first start with no admin checks for one (and for a user alike
    'admin'), then creates 'admin'. ``adduser`` beside it, between the two:
    with ``admin --admin`` the insert failed and the start stopped on
    "UNIQUE constraint failed: users.username" (5 of 6 real races); with
    ``Admin --admin`` two admins whose names read alike were left, and the
    start wrote an initial_admin_password that was no user's password
    either way. Now the start checks again in the insert's transaction."""
    monkeypatch.delenv(server.ADMIN_PASSWORD_ENV, raising=False)
    config = make_config(auth={"bcrypt_rounds": 4})
    engine = await engines.open(config)
    accounts = Accounts(engine, rounds=4)
    app = web.Application()
    app[ACCOUNTS] = accounts
    app[CONFIG] = config
    real_alike = accounts.alike

    def add() -> None:  # what `server.py adduser` does, through its own connection
        conn = server._spool_conn(config)
        try:
            add_user_sync(conn, name, "a-password-1", role, 4)
        finally:
            conn.close()

    async def alike_then_adduser(username: str) -> str | None:
        found = await real_alike(username)
        await asyncio.to_thread(add)
        return found

    monkeypatch.setattr(accounts, "alike", alike_then_adduser)
    initial = config.data_dir / "initial_admin_password"
    if role == "user":
        with pytest.raises(server.StartupError, match="belongs to a user without it"):
            await server._ensure_admin(app)
    else:
        await server._ensure_admin(app)
    rows = await engine.spool.read(
        lambda c: c.execute("SELECT username, role FROM users").fetchall())
    assert rows == [(name, role)]
    assert not initial.exists()  # it would hold no user's password


async def test_a_first_start_stopped_while_its_admin_commits_keeps_its_password(
    make_config: Any, engines: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signal during a first start cancels the creation of 'admin' while its
    insert waits for the spool's commit, which goes on (the spool commits
    what it was given). The start then deleted initial_admin_password as
    'the password of no user': the admin was made with a password nobody
    had, the log never said it was made, and the next start, finding an
    admin, wrote none. The file stays (a start that finds no admin writes
    a new one)."""
    monkeypatch.delenv(server.ADMIN_PASSWORD_ENV, raising=False)
    config = make_config(auth={"bcrypt_rounds": 4})
    engine = await engines.open(config)
    app = web.Application()
    app[ACCOUNTS] = Accounts(engine, rounds=4)
    app[CONFIG] = config
    held, release = threading.Event(), threading.Event()

    def hold(w: Any) -> None:  # the writer busy with a commit
        held.set()
        release.wait(10)

    busy = asyncio.create_task(engine.spool.submit(hold, needs_space=False))
    try:
        assert await asyncio.to_thread(held.wait, 10)
        start = asyncio.create_task(server._ensure_admin(app))
        await wait_for(lambda: engine.spool._pending, message="the insert queued")
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
    finally:
        release.set()
    await busy
    await engine.spool.submit(lambda w: None, needs_space=False)  # (after the insert's batch)
    rows = await engine.spool.read(
        lambda c: c.execute("SELECT username, role, password_hash FROM users").fetchall())
    assert [r[:2] for r in rows] == [("admin", "admin")]
    initial = config.data_dir / "initial_admin_password"
    assert check_password(initial.read_text(encoding="utf-8").strip(), rows[0][2])

"""kill -9 where the crash storms do not reach (found by a hunt for crash
consistency): the first start, the commands beside the server, the sinks'
own files. Real subprocesses, real files, loopback HTTP."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import live_server
import pytest
from live_server import Live

import server
from audit.spool import Limits, Spool, make_private_dirs


def _keys_from_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server and the commands read their keys from data/jwt.key and
    data/audit.key (made at the first start), not from the variables."""
    env = live_server.server_env()
    for name in ("SESSION_AUDIT_JWT_SECRET", "SESSION_AUDIT_AUDIT_KEY"):
        env.pop(name)
    monkeypatch.setattr(live_server, "server_env", lambda: dict(env))


def _empty_private(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


async def test_a_key_file_left_empty_by_a_kill_is_made_anew(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first start killed between creating data/audit.key or data/jwt.key
    (O_EXCL) and writing the key into it left the file empty: found by
    killing a first start at each of its file writes in turn (strace
    injecting SIGKILL), at its 3rd and 4th. Every later start then stopped
    with "SESSION_AUDIT_AUDIT_KEY (or audit.key) must be at least 32 bytes"
    until someone deleted the file. Such a key was never used: it is made
    anew. A spool that holds chains still refuses an empty audit.key as it
    refuses a missing one, and the commands beside the server make none."""
    _keys_from_files(monkeypatch)
    live.data_dir.mkdir(mode=0o700)
    for name in ("audit.key", "jwt.key"):
        _empty_private(live.data_dir / name)  # what the kill left
    await live.start()
    assert await live.stop() == 0
    for name in ("audit.key", "jwt.key"):
        assert len((live.data_dir / name).read_text().strip()) >= 32, name

    # Now the spool holds chains made with that key: an empty file is a lost key.
    os.truncate(live.data_dir / "audit.key", 0)
    r = await live.cli("serve", timeout=60)  # (the timeout: a guard against one that serves)
    assert r.returncode == 2 and "no audit key" in r.stderr, r.stderr
    for command in ("drain", "retry-dead"):
        r = await live.cli(command)
        assert r.returncode == 2 and "no audit key" in r.stderr, (command, r.stderr)
    assert (live.data_dir / "audit.key").stat().st_size == 0  # no new key was made


def test_a_key_file_is_durable_with_its_directory_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key file was fsynced, its directory not: after a power cut the
    file's entry could be gone while the spool's chains (synchronous =
    "full") survived, and every later start would be refused. A power cut
    cannot be made here: the fsyncs are recorded instead (of the file, then
    of its directory)."""
    real = os.fsync
    synced: list[tuple[int, int]] = []

    def recording(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_ino, stat.S_IFMT(st.st_mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    path = tmp_path / "data" / "audit.key"
    server._write_private(path, "k" * 64)
    # (first the directory made for it: its entry, in tmp_path)
    assert synced == [(tmp_path.stat().st_ino, stat.S_IFDIR),
                      (path.stat().st_ino, stat.S_IFREG),
                      (path.parent.stat().st_ino, stat.S_IFDIR)]


async def test_the_directories_a_spool_makes_have_their_entries_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``server.data_dir`` made at a first start (and its missing parents):
    each is an entry in its parent, fsynced before the spool's first commit
    is acknowledged, or a power cut could take the directory away with the
    spool in it. A directory that exists costs no fsync."""
    real = os.fsync
    synced: list[int] = []

    def recording(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    data = tmp_path / "a" / "data"
    spool = Spool(data / "spool.db", b"k" * 32, limits=Limits(500, 1 << 20))
    await spool.open()
    await spool.close()
    assert [os.stat(tmp_path).st_ino, os.stat(tmp_path / "a").st_ino] == synced[:2]
    synced.clear()
    make_private_dirs(data)
    assert synced == []


def test_a_directory_made_in_a_parent_not_readable_is_made_all_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent this account may write but not read (a drop-box, mode 0733):
    ``mkdir`` works there, but the parent cannot be opened to fsync its
    entry. The directory made stands and is the caller's: refusing it
    failed a first start with "cannot create ...: Permission denied" for a
    data directory it had made, and the next start, finding it, went on."""
    parent = tmp_path / "dropbox"
    parent.mkdir(mode=0o733)
    parent.chmod(0o733)
    real_open = os.open

    def unreadable(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        # (as root the mode alone does not refuse: say it as the kernel would)
        if Path(path) == parent and flags & os.O_DIRECTORY:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", unreadable)
    make_private_dirs(parent / "audit" / "data")
    assert (parent / "audit" / "data").is_dir()
    assert stat.S_IMODE((parent / "audit").stat().st_mode) == 0o700

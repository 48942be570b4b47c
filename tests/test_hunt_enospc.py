"""A disk that fills up (found by running the server on a real, tiny tmpfs
and ext4 image and filling it): the first start and a restart say which file
could not be written, and do not fail for what they do not need. The tests
stand in for the full disk with RLIMIT_FSIZE (a real subprocess) or an
injected ENOSPC at the one call."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable

import pytest

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


"""A damaged -wal, found at open: SQLite drops every frame from the first
one whose checksum fails, without a word, and with them every transaction
committed after it (acknowledged events, sessions, seals).

SQLite's recovery, run by the first connection, leaves the number of valid
frames in the -shm's index header (``mxFrame``, SQLite's documented WAL-index
format: native byte order, at offset 16); the frames it dropped stay in the
file until a write reuses them. A frame of the current log (its salts the
header's) beyond ``mxFrame`` that ends a transaction (its "database size
after commit" set) is such a transaction; one may be the transaction that was
being written when the machine stopped (never acknowledged), two or more mean
a committed one was dropped. Reading the frame headers costs a few ms for a
16 MiB -wal; the frames' checksums are SQLite's to check (too slow here).
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from pathlib import Path

_WAL_MAGIC = (0x377F0682, 0x377F0683)
_WAL_HEADER = 32
_FRAME_HEADER = 24


def _mx_frame(shm: Path) -> int | None:
    try:
        with open(shm, "rb") as f:
            head = f.read(48)
    except OSError:
        return None
    if len(head) < 48:
        return None
    return int(struct.unpack_from("=I", head, 16)[0])


def dropped_commits(wal: Path) -> tuple[int, int] | None:
    """``(mxFrame, commits)``: the transactions of the current log that SQLite
    could not read past a damaged frame, once a connection has opened the
    spool; None when there is no -wal or index to look at, or it changed
    while it was read (another process writing)."""
    shm = Path(f"{os.fspath(wal)[:-4]}-shm")
    before = _mx_frame(shm)
    if before is None:
        return None
    try:
        with open(wal, "rb") as f:
            head = f.read(_WAL_HEADER)
            if len(head) < _WAL_HEADER:
                return None
            magic, _, page_size, _, salt1, salt2 = struct.unpack(">6I", head[:24])
            if magic not in _WAL_MAGIC or not 512 <= page_size <= 65536:
                return None
            size = os.fstat(f.fileno()).st_size
            frame = _FRAME_HEADER + page_size
            commits = 0
            for i in range(before, (size - _WAL_HEADER) // frame):
                f.seek(_WAL_HEADER + i * frame)
                fh = f.read(_FRAME_HEADER)
                if len(fh) < _FRAME_HEADER:
                    break
                _, after_commit, s1, s2 = struct.unpack(">4I", fh[:16])
                if (s1, s2) == (salt1, salt2) and after_commit:
                    commits += 1
    except OSError:
        return None
    if _mx_frame(shm) != before:
        return None
    return before, commits


def keep_copy(wal: Path) -> Path:
    """A copy of the -wal beside it, before a write reuses its frames."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = wal.with_name(f"{wal.name}.damaged-{stamp}")
    shutil.copyfile(wal, dest)
    os.chmod(dest, 0o600)
    return dest

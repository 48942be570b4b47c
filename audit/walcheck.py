"""A damaged -wal, found at open: SQLite drops every frame from the first
one whose checksum fails, without a word, and with them every transaction
committed after it (acknowledged events, sessions, seals).

SQLite's recovery, run by the first connection, keeps the valid frames
(``mxFrame`` of its wal-index, which ``PRAGMA wal_checkpoint(PASSIVE)``
gives as its second column); the frames it dropped stay in the file until
a write reuses them. A frame of the current log (its salts the header's)
beyond ``mxFrame`` that ends a transaction (its "database size after
commit" set) is such a transaction; one may be the transaction that was
being written when the machine stopped (never acknowledged), two or more
mean a committed one was dropped. Reading the frame headers costs a few ms
for a 16 MiB -wal; the frames' checksums are SQLite's to check (too slow
here).

The -shm is never opened here: SQLite's locks on it are POSIX locks, and
closing any descriptor of the file drops every one this process holds. A
server that read mxFrame from the file lost its lock marking the -shm in
use, and the next command run beside it (``status``) took itself for the
only user, truncated the -shm and rebuilt it under the server, which died
of SIGBUS on its mapping of the file.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import time
from pathlib import Path

_WAL_MAGIC = (0x377F0682, 0x377F0683)
_WAL_HEADER = 32
_FRAME_HEADER = 24


def _mx_frame(conn: sqlite3.Connection) -> int | None:
    """The frames of the -wal SQLite holds valid, through ``conn``. The
    checkpoint copies them into the database file, as the first commit's
    would (it writes no frame: those past them stay as they are)."""
    try:
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error:
        return None
    if row is None or row[1] is None or row[1] < 0:  # (-1: not in WAL mode, or busy)
        return None
    return int(row[1])


def _checksum(data: bytes, big_endian: bool, seed: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes), continuing
    from ``seed`` (a frame's: the checksum before it in the log)."""
    s1, s2 = seed
    for x0, x1 in struct.iter_unpack(">2I" if big_endian else "<2I", data):
        s1 = (s1 + x0 + s2) & 0xFFFFFFFF
        s2 = (s2 + x1 + s1) & 0xFFFFFFFF
    return s1, s2


def _header_intact(head: bytes) -> bool:
    """The -wal header as SQLite reads it: a known magic, a page size, and
    its checksum right. SQLite reads no frame of a -wal whose header is not."""
    magic, _, page_size = struct.unpack(">3I", head[:12])
    return (magic in _WAL_MAGIC and _page_size_ok(page_size)
            and _checksum(head[:24], bool(magic & 1)) == struct.unpack(">2I", head[24:32]))


def _of_an_earlier_log(head: bytes, frame: bytes) -> bool:
    """Whether ``frame`` (the -wal's first, header and page) is of an earlier
    log than the damaged header ``head``: SQLite wrote the header of a log
    started over (its first salt one more, the second new) and was stopped
    before the new log's first frame. Not when the frame's second salt is
    the header's (SQLite draws a new one for a log started over; a first
    salt that is the frame's plus one is damage then), or its checksum
    continues the header's (as stored, or as the header's first 24 bytes
    give it: one of the two is not what is damaged; either byte order): the
    damage is the header's then. Nor when the header's first salt is not
    the frame's plus one: with the damage there, the frame is taken for the
    current log's (a damaged log said, rather than one that lost its
    transactions left unsaid)."""
    if frame[12:16] == head[20:24]:
        return False
    stored = struct.unpack(">2I", frame[16:24])
    for big_endian in (False, True):
        for seed in (struct.unpack(">2I", head[24:32]), _checksum(head[:24], big_endian)):
            if _checksum(frame[:8] + frame[_FRAME_HEADER:], big_endian, seed) == stored:
                return False
    salt1: int = struct.unpack(">I", head[16:20])[0]
    frame_salt1: int = struct.unpack(">I", frame[8:12])[0]
    return salt1 == (frame_salt1 + 1) & 0xFFFFFFFF


def _page_size_ok(size: int) -> bool:
    return 512 <= size <= 65536 and size & (size - 1) == 0


def dropped_commits(conn: sqlite3.Connection, wal: Path) -> tuple[int, int] | None:
    """``(mxFrame, commits)``: the transactions of the current log that SQLite
    could not read past a damaged frame, once ``conn`` has opened the spool
    (and written nothing); None when there is no -wal to look at, or it
    changed while it was read (another process writing).

    A damaged header (its magic, page size, salts or checksum) makes SQLite
    drop the whole log: its salts cannot be trusted then, and the current
    log is the one its first frame belongs to, in pages of the database's
    size, unless that frame is of an earlier log (see
    :func:`_of_an_earlier_log`): then no transaction of it was written."""
    before = _mx_frame(conn)
    if before is None:
        return None
    try:
        with open(wal, "rb") as f:
            head = f.read(_WAL_HEADER)
            if len(head) < _WAL_HEADER:
                return None
            _, _, page_size, _, salt1, salt2 = struct.unpack(">6I", head[:24])
            if not _header_intact(head):
                if before:  # (SQLite read frames: the header is not what is damaged)
                    return None
                page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
                if not _page_size_ok(page_size):
                    return None
                first = f.read(_FRAME_HEADER + page_size)
                if len(first) < _FRAME_HEADER:
                    return None
                if len(first) == _FRAME_HEADER + page_size and _of_an_earlier_log(head, first):
                    return before, 0  # (no frame of the current log was written)
                salt1, salt2 = struct.unpack(">2I", first[8:16])
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
    except (OSError, sqlite3.Error):
        return None
    if _mx_frame(conn) != before:
        return None
    return before, commits


def keep_copy(wal: Path) -> Path:
    """A copy of the -wal beside it, before a write reuses its frames."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = wal.with_name(f"{wal.name}.damaged-{stamp}")
    shutil.copyfile(wal, dest)
    os.chmod(dest, 0o600)
    return dest

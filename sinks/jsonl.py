"""The JSONL sink: append-only daily files, fsynced, for shipping with other tools.

Layout: ``<dir>/audit-YYYY-MM-DD.jsonl`` (UTC date of *writing*, not of the
session), one JSON object per line, each line ending in ``\\n``:

* a session part (API.md "A part") with ``"type": "session_part"`` added;
* a security event with ``"type": "security_event"`` added.

What "stored" means: the line (or, for a batch of security events, all its
lines, written with one ``write``) has been appended and ``fsync``-ed before
``write_part``/``write_security_events`` returns. A new file's directory
entry is fsynced too, and so is a directory's own entry when ``open``
created it.

What it promises about duplicates
---------------------------------
The sink never appends an ``_id`` twice. It keeps an index ``_id -> hash``
(16-byte BLAKE2b digests of both, see :func:`_digest`) of every line in the
directory; the index is built by streaming all files
once at :meth:`JsonlSink.open` and then kept up to date by reading only the
bytes appended since (by this or any other process). Writing an ``_id``
that is already in the index is a success without writing when the
``hash`` is equal, and :class:`~sinks.base.SinkConflict` (nothing written)
when it differs. So:

* a crash after the fsync but before the spool marks the part stored only
  means the flusher writes it again after the restart, and the index turns
  that into a no-op;
* a crash in the middle of a write leaves at most one incomplete last line.
  Such a torn line is removed (the file is truncated after the last
  ``\\n``) by the next process that holds the write lock (below): at open
  when the lock is free, and before every write. Its ``_id`` is not in the
  index, so the retried write appends it whole. A trailing line that is
  complete JSON but lacks only its ``\\n`` is kept and terminated;
* a failed write (``ENOSPC``, an ``fsync`` error) is truncated back to the
  previous size; if even that fails, the next write's catch-up (under the
  lock) indexes or repairs what is left;
* a line this process did not write itself (another process may have died
  between its ``write`` and its ``fsync``) is not trusted as stored until
  its file has been fsynced: before a write answers from the index (a
  duplicate, or a conflict), every file with lines this process has not
  seen fsynced is fsynced, once;
* if today's file is deleted or renamed while the sink is open, the next
  write notices (``fstat`` of the open file against ``stat`` of its path,
  under the lock) and appends to a new file at the expected path, never to
  the old inode. The index knows each file it read by its inode too: a
  file at that name made anew by another writer is read from its start
  (the index is rebuilt), not from where the old one ended.

If the directory keeps changing while it is read (files vanishing between
listing and reading, three times in a row), a write or query raises
:class:`~sinks.base.SinkUnavailable` and the index is left as it was, to be
rebuilt by the next attempt: a partial index never answers "stored already".

The write lock
--------------
Every write and every repair holds an exclusive ``flock`` on
``<dir>/.audit-jsonl.lock`` (``LOCK_NAME``), the file at that path now (a
directory moved away and made anew is locked through its new lock file, not
the one this sink opened first), and before appending reads what
other processes appended since this one last looked. So ``server.py drain``
(or any second writer) beside a running server waits for the lock (at most
``LOCK_WAIT_SECONDS``, then :class:`~sinks.base.SinkUnavailable`, which the
flusher retries) and then writes without duplicating the server's lines.
A process that finds the lock taken at open (``server.py drain`` while the
server is appending a part) opens without repairing: the line being written
looks torn, and is only skipped when reading. ``server.py verify`` opens the
sink read only (``readonly=True``): it creates nothing (not the directory,
not the lock file), takes no lock and never repairs; a torn last line is
skipped and reported in the log. Files edited by hand are not
supported; a reader that wants to be safe anyway deduplicates by ``_id``
and keeps the first line with each ``_id`` (equal ``_id`` implies equal
content unless the ``hash`` differs, which a verifier should report), e.g.::

    jq -c 'select(.type == "session_part")' audit-*.jsonl | \\
        jq -sc 'unique_by(._id)[]'

Lines are in the order they were written, which is the flusher's order
(security events first, then parts oldest first), not strictly by time.

Names it does not follow
------------------------
Every day file and the lock file is opened with ``O_NOFOLLOW`` and
``O_NONBLOCK`` and must ``fstat`` as a regular file; the listing uses
``lstat``. An ``audit-*.jsonl`` name (or the lock file) that is a symlink,
a FIFO or anything but a regular file makes ``open``, writes and queries
raise :class:`~sinks.base.SinkUnavailable` naming it, until an operator
moves it away. Otherwise a member of a group-writable directory could
point a day file at a file of the sink's user and have a repair cut off
its "torn" last line, or hang the sink on a FIFO; and skipping the name
would silently drop its ``_id`` values from the duplicate index.

Memory and queries
------------------
Nothing holds whole documents: files are streamed line by line, and the
index keeps per line only digests of its ``_id`` and ``hash`` and its
location (file and byte offset, packed into one int for a part), plus the
few fields the admin queries sort and filter on (a session's first and
last part's summary fields; an event's ``ts`` and ``action``). A query
reads only the lines of the page it returns. Memory grows with the number
of stored documents, not with their size: some 550 bytes per one-part
session by tracemalloc (RSS: +132 MB for 200,000 sessions in 284 MB of
files; it was +197 MB while the index kept the strings and a few tuples per
session). ``open`` still parses every line (some 5 s there).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import heapq
import json
import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from audit.spool import loose_dir, make_private_dirs, unsafe_dir

from .base import (
    Doc,
    Sink,
    SinkConflict,
    SinkRejected,
    SinkUnavailable,
    SinkUnreadable,
    decode_cursor,
    dumps,
    encode_cursor,
    event_count,
    lone_surrogate,
    odd_part,
)

log = logging.getLogger(__name__)

PART = "session_part"
SECURITY = "security_event"
LOCK_NAME = ".audit-jsonl.lock"  # not an audit-*.jsonl file
LOCK_WAIT_SECONDS = 10.0  # a writer holds the lock for one append, then lets go

T = TypeVar("T")
# Security events read per query when verify walks them all.
EVENTS_PAGE = 1000
_Reader = Callable[[int, int], Doc]  # (file number, offset) -> the parsed line


# Characters JSON leaves raw inside a string that make a line read as
# something else than it holds, written as JSON escapes (they read back as
# the same characters), as the log lines write them: U+0085, U+2028 and
# U+2029, which str.splitlines() (and JavaScript before ES2019) takes for
# line breaks (a client's text holding one, in a client event's details or a
# username tried at login, split its record in two for such a reader,
# neither piece JSON); the other C1 controls (8-bit terminal escapes: U+009B
# is CSI, to a terminal shown `cat audit-*.jsonl`); the bidirectional
# controls (Trojan Source).
_ESCAPED = [*range(0x80, 0xA0), 0x061C, 0x200E, 0x200F, *range(0x2028, 0x202F),
            *range(0x2066, 0x206A)]
_TO_ESCAPE = re.compile("[" + "".join(map(chr, _ESCAPED)) + "]")
_ESCAPES = [(chr(c), f"\\u{c:04x}") for c in _ESCAPED]


def _line(doc: Doc, kind: str) -> bytes:
    body = dict(doc)
    body["type"] = kind
    text = dumps(body)
    if _TO_ESCAPE.search(text):  # rare: one scan of the line otherwise
        for char, escape in _ESCAPES:
            if char in text:
                text = text.replace(char, escape)
    return (text + "\n").encode()


def _strip(doc: Doc) -> Doc:
    doc = dict(doc)
    doc.pop("type", None)
    return doc


def _not_a_file(path: Path) -> SinkUnavailable:
    """Why the sink stops at a name it would read, repair or lock that is not
    a regular file of its own.

    Whoever may write to the directory (a group member, where the sink only
    warns about group write) can plant ``audit-2000-01-01.jsonl`` as a
    symlink to another file, whose "torn" last line a repair would cut off,
    or as a FIFO, whose ``open`` never returns. Skipping the name instead
    would also drop its lines' ``_id`` values from the duplicate index, so the
    sink refuses to open (and to write, or answer a query) until an
    operator has looked.
    """
    return SinkUnavailable(
        f"jsonl sink: {path.parent.name}/{path.name} is a symbolic link or not a regular"
        " file; the sink neither follows nor reads it: move it away (someone who may"
        " write to the directory may have planted it)"
    )


def _open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` of a regular file at ``path`` itself, never through a symlink.

    ``O_NOFOLLOW`` refuses a symlink (``ELOOP``); ``O_NONBLOCK`` makes a FIFO
    fail (write side, ``ENXIO``) or return at once (read side) instead of
    hanging; ``fstat`` then requires a regular file, on the descriptor the
    caller will use, so a swap after any earlier ``stat`` is caught too.
    Raises :class:`SinkUnavailable` (see :func:`_not_a_file`) for anything
    else; other errors (``FileNotFoundError``) as ``os.open`` raised them.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise _not_a_file(path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_a_file(path)
        os.set_blocking(fd, True)  # a regular file: blocking is what it was always meant to be
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sizes(directory: Path) -> dict[str, tuple[int, int, int]]:
    """``(size, st_dev, st_ino)`` of every ``audit-*.jsonl`` file in ``directory``
    (one ``scandir``).

    A name of that pattern that is not a regular file (a symlink, even to a
    regular file; a FIFO; a directory) raises :class:`SinkUnavailable`: see
    :func:`_not_a_file`.
    """
    out: dict[str, tuple[int, int, int]] = {}
    with os.scandir(directory) as it:
        for entry in it:
            name = entry.name
            if name.startswith("audit-") and name.endswith(".jsonl"):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        raise _not_a_file(directory / name)
                    out[name] = (st.st_size, st.st_dev, st.st_ino)
    return out


def _intern(value: Any) -> Any:
    """One copy of a string of a small set (users, actions, seal reasons)."""
    return sys.intern(value) if isinstance(value, str) and len(value) <= 64 else value


class _Stale(Exception):
    """A line is not where the index says: the files changed behind our back."""


def _digest(value: str) -> bytes:
    """What the index keeps of an ``_id`` or a ``hash``: 16 bytes of BLAKE2b.

    The strings themselves (a part's ``_id`` and a 64-character hex hash) cost
    some 200 bytes per stored line as dict keys and values; two 16-byte
    digests cost under 100. Duplicate and conflict checks only ask "is this
    ``_id`` stored, and with this ``hash``?", which equal digests answer
    unless two values collide in 128 bits (at 10^9 lines, about 10^-21).
    ``surrogatepass``: JSON may hold a lone surrogate, which plain UTF-8
    cannot encode.
    """
    return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest()


# A part's location as one int: (part << _PART_SHIFT) | (file number << 48) | offset.
# One int (36 bytes) instead of a tuple of three and an offset int (~100);
# ints sort by part first, as get_session_parts wants them. A part number
# may be negative in a file edited by hand: ``>>`` and ``&`` still undo it.
_OFFSET_BITS = 48  # 256 TiB per day file
_FILE_BITS = 24  # 16 million day files
_PART_SHIFT = _OFFSET_BITS + _FILE_BITS


def _pack(part: int, no: int, offset: int) -> int:
    if not (0 <= offset < 1 << _OFFSET_BITS and 0 <= no < 1 << _FILE_BITS):
        raise SinkUnavailable(f"jsonl sink: file {no} at byte {offset} is past what it indexes")
    return (part << _PART_SHIFT) | (no << _OFFSET_BITS) | offset


def _unpack(loc: int) -> tuple[int, int, int]:
    """``(part, file number, offset)`` of a :func:`_pack` ed location."""
    return (loc >> _PART_SHIFT, (loc >> _OFFSET_BITS) & ((1 << _FILE_BITS) - 1),
            loc & ((1 << _OFFSET_BITS) - 1))


class _Session:
    """What the queries need of one session: no events, no documents.

    One flat object per session (it was an object, two tuples, a list and a
    tuple per part: some 400 bytes more, per stored session, for as long as
    the sink runs): the lowest part's user and start (``head_part``), the
    highest part's summary fields (``tail_part``), and the parts' locations,
    a bare int for the usual session of one part.
    """

    __slots__ = ("duration", "end", "event_count", "final", "head_part", "locs", "seal",
                 "start", "tail_part", "user")

    def __init__(self, part: int, doc: Doc, count: int, loc: int) -> None:
        self.head_part = self.tail_part = part
        self.user = _intern(doc.get("user"))
        self.start = doc.get("session_start_time")
        self._set_tail(doc)
        self.event_count = count
        self.locs: int | tuple[int, ...] = loc

    def _set_tail(self, doc: Doc) -> None:
        self.final = doc.get("final", False)
        self.end = doc.get("session_end_time")
        self.duration = doc.get("session_duration_seconds")
        self.seal = _intern(doc.get("seal_reason"))

    def add(self, part: int, doc: Doc, count: int, loc: int) -> None:
        """Another part (the first line of each ``_id`` only, as in a reader)."""
        if part < self.head_part:
            self.head_part = part
            self.user = _intern(doc.get("user"))
            self.start = doc.get("session_start_time")
        if part >= self.tail_part:
            self.tail_part = part
            self._set_tail(doc)
        self.event_count += count
        self.locs = (*self.locations(), loc)

    def locations(self) -> tuple[int, ...]:
        """Every stored part's :func:`_pack` ed location, in the order indexed."""
        return self.locs if isinstance(self.locs, tuple) else (self.locs,)

    def summary(self, session_id: str) -> Doc:
        """As :func:`sinks.base.summarize_parts` of the session's stored parts."""
        final = self.final
        return {
            "session_id": session_id,
            "user": self.user,
            "state": "stored" if final else "pending",
            "session_start_time": self.start,
            "session_end_time": self.end if final else None,
            "session_duration_seconds": self.duration if final else None,
            "event_count": self.event_count,
            "seal_reason": self.seal if final else None,
            "parts": len(self.locations()),
        }


class _Index:
    """The sink's view of its directory, built from complete lines only."""

    def __init__(self) -> None:
        self.names: list[str] = []  # file number -> file name
        self.numbers: dict[str, int] = {}
        self.seen: dict[str, int] = {}  # file name -> bytes indexed (whole lines)
        # file name -> (st_dev, st_ino) of the file those bytes were read from:
        # a file made anew at the name (today's file moved away, then another
        # writer appended) is another file, read from its start.
        self.files: dict[str, tuple[int, int]] = {}
        self.ids: dict[bytes, bytes] = {}  # _digest(_id) -> _digest(hash)
        self.synced: dict[str, int] = {}  # file name -> bytes known fsynced
        self.sessions: dict[str, _Session] = {}
        self.events: list[tuple[Any, Any, Any, int, int]] = []  # (ts, _id, action, file, offset)
        # Later lines with a known _id: (_id, kind, file, offset). The sink never
        # writes one; conflicting_copies compares each with the first copy.
        self.repeats: list[tuple[str, Any, int, int]] = []
        self.more_repeats = 0  # ... past the 10,000 kept: not compared, but counted
        # Lines that are no document the index can place (not JSON; no _id;
        # no known type; a part without its session id, number and start
        # time, a security event without its time and a string _id): (file,
        # offset, why), the first
        # 10,000, and how many more. Queries and verify never see them; a
        # reader of the files may take them.
        self.unplaced: list[tuple[int, int, str]] = []
        self.more_unplaced = 0

    def number(self, name: str) -> int:
        no = self.numbers.get(name)
        if no is None:
            no = self.numbers[name] = len(self.names)
            self.names.append(name)
        return no

    def stored_hash(self, doc_id: str) -> bytes | None:
        """``_digest`` of the ``hash`` stored with ``doc_id``, if it is stored."""
        return self.ids.get(_digest(doc_id))

    def unplace(self, no: int, offset: int, why: str) -> None:
        """Note a line the index cannot place (see ``unplaced``)."""
        if len(self.unplaced) < 10_000:
            self.unplaced.append((no, offset, why))
        else:
            self.more_unplaced += 1

    def add(self, doc: Doc, kind: Any, no: int, offset: int) -> None:
        """Index one line (the first line with an ``_id`` wins, as in a reader)."""
        doc_id = str(doc["_id"])
        key = _digest(doc_id)
        if key in self.ids:
            if len(self.repeats) < 10_000:
                self.repeats.append((doc_id, kind, no, offset))
            else:
                self.more_repeats += 1
            return
        self.ids[key] = _digest(str(doc.get("hash")))
        if kind not in (PART, SECURITY):
            self.unplace(no, offset, f"a line of type {kind!r}, neither {PART!r} nor {SECURITY!r}")
        elif kind == PART:
            sid, part = doc.get("session_id"), doc.get("part")
            # Listings sort and filter by the start time, and the admin API
            # merges them with the spool's: a part without one as a string
            # (an int, null) made every listing a 500.
            if (not isinstance(sid, str) or not isinstance(part, int)
                    or not isinstance(doc.get("session_start_time"), str)):
                self.unplace(no, offset, "a session part without a string session_id,"
                             " an integer part and a string session_start_time")
                return
            count = event_count(doc)
            loc = _pack(part, no, offset)
            s = self.sessions.get(sid)
            if s is None:
                self.sessions[sid] = _Session(part, doc, count, loc)
            else:
                s.add(part, doc, count, loc)
        else:
            ts = doc.get("ts")
            # Sorted by (ts, _id): an _id of another type beside a string at
            # the same ts made the listing a 500.
            if isinstance(ts, str) and isinstance(doc["_id"], str):
                self.events.append((ts, doc["_id"], _intern(doc.get("action")), no, offset))
            else:
                self.unplace(no, offset, "a security event without a string ts and _id")


class JsonlSink(Sink):
    """Append-only daily JSONL files; queries answered from a small index."""

    type = "jsonl"
    queryable = True
    raw_events = True

    def __init__(self, dir: Path | str, *, clock: Callable[[], float] = time.time,
                 readonly: bool = False) -> None:
        self.dir = Path(dir)
        self._clock = clock
        # Read only (verify): the sink must not change what it checks. It
        # creates nothing (no directory, no lock file), takes no lock and
        # repairs nothing: a torn last line is skipped and reported; writes
        # are refused.
        self.readonly = readonly
        self._torn_reported: set[tuple[str, int]] = set()  # (file, offset), read only
        self._index: _Index | None = None
        self._lock = asyncio.Lock()  # one write at a time in this event loop
        self._writing = threading.Lock()  # ... and in this sink's threads
        self._mu = threading.Lock()  # guards _index (threads read and extend it)
        self._lock_fd: int | None = None
        # Set by close(): a write waiting for another process's lock gives up
        # (the shutdown's window is short; the part stays pending).
        self._closing = threading.Event()
        self._file: IO[bytes] | None = None
        self._file_name: str | None = None
        self._dir_synced: str | None = None  # the day file whose directory entry is fsynced
        self._rebuild = False  # the last catch-up gave up: start the next afresh
        # How often the index was thrown away and rebuilt because the files
        # were not what it said (a file shrank or vanished; a line was not
        # at its offset). Never in normal operation: a test asserts it.
        self.rebuilds = 0

    # -- the index ---------------------------------------------------------

    def _scan_file(self, index: _Index, path: Path, start: int, repair: bool) -> int:
        """Index the whole lines of ``path`` from ``start``; the new end offset.

        An incomplete last line is left alone (a writer may be appending it)
        unless ``repair``, which the holder of the write lock passes.
        """
        no = index.number(path.name)
        pos = start
        with os.fdopen(_open_regular(path, os.O_RDONLY), "rb") as f:
            st = os.fstat(f.fileno())
            index.files[path.name] = (st.st_dev, st.st_ino)
            f.seek(start)
            for raw in f:
                if not raw.endswith(b"\n"):
                    if repair:
                        pos = self._repair(index, path, no, pos, raw, os.fstat(f.fileno()))
                    elif self.readonly and (path.name, pos) not in self._torn_reported:
                        # Once per tail: every query's catch-up reads it again.
                        self._torn_reported.add((path.name, pos))
                        log.warning(
                            "%s: the last %d bytes from byte %d are not a complete line"
                            " (a write in progress, or a crash during one): not read;"
                            " the next writer removes them",
                            path.name, len(raw), pos,
                        )
                    break
                try:
                    # Decoded first: json.loads of bytes takes the UTF-8-like
                    # bytes of a lone surrogate, which no answer can encode.
                    text = raw.decode("utf-8")
                    doc = json.loads(text)
                    if lone_surrogate(text, doc):
                        raise ValueError("a lone surrogate")
                except (ValueError, RecursionError):  # nested past the parser's stack too
                    log.warning("%s at byte %d: not JSON (or not UTF-8), ignored", path.name,
                                pos)
                    index.unplace(no, pos, "a line that is not JSON (or not UTF-8)")
                else:
                    if isinstance(doc, dict) and "_id" in doc:
                        index.add(doc, doc.get("type"), no, pos)
                    else:
                        index.unplace(no, pos, "a line that is not an object with an _id")
                pos += len(raw)
        return pos

    def _repair(self, index: _Index, path: Path, no: int, pos: int, fragment: bytes,
                scanned: os.stat_result) -> int:
        """End ``path`` with a complete line (under the write lock only).

        ``scanned`` is the ``fstat`` of the file the fragment was read from:
        the file opened for writing must be that one, not whatever the name
        was swapped for meanwhile (``_Stale``: everything is read again).
        """
        try:
            obj = json.loads(fragment)
            complete = isinstance(obj, dict) and "_id" in obj
        except (ValueError, RecursionError):
            complete = False
        f: IO[bytes]
        try:
            f = os.fdopen(_open_regular(path, os.O_RDWR), "r+b")
            append_only = False
        except PermissionError:
            # An append-only file (``chattr +a``, a hardening of audit logs)
            # opens for appending only, and takes no truncate: the sink then
            # could neither open nor write, for good. Its torn line is ended
            # instead, and stays as a line that is not JSON (verify reports
            # it). A file that takes no append either raises as before.
            f = os.fdopen(_open_regular(path, os.O_WRONLY | os.O_APPEND), "ab")
            append_only = True
        with f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != (scanned.st_dev, scanned.st_ino):
                raise _Stale
            if complete or append_only:
                if complete:
                    log.warning("%s: last line lacked its newline; terminated it", path.name)
                else:
                    log.warning(
                        "%s: a torn last line of %d bytes (crash during a write), in a file"
                        " that takes no truncate (append-only): ended it with a newline; it"
                        " stays, as a line that is not JSON", path.name, len(fragment))
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                log.warning(
                    "%s: removed a torn last line of %d bytes (crash during a write)",
                    path.name,
                    len(fragment),
                )
                f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
        end = pos + len(fragment) + 1 if complete or append_only else pos
        index.synced[path.name] = end  # the fsync covered every byte before it
        if complete:
            index.add(obj, obj.get("type"), no, pos)
        elif append_only:
            index.unplace(no, pos, "a line that is not JSON (or not UTF-8)")
        return end

    def _catch_up(self, repair: bool, fresh: bool = False) -> _Index:
        """Bring the index up to the files (caller holds ``_mu``).

        Only bytes appended since the last look are read. A file that shrank
        or vanished (edited by hand; another process's failed write undone)
        rebuilds the index from scratch. If the files still change under
        the rebuild after three tries, :class:`SinkUnavailable` (retryable)
        and ``_index`` is kept as it was (the next call starts afresh): a
        partial index must never answer a duplicate check.
        """
        fresh = fresh or self._rebuild or self._index is None
        index = _Index() if fresh else self._index
        assert index is not None
        rebuilt = fresh
        for _ in range(3):
            sizes = _sizes(self.dir)
            # Gone, or another file at the name now (moved away, made anew):
            stale = any(name not in sizes or sizes[name][1:] != index.files.get(name)
                        for name in index.seen)
            for name in sorted(sizes) if not stale else ():
                size, start = sizes[name][0], index.seen.get(name)
                if size == start:
                    continue
                if start is not None and size < start:
                    stale = True
                    break
                try:
                    index.seen[name] = self._scan_file(index, self.dir / name, start or 0, repair)
                except (FileNotFoundError, _Stale):
                    stale = True
                    break
                except BaseException:
                    # Lines of this file may be in the index already, its
                    # ``seen`` not yet: reading them again would add them twice.
                    self._rebuild = True
                    raise
            if not stale:
                if rebuilt:
                    # Today's file may be another inode now: reopen it.
                    self._close_file()
                self._index, self._rebuild = index, False
                return index
            log.warning("%s: a file shrank or went away; re-reading them all", self.dir.name)
            self.rebuilds += 1
            index, rebuilt = _Index(), True
        self._rebuild = True
        raise SinkUnavailable(f"jsonl sink: {self.dir.name} keeps changing while it is read")

    def _sync_indexed(self, index: _Index) -> None:
        """fsync every file with indexed lines not known to be fsynced.

        Lines another process appended (or that were there at open) may
        have been written by one that died before its ``fsync``: they are
        trusted as stored only once their file has been fsynced (by us).
        Caller holds the write lock and ``_mu``; once per file per process
        in normal operation.
        """
        for name, seen in index.seen.items():
            if index.synced.get(name, 0) >= seen:
                continue
            fd = _open_regular(self.dir / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            index.synced[name] = seen

    # -- the write lock ----------------------------------------------------

    def _acquire(self, wait: float) -> bool:
        """Take the directory's write lock (``flock``), waiting up to ``wait`` s.

        The lock is the one of the file now at ``<dir>/LOCK_NAME``: if the
        directory was moved away and made anew (or remounted) since this
        sink opened its lock file, a lock on the old file would exclude no
        writer that opened the new one, and a repair here could cut off the
        line that writer is appending.
        """
        deadline = time.monotonic() + wait
        pause = 0.001
        while True:
            if self._lock_fd is None:
                # Not through a symlink either: O_CREAT would create its target.
                self._lock_fd = _open_regular(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline or self._closing.is_set():
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            if self._lock_is_current():
                return True
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # (its lock goes with it)

    def _lock_is_current(self) -> bool:
        """Whether the open lock file is still the one at its path."""
        assert self._lock_fd is not None
        try:
            st = os.lstat(self.dir / LOCK_NAME)
        except FileNotFoundError:
            return False
        fst = os.fstat(self._lock_fd)
        return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

    def _release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- lifecycle ---------------------------------------------------------

    def _open_read_only(self) -> None:
        """Index the files as they are: nothing created, locked or repaired.

        A directory others may write to is a warning here, not a refusal:
        reading it changes nothing, and verify checks what it reads against
        the audit key anyway.
        """
        if not self.dir.is_dir():
            raise SinkUnavailable(f"jsonl sink: {self.dir} does not exist or is not a directory")
        for problem in (unsafe_dir(self.dir), loose_dir(self.dir)):
            if problem is not None:
                log.warning("jsonl sink: %s", problem)
        with self._mu:
            self._catch_up(repair=False, fresh=True)

    def _open_sync(self) -> None:
        if self.readonly:
            self._open_read_only()
            return
        make_private_dirs(self.dir)
        unsafe = unsafe_dir(self.dir)
        if unsafe is not None:  # another user could swap or plant day files
            raise SinkUnavailable(f"jsonl sink: {unsafe}")
        loose = loose_dir(self.dir)
        if loose is not None:
            log.warning("jsonl sink: %s", loose)
        with self._mu:
            self._catch_up(repair=False, fresh=True)  # the long scan, without the lock
        with self._writing:
            try:
                locked = self._acquire(0)
            except OSError as exc:  # e.g. a directory this user may only read
                log.info("%s: no write lock (%s); not repairing", self.dir.name, exc)
                return
            if not locked:
                log.info("%s: another process is writing; not repairing", self.dir.name)
                return
            try:
                with self._mu:
                    self._catch_up(repair=True)  # only the tails, now
            finally:
                self._release()

    async def open(self) -> None:
        self._closing.clear()
        async with self._lock:
            try:
                await asyncio.to_thread(self._open_sync)
            except (OSError, SinkUnavailable) as exc:
                with self._mu:
                    self._index = None
                if isinstance(exc, SinkUnavailable):
                    raise
                raise SinkUnavailable(f"jsonl sink: cannot open {self.dir.name}: {exc}") from exc

    def _close_sync(self) -> None:
        with self._writing, self._mu:
            self._index = None
            f, self._file, self._file_name = self._file, None, None
            fd, self._lock_fd = self._lock_fd, None
            try:
                if f is not None:
                    f.close()
            finally:
                if fd is not None:
                    os.close(fd)

    async def close(self) -> None:
        # Before the lock: a write holding it may be waiting for another
        # process's flock (up to LOCK_WAIT_SECONDS), and would hold the
        # shutdown that long.
        self._closing.set()
        async with self._lock:
            await asyncio.to_thread(self._close_sync)

    # -- writing -----------------------------------------------------------

    def _close_file(self) -> None:
        f, self._file, self._file_name = self._file, None, None
        self._dir_synced = None  # a file opened anew may be a new directory entry
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def _file_is_current(self, path: Path) -> bool:
        """Whether the open file is still the one at ``path`` (not deleted or renamed)."""
        assert self._file is not None
        try:
            st = os.lstat(path)  # a symlink, even to the open file, is not it
        except FileNotFoundError:
            return False
        fst = os.fstat(self._file.fileno())
        return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

    def _append(self, data: bytes) -> tuple[str, int]:
        """Append ``data`` to today's file and fsync; undo on failure.

        Returns the file's name and the offset ``data`` starts at. Caller
        holds the write lock, so nobody else appends meanwhile.
        """
        name = f"audit-{datetime.fromtimestamp(self._clock(), tz=UTC):%Y-%m-%d}.jsonl"
        path = self.dir / name
        if self._file is not None and (self._file_name != name or not self._file_is_current(path)):
            if self._file_name == name:
                log.warning("%s: %s was deleted or renamed; starting it anew", self.dir.name, name)
            self._close_file()
        if self._file is None:
            # The owner's only: the audit trail is no one else's to read.
            self._file = os.fdopen(_open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT),
                                   "ab")
            self._file_name = name
        if self._dir_synced != name:
            # The file's directory entry, once per file and process (whoever
            # created it: a crash, or a failed fsync, may have left it unsynced).
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._dir_synced = name
        f = self._file
        start = f.seek(0, os.SEEK_END)
        try:
            # Past the file object's buffer: of a write the disk cut short
            # (full, RLIMIT_FSIZE) the rest would stay buffered, and
            # truncate() below, flushing it first, would fail the same way.
            fd, view = f.fileno(), memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            # If the truncate fails too, the next write's catch-up (under the
            # lock) indexes the lines that made it or repairs a torn one.
            with contextlib.suppress(OSError, ValueError):
                f.truncate(start)
                os.fsync(f.fileno())
            with contextlib.suppress(OSError):
                f.close()
            self._file, self._file_name = None, None
            raise
        return name, start

    def _write_sync(self, docs: list[Doc], kind: str) -> None:
        with self._writing:
            try:
                if not os.path.lexists(self.dir):
                    # Removed while the sink ran (a cleanup of shipped files
                    # gone too far): made anew as ``open`` would, not
                    # "cannot lock ...: No such file or directory" at every
                    # write until someone made it by hand or restarted.
                    log.warning("%s was removed; making it anew", self.dir.name)
                    make_private_dirs(self.dir)
                locked = self._acquire(LOCK_WAIT_SECONDS)
            except OSError as exc:
                raise SinkUnavailable(f"jsonl sink: cannot lock {self.dir.name}: {exc}") from exc
            if not locked:
                raise SinkUnavailable(
                    f"jsonl sink: {self.dir.name} is locked by another writer"
                    f" for more than {LOCK_WAIT_SECONDS:g} s"
                )
            try:
                with self._mu:
                    self._write_locked(docs, kind)
            finally:
                self._release()

    def _write_locked(self, docs: list[Doc], kind: str) -> None:
        if self._index is None:
            raise SinkUnavailable("jsonl sink is not open")
        # What other processes appended since we last looked, and any torn
        # tail a crashed writer left: nobody else is writing now.
        index = self._catch_up(repair=True)
        stored = [index.stored_hash(str(doc["_id"])) for doc in docs]
        if any(known is not None for known in stored):
            # The answer comes from lines that may not be on disk yet.
            self._sync_indexed(index)
        new: dict[str, Doc] = {}
        for doc, known in zip(docs, stored, strict=True):
            doc_id, h = str(doc["_id"]), _digest(str(doc["hash"]))
            if known is None and doc_id in new:
                known = _digest(str(new[doc_id]["hash"]))
            if known is None:
                new[doc_id] = doc
            elif known != h:
                raise SinkConflict(f"{doc_id} is stored with a different hash")
        if not new:
            return
        try:
            lines = [_line(d, kind) for d in new.values()]
        except (TypeError, ValueError) as exc:
            raise SinkRejected(f"jsonl sink: not JSON serialisable: {exc}") from exc
        data = b"".join(lines)
        name, start = self._append(data)
        # The fsync covered the whole file, including lines not read yet.
        index.synced[name] = max(index.synced.get(name, 0), start + len(data))
        if index.seen.get(name, 0) != start:
            return  # bytes we have not read precede ours: the next catch-up reads both
        if name not in index.files:  # a file new to the index: the one just appended to
            assert self._file is not None
            st = os.fstat(self._file.fileno())
            index.files[name] = (st.st_dev, st.st_ino)
        no = index.number(name)
        pos = start
        for doc, raw in zip(new.values(), lines, strict=True):
            index.add(doc, kind, no, pos)
            pos += len(raw)
        index.seen[name] = pos

    async def _write(self, docs: list[Doc], kind: str) -> None:
        if self._index is None:
            raise SinkUnavailable("jsonl sink is not open")
        if self.readonly:
            raise SinkUnavailable("jsonl sink is open read only")
        try:
            await asyncio.to_thread(self._write_sync, docs, kind)
        except OSError as exc:
            raise SinkUnavailable(f"jsonl sink: write failed: {exc}") from exc

    async def write_part(self, part: Doc) -> None:
        async with self._lock:
            await self._write([part], PART)

    async def write_security_events(self, events: list[Doc]) -> None:
        if not events:
            return
        async with self._lock:
            await self._write(events, SECURITY)

    # -- queries (from the index; only the returned lines are read) ---------

    def _read(self, index: _Index, files: dict[int, IO[bytes]], no: int, offset: int) -> Doc:
        """The line at ``offset`` of file ``no``, parsed (``_Stale`` if it is not one)."""
        f = files.get(no)
        if f is None:
            f = files[no] = os.fdopen(_open_regular(self.dir / index.names[no], os.O_RDONLY),
                                      "rb")
        f.seek(offset)
        raw = f.readline()
        try:
            doc = json.loads(raw)
        except ValueError:
            raise _Stale from None
        if not isinstance(doc, dict):
            raise _Stale
        return doc

    def _query(self, fn: Callable[[_Index, _Reader], T]) -> T:
        """``fn(index, read)`` on an index brought up to the files.

        ``read(file, offset)`` loads one indexed line. A line that is not
        where the index says (files edited behind the sink's back) re-reads
        everything once.
        """
        with self._mu:
            for attempt in range(2):
                if self._index is None:
                    raise SinkUnavailable("jsonl sink is not open")
                if attempt > 0:
                    # Not in normal operation: an offset bug would hide here.
                    log.warning("%s: a line was not where the index said; re-reading all",
                                self.dir.name)
                    self.rebuilds += 1
                index = self._catch_up(repair=False, fresh=attempt > 0)
                files: dict[int, IO[bytes]] = {}
                try:
                    return fn(index, functools.partial(self._read, index, files))
                except (_Stale, FileNotFoundError):
                    continue
                finally:
                    for f in files.values():
                        f.close()
        raise SinkUnavailable(f"jsonl sink: {self.dir.name} keeps changing under the reader")

    async def _run_query(self, fn: Callable[[_Index, _Reader], T]) -> T:
        if self._index is None:
            raise SinkUnavailable("jsonl sink is not open")
        try:
            return await asyncio.to_thread(self._query, fn)
        except OSError as exc:
            raise SinkUnavailable(f"jsonl sink: {exc}") from exc

    async def list_sessions(
        self,
        *,
        user: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Doc], str | None]:
        after: tuple[str, str] | None = None
        if cursor is not None:
            start, sid = decode_cursor(cursor)
            after = (start, sid)

        def query(index: _Index, read: _Reader) -> tuple[list[Doc], str | None]:
            def heads() -> Iterator[tuple[str, str]]:
                # Listed by its lowest stored part, not part 0 (as the sqlite
                # sink): verify must see a session whose part 0 went missing.
                for sid, s in index.sessions.items():
                    start = s.start or ""
                    if user is not None and s.user != user:
                        continue
                    if since is not None and start < since:
                        continue
                    if until is not None and start > until:
                        continue
                    if after is not None and (start, sid) >= after:
                        continue
                    yield start, sid

            top = heapq.nlargest(max(limit, 0) + 1, heads())
            out = [index.sessions[sid].summary(sid) for _, sid in top[:limit]]
            next_cursor = None
            if len(top) > limit and out:
                last = out[-1]
                next_cursor = encode_cursor(last["session_start_time"], last["session_id"])
            return out, next_cursor

        return await self._run_query(query)

    async def get_session_parts(self, session_id: str) -> list[Doc]:
        def query(index: _Index, read: _Reader) -> list[Doc]:
            s = index.sessions.get(session_id)
            if s is None:
                return []
            out = []
            for loc in sorted(s.locations()):  # by part first
                part, no, offset = _unpack(loc)
                doc = read(no, offset)
                if doc.get("session_id") != session_id or doc.get("part") != part:
                    raise _Stale
                if odd_part(doc):  # (a line another process appended: see odd_part)
                    raise SinkUnreadable(
                        f"jsonl sink: {index.names[no]}, byte {offset}: a part the admin"
                        " API cannot show (its events are not events with a seq)")
                out.append(_strip(doc))
            return out

        return await self._run_query(query)

    def _parts_numbered(self, session_id: str, numbers: Callable[[int], bool],
                        strip_events: bool) -> Callable[[_Index, _Reader], list[Doc]]:
        """A query for :meth:`get_session_parts` restricted to the parts whose
        number passes ``numbers``, each read alone (a part's line at a time)."""
        def query(index: _Index, read: _Reader) -> list[Doc]:
            s = index.sessions.get(session_id)
            out = []
            for loc in sorted(s.locations()) if s is not None else ():  # by part first
                part, no, offset = _unpack(loc)
                if not numbers(part):
                    continue
                doc = read(no, offset)
                if doc.get("session_id") != session_id or doc.get("part") != part:
                    raise _Stale
                if strip_events:
                    doc.pop("events", None)
                out.append(_strip(doc))
            return out

        return query

    async def session_part_heads(self, session_id: str) -> list[Doc]:
        """Each part's line is read and parsed, one at a time, and its events
        dropped: memory for one part, whatever the session's length."""
        return await self._run_query(self._parts_numbered(session_id, lambda _: True, True))

    async def session_part(self, session_id: str, part: Any) -> list[Doc]:
        return await self._run_query(
            self._parts_numbered(session_id, lambda n: n == part, False))

    async def conflicting_copies(self) -> list[tuple[str, str, str]]:
        """Later lines with a stored ``_id`` whose document differs from the
        first copy's in anything (its hash or not: whoever appends a line
        chooses its hash). The sink never writes a second line for an
        ``_id``; an identical one is harmless and not reported."""
        def query(index: _Index, read: _Reader) -> list[tuple[str, str, str]]:
            repeated = {doc_id for doc_id, *_ in index.repeats}
            firsts: dict[str, tuple[int, int]] = {}
            for doc_id in repeated:  # a part's _id is <session_id>:<part>
                sid, _, part = doc_id.rpartition(":")
                s = index.sessions.get(sid)
                for loc in s.locations() if s is not None else ():
                    number, no, offset = _unpack(loc)
                    if str(number) == part:
                        firsts[doc_id] = (no, offset)
            for _, doc_id, _, no, offset in index.events:
                if str(doc_id) in repeated:
                    firsts.setdefault(str(doc_id), (no, offset))
            out = []
            for doc_id, kind, no, offset in index.repeats:
                first = firsts.get(doc_id)
                if first is None or read(*first) != read(no, offset):
                    out.append((doc_id, "part" if kind == PART else "security event",
                                f"{index.names[no]}, byte {offset}"))
            return out

        if not (self._index and self._index.repeats):
            return []
        return await self._run_query(query)

    async def unchecked_records(self) -> list[str]:
        """The lines the index could not place, and the repeated ``_id`` lines
        past the 10,000 :meth:`conflicting_copies` compares: verify checked
        none of them, and a reader of the files (``jq``, a shipper) takes
        them as they are."""
        def query(index: _Index, read: _Reader) -> list[str]:
            out = [f"{index.names[no]}, byte {offset}: {why}"
                   for no, offset, why in index.unplaced]
            if index.more_unplaced:
                out.append(f"{index.more_unplaced} more lines that are no document of the sink")
            if index.more_repeats:
                out.append(f"{index.more_repeats} more lines with an _id stored already, not"
                           " compared with its first line (past the 10,000 that were)")
            return out

        return await self._run_query(query)

    async def session_ids(self) -> AsyncIterator[str]:
        """Every session with any stored part (from the index; no file is read)."""
        ids = await self._run_query(lambda index, read: list(index.sessions))
        for sid in ids:
            yield sid

    async def security_events_oldest_first(self) -> AsyncIterator[Doc]:
        """In file order: the order written, the security stream's chain
        order; read :data:`EVENTS_PAGE` at a time, each page yielded before
        the next is read (lines appended meanwhile come last)."""
        start = 0
        while True:
            def query(index: _Index, read: _Reader, start: int = start) -> list[Doc]:
                docs = []
                for _, eid, _, no, offset in index.events[start:start + EVENTS_PAGE]:
                    doc = read(no, offset)
                    if doc.get("_id") != eid:
                        raise _Stale
                    docs.append(_strip(doc))
                return docs

            docs = await self._run_query(query)
            for doc in docs:
                yield doc
            if len(docs) < EVENTS_PAGE:
                return
            start += len(docs)

    async def list_security_events(
        self,
        *,
        since: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Doc], str | None]:
        after: tuple[str, str] | None = None
        if cursor is not None:
            ts, eid = decode_cursor(cursor)
            after = (ts, eid)

        def query(index: _Index, read: _Reader) -> tuple[list[Doc], str | None]:
            def matching() -> Iterator[tuple[Any, Any, int, int]]:
                for ts, eid, action, no, offset in index.events:
                    if since is not None and ts < since:
                        continue
                    if kind is not None and action != kind:
                        continue
                    if after is not None and (ts, eid) >= after:
                        continue
                    yield ts, eid, no, offset

            top = heapq.nlargest(max(limit, 0) + 1, matching(), key=lambda e: (e[0], e[1]))
            docs = []
            for _, eid, no, offset in top[:limit]:
                doc = read(no, offset)
                if doc.get("_id") != eid:
                    raise _Stale
                docs.append(_strip(doc))
            next_cursor = None
            if len(top) > limit and docs:
                next_cursor = encode_cursor(docs[-1]["ts"], docs[-1]["_id"])
            return docs, next_cursor

        return await self._run_query(query)

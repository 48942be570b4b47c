"""The durable local spool: one SQLite file in WAL mode, one writer, group commit.

Everything that writes goes through :meth:`Spool.submit`: the job is queued,
the writer takes *every* job waiting and runs them in one transaction
(``BEGIN IMMEDIATE`` … ``COMMIT``, each job in its own savepoint), and each
caller is resolved only after that commit. With the queue empty the writer
sleeps on an event, not a timer, so a lone request pays one commit and no
wait. Reads use a second connection on a thread of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .events import event_hash, genesis
from .logthrottle import LogThrottle, failure_kind, more
from .metrics import Stats
from .store import SCHEMA, Limits, OpenSession, Writer, migrate, note_earlier_stretch
from .walcheck import dropped_commits, keep_copy

log = logging.getLogger("session_audit.spool")

T = TypeVar("T")
Job = Callable[[Writer], Any]
# What a job taken under spool_max_bytes is counted to add until its commit
# measures the file, unless its caller says more (a request of client events
# says its size): about one event's row and index entries (README: ~700
# bytes an event).
JOB_BYTES = 1024


class SpoolClosed(RuntimeError):
    """The spool is closed (or was never opened)."""


class SpoolFull(Exception):
    """The spool is at ``spool_max_bytes`` under ``on_spool_full = "reject"``."""


class SpoolUnavailable(Exception):
    """The spool could not commit (disk full, I/O error); nothing was recorded."""


# SQLite's primary result codes for a spool that cannot do its work now (no
# file descriptor or memory left, the disk full or failing), not a bug in a
# statement.
_RESOURCE_CODES = frozenset({sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
                             sqlite3.SQLITE_CANTOPEN})


class SpoolDamaged(SpoolUnavailable):
    """The spool file is damaged: SQLite found a page it cannot make sense of
    (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``: a bad disk, a bad copy, a file
    written over), or a text in it is not UTF-8 (which this server never
    writes). Not the caller's fault, nor a bug, and it does not pass."""


# SQLite's primary result codes for a file it finds damaged.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
# Python's sqlite3 raises this (an OperationalError with no SQLite code) for a
# TEXT value that is not UTF-8; the value follows it, and is left out.
_NOT_UTF8 = "Could not decode to UTF-8 column "


def damage(exc: BaseException, path: Path | None = None) -> SpoolDamaged | None:
    """``exc`` as :class:`SpoolDamaged` when it says the spool file is
    damaged, else None. The message never quotes the damaged text (a
    document's content, a password hash)."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    spool = "the audit spool" if path is None else f"the audit spool {path}"
    if code is not None and code & 0xFF in _DAMAGE_CODES:
        err = SpoolDamaged(f"{spool} is damaged: {text}")
    elif text.startswith(_NOT_UTF8):
        err = SpoolDamaged(f"{spool} is damaged: {forget_text(exc)}")
    else:
        return None
    err.__cause__ = exc
    return err


def without_text(exc: BaseException) -> str:
    """``str(exc)``, but of SQLite's "Could not decode to UTF-8 column 'x'
    with text '...'" only the column: the text it quotes is a damaged row's
    (a document's title, a session's user), not for a log or a terminal."""
    text = str(exc)
    if isinstance(exc, sqlite3.Error) and text.startswith(_NOT_UTF8):
        column = text[len(_NOT_UTF8):].split(" with text ", 1)[0][:80]
        return f"a text in column {column} is not UTF-8"
    return text


def forget_text(exc: BaseException) -> str:
    """:func:`without_text`, and ``exc`` says no more itself: it is the cause
    of what is raised for it, and a traceback logged of that (``reaper: ...
    failed``, ``log.exception``) printed the cause's words, the damaged text
    with them."""
    text = without_text(exc)
    if text != str(exc):
        exc.args = (text,)
    return text


def resource_failure(exc: BaseException) -> SpoolUnavailable | None:
    """``exc`` as :class:`SpoolUnavailable` when SQLite raised it for want of
    a resource, or as :class:`SpoolDamaged` when it found the file damaged,
    else None.

    A job or a read may need a resource of its own: a change of a large
    document spills its statement journal to a temporary file, a listing
    opens its connection on first use. Out of file descriptors, such a job
    failed alone (the rest of its batch committed), as a 500
    ``internal_error`` with a traceback; it is the 503 ``audit_unavailable``
    of a spool that cannot write: nothing done, nothing recorded."""
    if (damaged := damage(exc)) is not None:
        return damaged
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _RESOURCE_CODES:
        err = SpoolUnavailable(f"the audit spool cannot do this now: {exc}")
        err.__cause__ = exc
        return err
    return None


# The spool's layout, in its PRAGMA user_version: a release that changes the
# layout in a way this code would misread raises it. A spool of a later
# layout is refused (:class:`SpoolNewer`) rather than half understood.
LAYOUT = 1


class SpoolNewer(SpoolUnavailable):
    """The spool was written by a later release (its layout is newer)."""


class AuditKeyMismatch(Exception):
    """The audit key is not the one the spool's chains were made with: a lost
    ``audit.key`` made anew, or another ``SESSION_AUDIT_AUDIT_KEY``. Chaining
    on under it would leave sessions no key verifies."""


_KEY_CHECK_LABEL = b"session-audit: the audit key of this spool"


def key_check(key: bytes) -> str:
    """What the spool keeps to recognise its key (an HMAC of a fixed label:
    it tells keys apart and gives nothing of the key away)."""
    return hmac.new(key, _KEY_CHECK_LABEL, hashlib.sha256).hexdigest()


def stored_key_check(conn: sqlite3.Connection) -> str | None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
    except sqlite3.OperationalError:  # no meta table: a spool not made yet
        return None
    return str(row[0]) if row else None


def _made_with(conn: sqlite3.Connection, key: bytes) -> bool | None:
    """Whether the chain state in a spool from before the key check was made
    with ``key``, by the first of these it holds (None: none of them):

    * a session's first event, which continues its genesis value;
    * an open session before its first cut, whose chain head is that value;
    * an open session's next uncut event, which continues its last cut;
    * a pending part's first event, which continues its ``prev_hash``;
    * two security events in a row (the second continues the first).
    """
    def continues(prev: str, text: str) -> bool:
        event = json.loads(text)
        return bool(event_hash(key, prev, event) == event.get("hash"))

    row = conn.execute("SELECT session_id, json FROM events WHERE seq = 1 LIMIT 1").fetchone()
    if row is not None:
        return continues(genesis(key, row[0]), row[1])
    row = conn.execute("SELECT session_id, cut_hash FROM sessions"
                       " WHERE state = 'open' AND cut_seq = 0 LIMIT 1").fetchone()
    if row is not None:
        return bool(genesis(key, row[0]) == row[1])
    row = conn.execute(
        "SELECT s.cut_hash, e.json FROM sessions s JOIN session_events e"
        " ON e.sk = s.sk AND e.seq = s.cut_seq + 1 WHERE s.state = 'open' LIMIT 1").fetchone()
    if row is None:
        row = conn.execute(
            "SELECT p.prev_hash, e.json FROM parts p JOIN sessions s USING (session_id)"
            " JOIN session_events e ON e.sk = s.sk AND e.seq = p.first_seq"
            " WHERE p.state != 'stored' LIMIT 1").fetchone()
    if row is not None:
        return continues(row[0], row[1])
    # Ids in a row are appends in a row (AUTOINCREMENT, rolled back with its
    # transaction); rows between may be gone (stored and deleted).
    pair = conn.execute("SELECT a.json, b.json FROM security_events a JOIN security_events b"
                        " ON b.id = a.id + 1 LIMIT 1").fetchone()
    if pair is not None:
        return continues(json.loads(pair[0])["hash"], pair[1])
    return None


def check_key(conn: sqlite3.Connection, key: bytes, path: Path) -> None:
    """Refuse a key the spool's chains were not made with. The first open
    (of a new spool, or of one from before the check) records the key's
    check; a spool from before it is first held to one of its own events:
    a session's first event continues the chain from the session's genesis
    value, which only the right key gives (or other chain state it holds:
    :func:`_made_with`)."""
    want = key_check(key)
    have = stored_key_check(conn)
    if have is None:
        try:
            made = _made_with(conn, key)
        except sqlite3.Error as exc:
            if (damaged := damage(exc, path)) is None:
                raise
            raise damaged from exc
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise SpoolDamaged(
                f"the audit spool {path} is damaged: the text of an event the audit key"
                " is checked against is not an event's JSON") from exc
        if made is False:
            have = ""  # not this key's
        if have is None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('key_check', ?)"
                         " ON CONFLICT (key) DO NOTHING", (want,))
            have = stored_key_check(conn)  # another process may have been first
    if have is None or not hmac.compare_digest(have, want):
        raise AuditKeyMismatch(
            f"the audit key is not the one the chains in {path} were made with (a lost"
            " audit.key made anew, or another SESSION_AUDIT_AUDIT_KEY): restore that key;"
            " chaining on under this one would leave sessions no key verifies")


def check_writable(conn: sqlite3.Connection) -> None:
    """Raise SQLite's ``SQLITE_READONLY`` error if the spool cannot be
    written. SQLite opens a file it may not write (mode 0400, another
    owner, an immutable file or a read-only mount) read-only without a word,
    and a spool whose layout is current needs no write to open: ``serve``
    then said it was ready and answered every login 500 ``internal_error``,
    with a traceback in the log. The statement writes nothing (no row
    matches), but SQLite refuses it on a read-only file."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("UPDATE meta SET value = value WHERE 0")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def create_private(path: Path) -> None:
    """Create ``path`` (empty, mode 0600) unless it exists.

    SQLite creates a database file with the process umask (often 0644) and
    gives its -wal and -shm files the database file's mode: created first,
    they are all the owner's only, whatever the data directory's mode.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def open_lock(path: Path) -> int:
    """A descriptor of the lock file ``path`` (created 0600 if missing) for
    ``flock``, never through a symbolic link.

    A symlink planted at a lock file's name (by whoever may write to the
    data directory: its group, where it is group-writable) was followed:
    ``O_CREAT`` created its target, and the serve lock, which is truncated
    to take the server's pid, truncated whatever file of the server's user
    it named (the sqlite sink's database too). ``O_NOFOLLOW`` refuses a
    symlink, ``O_NONBLOCK`` a FIFO's wait; anything but a regular file is
    :class:`SpoolUnavailable`, in words."""
    fd = -1
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
    if fd >= 0:
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.set_blocking(fd, True)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise SpoolUnavailable(
        f"{path} is not a regular file (a symbolic link, a directory or a FIFO; whoever"
        f" may write to {path.parent} may have planted it): remove it, it is made anew")


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each owner-only (0700) whatever
    the umask (under ``umask 000`` ``mkdir(parents=True)`` makes them 0777: any
    local user could swap the files in them). Existing ones are left alone.

    The parent of each level created is fsynced: a new directory is an entry
    in its parent, and without that a power cut after the first durable
    write in it (a key, the spool's first commit) could take the directory
    away with what was written there. One created meanwhile by another
    process is its creator's to sync; one in a parent this account cannot
    read (only write) is left unsynced."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)  # a umask can only take bits away: it took none here
        try:
            fd = os.open(d.parent, os.O_RDONLY | os.O_DIRECTORY)
        except PermissionError:
            # A parent this account may write but not read (mode 0733): its
            # entry cannot be synced from here. The directory is made;
            # refusing it failed a start the next one, finding it, passed.
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def unsafe_dir(path: Path) -> str | None:
    """Why a directory holding keys or audit files is not safe, if it is not:
    anyone may write to it (and so swap its files), or another user owns it
    (that user could). Root may use a directory another user owns (a bind
    mount): :func:`loose_dir` warns about that, and about group write."""
    st = path.stat()
    if st.st_mode & 0o002:
        return (f"{path} is writable by every user (mode {stat.S_IMODE(st.st_mode):o}):"
                " chmod o-w it")
    uid = os.geteuid()
    if st.st_uid != uid and uid != 0:
        return f"{path} belongs to another user (uid {st.st_uid})"
    return None


def loose_dir(path: Path) -> str | None:
    """What is worth a warning about a directory :func:`unsafe_dir` accepts."""
    st = path.stat()
    if st.st_uid != os.geteuid():
        return f"{path} belongs to another user (uid {st.st_uid}), who can swap its files"
    if st.st_mode & 0o020:
        return (f"{path} is writable by its group (gid {st.st_gid}), whose members can"
                " swap its files: chmod g-w it unless that group is yours alone")
    return None


def _note_earlier_late(conn: sqlite3.Connection, writer: Writer) -> None:
    """Security events an earlier release dead-lettered, noted as the later
    ones are (:meth:`Writer.note_earlier_late`). A failure leaves them as they
    were: retried into another sink, each is then a break in both chains."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            n = writer.note_earlier_late()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except (sqlite3.Error, ValueError, TypeError, KeyError) as exc:
        # (Also a damaged meta note, security_stretch not JSON: the start goes
        # on, as after a cut to the part limits that cannot read a text.)
        log.warning("security events dead-lettered by an earlier release could not be"
                    " noted: %s", without_text(exc) if isinstance(exc, sqlite3.Error)
                    else type(exc).__name__)
        return
    if n:
        log.info("noted the place in the security chain of %d security events an earlier"
                 " release dead-lettered (for verify, should another sink take them)", n)


def _split_oversized(conn: sqlite3.Connection, writer: Writer) -> None:
    """Sessions in progress cut to the part limits of this run
    (:meth:`Writer.split_oversized`). A failure leaves them as they were:
    their parts are then larger than the limits, and nothing is lost."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            n = writer.split_oversized()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            writer.reload()
            raise
    except (sqlite3.Error, ValueError, TypeError, KeyError) as exc:
        # (A damaged event's text, which the cut reads for its hash: not JSON,
        # not an object, no hash. The start goes on; the part that holds it is
        # dead-lettered when it is sent, as any part with a damaged event.)
        # (Not a damaged text's own words: "Could not decode to UTF-8 column
        # 'json' with text '...'" quotes the event, a document's title say.)
        log.warning("sessions in progress could not be cut to the part limits: %s",
                    type(exc).__name__ if not isinstance(exc, sqlite3.Error)
                    else damage(exc) or exc)
        return
    if n:
        log.info("cut %d parts from sessions in progress to the (lowered) part limits", n)


def prepare(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the file to the current layout (:func:`migrate`, then SCHEMA),
    one process at a time: commands run beside the server and each other
    (``adduser`` five times at once on a new data dir), and one that looked
    at the file while another was half way through creating it would take
    it for an earlier layout and fail converting it."""
    fd = open_lock(Path(f"{path}.schema-lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        check_layout(conn, path)
        migrate(conn)
        conn.executescript(SCHEMA)
        note_earlier_stretch(conn)
        if conn.execute("PRAGMA user_version").fetchone()[0] < LAYOUT:
            conn.execute(f"PRAGMA user_version = {LAYOUT}")
    finally:
        os.close(fd)  # (closing releases the lock)


def check_layout(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a spool a later release has written (:data:`LAYOUT`): after a
    downgrade, one line instead of a server that starts and then fails every
    action, or a command that misreads the file."""
    have = conn.execute("PRAGMA user_version").fetchone()[0]
    if have > LAYOUT:
        raise SpoolNewer(
            f"the spool {path} was written by a later release of session-audit (layout"
            f" {have}; this release reads layout {LAYOUT}): run that release again")


def readonly_uri(path: Path) -> str:
    """The ``file:`` URI that opens ``path`` read-only. The path is
    percent-encoded: a ``#``, ``?`` or ``%`` in a directory name would
    otherwise cut it short, and SQLite would open (and create) another file.
    It is the path's bytes that are encoded: a name that is not UTF-8 (a
    Latin-1 directory name, or any non-ASCII one under a locale that is not
    UTF-8) holds lone surrogates as Python text, which ``quote`` cannot
    encode."""
    return f"file:{urllib.parse.quote(os.fsencode(path))}?mode=ro"


# Bytes a spool's -wal file is cut back to after a checkpoint (SQLite's
# journal_size_limit): some four times what it reaches between two automatic
# checkpoints (1000 pages).
WAL_SIZE_LIMIT = 16 * 1024 * 1024


BUSY_TIMEOUT_SECONDS = 10.0


def _set_wal(conn: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode = WAL``, waiting as ``busy_timeout`` would. On a
    file not yet in WAL mode (a new spool) the change takes a lock for which
    SQLite answers SQLITE_BUSY at once, without the busy handler: commands
    started together before the first start (``adduser`` in parallel from a
    provisioning script, or beside the first ``serve``) failed with
    "database is locked"."""
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    pause = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if (exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY
                    or time.monotonic() + pause > deadline):
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def connect(path: Path, synchronous: str, *, readonly: bool = False) -> sqlite3.Connection:
    """A spool connection with the pragmas every user of the file needs."""
    if not readonly:
        create_private(Path(path))
    if readonly:
        conn = sqlite3.connect(
            readonly_uri(path), uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        if not readonly:
            _set_wal(conn)
            # A deleted document or purged record is overwritten, not left in
            # free pages (and in every backup) for whoever reads the file. Many
            # builds do so by default (Debian's); not all do.
            conn.execute("PRAGMA secure_delete = ON")
            # The WAL goes back to this size once checkpointed: else it stays as
            # large as the largest transaction ever made it, for good (a purge of
            # 500 kept parts of 200 kB left a 107 MB -wal beside 266 kB of data).
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
        check_layout(conn, Path(path))
    except BaseException:  # (a pragma or the layout check: no connection left open)
        conn.close()
        raise
    return conn


# The application's tables share the spool file (a change and its event commit
# in one transaction) but not its budget: spool_max_bytes bounds the audit
# data waiting for the sink, which drains; documents do not.
APP_TABLES = ("users", "documents")
# After a document change, the app tables are measured again at most this often.
# dbstat reads every page of those tables: 50 ms for 200 MB of documents,
# 0.2-0.75 s for 1 GB.
APP_BYTES_INTERVAL = 30.0
# ... and at most this often while the spool looks full: documents created
# since the last measure count as audit data, so one user creating large
# documents (150 MiB in 8 s, measured) would otherwise get every other user
# 503 audit_unavailable until the next measure, up to 30 s later, each time.
APP_BYTES_FULL_INTERVAL = 5.0
_no_dbstat_logged = False


def app_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the pages of the application's tables and their indexes, by
    SQLite's ``dbstat``. A SQLite built without it gives 0 (documents then
    count toward ``spool_max_bytes``), with a warning once."""
    global _no_dbstat_logged
    try:
        return _app_bytes(conn)
    except sqlite3.OperationalError as exc:
        if "dbstat" not in str(exc):
            raise
        if not _no_dbstat_logged:
            _no_dbstat_logged = True
            log.warning("this SQLite has no dbstat table: documents count toward"
                        " audit.spool_max_bytes")
        return 0


def _app_bytes(conn: sqlite3.Connection) -> int:
    marks = ", ".join("?" * len(APP_TABLES))
    names = [r[0] for r in conn.execute(
        f"SELECT name FROM sqlite_schema WHERE tbl_name IN ({marks})"
        " AND type IN ('table', 'index')", APP_TABLES)]
    total = 0
    for name in names:
        row = conn.execute("SELECT pgsize FROM dbstat('main', 1) WHERE name = ?",
                           (name,)).fetchone()
        total += int(row[0]) if row and row[0] else 0
    return total


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the file's pages in use (the free list excluded)."""
    row = conn.execute(
        "SELECT page_count - freelist_count, page_size"
        " FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"
    ).fetchone()
    return int(row[0] * row[1])


class Spool:
    def __init__(
        self,
        path: str | Path,
        key: bytes,
        *,
        limits: Limits,
        synchronous: str = "full",
        max_bytes: int = 1 << 30,
        on_full: str = "reject",
        clock: Callable[[], float] = time.time,
        stats: Stats | None = None,
        cut_to_limits: bool = True,
    ) -> None:
        self.path = Path(path)
        # At open, cut open sessions' uncut events to the part limits
        # (_split_oversized): only in the process that serves the spool.
        self.cut_to_limits = cut_to_limits
        self.key = key
        self.limits = limits
        self.synchronous = synchronous
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.clock = clock
        self.stats = stats or Stats()
        self.used_bytes = 0  # the file's pages in use
        self.app_bytes = 0  # ... of them, the users' and documents' (APP_TABLES)
        self.app_changed = False  # a document change committed since app_bytes
        self._app_measured = 0.0
        self.on_commit: Callable[[int, int], None] | None = None
        self._writer: Writer | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._wexec: ThreadPoolExecutor | None = None
        self._rexec: ThreadPoolExecutor | None = None
        self._mexec: ThreadPoolExecutor | None = None  # measuring the app tables
        self._bexec: ThreadPoolExecutor | None = None  # long reads (read_apart)
        self._bconn: sqlite3.Connection | None = None
        self._pending: list[tuple[Job, asyncio.Future[Any]]] = []
        # What the jobs taken under the limit and not yet committed are
        # counted to add (JOB_BYTES or their caller's size): queued, and in
        # the batch committing. The file's size is known only after a commit,
        # so without them every job submitted meanwhile was taken (256
        # requests of client events at once took a 64 MiB spool to 183 MB).
        self._queued_bytes = 0
        self._committing_bytes = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None  # close(), once begun
        self._state = "new"  # new | open | closing | closed
        self.failure: BaseException | None = None
        # The last commit's error while commits fail (a full or read-only
        # disk, an I/O error): not accepting until one succeeds again.
        self.commit_error: str | None = None
        self._commit_failures = 0  # in a row
        # This run of failed commits was logged: its end is logged too. A run
        # not logged (the failure line said a minute ago: a spool whose
        # commits fail and pass by turns, on a nearly full disk) ends
        # unsaid, else each turn logged two lines.
        self._commit_said = False
        # The throttle's key of the last failure: its cause's (a disk full,
        # then another process holding the write lock, are each said at once).
        self._commit_key = "commit"
        # What SQLite said the first time it found the file damaged: it stays
        # so (readyz says so) until the file is repaired, the server stopped.
        self.damaged: str | None = None
        self._log = LogThrottle()

    # -- lifecycle ---------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    @property
    def accepting(self) -> bool:
        """Open, healthy, committing, and not full under ``reject``."""
        return (self.is_open and self.failure is None and self.commit_error is None
                and not self.full)

    @property
    def spool_bytes(self) -> int:
        """The audit data in the spool: its pages in use but the app tables'.
        Documents created since the app tables were last measured count here
        until the next measure (at most :data:`APP_BYTES_INTERVAL` later, or
        :data:`APP_BYTES_FULL_INTERVAL` when they make the spool look full)."""
        return max(0, self.used_bytes - self.app_bytes)

    @property
    def full(self) -> bool:
        """At the limit under ``reject``, counting what the jobs taken and
        not yet committed add."""
        return (self.on_full == "reject" and self.spool_bytes + self._queued_bytes
                + self._committing_bytes >= self.max_bytes)

    async def open(self) -> None:
        if self._state != "new":
            raise SpoolClosed("a spool can be opened once")
        make_private_dirs(self.path.parent)
        loop = asyncio.get_running_loop()
        self._wexec = ThreadPoolExecutor(1, thread_name_prefix="spool-writer")
        self._rexec = ThreadPoolExecutor(1, thread_name_prefix="spool-reader")
        self._mexec = ThreadPoolExecutor(1, thread_name_prefix="spool-measure")
        self._bexec = ThreadPoolExecutor(1, thread_name_prefix="spool-apart")
        try:
            await loop.run_in_executor(self._wexec, self._open_writer)
            self._rconn = await loop.run_in_executor(
                self._rexec, lambda: connect(self.path, self.synchronous)
            )
        except BaseException as exc:
            await self._shutdown_threads()
            self._state = "closed"
            if isinstance(exc, sqlite3.DatabaseError):  # not a database, damaged
                raise SpoolUnavailable(f"the spool {self.path} cannot be opened:"
                                       f" {without_text(exc)}") from exc
            raise
        self._wake = asyncio.Event()
        self._state = "open"
        self._task = asyncio.create_task(self._run(), name="spool-writer")
        self._task.add_done_callback(self._writer_done)

    def _open_writer(self) -> None:
        conn = connect(self.path, self.synchronous)
        try:
            self._check_wal(conn)  # (SQLite's recovery has run; nothing written yet)
            prepare(conn, self.path)
            check_key(conn, self.key, self.path)
            check_writable(conn)
            writer = Writer(conn, self.key, self.limits, self.clock)
            writer.load()
            if self.cut_to_limits:
                _split_oversized(conn, writer)
                _note_earlier_late(conn, writer)
        except BaseException:
            conn.close()
            raise
        self._wconn, self._writer = conn, writer
        self.used_bytes = used_bytes(conn)
        self.app_bytes = app_bytes(conn)
        self._app_measured = time.monotonic()

    def _failure(self, exc: BaseException) -> SpoolUnavailable | None:
        """:func:`resource_failure`, noting damage (logged once)."""
        failure = (exc if isinstance(exc, SpoolDamaged)  # (a damaged text a query found)
                   else damage(exc, self.path) or resource_failure(exc))
        if isinstance(failure, SpoolDamaged):
            self.note_damage(failure)
        return failure

    def note_damage(self, exc: SpoolDamaged) -> None:
        """The spool file is damaged: said once, and /readyz 503 from now on."""
        if self.damaged is None:
            self.damaged = str(exc)[:300]
            log.error("%s: /readyz is 503 from now on; stop the server and repair the file"
                      " (README: A damaged spool)", exc)

    def _check_wal(self, conn: sqlite3.Connection) -> None:
        """Say it when SQLite dropped committed transactions of a damaged
        -wal (:mod:`audit.walcheck`), and keep a copy of it first: the
        writer's first commits reuse those frames."""
        wal = Path(f"{self.path}-wal")
        found = dropped_commits(conn, wal)
        if found is None or found[1] < 2:  # (one: the transaction a crash cut off)
            return
        frames, commits = found
        try:
            kept = f"kept as {keep_copy(wal)}"
        except OSError as exc:
            kept = f"not kept: {exc}"
        what = (f"its -wal holds {commits} committed transactions past a frame SQLite"
                f" cannot read (after frame {frames}), which it dropped, and with them"
                f" records that may have been acknowledged; the -wal was {kept}")
        if self.synchronous != "full":
            # Under "normal" the -wal is not synced at each commit: a power
            # loss or an OS crash may leave its later frames on disk and not
            # an earlier one, which is this, and the loss README documents
            # for that setting. Said, not taken for a damaged file.
            log.error("the audit spool %s lost committed transactions at the last stop: %s"
                      " (synchronous = \"normal\" does not survive a power loss or an OS"
                      " crash; \"full\" does)", self.path, what)
            return
        self.note_damage(SpoolDamaged(f"the audit spool {self.path} is damaged: {what}"))

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.failure = exc
            log.error("spool writer stopped", exc_info=exc)
            # Jobs queued behind the failed batch will never run: say so.
            pending, self._pending = self._pending, []
            self._queued_bytes = self._committing_bytes = 0
            for _, fut in pending:
                if not fut.done():
                    fut.set_exception(SpoolUnavailable("the spool writer has failed"))

    async def close(self) -> None:
        """Commit what is queued, then close; safe to call twice, and at once:
        every call returns once the spool is closed (its connections too: a
        second call at once returned when the writer stopped, before them).
        A call cancelled leaves the close to go on (cancelling the writer
        halfway left the jobs queued behind it unanswered)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._state == "closed":  # (an open that failed)
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "closing"
        assert self._wake is not None
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):  # already logged by the done-callback
                await self._task
        self._state = "closed"
        await self._shutdown_threads()

    async def _shutdown_threads(self) -> None:
        loop = asyncio.get_running_loop()
        if self._mexec is not None:
            # A measure in progress closes its connection first, so that the
            # writer's is the last one and SQLite checkpoints and removes the WAL.
            await loop.run_in_executor(None, self._mexec.shutdown, True)
        for executor, attr in ((self._bexec, "_bconn"), (self._wexec, "_wconn"),
                               (self._rexec, "_rconn")):
            if executor is None:
                continue
            # Looked at on the connection's own thread, after what is queued
            # there: a read_apart still to run (or opening its connection)
            # opens it then. (executor.shutdown below then waits for nothing:
            # it blocks the event loop.)
            await loop.run_in_executor(executor, self._close_conn, attr)
            executor.shutdown(wait=True)
        self._wexec = self._rexec = self._mexec = self._bexec = None

    def _close_conn(self, attr: str) -> None:
        conn = getattr(self, attr)
        if conn is not None:
            setattr(self, attr, None)
            conn.close()

    # -- writing -----------------------------------------------------------

    def submit_nowait(self, job: Job, *, needs_space: bool = True,
                      size: int = JOB_BYTES) -> asyncio.Future[Any]:
        """Queue a job; the future resolves after its commit. With
        ``needs_space``, a full spool refuses it, and until its commit it
        counts as ``size`` bytes more in the spool."""
        if self._state != "open":
            raise SpoolClosed("the spool is closed")
        if self.failure is not None:
            raise SpoolUnavailable("the spool writer has failed")
        if needs_space and self.full:
            raise SpoolFull("the audit spool is full")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if needs_space:
            self._queued_bytes += size
        self._pending.append((job, fut))
        if len(self._pending) == 1:
            assert self._wake is not None
            self._wake.set()
        return fut

    async def submit(self, job: Job, *, needs_space: bool = True, size: int = JOB_BYTES) -> Any:
        return await self.submit_nowait(job, needs_space=needs_space, size=size)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None and self._wexec is not None
        while True:
            if not self._pending:
                if self._state != "open":
                    return
                wake.clear()
                if self.commit_error is not None and not self._commit_said:
                    # The failure was left out (a line said less than a
                    # minute ago), and no commit since to say it on: said
                    # when the minute is out, so that the log's last word is
                    # not "succeed again" while audited actions get 503.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), self._log.due(self._commit_key))
                    if (self.commit_error is not None and not self._commit_said
                            and not self._log.due(self._commit_key)):
                        self._commit_failed(self.commit_error)
                    continue
                await wake.wait()
                continue
            batch, self._pending = self._pending, []
            self._committing_bytes, self._queued_bytes = self._queued_bytes, 0
            jobs = [job for job, _ in batch]
            started = time.perf_counter()
            try:
                results, nbytes, new_parts, new_sec, appended = await loop.run_in_executor(
                    self._wexec, self._commit, jobs
                )
            except Exception as exc:
                # Nothing of the batch was committed: every caller hears so.
                self._committing_bytes = 0
                self.stats.commit_failures += 1
                err = SpoolUnavailable("the audit spool could not commit")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                if isinstance(exc, sqlite3.Error):  # disk full, I/O error: may pass
                    self._failure(exc)
                    said = str(exc)
                    if isinstance(exc.__cause__, sqlite3.Error):
                        # (SQLite rolled the transaction back: why, a disk
                        # full say, is its cause's words, not the text above)
                        said = f"{said}: {without_text(exc.__cause__)}"
                    self.commit_error = said[:200]
                    self._commit_failures += 1
                    self._commit_key = f"commit {failure_kind(exc)}"
                    self._commit_failed(said)
                    continue
                raise  # a bug: the done-callback marks the spool failed
            if self.commit_error is not None:
                if self._commit_said:
                    log.warning("spool commits succeed again, after %d failed: %s",
                                self._commit_failures, self.commit_error)
                self.commit_error, self._commit_failures = None, 0
                self._commit_said = False
            self.stats.observe_commit(len(batch), time.perf_counter() - started)
            self.stats.events_recorded += appended
            self.stats.security_events_recorded += new_sec
            self.used_bytes, self._committing_bytes = nbytes, 0
            for (_, fut), (ok, value) in zip(batch, results, strict=True):
                if fut.done():  # cancelled by its caller; the commit stands
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(self._failure(value) or value)
            if (new_parts or new_sec) and self.on_commit is not None:
                self.on_commit(new_parts, new_sec)

    def _commit_failed(self, exc: object) -> None:
        """The failure line: at once for the first, then at most once a
        minute, counting those left out (the window is not started over when
        a commit passes: a spool failing and passing by turns logs no more)."""
        left_out = self._log.allow(self._commit_key)
        if left_out is not None:
            self._commit_said = True
            log.error("spool commit failed: %s; audited actions get 503 until a"
                      " commit succeeds%s", exc, more(left_out))

    def _commit(self, jobs: list[Job]) -> tuple[list[tuple[bool, Any]], int, int, int, int]:
        w = self._writer
        assert w is not None and self._wconn is not None
        w.new_parts = w.new_security = w.appended = 0
        results = w.run_batch(jobs)
        try:
            nbytes = used_bytes(self._wconn)
        except sqlite3.Error:
            # The batch is committed: its callers must hear so. The size is
            # measured again after the next commit.
            nbytes = self.used_bytes
        return results, nbytes, w.new_parts, w.new_security, w.appended

    def _measure_app(self) -> int:
        conn = connect(self.path, self.synchronous, readonly=True)
        try:
            return app_bytes(conn)
        finally:
            conn.close()

    async def measure_app_bytes(self, *, force: bool = False) -> bool:
        """Measure the app tables again if a document changed since the last
        time, at most every :data:`APP_BYTES_INTERVAL` (every
        :data:`APP_BYTES_FULL_INTERVAL` while the spool is full), on a worker thread with
        a connection of its own (not the reader's: logins wait on that one).
        Returns whether it measured."""
        now = time.monotonic()
        interval = APP_BYTES_FULL_INTERVAL if self.full else APP_BYTES_INTERVAL
        if not force and (not self.app_changed or now - self._app_measured < interval):
            return False
        if self._state != "open" or self._mexec is None:
            return False
        self.app_changed = False
        self._app_measured = now
        try:
            self.app_bytes = await asyncio.get_running_loop().run_in_executor(
                self._mexec, self._measure_app)
        except BaseException:
            self.app_changed = True  # try again next time
            raise
        return True

    # -- reading -----------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` with the read connection on the reader thread."""
        if self._state not in ("open", "closing") or self._rconn is None:
            raise SpoolClosed("the spool is closed")
        conn = self._rconn
        try:
            return await asyncio.get_running_loop().run_in_executor(self._rexec, fn, conn)
        except (sqlite3.Error, SpoolDamaged) as exc:
            if (failure := self._failure(exc)) in (None, exc):
                raise
            raise failure from exc

    async def read_apart(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` with a read connection of its own, on a thread of its
        own: for reads that may be long, so that they hold back neither the
        writer (every audited action) nor the reader (logins)."""
        if self._state not in ("open", "closing") or self._bexec is None:
            raise SpoolClosed("the spool is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._bexec, self._apart, fn)
        except (sqlite3.Error, SpoolDamaged) as exc:
            if (failure := self._failure(exc)) in (None, exc):
                raise
            raise failure from exc

    def _apart(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._bconn is None:
            self._bconn = connect(self.path, self.synchronous, readonly=True)
        return fn(self._bconn)

    def open_session(self, session_id: str) -> OpenSession | None:
        """An open session as the writer's cache has it (no I/O): its
        committed state, or, while a batch runs, up to that batch ahead of it
        (a session being sealed is gone a moment before the commit; a failed
        batch puts it back)."""
        w = self._writer
        return w.sessions.get(session_id) if w is not None else None

    def open_sessions(self) -> list[OpenSession]:
        w = self._writer
        return list(w.sessions.values()) if w is not None else []

"""The spool's write side: schema and every write, run on the writer thread.

:class:`Writer` owns the one write connection. The spool hands it batches of
jobs; each job runs inside a savepoint of the batch's transaction, so a job
that fails leaves no trace while the others commit. The session heads kept in
memory (next ``seq``, chain head, uncut counts) are a cache of committed
state: a failed job or a failed commit puts them back as they were.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from .events import (
    SECURITY_ACTIONS,
    Draft,
    canonical_json,
    format_ts,
    genesis,
    new_id,
    parse_ts,
    seal_event,
    seal_text,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0   -- no login (its open sessions were revoked)
);
-- Open sessions to end, named by the command line (passwd, disable) in the
-- transaction of its change; the server seals each and deletes its row in one.
CREATE TABLE IF NOT EXISTS revocations (
    session_id TEXT PRIMARY KEY,
    cause TEXT NOT NULL,                  -- password_changed | user_disabled
    created_ts REAL NOT NULL
);
-- Changes of accounts still to record (adduser, passwd, disable, enable),
-- each written in the transaction of its change;
-- the server turns each into a security event and deletes its row in one
-- transaction (Accounts.record_account_changes). Never a password or hash.
CREATE TABLE IF NOT EXISTS account_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- (no other key: one page in an empty spool)
    action TEXT NOT NULL,                 -- user.create | user.password_change | ...
    username TEXT NOT NULL,
    actor_user TEXT,                      -- the OS account that ran the command
    actor_role TEXT NOT NULL,             -- cli
    details TEXT NOT NULL,                -- a JSON object
    created_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    content TEXT NOT NULL,
    owner TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_owner ON documents (owner, updated_at);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    sk INTEGER,                      -- the session's key in events (see below)
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    state TEXT NOT NULL,             -- open | sealed
    start_ts REAL NOT NULL,
    start_ms INTEGER,                -- start_ts in whole ms, as shown (format_ts)
    expires_at REAL NOT NULL,
    last_ts REAL NOT NULL,           -- last activity known at the last cut
    head_ts REAL,                    -- newest event's time at the last cut (NULL: last_ts)
    end_ts REAL,
    seal_reason TEXT,
    next_part INTEGER NOT NULL DEFAULT 0,
    cut_seq INTEGER NOT NULL DEFAULT 0,   -- last seq inside a cut part
    cut_hash TEXT NOT NULL,               -- chain head at that cut
    cut_events INTEGER NOT NULL DEFAULT 0 -- events inside cut parts
);
-- The admin listing's order and cursor: what clients see and send back;
-- filtered by state or user, in the same order (else every open session,
-- or every session kept with keep_stored_seconds, was read and sorted for
-- each page: 0.13 s at 100,000 open sessions). sessions_state_start
-- replaces sessions_state (state, start_ts), which nothing ordered by.
DROP INDEX IF EXISTS sessions_state;
CREATE INDEX IF NOT EXISTS sessions_state_start ON sessions (state, start_ms, session_id);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user, start_ms, session_id);
CREATE INDEX IF NOT EXISTS sessions_start ON sessions (start_ms, session_id);
CREATE UNIQUE INDEX IF NOT EXISTS sessions_sk ON sessions (sk);
-- A rowid table written in commit order, with no index: a commit appends
-- its rows at the right edge of one B-tree. The writer gives each row its
-- rowid (never reused: see Writer.next_rid). Rows are found by session
-- through event_keys, (sk, seq) -> rowid, which the writer fills in bulk,
-- every KEYS_EVERY rows, in (sk, seq) order: a commit of 256 events of 256
-- sessions then dirties one table edge, not 256 index leaves (measured:
-- 3-4 against 9-10 us of commit per event). The rows above keys_mark (in
-- meta) are the unindexed tail, which the session_events view scans. sk is
-- an integer session key (sessions.sk, allocated by the writer and never
-- reused while the spool holds events of it); session_id stays on the row,
-- unindexed, for people reading the file.
CREATE TABLE IF NOT EXISTS events (
    sk INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS event_keys (
    sk INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    rid INTEGER NOT NULL,
    PRIMARY KEY (sk, seq)
) WITHOUT ROWID;
-- Every event of the spool by (sk, seq): a query on it with sk = ? is one
-- search of event_keys plus a scan of the tail (at most a few thousand rows).
CREATE VIEW IF NOT EXISTS session_events (sk, seq, ts, json) AS
    SELECT k.sk, k.seq, e.ts, e.json FROM event_keys k JOIN events e ON e.rowid = k.rid
    UNION ALL
    SELECT sk, seq, ts, json FROM events WHERE rowid > (
        SELECT COALESCE(MAX(CAST(value AS INTEGER)), 0) FROM meta WHERE key = 'keys_mark');
CREATE TABLE IF NOT EXISTS parts (
    session_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    final INTEGER NOT NULL,
    seal_reason TEXT NOT NULL,
    end_ts REAL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    state TEXT NOT NULL,             -- pending | stored | dead
    created_ts REAL NOT NULL,
    stored_ts REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (session_id, part)
);
CREATE INDEX IF NOT EXISTS parts_state ON parts (state, created_ts);
-- The purge of parts kept past keep_stored_seconds (Writer.purge_stored), which
-- otherwise read every kept part each time it found none old enough (every
-- few seconds, on the writer). Partial: with nothing kept it costs nothing.
CREATE INDEX IF NOT EXISTS parts_kept ON parts (state, stored_ts) WHERE state = 'stored';
-- Sessions whose final part a sink acknowledged lately (for as long as such
-- a session could still look open there: max_session_seconds and a day):
-- verify then knows a final part, or a whole session, gone from that sink.
CREATE TABLE IF NOT EXISTS stored_sessions (
    session_id TEXT PRIMARY KEY,
    sink TEXT NOT NULL,              -- the sink's type and location (sink_where)
    stored_ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS stored_sessions_ts ON stored_sessions (stored_ts);
-- The stretches of the security chain each sink took (a sink switch starts
-- one in the new sink): from the hash before its first event to its last
-- event's. verify accepts a chain in a sink starting where one of its
-- stretches does, and holds a sink the server left to the end of its last.
-- meta 'security_stretch' is the current one: [sink, took_from].
CREATE TABLE IF NOT EXISTS sink_stretches (
    sink TEXT NOT NULL,              -- the sink's type and location (sink_where)
    took_from TEXT NOT NULL,
    took_to TEXT NOT NULL,
    PRIMARY KEY (sink, took_from)
);
CREATE TABLE IF NOT EXISTS security_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    ts REAL NOT NULL,
    ts_ms INTEGER,                   -- ts in whole ms, as shown (format_ts)
    action TEXT NOT NULL,
    json TEXT NOT NULL,
    state TEXT NOT NULL,             -- pending | stored | dead
    stored_ts REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS security_state ON security_events (state, id);
CREATE INDEX IF NOT EXISTS security_kept ON security_events (state, stored_ts)
    WHERE state = 'stored';
-- The admin listing's order and cursor (ts as shown, then event_id).
CREATE INDEX IF NOT EXISTS security_ts ON security_events (ts_ms, event_id);
"""

log = logging.getLogger(__name__)

SECURITY_STREAM = "security"
# The writer indexes the unindexed tail of events (see SCHEMA) once it holds
# this many rows. Larger: fewer index leaves written per event; smaller: a
# shorter scan for reads of the newest events (the flusher's reads of parts
# in event_keys skip it).
KEYS_EVERY = 4096
# Events of kept parts one purge job deletes at most (some 12 MB at 600
# bytes an event): 500 parts of 500 events in one job held the writer, and
# every audited request with it, for 1.3 s, and grew the WAL by 100 MB.
PURGE_MAX_EVENTS = 20_000

# The writer's SQL gives up the GIL at every step of every statement; the
# event loop, busy, takes it, and the writer waits for it back (the loop's
# callback, or the 5 ms switch interval) before its next step. So a batch
# reads the documents its audited reads need with one statement
# (:meth:`Writer.read_ahead`) rather than two steps per read. (Event rows
# still go in with executemany, a step a row: multi-row INSERTs of 2**k
# rows gained nothing measurable, and the 256-producer spool benchmark was
# 0.36 against 0.37 x raw sqlite3 with them, 4 alternating pairs.)
DOCUMENT_COLUMNS = "id, title, content, owner, version, created_at, updated_at"
# A document read ahead is one element of one JSON text (one step, not one a
# row); larger ones are read by their own job, so that a batch of reads of
# 8 MiB documents is not one text of hundreds of MB.
READ_AHEAD_MAX_BYTES = 65536
# Only a row of the types the schema names goes through JSON unchanged: a
# REAL (which the INTEGER column keeps when another process stored one) is
# written with 15 digits, an infinity as Inf (no JSON: json.loads fails),
# and a BLOB fails the whole statement. Such a row its read reads itself.
_READ_AHEAD = (
    f"SELECT json_group_array(json_array({DOCUMENT_COLUMNS})) FROM documents"
    " WHERE id IN (SELECT value FROM json_each(?))"
    f" AND length(CAST(content AS BLOB)) + length(CAST(title AS BLOB)) <= {READ_AHEAD_MAX_BYTES}"
    " AND typeof(version) = 'integer' AND typeof(title) = 'text'"
    " AND typeof(content) = 'text' AND typeof(owner) = 'text'"
    " AND typeof(created_at) = 'text' AND typeof(updated_at) = 'text'"
)


def read_document(conn: sqlite3.Connection, doc_id: str) -> tuple[Any, ...] | None:
    """The row of the document ``doc_id`` (``DOCUMENT_COLUMNS``), None if there is none."""
    row = conn.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE id = ?",
                       (doc_id,)).fetchone()
    return None if row is None else tuple(row)


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a spool file of an earlier layout to :data:`SCHEMA` (before it runs).

    Three earlier layouts: ``events`` as a ``WITHOUT ROWID`` table clustered
    by ``(session_id, seq)``; ``events`` as a rowid table with a unique
    ``(session_id, seq)`` index and no ``sessions.sk``; and the current
    ``events`` with a unique ``(sk, seq)`` index instead of ``event_keys``.
    Each becomes the current layout in one transaction: every session gets
    ``sk`` = its rowid, the events are copied in their stored order (by
    ``ts`` from the clustered layout, whose order is the session id's), and
    ``event_keys`` is built over all of them. A file a release before
    ``event_keys`` has run on since (its ``(sk, seq)`` index is back, and
    ``event_keys`` is stale) gets ``event_keys`` rebuilt the same way.
    """
    _migrate_users(conn)
    _migrate_head_ts(conn)
    _migrate_shown_ms(conn)
    row = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()
    if row is None:
        return  # a new file
    clustered = "WITHOUT ROWID" in row[0].upper()
    keyed = not clustered and "sk" in _columns(conn, "events")
    has_keys = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE name = 'event_keys'"
    ).fetchone() is not None
    # The (sk, seq) index beside event_keys: a release before event_keys ran
    # on this file since (it adds the index and leaves event_keys stale).
    old_index = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE name = 'events_sk_seq'"
    ).fetchone() is not None
    if keyed and has_keys and not old_index:
        return  # current
    log.info("spool: converting the file to the current events layout (once; takes a"
             " few seconds per million events)")
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not keyed:
            if "sk" not in _columns(conn, "sessions"):
                conn.execute("ALTER TABLE sessions ADD COLUMN sk INTEGER")
                conn.execute("UPDATE sessions SET sk = rowid")
            conn.execute("ALTER TABLE events RENAME TO events_old")
            conn.execute("DROP INDEX IF EXISTS events_session_seq")
            conn.execute(
                "CREATE TABLE events (sk INTEGER NOT NULL, session_id TEXT NOT NULL,"
                " seq INTEGER NOT NULL, ts REAL NOT NULL, json TEXT NOT NULL)"
            )
            order = "e.ts" if clustered else "e.rowid"
            # Events of no session are unreachable in every layout (each read
            # goes through its session): they are not carried over.
            conn.execute(
                "INSERT INTO events (sk, session_id, seq, ts, json)"
                " SELECT s.sk, e.session_id, e.seq, e.ts, e.json"
                f" FROM events_old e JOIN sessions s USING (session_id) ORDER BY {order}"
            )
            conn.execute("DROP TABLE events_old")
        if has_keys:
            conn.execute("DELETE FROM event_keys")
        else:
            conn.execute(
                "CREATE TABLE event_keys (sk INTEGER NOT NULL, seq INTEGER NOT NULL,"
                " rid INTEGER NOT NULL, PRIMARY KEY (sk, seq)) WITHOUT ROWID"
            )
        conn.execute(
            "INSERT INTO event_keys (sk, seq, rid)"
            " SELECT sk, seq, rowid FROM events ORDER BY sk, seq"
        )
        conn.execute("DROP INDEX IF EXISTS events_sk_seq")
        conn.execute(
            "INSERT INTO meta (key, value) SELECT 'keys_mark', COALESCE(MAX(rowid), 0)"
            " FROM events WHERE true ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # (SQLite may have rolled it back itself: a full disk)
            conn.execute("ROLLBACK")
        raise


def _migrate_users(conn: sqlite3.Connection) -> None:
    """Give a users table of an earlier release its ``disabled`` column."""
    have = _columns(conn, "users")
    if have and "disabled" not in have:  # (no columns: a new file, SCHEMA creates it)
        conn.execute("ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0")


def _migrate_head_ts(conn: sqlite3.Connection) -> None:
    """Give a sessions table of an earlier release its ``head_ts`` column
    (NULL: its ``last_ts``, which was the newest event's time then)."""
    have = _columns(conn, "sessions")
    if have and "head_ts" not in have:  # (no columns: a new file, SCHEMA creates it)
        conn.execute("ALTER TABLE sessions ADD COLUMN head_ts REAL")


def shown_ms(epoch: float) -> int:
    """``epoch`` in whole milliseconds, rounded as :func:`format_ts` shows it."""
    return round(epoch * 1000)


def _migrate_shown_ms(conn: sqlite3.Connection) -> None:
    """Give the sessions and security events of an earlier release (or that
    one wrote since) their ``start_ms`` / ``ts_ms``, which the admin
    listings page by."""
    conn.create_function("shown_ms", 1, shown_ms, deterministic=True)
    for table, column, source in (("sessions", "start_ms", "start_ts"),
                                  ("security_events", "ts_ms", "ts")):
        have = _columns(conn, table)
        if not have:
            continue  # a new file: SCHEMA creates it
        missing = column not in have
        if not missing and conn.execute(
                f"SELECT 1 FROM {table} WHERE {column} IS NULL LIMIT 1").fetchone() is None:
            continue
        # Missing: a file of an earlier release. NULLs: rows an earlier
        # release wrote since (found on the column's index).
        conn.execute("BEGIN IMMEDIATE")  # the column and its values, or neither
        try:
            if missing:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER")
            conn.execute(f"UPDATE {table} SET {column} = shown_ms({source})"
                         f" WHERE {column} IS NULL")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # (SQLite may have rolled it back itself: a full disk)
                conn.execute("ROLLBACK")
            raise


def _taken(raw: str | None) -> list[Any] | None:
    """meta ``security_taken``: [id, hash] of the newest security event a sink
    took. A bare hash is the form of one earlier build (without the id): its
    hash is still where the next sink's stretch begins, its id unknown (0)."""
    if not raw:
        return None
    if raw.startswith("["):
        return list(json.loads(raw))
    return [0, raw]


def note_earlier_stretch(conn: sqlite3.Connection) -> None:
    """Note the stretch of the security chain that a release before
    sink_stretches left in its sink, where the spool can still tell it.

    Such a spool was flushed (meta ``sink_status``) but has no
    ``security_taken``: without this, the next sink's stretch would begin
    nowhere (verify on it reports its first event as not continuing a chain)
    and the old sink would have no stretch (verify with the old configuration
    holds it to the spool's newest event): both false breaks, for good, after
    an upgrade with a sink switch. With no security event left unsent
    (pending, dead), the old sink took the whole chain so far: its end is the
    spool's security head. With some unsent, where it stopped is not known
    and nothing is noted. Runs after :data:`SCHEMA` (it needs sink_stretches).
    """
    if conn.execute("SELECT 1 FROM meta WHERE key = 'security_taken'").fetchone():
        return  # (the usual case, without taking the write lock)
    conn.execute("BEGIN IMMEDIATE")  # read and noted in one (a server may be running)
    try:
        noted = _note_earlier_stretch(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # (SQLite may have rolled it back itself: a full disk)
            conn.execute("ROLLBACK")
        raise
    if noted:
        log.info("spool: noted where the security chain stood in the sink an earlier"
                 " release flushed to (for verify after a sink switch)")


# A meta row's value, but sink_status's as bytes: the server's display of
# its sink, which a reader only parses or looks for; a damaged one (not
# UTF-8) is then not used, not an error that stops the spool quoting it.
_META_VALUE = "CASE key WHEN 'sink_status' THEN CAST(value AS BLOB) ELSE value END"


def _note_earlier_stretch(conn: sqlite3.Connection) -> bool:
    meta = dict(conn.execute(
        f"SELECT key, {_META_VALUE}"
        " FROM meta WHERE key IN"
        " ('sink_status', 'security_taken', 'security_stretch', 'security_head')"))
    if ("sink_status" not in meta or "security_head" not in meta
            or "security_taken" in meta or "security_stretch" in meta):
        return False
    if conn.execute(
            "SELECT 1 FROM security_events WHERE state != 'stored' LIMIT 1").fetchone():
        return False
    row = conn.execute(
        "SELECT seq FROM sqlite_sequence WHERE name = 'security_events'").fetchone()
    newest, head = (int(row[0]) if row else 0), meta["security_head"]
    try:
        status = json.loads(meta["sink_status"])
    except ValueError:
        status = None
    rows = [("security_taken", json.dumps([newest, head]))]
    if isinstance(status, dict) and status.get("type") and status.get("where"):
        # (A sink_status without "where" does not say which sink of its type.)
        sink = f"{status['type']} {status['where']}"
        conn.execute("INSERT OR IGNORE INTO sink_stretches (sink, took_from, took_to)"
                     " VALUES (?, '', ?)", (sink, head))
        rows.append(("security_stretch", json.dumps([sink, ""])))
    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", rows)
    return True


# details.reason of the record of an action a crash interrupted, which the
# server makes at its next start (AuditEngine.record_interrupted).
INTERRUPTED = "interrupted"


def activity_time(event: Any) -> float | None:
    """When a record the server made on its own counts as its session's
    activity, or None for any other event (activity at its own time).

    The record of an action a crash interrupted (``ai.interaction``,
    failure, reason ``interrupted``: only the server's start makes it) is
    made at the next start; the user's activity was when the action began
    (``details.started_at``). Counted at the record's time, the downtime
    was added to the session's idle deadline. The spool keeps no more than
    the event, so this rule is what a restart reads back (Writer.load)."""
    if (not isinstance(event, dict) or event.get("action") != "ai.interaction"
            or event.get("outcome") != "failure"):
        return None
    details = event.get("details")
    if not isinstance(details, dict) or details.get("reason") != INTERRUPTED:
        return None
    started = details.get("started_at")
    try:
        return parse_ts(started) if isinstance(started, str) else None
    except (ValueError, OverflowError):
        return None


def _last_activity(conn: sqlite3.Connection, sk: int, cut_seq: int) -> float:
    """The last activity told by a session's uncut events, the newest of
    which is a record the server made (:func:`activity_time`): going back
    from it, each such record's activity time, and the first other event's
    time (times only go forward along the chain)."""
    last = float("-inf")
    for ts, text in conn.execute(
        "SELECT ts, CAST(json AS BLOB) FROM session_events WHERE sk = ? AND seq > ?"
        " ORDER BY seq DESC", (sk, cut_seq),
    ):
        try:
            at = activity_time(json.loads(text))
        except ValueError:  # a damaged text: counted at its time, as before
            at = None
        if at is None:
            return max(last, float(ts))
        last = max(last, at)
    return last


def _keys_mark(conn: sqlite3.Connection) -> int:
    """The highest events rowid in event_keys' reach (the tail is above it)."""
    row = conn.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'keys_mark'").fetchone()
    return int(row[0]) if row else 0


class SessionNotOpen(Exception):
    """The session is sealed, unknown or was never started. ``recorded``: the
    raiser has recorded the attempt already (else the HTTP layer does)."""

    def __init__(self, session_id: str | None, *, recorded: bool = False) -> None:
        super().__init__(f"session {session_id} is not open")
        self.session_id = session_id
        self.recorded = recorded


class ActionError(Exception):
    """An audited action that did not happen; its event is still recorded.

    Raised by a job's ``change``: the change is rolled back and the event is
    committed with ``outcome`` and ``details.reason``; then the caller gets
    this exception back.
    """

    def __init__(self, reason: str, outcome: str = "failure", message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.outcome = outcome
        self.message = message or reason


@dataclass(slots=True)
class OpenSession:
    """The writer's view of one open session (a cache of committed state)."""

    session_id: str
    sk: int
    user: str
    role: str
    start_ts: float
    expires_at: float
    # The user's last activity, from which the idle deadline runs: the time
    # of the newest event, or of a request that recorded none (memory only),
    # but not of a record the server made on its own (see activity_time).
    last_activity: float
    # The time of the newest event: later events and the session's end are
    # never before it (a wall clock stepped back must not send the times of
    # its chain backwards).
    head_ts: float
    next_seq: int
    head: str
    cut_seq: int
    cut_hash: str
    cut_events: int
    next_part: int
    uncut_count: int = 0
    uncut_bytes: int = 0
    uncut_first_ts: float | None = None

    @property
    def event_count(self) -> int:
        return self.cut_events + self.uncut_count

    def copy(self) -> OpenSession:
        """A snapshot (cheaper than ``dataclasses.replace``; taken per append)."""
        return OpenSession(
            self.session_id, self.sk, self.user, self.role, self.start_ts, self.expires_at,
            self.last_activity, self.head_ts, self.next_seq, self.head, self.cut_seq, self.cut_hash,
            self.cut_events, self.next_part, self.uncut_count, self.uncut_bytes,
            self.uncut_first_ts,
        )


@dataclass(frozen=True, slots=True)
class Limits:
    part_max_events: int
    part_max_bytes: int


Change = Callable[[sqlite3.Connection, Draft], Any]


class Append:
    """The job of a plain append (no app change): ``w.append(session_id, draft)``.

    The writer runs it without a savepoint of its own: a failing append
    executes no SQL (its event row is only buffered, and a checkpoint cut
    has its own savepoint), so undoing it is dropping the buffered row and
    restoring the session head.
    """

    __slots__ = ("draft", "session_id")

    def __init__(self, session_id: str, draft: Draft) -> None:
        self.session_id = session_id
        self.draft = draft

    def __call__(self, w: Writer) -> str:
        return w.append(self.session_id, self.draft)

class ReadOnlyViolation(sqlite3.ProgrammingError):
    """A :class:`Read` job's read wrote to the database (a bug in its caller).

    Its write is outside any savepoint, so the whole batch is rolled back:
    every caller of the batch hears that the spool could not commit.
    """

    def __init__(self, action: str) -> None:
        super().__init__(f"the read-only change of {action!r} wrote to the database")


class TransactionLost(sqlite3.OperationalError):
    """SQLite rolled back the whole transaction under a failing job.

    It may do so on SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM or SQLITE_BUSY,
    not only the failing statement. The batch cannot go on (every later
    ``SAVEPOINT`` would start and commit a transaction of its own): it fails
    as a whole, and every caller of it hears that the spool could not commit.
    """

    def __init__(self) -> None:
        super().__init__("the spool's transaction was rolled back under a failing job")


class Read:
    """The job of a read-only change and its event: ``read(conn, draft)``
    checks and reads (it must not write), then the event is appended.

    With ``document`` (an id), the read is of that one document: ``read``
    gets its row (``DOCUMENT_COLUMNS``, None if there is none) instead of
    the connection, ``read(row, draft)``; the writer reads the rows of a
    batch's reads with one statement (:meth:`Writer.read_ahead`).

    Like :class:`Append` it runs without a savepoint (a read has nothing to
    roll back). If the read raises :class:`ActionError`, the event is
    recorded with that outcome, plus ``access.denied`` when denied, in a
    savepoint of its own, and the error is the job's result.
    """

    __slots__ = ("document", "draft", "read", "session_id")

    def __init__(self, session_id: str, draft: Draft, read: Callable[[Any, Draft], Any],
                 document: str | None = None) -> None:
        self.session_id = session_id
        self.draft = draft
        self.read = read
        self.document = document

    def __call__(self, w: Writer) -> Any:
        w.session(self.session_id)  # fail before the read if the session is gone
        changes = w.conn.total_changes
        try:
            if self.document is None:
                result = self.read(w.conn, self.draft)
            else:
                result = self.read(w.document(self.document), self.draft)
        except ActionError as err:
            # Kept as the result, without its traceback: its frames (this
            # one, which holds it) would make a cycle keeping the request
            # alive until the next full collection, rare (audit.runtime).
            result = err.with_traceback(None)
        finally:
            if w.conn.total_changes != changes:
                raise ReadOnlyViolation(self.draft.action)
        if isinstance(result, ActionError):
            w.atomic(partial(w.record_failure, self.session_id, self.draft, result), flush=False)
            return result
        w.append(self.session_id, self.draft)
        return result


_PLAIN = (Append, Read)
_MISSING = object()
T = TypeVar("T")


# Made the first time a security event is dead-lettered (or put aside by the
# flusher) with its sink known (not with the schema: every table is a page or
# two of an empty spool, whose size the smallest spool_max_bytes allows for).
# security_late: each such security event's hash before it in the chain, and
# the sink whose stretch it belonged to (the one that refused or failed it
# first). sink_resumes: where a sink's chain resumes besides its stretches'
# starts: such an event stored in another sink (retry-dead after a switch)
# leaves a gap in the first, whose chain resumes after it (took_to ''), and
# stands alone in the second, which must hold it (took_to: its hash).
LATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS security_late (
    id INTEGER PRIMARY KEY,
    prev TEXT NOT NULL,
    sink TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sink_resumes (
    sink TEXT NOT NULL,
    took_from TEXT NOT NULL,
    took_to TEXT NOT NULL,
    PRIMARY KEY (sink, took_from)
);
"""


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


class Writer:
    """All writes of the spool; only ever called from the writer thread."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        key: bytes,
        limits: Limits,
        clock: Callable[[], float],
    ) -> None:
        self.conn = conn
        self.key = key
        self.limits = limits
        self.clock = clock
        self.sessions: dict[str, OpenSession] = {}
        self.security_head = genesis(key, SECURITY_STREAM)
        # The undo log of the running savepoint (None outside one): the first
        # snapshot of each cached value it changes. A failed batch needs none:
        # the cache is reloaded from the committed state.
        self._undo: dict[str, Any] | None = None
        self._stale = False
        # Event rows of the running batch, inserted with one executemany.
        self._rows: list[tuple[int, int, str, int, float, str]] = []
        # The next event rowid: load() sets it above every rowid in events
        # and above keys_mark; then it only grows. A rowid SQLite chose could
        # fall under keys_mark once the newest rows were deleted, and its
        # row would then be in neither event_keys nor the tail.
        self.next_rid = 1
        # Rows inserted since the tail was last indexed (an estimate, used
        # only to decide when to index it again).
        self.tail = 0
        self.keys_failed = False
        # The next session key: load() sets it above every key still in
        # sessions or events; then it only grows (a key taken by a
        # rolled-back start is skipped). A key can come back only after a
        # restart, once no session row and no event row holds it.
        self.next_sk = 1
        self.new_parts = 0
        self.new_security = 0
        self.appended = 0
        # Rows of documents read ahead for the reads at the head of the
        # running batch (read_ahead); emptied before any other job runs.
        self._ahead: dict[str, tuple[Any, ...]] = {}

    # -- loading -----------------------------------------------------------

    def load(self) -> None:
        """Rebuild the cache of open sessions and the security head from disk."""
        c = self.conn
        row = c.execute("SELECT value FROM meta WHERE key = 'security_head'").fetchone()
        self.security_head = row[0] if row else genesis(self.key, SECURITY_STREAM)
        # Built aside and swapped in whole: the event loop reads this cache
        # (Spool.open_session) while a failed batch reloads it.
        sessions: dict[str, OpenSession] = {}
        mark = _keys_mark(c)
        top_rid = c.execute("SELECT COALESCE(MAX(rowid), 0) FROM events").fetchone()[0]
        self.next_rid = max(self.next_rid, top_rid + 1, mark + 1)
        # The unindexed tail, read once (at most about KEYS_EVERY rows plus a batch).
        tail: dict[int, list[tuple[int, float, int, int]]] = {}
        for rid, sk, seq, ts, size in c.execute(
            "SELECT rowid, sk, seq, ts, LENGTH(CAST(json AS BLOB)) FROM events WHERE rowid > ?",
            (mark,),
        ):
            tail.setdefault(sk, []).append((seq, ts, size, rid))
        self.tail = sum(len(v) for v in tail.values())
        top = c.execute(
            "SELECT MAX(COALESCE((SELECT MAX(sk) FROM sessions), 0),"
            " COALESCE((SELECT MAX(sk) FROM event_keys), 0))"
        ).fetchone()[0]
        self.next_sk = max(self.next_sk, top + 1, max(tail, default=0) + 1)
        rows = c.execute(
            "SELECT session_id, sk, user, role, start_ts, expires_at, last_ts, next_part,"
            " cut_seq, cut_hash, cut_events, head_ts FROM sessions WHERE state = 'open'"
        ).fetchall()
        for (sid, sk, user, role, start, exp, last_ts, next_part, cut_seq, cut_hash,
             cut_events, cut_head_ts) in rows:
            s = OpenSession(
                session_id=sid,
                sk=sk,
                user=user,
                role=role,
                start_ts=start,
                expires_at=exp,
                last_activity=last_ts,
                # The newest cut event's time: later than the activity when
                # that event was a record the server made (activity_time).
                head_ts=last_ts if cut_head_ts is None else max(last_ts, cut_head_ts),
                next_seq=cut_seq + 1,
                head=cut_hash,
                cut_seq=cut_seq,
                cut_hash=cut_hash,
                cut_events=cut_events,
                next_part=next_part,
            )
            count, nbytes, first_ts, last_ts2, max_seq = c.execute(
                "SELECT COUNT(*), SUM(LENGTH(CAST(e.json AS BLOB))), MIN(e.ts), MAX(e.ts),"
                " MAX(k.seq) FROM event_keys k JOIN events e ON e.rowid = k.rid"
                " WHERE k.sk = ? AND k.seq > ?",
                (sk, cut_seq),
            ).fetchone()
            nbytes = nbytes or 0
            head_rid = None  # the newest event's rowid if it is in the tail
            for seq, ts, size, rid in tail.get(sk, ()):
                if seq > cut_seq:
                    count += 1
                    nbytes += size
                    first_ts = ts if first_ts is None else min(first_ts, ts)
                    last_ts2 = ts if last_ts2 is None else max(last_ts2, ts)
                    if max_seq is None or seq >= max_seq:
                        max_seq, head_rid = seq, rid
            if count:
                # One row by rowid: the view would scan the tail once per session.
                if head_rid is None:
                    last = c.execute(
                        "SELECT e.json FROM event_keys k JOIN events e ON e.rowid = k.rid"
                        " WHERE k.sk = ? AND k.seq = ?", (sk, max_seq)
                    ).fetchone()
                else:
                    last = c.execute(
                        "SELECT json FROM events WHERE rowid = ?", (head_rid,)).fetchone()
                newest = json.loads(last[0])
                s.head = newest["hash"]
                s.next_seq = max_seq + 1
                s.uncut_count = count
                s.uncut_bytes = nbytes
                s.uncut_first_ts = first_ts
                s.head_ts = max(s.head_ts, last_ts2)
                if activity_time(newest) is None:  # (the usual case: the newest is activity)
                    s.last_activity = max(s.last_activity, last_ts2)
                else:
                    s.last_activity = max(s.last_activity, _last_activity(c, sk, cut_seq))
            old = self.sessions.get(sid)
            if old is not None:  # activity seen since (memory only) is not lost
                s.last_activity = max(s.last_activity, old.last_activity)
                s.head_ts = max(s.head_ts, old.head_ts)
            sessions[sid] = s
        self.sessions = sessions

    def reload(self) -> None:
        """The cache back to the committed state after a transaction that
        failed. If that fails too (the same I/O error, most likely), the
        cache may be ahead of what is committed (a cut that was rolled back:
        a part numbered after one never committed, beginning after events in
        none): it is marked stale, and the next batch reloads it first."""
        try:
            self.load()
        except Exception:
            self._stale = True

    # -- undo --------------------------------------------------------------

    def _remember(self, name: str, value: Any) -> None:
        """Keep the first snapshot of ``name`` in the running savepoint's undo log."""
        undo = self._undo
        if undo is not None and name not in undo:
            undo[name] = value

    def _touch(self, s: OpenSession) -> None:
        undo = self._undo
        if undo is not None:
            name = "s:" + s.session_id
            if name not in undo:
                undo[name] = s.copy()

    def _restore(self, undo: dict[str, Any]) -> None:
        for name, value in undo.items():
            if name == "security_head":
                self.security_head = value
            elif name.startswith("s:"):
                sid = name[2:]
                if value is _MISSING:
                    self.sessions.pop(sid, None)
                else:
                    # A copy: a nested savepoint's log may hold the same snapshot.
                    self.sessions[sid] = value.copy()
            elif name == "tail":
                self.tail = value
            elif name == "counters":
                self.new_parts, self.new_security, self.appended = value

    def atomic(self, fn: Callable[[], T], *, flush: bool = True) -> T:
        """``fn()`` in a savepoint of its own: its SQL, its event rows and its
        changes to the cached session heads happen whole or not at all.

        With ``flush``, the event rows buffered by then are inserted inside
        the savepoint (a savepoint job's rows, so that a later job sees them).
        """
        c = self.conn
        rows = self._rows
        mark = len(rows)
        outer, self._undo = self._undo, {}
        self._remember("counters", (self.new_parts, self.new_security, self.appended))
        c.execute("SAVEPOINT job")
        try:
            value = fn()
            if flush:
                self._insert_rows()
        except BaseException:
            del rows[mark:]
            self._restore(self._undo)
            if c.in_transaction:  # else SQLite rolled back the whole batch (see TransactionLost)
                c.execute("ROLLBACK TO job")
                c.execute("RELEASE job")
            raise
        finally:
            undo, self._undo = self._undo, outer
            if outer is not None:  # a nested savepoint: the outer one may still undo
                for name, value in undo.items():
                    outer.setdefault(name, value)
        c.execute("RELEASE job")
        return value

    def run_batch(self, jobs: list[Callable[[Writer], Any]]) -> list[tuple[bool, Any]]:
        """Run jobs in one transaction; each job's result or exception.

        Plain jobs (:class:`Append`, :class:`Read`) run without a savepoint:
        they write no SQL but their buffered event row (a checkpoint cut and
        a failure's security event have savepoints of their own), so undoing
        one is dropping its row. Every other job runs in a savepoint
        (:meth:`atomic`). Event rows are inserted with one ``executemany``
        before the next savepoint job and before ``COMMIT``. If the batch
        fails as a whole, the cache is reloaded from the committed state.
        """
        c = self.conn
        if self._stale:  # the last failed batch could not reload the cache
            if c.in_transaction:
                c.execute("ROLLBACK")
            self.load()
            self._stale = False
        results: list[tuple[bool, Any]] = []
        append = results.append
        rows = self._rows
        rows.clear()
        ahead = self._ahead
        c.execute("BEGIN IMMEDIATE")
        try:
            try:
                self.read_ahead(jobs)
            except (sqlite3.Error, ValueError) as exc:  # each read then reads its own,
                # and may fail alone (ValueError: a text json.loads cannot take)
                if not c.in_transaction:
                    raise TransactionLost() from exc
                ahead.clear()
            for job in jobs:
                if type(job) in _PLAIN:  # Append or Read
                    mark = len(rows)
                    try:
                        value = job(self)
                    except ReadOnlyViolation:
                        raise  # it wrote outside any savepoint: the whole batch goes
                    except Exception as exc:  # one job's failure is only its own
                        if not c.in_transaction:
                            raise TransactionLost() from exc
                        del rows[mark:]
                        append((False, exc))
                    else:
                        append((True, value))
                    continue
                ahead.clear()  # this job may change documents: reads after it read them anew
                self._insert_rows()
                try:
                    value = self.atomic(partial(job, self))
                except Exception as exc:  # one job's failure is only its own
                    if not c.in_transaction:
                        raise TransactionLost() from exc
                    append((False, exc))
                else:
                    append((True, value))
            self._insert_rows()
            if self.tail >= KEYS_EVERY and not self.keys_failed:
                self._index_tail_in_batch()
            c.execute("COMMIT")
        except BaseException:
            rows.clear()
            ahead.clear()
            self._undo = None
            try:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                self.load()  # what the batch changed in the cache is gone with it
            except Exception:
                # The same I/O error, most likely: the cache may be ahead of
                # what is committed, so no job may run on it; the next batch
                # reloads it first (or fails, and tries again the time after).
                self._stale = True
            raise
        ahead.clear()
        return results

    def read_ahead(self, jobs: list[Callable[[Writer], Any]]) -> None:
        """Read, with one statement, the documents the reads at the head of
        the batch will look at (:class:`Read` with ``document``), up to the
        first job that may change one. A document it does not find (none,
        or past ``READ_AHEAD_MAX_BYTES``) its read reads itself."""
        ids: list[str] = []
        for job in jobs:
            if type(job) is Read:
                if job.document is not None:
                    ids.append(job.document)
            elif type(job) is not Append:
                break
        if len(ids) < 2:  # one statement either way
            return
        row = self.conn.execute(_READ_AHEAD, (json.dumps(ids),)).fetchone()
        self._ahead.update((doc[0], tuple(doc)) for doc in json.loads(row[0]))

    def document(self, doc_id: str) -> tuple[Any, ...] | None:
        """The row of the document ``doc_id`` (``DOCUMENT_COLUMNS``), None if
        there is none: read ahead for this batch, or read now."""
        row = self._ahead.get(doc_id)
        return read_document(self.conn, doc_id) if row is None else row

    def _insert_rows(self) -> None:
        rows = self._rows
        if rows:
            self.conn.executemany(
                "INSERT INTO events (rowid, sk, session_id, seq, ts, json)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self.tail += len(rows)
            rows.clear()

    def index_tail(self) -> None:
        """Add the unindexed tail of events to event_keys, in (sk, seq) order.

        The mark is read from and written to the database, in the running
        transaction: a rollback of it leaves the tail as it was.
        """
        self._insert_rows()
        self._remember("tail", self.tail)
        c = self.conn
        mark = _keys_mark(c)
        c.execute(
            "INSERT INTO event_keys (sk, seq, rid) SELECT sk, seq, rowid FROM events"
            " WHERE rowid > ? ORDER BY sk, seq",
            (mark,),
        )
        c.execute(
            "INSERT INTO meta (key, value)"
            " SELECT 'keys_mark', MAX(?, COALESCE(MAX(rowid), 0)) FROM events WHERE true"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (mark,),
        )
        self.tail = 0

    def _keys_failed(self) -> None:
        """Two events with one (sk, seq): a bug, which the chain check of
        ``verify`` will show. Nothing is dropped: the tail is no longer
        indexed (until a restart), reads and deletes scan it, and both
        events reach the sink."""
        log.error(
            "the spool found two events with the same session and seq; it stops"
            " indexing its events (reads of them slow down) until it restarts"
        )
        self.keys_failed = True

    def _index_tail_in_batch(self) -> None:
        """:meth:`index_tail` in a savepoint: a failure leaves the tail for next time.

        A failure that is not the spool's trouble (the UNIQUE (sk, seq) key
        of event_keys refused a row: a bug) stops indexing (:meth:`_keys_failed`).
        """
        try:
            self.atomic(self.index_tail, flush=False)
        except sqlite3.IntegrityError:
            if not self.conn.in_transaction:
                raise TransactionLost() from None
            self._keys_failed()
        except sqlite3.OperationalError:
            if not self.conn.in_transaction:
                raise TransactionLost() from None
            # SQLITE_FULL and the like: the tail waits for the next batch.

    # -- sessions ----------------------------------------------------------

    def start_session(
        self, user: str, role: str, expires_at: float, drafts: list[Draft], session_id: str = ""
    ) -> OpenSession:
        sid = session_id or new_id()
        now = self.clock()
        head = genesis(self.key, sid)
        sk = self.next_sk
        self.conn.execute(
            "INSERT INTO sessions (session_id, sk, user, role, state, start_ts, start_ms,"
            " expires_at, last_ts, cut_hash) VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?, ?)",
            (sid, sk, user, role, now, shown_ms(now), expires_at, now, head),
        )
        self.next_sk = sk + 1
        self._remember("s:" + sid, _MISSING)
        s = OpenSession(
            session_id=sid,
            sk=sk,
            user=user,
            role=role,
            start_ts=now,
            expires_at=expires_at,
            last_activity=now,
            head_ts=now,
            next_seq=1,
            head=head,
            cut_seq=0,
            cut_hash=head,
            cut_events=0,
            next_part=0,
        )
        self.sessions[sid] = s
        for d in drafts:  # at the session's start time: verify compares the two
            self.append(sid, d, now)
        return replace(s)

    def session(self, session_id: str | None) -> OpenSession:
        s = self.sessions.get(session_id) if session_id else None
        if s is None:
            raise SessionNotOpen(session_id)
        return s

    def append(self, session_id: str, draft: Draft, now: float | None = None,
               *, activity: float | None = None) -> str:
        """Give the draft its ``seq``, time (``now``, else the clock's) and hash
        and store it; returns the event as stored (its canonical JSON).

        The event is the session's activity at its time, unless ``activity``
        says when instead: a record the server makes on its own (a chat a
        crash interrupted, recorded at the next start: when it began), which
        must match :func:`activity_time` of the event, as a restart reads it.

        The hot path of the spool (once per event): nothing in the cache
        changes before the sealing succeeded, so a failing append leaves
        nothing to undo but inside a savepoint job.
        """
        s = self.sessions.get(session_id)
        if s is None:
            raise SessionNotOpen(session_id)
        if self._undo is not None:
            self._touch(s)
        if now is None:
            # Never before the session's newest event: a wall clock stepped
            # back (NTP) must not send the times of its chain backwards.
            now = max(self.clock(), s.head_ts)
        seq = s.next_seq
        digest, text = seal_text(self.key, s.head, draft, session_id, seq, now)
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        count = s.uncut_count
        if count:
            lim = self.limits
            if count >= lim.part_max_events or s.uncut_bytes + size > lim.part_max_bytes:
                self._cut(s, final=False, reason="checkpoint", end_ts=None)
                count = 0
        rid = self.next_rid
        self.next_rid = rid + 1
        self._rows.append((rid, s.sk, session_id, seq, now, text))
        s.head = digest
        s.next_seq = seq + 1
        if count:
            s.uncut_count = count + 1
            s.uncut_bytes += size
        else:  # the first event after a cut (or of the session)
            s.uncut_count, s.uncut_bytes, s.uncut_first_ts = 1, size, now
        s.head_ts = now
        active = now if activity is None else activity
        if active > s.last_activity:
            s.last_activity = active
        self.appended += 1
        return text

    def touch(self, session_id: str) -> None:
        s = self.sessions.get(session_id)
        if s is not None:
            s.last_activity = max(s.last_activity, self.clock())

    def _cut(self, s: OpenSession, *, final: bool, reason: str, end_ts: float | None,
             upto: tuple[int, str] | None = None) -> None:
        """Cut the session's uncut events into its next part; with ``upto``
        (seq, that event's hash) only those up to it (:meth:`split_oversized`)."""
        first, last = s.cut_seq + 1, s.next_seq - 1
        head = s.head
        if upto is not None:
            last, head = upto
        now = self.clock()
        part = s.next_part
        cut_events = s.cut_events + (last - first + 1)
        # Its own savepoint: a cut inside a savepoint-less Append either
        # happens whole or not at all. The cache changes only after the SQL.
        c = self.conn
        c.execute("SAVEPOINT cut")
        try:
            c.execute(
                "INSERT INTO parts (session_id, part, first_seq, last_seq, final, seal_reason,"
                " end_ts, prev_hash, hash, state, created_ts)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                (s.session_id, part, first, last, int(final), reason, end_ts,
                 s.cut_hash, head, now),
            )
            c.execute(
                "UPDATE sessions SET next_part = ?, cut_seq = ?, cut_hash = ?, cut_events = ?,"
                " last_ts = ?, head_ts = ? WHERE session_id = ?",
                (part + 1, last, head, cut_events, s.last_activity, s.head_ts, s.session_id),
            )
        except BaseException:
            if c.in_transaction:  # else SQLite rolled back the whole batch (see TransactionLost)
                c.execute("ROLLBACK TO cut")
                c.execute("RELEASE cut")
            raise
        c.execute("RELEASE cut")
        s.cut_events = cut_events
        s.cut_seq, s.cut_hash = last, head
        s.next_part = part + 1
        s.uncut_count, s.uncut_bytes, s.uncut_first_ts = 0, 0, None
        self.new_parts += 1

    def split_oversized(self) -> int:
        """Cut checkpoint parts, each within the part limits, from the uncut
        events of open sessions that exceed them: the limits were lowered
        since the events were appended (a restart with a smaller
        ``part_max_events`` or ``part_max_bytes``, say to fit a receiver's
        size limit), and one part of them all would be one sink write past
        what the limits promise. The rest stays uncut. Runs in the caller's
        transaction; returns the parts cut."""
        lim = self.limits
        cut = 0
        for s in list(self.sessions.values()):
            if s.uncut_count <= lim.part_max_events and s.uncut_bytes <= lim.part_max_bytes:
                continue
            rows = self.conn.execute(
                "SELECT seq, ts, LENGTH(CAST(json AS BLOB)), json FROM session_events"
                " WHERE sk = ? AND seq > ? ORDER BY seq", (s.sk, s.cut_seq)).fetchall()
            run: list[tuple[int, float, int, str]] = []
            run_bytes = 0
            for row in rows:  # the rule of append: cut before an event that would not fit
                if run and (len(run) >= lim.part_max_events
                            or run_bytes + row[2] > lim.part_max_bytes):
                    self._cut(s, final=False, reason="checkpoint", end_ts=None,
                              upto=(run[-1][0], json.loads(run[-1][3])["hash"]))
                    cut += 1
                    run, run_bytes = [], 0
                run.append(row)
                run_bytes += row[2]
            s.uncut_count = len(run)
            s.uncut_bytes = run_bytes
            s.uncut_first_ts = run[0][1] if run else None
        return cut

    def checkpoint(self, session_id: str) -> bool:
        """Cut the session's uncut events into a non-final part, if any."""
        s = self.session(session_id)
        if not s.uncut_count:
            return False
        self._touch(s)
        self._cut(s, final=False, reason="checkpoint", end_ts=None)
        return True

    def seal(
        self, session_id: str, reason: str, end: Draft, at: float | None = None
    ) -> OpenSession:
        """Record ``session.end`` and cut the final part; the session closes.

        It ends now, or ``at`` (the deadline that ended it, which the reaper
        may see late: after downtime, a paused VM) but never before its newest
        event (even now, after a wall clock stepped back), so that times in
        its chain do not go backwards.
        """
        s = self.session(session_id)
        now = max(self.clock() if at is None else at, s.head_ts)
        self.append(session_id, end, now)  # at the session's end time: verify compares the two
        self._touch(s)
        self._cut(s, final=True, reason=reason, end_ts=now)
        self.conn.execute(
            "UPDATE sessions SET state = 'sealed', end_ts = ?, seal_reason = ?"
            " WHERE session_id = ?",
            (now, reason, session_id),
        )
        del self.sessions[session_id]
        return s

    # -- security events ---------------------------------------------------

    def append_security(self, draft: Draft, session_id: str | None) -> dict[str, Any]:
        if draft.action not in SECURITY_ACTIONS:
            raise ValueError(f"{draft.action!r} is not a security event action")
        now = self.clock()
        event, text = seal_event(self.key, self.security_head, draft, session_id, None, now)
        self.conn.execute(
            "INSERT INTO security_events (event_id, ts, ts_ms, action, json, state)"
            " VALUES (?, ?, ?, ?, ?, 'pending')",
            (event["event_id"], now, shown_ms(now), draft.action, text),
        )
        self._move_security_head(event["hash"])
        self.new_security += 1
        return event

    def adopt_security_head(self, old: str, new: str) -> bool:
        """Continue the security chain from ``new`` (the end of what the sink
        holds after ``old``: a spool restored from a backup older than the
        sink), unless an event was appended since ``old`` was read."""
        if self.security_head != old:
            return False
        self._move_security_head(new)
        return True

    def _move_security_head(self, new: str) -> None:
        """The security chain goes on from ``new`` (put back if the batch fails)."""
        self._remember("security_head", self.security_head)
        self.security_head = new
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('security_head', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (new,),
        )

    def record_failure(self, session_id: str, draft: Draft, err: ActionError) -> None:
        """Record a refused action: its event with the error's outcome and
        reason, and ``access.denied`` as well when it was denied."""
        draft.outcome = err.outcome
        draft.details = {**draft.details, "reason": err.reason}
        self.append(session_id, draft)
        if err.outcome == "denied":
            self.append_security(
                Draft(
                    "access.denied",
                    outcome="denied",
                    target=draft.target,
                    details={"action": draft.action, "reason": err.reason},
                    source=draft.source,
                ),
                session_id,
            )

    # -- the flusher's side ------------------------------------------------

    def mark_part_stored(self, session_id: str, part: int, keep_seconds: float,
                         remember: tuple[str, float] | None = None) -> None:
        """The sink acknowledged the part: kept ``keep_seconds`` or deleted.
        With ``remember`` (the sink, seconds), a final part's session is
        noted in ``stored_sessions`` for that long (and older notes go)."""
        now = self.clock()
        if remember is not None:
            final = self.conn.execute(
                "SELECT final FROM parts WHERE session_id = ? AND part = ?",
                (session_id, part)).fetchone()
            if final is not None and final[0]:
                sink, seconds = remember
                self.conn.execute(
                    "INSERT INTO stored_sessions (session_id, sink, stored_ts) VALUES (?, ?, ?)"
                    " ON CONFLICT (session_id) DO UPDATE SET sink = excluded.sink,"
                    " stored_ts = excluded.stored_ts", (session_id, sink, now))
                self.conn.execute("DELETE FROM stored_sessions WHERE stored_ts < ?",
                                  (now - seconds,))
        if keep_seconds > 0:
            self.conn.execute(
                "UPDATE parts SET state = 'stored', stored_ts = ?, last_error = NULL"
                " WHERE session_id = ? AND part = ?",
                (now, session_id, part),
            )
            return
        self._delete_part(session_id, part)

    def _delete_part(self, session_id: str, part: int) -> None:
        c = self.conn
        row = c.execute(
            "SELECT p.first_seq, p.last_seq, s.sk"
            " FROM parts p LEFT JOIN sessions s USING (session_id)"
            " WHERE p.session_id = ? AND p.part = ?",
            (session_id, part),
        ).fetchone()
        if row is None:
            return
        first, last, sk = row
        if not self.keys_failed:
            try:
                self.index_tail()  # the tail is then (almost always) empty
            except sqlite3.IntegrityError:  # the statement failed; the transaction stands
                self._keys_failed()
        c.execute(
            "DELETE FROM events WHERE rowid IN (SELECT rid FROM event_keys"
            " WHERE sk = ? AND seq BETWEEN ? AND ?)",
            (sk, first, last),
        )
        c.execute(
            "DELETE FROM events WHERE rowid > ? AND sk = ? AND seq BETWEEN ? AND ?",
            (_keys_mark(c), sk, first, last),
        )
        c.execute(
            "DELETE FROM event_keys WHERE sk = ? AND seq BETWEEN ? AND ?", (sk, first, last)
        )
        c.execute("DELETE FROM parts WHERE session_id = ? AND part = ?", (session_id, part))
        c.execute(
            "DELETE FROM sessions WHERE session_id = ? AND state = 'sealed'"
            " AND NOT EXISTS (SELECT 1 FROM parts WHERE session_id = ?)",
            (session_id, session_id),
        )

    def purge_stored(self, older_than: float, limit: int = 500,
                     max_events: int = PURGE_MAX_EVENTS) -> tuple[int, bool]:
        """Delete stored parts acknowledged before ``older_than``: up to
        ``limit`` parts, and no more once ``max_events`` events are deleted
        (the writer's queue waits on the job, and the WAL takes all it
        deletes). Returns how many parts, and whether more may wait."""
        rows = self.conn.execute(
            "SELECT session_id, part, last_seq - first_seq + 1 FROM parts"
            " WHERE state = 'stored' AND stored_ts < ? LIMIT ?",
            (older_than, limit),
        ).fetchall()
        events = 0
        for n, (sid, part, count) in enumerate(rows):
            if n and events + count > max_events:
                return n, True
            self._delete_part(sid, part)
            events += count
        return len(rows), len(rows) >= limit

    def mark_part_failed(self, session_id: str, part: int, error: str, dead: bool) -> None:
        self.conn.execute(
            "UPDATE parts SET attempts = attempts + 1, last_error = ?,"
            " state = CASE WHEN ? THEN 'dead' ELSE state END"
            " WHERE session_id = ? AND part = ? AND state = 'pending'",
            (error[:500], int(dead), session_id, part),
        )

    def mark_security_stored(self, ids: list[int], keep_seconds: float,
                             sink: str | None = None) -> None:
        """The sink took these security events: kept ``keep_seconds`` or
        deleted. With ``sink`` (its identity), the stretch of the chain it
        holds is extended, or a new one begun if another sink took the last
        (:meth:`_note_stretch`)."""
        q = ",".join("?" * len(ids))
        if sink is not None:
            self._note_stretch(sink, ids)
            self._note_late(sink, ids)
        if keep_seconds > 0:
            self.conn.execute(
                f"UPDATE security_events SET state = 'stored', stored_ts = ?, last_error = NULL"
                f" WHERE id IN ({q})",
                (self.clock(), *ids),
            )
        else:
            self.conn.execute(f"DELETE FROM security_events WHERE id IN ({q})", ids)

    def _note_stretch(self, sink: str, ids: list[int]) -> None:
        """Extend ``sink``'s stretch of the security chain to the newest of
        ``ids``, or begin one after the last event any sink took.

        Only forward: a dead letter retried late is older than what its
        sink took since. A spool that flushed before stretches were noted
        (meta ``sink_status`` but no ``security_taken``) does not know where
        its first stretch begins: it is noted as "" (it accepts no chain
        start; its end is still checked), unless ``ids`` hold the chain's
        first event (id 1: ids count up from it)."""
        newest = max(ids)
        meta = dict(self.conn.execute(
            f"SELECT key, {_META_VALUE}"
            " FROM meta WHERE key IN ('security_stretch', 'security_taken', 'sink_status')"))
        taken = _taken(meta.get("security_taken"))
        if taken is not None and newest <= taken[0]:
            return
        row = self.conn.execute(
            "SELECT json FROM security_events WHERE id = ?", (newest,)).fetchone()
        if row is None:
            return
        last = json.loads(row[0])["hash"]
        current = json.loads(meta["security_stretch"]) if "security_stretch" in meta else None
        if current is None or current[0] != sink:
            if taken is not None:
                begins = taken[1]
            elif "sink_status" in meta and min(ids) != 1:
                begins = ""  # flushed before stretches were noted: unknown
            else:
                begins = genesis(self.key, SECURITY_STREAM)
            current = [sink, begins]
        self.conn.execute(
            "INSERT INTO sink_stretches (sink, took_from, took_to) VALUES (?, ?, ?)"
            " ON CONFLICT (sink, took_from) DO UPDATE SET took_to = excluded.took_to",
            (sink, current[1], last))
        self.conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [("security_stretch", json.dumps(current)),
             ("security_taken", json.dumps([newest, last]))])

    def _note_late(self, sink: str, ids: list[int]) -> None:
        """Of ``ids``, the events dead-lettered before: stored now in another
        sink than the one whose stretch of the chain they belong to, each
        leaves a gap there and stands alone here. Both are noted (sink_resumes),
        or verify reports a break in each sink for good."""
        if not _has_table(self.conn, "security_late"):
            return  # no security event was ever dead-lettered with its sink known
        q = ",".join("?" * len(ids))
        late = self.conn.execute(
            f"SELECT l.prev, l.sink, e.json FROM security_late l"
            f" JOIN security_events e ON e.id = l.id WHERE l.id IN ({q})", ids).fetchall()
        if not late:
            return
        for prev, first_sink, text in late:
            if first_sink == sink:
                continue  # the gap filled where it was
            own = json.loads(text)["hash"]
            self.conn.executemany(
                "INSERT OR IGNORE INTO sink_resumes (sink, took_from, took_to) VALUES (?, ?, ?)",
                [(first_sink, own, ""), (sink, prev, own)])
        self.conn.execute(f"DELETE FROM security_late WHERE id IN ({q})", ids)

    def _hash_before(self, rid: int) -> str | None:
        """The hash of the security event before ``rid`` in the chain (ids
        count up from 1 with it), while the spool can tell."""
        if rid == 1:
            return genesis(self.key, SECURITY_STREAM)
        row = self.conn.execute(  # (as bytes: a text that is not UTF-8 fails only here)
            "SELECT CAST(json AS BLOB) FROM security_events WHERE id = ?", (rid - 1,)).fetchone()
        if row is not None:
            try:
                return str(json.loads(row[0])["hash"])
            except (ValueError, TypeError, KeyError):  # its text damaged: cannot tell
                return None
        raw = self.conn.execute(
            "SELECT value FROM meta WHERE key = 'security_taken'").fetchone()
        taken = _taken(raw[0] if raw else None)
        return str(taken[1]) if taken is not None and taken[0] == rid - 1 else None

    def note_earlier_late(self) -> int:
        """Note (security_late) the dead-lettered security events a release
        before those notes left, as :meth:`mark_security_dead` does now, with
        the sink of the current stretch: the one that refused them, unless the
        sink was switched before the upgrade too. Without it, such an event
        retried into another sink broke the chain in both, as before the notes
        were made. At open; nothing to do (one indexed read) once noted."""
        dead = [r[0] for r in self.conn.execute(
            "SELECT id FROM security_events WHERE state = 'dead' ORDER BY id")]
        if not dead:
            return 0
        if _has_table(self.conn, "security_late"):
            noted = {r[0] for r in self.conn.execute("SELECT id FROM security_late")}
            dead = [rid for rid in dead if rid not in noted]
            if not dead:
                return 0
        raw = self.conn.execute(
            "SELECT value FROM meta WHERE key = 'security_stretch'").fetchone()
        if raw is None:
            return 0  # never flushed a security event: no sink to name
        sink = str(json.loads(raw[0])[0])
        for stmt in LATE_SCHEMA.split(";")[:-1]:
            self.conn.execute(stmt)
        n = 0
        for rid in dead:
            prev = self._hash_before(rid)
            if prev is not None:
                n += self.conn.execute(
                    "INSERT OR IGNORE INTO security_late (id, prev, sink) VALUES (?, ?, ?)",
                    (rid, prev, sink)).rowcount
        return n

    def mark_security_dead(self, ids: list[int], error: str, sink: str | None = None) -> None:
        """With ``sink`` (its identity), each event's place in the chain is
        noted the first time (security_late), for when another sink takes it."""
        q = ",".join("?" * len(ids))
        if sink is not None:
            self._note_place(ids, sink)
        self.conn.execute(
            f"UPDATE security_events SET state = 'dead', last_error = ? WHERE id IN ({q})",
            (error[:500], *ids),
        )

    def mark_security_aside(self, rid: int, error: str, sink: str | None = None) -> None:
        """A pending security event the sink keeps failing, put aside while
        later ones go (the flusher): its ``last_error``, and with ``sink`` its
        place in the chain, as a dead letter's (stored late, it may be stored
        in another sink, after a switch)."""
        if sink is not None:
            self._note_place([rid], sink)
        self.conn.execute(
            "UPDATE security_events SET last_error = ? WHERE id = ? AND state = 'pending'",
            (error[:500], rid))

    def _note_place(self, ids: list[int], sink: str) -> None:
        for stmt in LATE_SCHEMA.split(";")[:-1]:  # in this transaction, as the rest
            self.conn.execute(stmt)
        for rid in ids:
            prev = self._hash_before(rid)
            if prev is not None:
                self.conn.execute(
                    "INSERT OR IGNORE INTO security_late (id, prev, sink) VALUES (?, ?, ?)",
                    (rid, prev, sink))

    def purge_stored_security(self, older_than: float, limit: int = 5000) -> int:
        """Delete up to ``limit`` stored security events acknowledged before
        ``older_than`` (a bounded job: the writer's queue waits on it)."""
        cur = self.conn.execute(
            "DELETE FROM security_events WHERE id IN (SELECT id FROM security_events"
            " WHERE state = 'stored' AND stored_ts < ? LIMIT ?)", (older_than, limit)
        )
        return cur.rowcount

    def retry_dead(self) -> int:
        a = self.conn.execute(
            "UPDATE parts SET state = 'pending', last_error = NULL WHERE state = 'dead'"
        ).rowcount
        b = self.conn.execute(
            "UPDATE security_events SET state = 'pending', last_error = NULL WHERE state = 'dead'"
        ).rowcount
        return a + b


def part_document(meta: dict[str, Any], events: list[Any]) -> dict[str, Any]:
    """The sink document of a part (API.md "A part")."""
    sid, part = meta["session_id"], meta["part"]
    final = bool(meta["final"])
    end_ts = meta["end_ts"]
    return {
        "_id": f"{sid}:{part}",
        "session_id": sid,
        "part": part,
        "final": final,
        "user": meta["user"],
        "session_start_time": format_ts(meta["start_ts"]),
        "session_end_time": format_ts(end_ts) if final and end_ts is not None else None,
        "session_duration_seconds": (
            round(end_ts - meta["start_ts"], 3) if final and end_ts is not None else None
        ),
        "event_count": meta["last_seq"] - meta["first_seq"] + 1,
        "seal_reason": meta["seal_reason"],
        "first_seq": meta["first_seq"],
        "last_seq": meta["last_seq"],
        "prev_hash": meta["prev_hash"],
        "hash": meta["hash"],
        "events": events,
    }


__all__ = [
    "INTERRUPTED",
    "SCHEMA",
    "ActionError",
    "Append",
    "Change",
    "Limits",
    "OpenSession",
    "SessionNotOpen",
    "Writer",
    "activity_time",
    "canonical_json",
    "migrate",
    "note_earlier_stretch",
    "part_document",
]

"""The embedded default sink: a separate SQLite file, idempotent and queryable."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from audit.spool import (
    create_private,
    forget_text,
    loose_dir,
    make_private_dirs,
    readonly_uri,
    unsafe_dir,
)

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
    lone_surrogate,
    odd_part,
    sql_where,
    summarize_parts,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS parts (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    user TEXT,
    session_start_time TEXT,
    final INTEGER NOT NULL,
    hash TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS parts_session ON parts (session_id, part);
CREATE INDEX IF NOT EXISTS parts_start ON parts (session_start_time, session_id);
CREATE INDEX IF NOT EXISTS parts_user ON parts (user, session_start_time);
CREATE TABLE IF NOT EXISTS security_events (
    id TEXT PRIMARY KEY,
    ts TEXT NOT NULL,
    action TEXT NOT NULL,
    hash TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS security_ts ON security_events (ts, id);
-- GET /audit/security-events?kind=: without it a rare kind read every row
-- (0.3-0.5 s for a million events, on the connection sink writes wait for).
CREATE INDEX IF NOT EXISTS security_action ON security_events (action, ts, id);
"""


# The query columns and the document fields they copy (index_mismatches).
_PART_COLUMNS = (("id", "_id"), ("session_id", "session_id"), ("part", "part"),
                 ("user", "user"), ("session_start_time", "session_start_time"),
                 ("final", "final"), ("hash", "hash"))
_SECURITY_COLUMNS = (("id", "_id"), ("ts", "ts"), ("action", "action"), ("hash", "hash"))


# Bytes the -wal file is cut back to once checkpointed (SQLite's
# journal_size_limit): else it keeps the largest size it ever reached, say
# while a backup or a sqlite3 shell held a snapshot and writes went on.
WAL_SIZE_LIMIT = 16 * 1024 * 1024


# How long the open tries to make a new file WAL while another connection
# holds it (as long as a write waits for another's lock: busy_timeout).
WAL_WAIT_SECONDS = 5.0


async def _prepare(db: aiosqlite.Connection) -> None:
    await _make_wal(db)
    await db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    await db.execute("PRAGMA synchronous=FULL")
    await db.execute("PRAGMA busy_timeout=5000")
    await db.executescript(_SCHEMA)
    for table, columns in (("parts", _PART_COLUMNS), ("security_events", _SECURITY_COLUMNS)):
        await _check_columns(db, table, {c for c, _ in columns} | {"doc"})


async def _make_wal(db: aiosqlite.Connection) -> None:
    """``journal_mode=WAL``, waiting for another connection that holds the file.

    Servers sharing one sink file (README: Several servers, one sink) open a
    new one at once as a fleet starts. While one is making it WAL (holding
    its write lock, about to take it whole), SQLite answers another's
    ``journal_mode=WAL`` "database is locked" at once, without waiting out
    its busy timeout (waiting there could deadlock): that server's sink was
    unavailable at start (7 of 600 opens, four processes at once), and its
    start's checks against the sink were skipped. It is tried again."""
    deadline = time.monotonic() + WAL_WAIT_SECONDS
    while True:
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", None) != "SQLITE_BUSY" \
                    or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.01)


async def _check_columns(db: aiosqlite.Connection, table: str, ours: set[str]) -> None:
    """The table found in the file takes the sink's rows: it has every column
    the sink fills, and no other that must be filled (NOT NULL without a
    default). A table of that name another program made (or one changed by
    hand) refused every row with an IntegrityError, which is the verdict on
    a document: every part and security event was dead-lettered in turn."""
    # table_xinfo: (cid, name, type, notnull, default, pk, hidden); hidden
    # columns (generated ones, 2 and 3) are never filled by an INSERT.
    async with db.execute(f"PRAGMA table_xinfo({table})") as cur:
        rows = list(await cur.fetchall())
    # table_list: (schema, name, type, ncol, wr, strict); wr: WITHOUT ROWID.
    async with db.execute(f"PRAGMA table_list({table})") as cur:
        listed = await cur.fetchone()
    without_rowid = listed is not None and bool(listed[4])
    # Of a key, SQLite fills only a rowid table's one INTEGER PRIMARY KEY (the
    # rowid). Another key column of the table's own was taken for filled: NOT
    # NULL (always so in a WITHOUT ROWID table), it refused every row alike.
    # index_list: (seq, name, unique, origin, partial); a key that is not the
    # rowid has an index of origin "pk" (so "INTEGER PRIMARY KEY DESC", which
    # SQLite does not take for the rowid, a quirk kept for compatibility).
    async with db.execute(f"PRAGMA index_list({table})") as cur:
        key_index = any(r[3] == "pk" for r in await cur.fetchall())
    key = [r for r in rows if r[5]]
    rowid = (key[0][1] if not without_rowid and not key_index and len(key) == 1
             and str(key[0][2]).upper() == "INTEGER" else None)
    missing = ours - {r[1] for r in rows}
    unfilled = [r[1] for r in rows
                if r[1] not in ours and r[1] != rowid and r[4] is None and r[6] == 0
                and (r[3] or (r[5] and without_rowid))]
    if missing or unfilled:
        why = (f"it lacks the column(s) {', '.join(sorted(missing))}" if missing else
               f"its column(s) {', '.join(unfilled)} must be filled (NOT NULL, no default),"
               " and the sink does not fill them")
        raise SinkUnavailable(f"table {table} is not this sink's: {why}; the file is another"
                              " program's, or the table was changed by hand")


async def _has_tables(db: aiosqlite.Connection) -> None:
    """A read-only open (verify): the file must be an audit sink already."""
    await db.execute("PRAGMA busy_timeout=5000")
    async with db.execute(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table'"
        " AND name IN ('parts', 'security_events')"
    ) as cur:
        row = await cur.fetchone()
    if row is None or row[0] != 2:
        raise SinkUnavailable("the file holds no audit tables (parts, security_events): not"
                              " this sink's file, or they were dropped")


@contextlib.asynccontextmanager
async def _readable(name: str) -> AsyncIterator[None]:
    """A query over rows SQLite cannot hand out (text that is not UTF-8, a
    damaged page) or that hold no JSON (written by another process):
    :class:`SinkUnreadable` (the admin API's 503 ``sink_unavailable``, the
    words in the log; a finding of ``verify``), not a 500 with a traceback."""
    try:
        yield
    except sqlite3.Error as exc:
        # (Not "... with text '...'": an audit record's text, for no log.)
        raise SinkUnreadable(f"sqlite sink: {name} cannot be read: {forget_text(exc)}") from exc
    except (ValueError, RecursionError) as exc:  # json.loads (nested past its stack too)
        raise SinkUnreadable(f"sqlite sink: {name} holds a document that is not JSON:"
                             f" {exc}") from exc
    except OverflowError as exc:  # a document's part number past 64 bits, bound in a query
        raise SinkUnreadable(f"sqlite sink: {name} holds a number SQLite cannot hold:"
                             f" {exc}") from exc


# The constraints a row of the sink's own tables can fail: a field the
# document lacks (NOT NULL). The primary key's is answered by ON CONFLICT.
_DOCUMENT_CONSTRAINTS = frozenset({"SQLITE_CONSTRAINT_NOTNULL"})


def _classified(exc: sqlite3.Error) -> SinkUnavailable | SinkRejected:
    """Rejected only for what is wrong with the document (a field it lacks, a
    value SQLite cannot bind or store); the file's trouble is unavailable:
    locked, read only, full (OperationalError), and corrupt or not a
    database (a plain DatabaseError), which would otherwise dead-letter the
    whole backlog one write after another until an operator repairs it. So
    is a constraint the sink never made (a CHECK, a trigger's RAISE, a
    UNIQUE index, a column type that takes no text id: someone changed the
    table), which fails every row alike."""
    if isinstance(exc, (sqlite3.OperationalError, sqlite3.InternalError)) or (
        type(exc) is sqlite3.DatabaseError
    ) or (isinstance(exc, sqlite3.IntegrityError)
          and getattr(exc, "sqlite_errorname", None) not in _DOCUMENT_CONSTRAINTS):
        return SinkUnavailable(f"sqlite sink: {exc}")
    return SinkRejected(f"sqlite sink: {exc}")


def _checked_parts(rows: Iterable[Any], *, events: bool = True) -> list[Doc]:
    """Rows ``(id, doc)`` of ``parts`` as documents; a row another writer put
    there that the admin API cannot show (:func:`~sinks.base.odd_part`; without
    ``events``, their events are not looked at) is :class:`SinkUnreadable`."""
    parts = []
    for row_id, text in rows:
        part = json.loads(text)
        if lone_surrogate(text, part):
            raise SinkUnreadable(f"sqlite sink: the part with id {row_id!r} holds text that"
                                 " is not UTF-8 (a lone surrogate)")
        if odd_part(part, events=events):  # (another writer's row: see odd_part)
            raise SinkUnreadable(f"sqlite sink: the part with id {row_id!r} is not a part"
                                 " the admin API can show: no object with a session_id"
                                 " and a number, or events without a seq")
        parts.append(part)
    return parts


class SqliteSink(Sink):
    type = "sqlite"
    queryable = True
    raw_events = True

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        # Read only (verify): nothing is created or changed, not even the
        # tables of a file that has lost them.
        self.readonly = readonly
        self._db: aiosqlite.Connection | None = None
        # The file the connection has open, as (st_dev, st_ino): a file
        # deleted or renamed while open takes writes that nobody will read.
        self._file_id: tuple[int, int] | None = None
        self._reopen = False  # closed for that reason, to be opened anew
        # One connection: writes must not interleave inside a transaction.
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        # Said before aiosqlite tries: its thread, failing to connect, may
        # outlive a command's event loop and print a traceback as it ends.
        try:
            unusable = self.path.is_dir() or (self.readonly and not self.path.is_file())
        except OSError as exc:  # a name too long; a directory on the way not searchable
            raise SinkUnavailable(f"cannot open {self.path.name}: {exc}") from exc
        if unusable:
            raise SinkUnavailable(f"cannot open {self.path.name}: not a database file")
        if self.readonly:
            await self._connect(readonly_uri(self.path), uri=True, setup=_has_tables)
            return
        try:
            make_private_dirs(self.path.parent)
            unsafe = unsafe_dir(self.path.parent)
            if unsafe is not None:
                raise SinkUnavailable(f"sqlite sink: {unsafe}")
            loose = loose_dir(self.path.parent)
            if loose is not None:
                log.warning("sqlite sink: %s", loose)
            create_private(self.path)
        except OSError as exc:
            raise SinkUnavailable(f"cannot open {self.path.name}: {exc}") from exc
        await self._connect(self.path, uri=False, setup=_prepare)
        self._file_id = self._path_id()

    def _path_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    async def _current(self) -> aiosqlite.Connection:
        """The connection, opened anew first if its file is no longer the one
        at ``path`` (deleted or renamed: SQLite would go on writing into it).

        The old connection is closed only once its WAL is wholly checkpointed
        into the old file and emptied: SQLite does not checkpoint on closing a
        file that has moved, and leaves the ``-wal`` under the old name, for
        the new file to drop (the renamed file lost its last writes, or came
        out malformed) or replay. While another connection (a ``sqlite3``
        shell, a backup) reads an older snapshot, the checkpoint stops short:
        the write is unavailable until it can finish."""
        if self._db is not None and self._file_id is not None \
                and self._path_id() != self._file_id:
            try:
                async with self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                    row = await cur.fetchone()
            except sqlite3.Error as exc:
                raise SinkUnavailable(f"sqlite sink: {self.path.name} was deleted or replaced,"
                                      f" and its WAL cannot be checkpointed: {exc}") from exc
            if row is None or row[0] != 0:
                raise SinkUnavailable(
                    f"sqlite sink: {self.path.name} was deleted or replaced, and its WAL"
                    " cannot be checkpointed yet (another connection is reading the file)")
            log.warning("sqlite sink: %s was deleted or replaced; starting it anew",
                        self.path.name)
            await self.close()
            self._reopen = True
        if self._db is None and self._reopen:
            await self.open()  # SinkUnavailable if it cannot: tried again at the next write
            self._reopen = False
        return self._conn()

    def _still_current(self) -> None:
        """After a write: its file still the one at ``path``, else the write
        counts as failed (written again into the new file)."""
        if self._file_id is not None and self._path_id() != self._file_id:
            raise SinkUnavailable(f"sqlite sink: {self.path.name} was deleted or replaced"
                                  " during a write")

    async def _connect(self, target: str | Path, *, uri: bool,
                       setup: Callable[[aiosqlite.Connection], Awaitable[None]]) -> None:
        try:
            db = await aiosqlite.connect(target, uri=uri, isolation_level=None)
            try:
                await setup(db)
            except BaseException:
                await db.close()
                raise
        except SinkUnavailable as exc:
            raise SinkUnavailable(f"{self.path.name}: {exc}") from None
        except (OSError, sqlite3.Error) as exc:
            raise SinkUnavailable(f"cannot open {self.path.name}: {exc}") from exc
        self._db = db

    async def close(self) -> None:
        db, self._db, self._file_id, self._reopen = self._db, None, None, False
        if db is not None:
            await db.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise SinkUnavailable("sqlite sink is not open")
        return self._db

    async def write_part(self, part: Doc) -> None:
        doc = dumps(part)
        async with self._lock:
            await self._insert_part(await self._current(), part, doc)
            self._still_current()

    async def _insert_part(self, db: aiosqlite.Connection, part: Doc, doc: str) -> None:
        try:
            cur = await db.execute(
                "INSERT INTO parts"
                " (id, session_id, part, user, session_start_time, final, hash, doc)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (
                    part["_id"],
                    part["session_id"],
                    part["part"],
                    part.get("user"),
                    part.get("session_start_time"),
                    1 if part.get("final") else 0,
                    part["hash"],
                    doc,
                ),
            )
            inserted = cur.rowcount
            await cur.close()
            if inserted == 0:
                await self._check_same(db, "parts", part["_id"], part["hash"])
        except sqlite3.Error as exc:
            raise _classified(exc) from exc

    async def write_security_events(self, events: list[Doc]) -> None:
        async with self._lock:
            await self._insert_security(await self._current(), events)
            self._still_current()

    async def _insert_security(self, db: aiosqlite.Connection, events: list[Doc]) -> None:
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                conflicts = []
                for ev in events:
                    cur = await db.execute(
                        "INSERT INTO security_events (id, ts, action, hash, doc)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                        (
                            ev["_id"],
                            ev["ts"],
                            ev["action"],
                            ev["hash"],
                            json.dumps(ev, separators=(",", ":"), ensure_ascii=False),
                        ),
                    )
                    if cur.rowcount == 0:
                        conflicts.append(ev)
                    await cur.close()
                for ev in conflicts:
                    await self._check_same(db, "security_events", ev["_id"], ev["hash"])
                await db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled the transaction back itself (on
                # SQLITE_FULL, IOERR, NOMEM): a ROLLBACK then fails with "no
                # transaction is active", and that error, not the full disk,
                # was what the flusher, the log and /audit/status reported.
                # So when the write was cancelled (Ctrl-C on drain, the end of
                # the shutdown's flush window) while its COMMIT ran in
                # aiosqlite's thread: the transaction still looked open, the
                # ROLLBACK queued behind the COMMIT found none, and its error
                # replaced the cancellation (drain went on sending).
                if db.in_transaction:
                    try:
                        await db.execute("ROLLBACK")
                    except sqlite3.Error:
                        if db.in_transaction:
                            raise
                raise
        except sqlite3.Error as exc:
            raise _classified(exc) from exc

    @staticmethod
    async def _check_same(db: aiosqlite.Connection, table: str, doc_id: str, h: str) -> None:
        async with db.execute(f"SELECT hash FROM {table} WHERE id = ?", (doc_id,)) as cur:
            row = await cur.fetchone()
        if row is None or row[0] != h:
            raise SinkConflict(f"{doc_id} is stored with a different hash")

    async def list_sessions(
        self,
        *,
        user: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Doc], str | None]:
        # Under the lock, as the queries below: a write that finds the file
        # deleted or renamed closes this connection (a query on it was a
        # ProgrammingError, a 500), and the pages come from one file. And
        # from the file at ``path``, as a write's: a file renamed away (an
        # archive) was still shown, as if the sink held it, until the next
        # write, which might be hours later; verify found none of it.
        async with self._lock, _readable(self.path.name):
            await self._current()
            return await self._list_sessions(user, since, until, limit, cursor)

    async def _list_sessions(self, user: str | None, since: str | None, until: str | None,
                             limit: int, cursor: str | None) -> tuple[list[Doc], str | None]:
        db = self._conn()
        # A session is listed by its lowest stored part (not part 0: verify
        # must see a session whose first part was removed from the sink).
        after = None
        if cursor is not None:
            start, sid = decode_cursor(cursor)
            after = (start, sid)
        # A row value, not "a < ? OR (a = ? AND b < ?)": SQLite searches the
        # index only for the first; with the second it scanned every newer
        # row to reach a page deep in the history (0.1 s a page at 500,000).
        where, args = sql_where(
            ("user = ?", user),
            ("session_start_time >= ?", since),
            ("session_start_time <= ?", until),
            ("(session_start_time, session_id) < (?, ?)", after),
        )
        sql = (
            "SELECT session_id FROM parts WHERE part = (SELECT MIN(p.part) FROM parts p"
            f" WHERE p.session_id = parts.session_id) AND {where}"
            " ORDER BY session_start_time DESC, session_id DESC LIMIT ?"
        )
        async with db.execute(sql, (*args, limit + 1)) as cur:
            ids = [r[0] for r in await cur.fetchall()]
        more = len(ids) > limit
        ids = ids[:limit]
        out = []
        for sid in ids:
            parts = await self._session_parts(db, sid, events=False)
            out.append(summarize_parts(parts))
        next_cursor = None
        if more and out:
            last = out[-1]
            next_cursor = encode_cursor(last["session_start_time"], last["session_id"])
        return out, next_cursor

    async def index_mismatches(self) -> list[tuple[str, str, str]]:
        """Rows whose columns (``session_id``, ``part``, ``user``,
        ``session_start_time``, ``final``, ``hash``; ``ts``, ``action``) are
        not the document's own fields: the listings filter on the columns,
        verify reads the documents. A ``doc`` that is not JSON, or that has
        a key twice in one object, is reported as the column ``doc``.

        The fields are read as verify and the admin API read them (Python's
        ``json``: the last of two equal keys; ``"us\\u0065r"`` is ``user``),
        not by ``json_extract``, which takes the first and does not match an
        escaped key: either way a forged row listed under one ``user`` or
        ``action`` showed another, and verify said OK. A key twice anywhere
        (an event's ``actor.user``) is read one way by verify and another by
        ``json_extract`` in a report of its own: never written by the sink."""
        db = self._conn()
        out: list[tuple[str, str, str]] = []
        for table, kind, columns in (("parts", "part", _PART_COLUMNS),
                                     ("security_events", "security event", _SECURITY_COLUMNS)):
            # One parse for the keys given twice, one for the fields by their
            # unescaped keys; the column by column answer only for a row
            # found wrong (each json_each is a parse: 7 of them made it 35 times slower).
            twice = (f"EXISTS (SELECT 1 FROM json_tree({table}.doc) WHERE parent IS NOT NULL"
                     " GROUP BY parent, key HAVING count(*) > 1)")
            fields = ", ".join(f"'{f}'" for _, f in columns)
            column = " ".join(f"WHEN '{f}' THEN {table}.{c}" for c, f in columns)
            unescaped = (f"EXISTS (SELECT 1 FROM json_each({table}.doc) j WHERE j.key IN"
                         f" ({fields}) AND j.value IS NOT CASE j.key {column} END)")
            differs = " || ".join(
                f"(CASE WHEN {c} IS NOT json_extract(doc, '$.{f}') THEN '{c} ' ELSE '' END)"
                for c, f in columns)
            each = " || ".join(
                f"(CASE WHEN {c} IS NOT json_extract(doc, '$.{f}') OR EXISTS (SELECT 1 FROM"
                f" json_each({table}.doc) j WHERE j.key = '{f}' AND j.value IS NOT"
                f" {table}.{c}) THEN '{c} ' ELSE '' END)"
                for c, f in columns)
            async with db.execute(
                f"SELECT id, CASE WHEN NOT json_valid(doc) OR {twice} THEN 'doc'"
                f" WHEN {unescaped} THEN {each} ELSE {differs} END AS bad"
                f" FROM {table} WHERE bad != '' ORDER BY id"
            ) as cur:
                out.extend((str(r[0]), kind, ", ".join(str(r[1]).split()))
                           for r in await cur.fetchall())
        return out

    async def get_session_parts(self, session_id: str) -> list[Doc]:
        async with self._lock, _readable(self.path.name):  # (see list_sessions)
            return await self._session_parts(await self._current(), session_id)

    @staticmethod
    async def _session_parts(db: aiosqlite.Connection, session_id: str, *,
                             events: bool = True) -> list[Doc]:
        """The session's parts; without ``events``, for a summary: their
        events are not looked at (see :func:`~sinks.base.odd_part`)."""
        async with db.execute(
            "SELECT id, doc FROM parts WHERE session_id = ? ORDER BY part", (session_id,)
        ) as cur:
            return _checked_parts(await cur.fetchall(), events=events)

    async def session_part_heads(self, session_id: str) -> list[Doc]:
        """The events are cut out by SQLite (its JSON parser, in C, holding one
        document at a time): a document that is no JSON is found here, before
        the admin API's answer begins. The rest is the document's own text.
        (Under the lock, and from the file at ``path``, as list_sessions.)"""
        async with self._lock, _readable(self.path.name), (await self._current()).execute(
            "SELECT id, json_remove(doc, '$.events') FROM parts WHERE session_id = ?"
            " ORDER BY part", (session_id,)
        ) as cur:
            return _checked_parts(await cur.fetchall(), events=False)

    async def session_part(self, session_id: str, part: object) -> list[Doc]:
        async with self._lock, _readable(self.path.name), (await self._current()).execute(
            "SELECT id, doc FROM parts WHERE session_id = ? AND part = ?", (session_id, part)
        ) as cur:
            return _checked_parts(await cur.fetchall())

    async def session_ids(self) -> AsyncIterator[str]:
        """Every session with any part, from the (session_id, part) index: no
        document is read (verify then reads each session's parts itself)."""
        db = self._conn()
        # From "" itself (a session id "" is listed too), then past each page;
        # two comparisons, as a search of the index each (an OR scans it).
        # Past the page's last value as stored: a BLOB (another writer's)
        # sorts after every text, and past its str() the text came again,
        # page after page: verify never ended. (index_mismatches names it.)
        after: object = ""
        op = ">="
        while True:
            async with db.execute(
                f"SELECT DISTINCT session_id FROM parts WHERE session_id {op} ?"
                " ORDER BY session_id LIMIT 1000", (after,),
            ) as cur:
                ids = [r[0] for r in await cur.fetchall()]
            if not ids:
                return
            for sid in ids:
                yield str(sid)
            after, op = ids[-1], ">"

    async def security_events_oldest_first(self) -> AsyncIterator[Doc]:
        """In the order written (rowid): the security stream's chain order."""
        db = self._conn()
        last = 0
        while True:
            async with db.execute(
                "SELECT rowid, doc FROM security_events WHERE rowid > ? ORDER BY rowid LIMIT 1000",
                (last,),
            ) as cur:
                rows = list(await cur.fetchall())
            if not rows:
                return
            for _, text in rows:
                yield json.loads(text)
            last = rows[-1][0]

    async def list_security_events(
        self,
        *,
        since: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Doc], str | None]:
        async with self._lock, _readable(self.path.name):  # (see list_sessions)
            await self._current()
            return await self._list_security_events(since, kind, limit, cursor)

    async def _list_security_events(self, since: str | None, kind: str | None, limit: int,
                                    cursor: str | None) -> tuple[list[Doc], str | None]:
        db = self._conn()
        after = None
        if cursor is not None:
            ts, eid = decode_cursor(cursor)
            after = (ts, eid)
        # Only rows whose ts and id are text, as the sink writes them: a BLOB
        # (a row changed by hand) sorts after every text, and a page ending
        # at it had bytes in its cursor, no JSON: a 500. Verify reports it.
        where, args = sql_where(  # (a row value: see list_sessions)
            ("typeof(ts) = 'text' AND typeof(id) = 'text'", ()),
            ("ts >= ?", since),
            ("action = ?", kind),
            ("(ts, id) < (?, ?)", after),
        )
        sql = (f"SELECT ts, id, doc FROM security_events WHERE {where}"
               " ORDER BY ts DESC, id DESC LIMIT ?")
        async with db.execute(sql, (*args, limit + 1)) as cur:
            rows = list(await cur.fetchall())
        more = len(rows) > limit
        rows = rows[:limit]
        docs = []
        for _, row_id, text in rows:
            doc = json.loads(text)
            if not isinstance(doc, dict) or lone_surrogate(text, doc):  # another writer's row
                raise SinkUnreadable(f"sqlite sink: the security event with id {row_id!r}"
                                     " is no JSON object, or holds text that is not UTF-8")
            docs.append(doc)
        # The cursor is where the page ends in the order read, the columns'
        # (a document another writer left without its ts or _id was a
        # KeyError here, a 500, whenever more events followed).
        next_cursor = encode_cursor(rows[-1][0], rows[-1][1]) if more and rows else None
        return docs, next_cursor

"""Read-side queries on the spool, as plain functions of a sqlite3 connection.

They run on the spool's reader thread in the server, and directly in the
CLI (``status`` works against the file of a running server).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Collection, Iterator
from typing import Any

from sinks.base import RawJSON, sql_where

from .events import format_ts
from .spool import SpoolDamaged
from .store import part_document

Row = dict[str, Any]


def _text(blob: bytes) -> str | None:
    """A stored record's text, read as bytes (``CAST(json AS BLOB)``): None
    if it is not UTF-8 (damage: this server writes only UTF-8). Read so, one
    such row does not fail the statement for every other row."""
    try:
        return blob.decode()
    except UnicodeDecodeError:
        return None


def _event(blob: bytes) -> Row | str:
    """A stored event, or what is wrong with its text (the spool file damaged)."""
    text = _text(blob)
    if text is None:
        return "not UTF-8"
    try:
        doc = json.loads(text)
    except ValueError:
        return "not JSON"
    if not isinstance(doc, dict) or not isinstance(doc.get("event_id"), str):
        return "not an event"
    return doc


def pending_security(
    conn: sqlite3.Connection, limit: int, damaged: list[tuple[int, str]] | None = None,
    skip: Collection[int] = (),
) -> list[tuple[int, Row]]:
    """The oldest pending security events as sink documents; one whose id is
    in ``skip`` is passed over. One whose
    stored text is not UTF-8, not JSON or not an event (the spool file
    damaged) is left out and, given a ``damaged`` list, put there as
    ``(id, what is wrong)``."""
    rows = conn.execute(
        "SELECT id, CAST(json AS BLOB) FROM security_events WHERE state = 'pending'"
        " ORDER BY id LIMIT ?",
        (limit + len(skip),),
    ).fetchall()
    out = []
    for rid, blob in [r for r in rows if r[0] not in skip][:limit]:
        doc = _event(blob)
        if isinstance(doc, str):
            if damaged is not None:
                damaged.append((rid, doc))
            continue
        doc["_id"] = doc["event_id"]
        out.append((rid, doc))
    return out


_PART_COLS = (
    "p.session_id, p.part, p.first_seq, p.last_seq, p.final, p.seal_reason, p.end_ts,"
    " p.prev_hash, p.hash, s.user, s.start_ts, s.sk"
)
_PART_KEYS = (
    "session_id", "part", "first_seq", "last_seq", "final", "seal_reason", "end_ts",
    "prev_hash", "hash", "user", "start_ts", "sk",
)


def next_pending_part(
    conn: sqlite3.Connection, skip: Collection[tuple[str, int]] = ()
) -> Row | None:
    """The oldest pending part's row, joined with its session; a part whose
    ``(session_id, part)`` is in ``skip`` is passed over."""
    for row in conn.execute(
        f"SELECT {_PART_COLS} FROM parts p JOIN sessions s USING (session_id)"
        " WHERE p.state = 'pending' ORDER BY p.created_ts, p.session_id, p.part LIMIT ?",
        (len(skip) + 1,),
    ):
        if (row[0], row[1]) not in skip:
            return dict(zip(_PART_KEYS, row, strict=True))
    return None


def still_pending(
    conn: sqlite3.Connection, keys: Collection[tuple[str, int]]
) -> set[tuple[str, int]]:
    """Which of these ``(session_id, part)`` are still pending."""
    return {key for key in keys if conn.execute(
        "SELECT 1 FROM parts WHERE session_id = ? AND part = ? AND state = 'pending'",
        key).fetchone()}


def security_still_pending(conn: sqlite3.Connection, ids: Collection[int]) -> set[int]:
    """Which of these security events (spool ids) are still pending."""
    return {rid for rid in ids if conn.execute(
        "SELECT 1 FROM security_events WHERE id = ? AND state = 'pending'", (rid,)).fetchone()}


def part_events(conn: sqlite3.Connection, meta: Row, raw: bool = False) -> list[Any]:
    """The part's events; ``meta`` as :func:`next_pending_part` gives it (with ``sk``).

    With ``raw``, each event is its stored canonical JSON as :class:`RawJSON`.
    A part of the backlog is found whole in ``event_keys``; only a part of
    the newest events needs the scan of the unindexed tail.

    An event whose stored text is not UTF-8, or not JSON, is the spool
    file's damage: :class:`~audit.spool.SpoolDamaged` naming it (sent as it
    is, a raw text that is not JSON made the sink's whole document unreadable).
    """
    args = (meta["sk"], meta["first_seq"], meta["last_seq"])
    rows = conn.execute(
        "SELECT k.seq, CAST(e.json AS BLOB), json_valid(e.json) FROM event_keys k"
        " JOIN events e ON e.rowid = k.rid WHERE k.sk = ? AND k.seq BETWEEN ? AND ?"
        " ORDER BY k.seq",
        args,
    ).fetchall()
    if len(rows) != args[2] - args[1] + 1:  # one statement: one snapshot of both
        rows = conn.execute(
            "SELECT seq, CAST(json AS BLOB), json_valid(json) FROM session_events"
            " WHERE sk = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            args,
        ).fetchall()
    out: list[Any] = []
    for seq, blob, valid in rows:
        text = _text(blob)
        if text is None or not valid:
            what = "UTF-8" if text is None else "JSON"
            raise SpoolDamaged(
                f"the audit spool is damaged: the text of event {seq} of part"
                f" {meta['session_id']}:{meta['part']} is not {what}")
        out.append(RawJSON(text) if raw else json.loads(text))
    return out


def load_part(
    conn: sqlite3.Connection, raw: bool = False, skip: Collection[tuple[str, int]] = ()
) -> Row | None:
    """The oldest pending part not in ``skip`` as its sink document (events
    as RawJSON if ``raw``)."""
    meta = next_pending_part(conn, skip)
    if meta is None:
        return None
    return part_document(meta, part_events(conn, meta, raw))


def counts(conn: sqlite3.Connection, now: float) -> Row:
    """The spool half of the status object."""
    pending_parts, oldest_part = conn.execute(
        "SELECT COUNT(*), MIN(created_ts) FROM parts WHERE state = 'pending'"
    ).fetchone()
    # The oldest pending security event is the first by id (ids grow with
    # time): one step down the (state, id) index. MIN(ts) read every row.
    pending_sec = conn.execute(
        "SELECT COUNT(*) FROM security_events WHERE state = 'pending'"
    ).fetchone()[0]
    first = conn.execute(
        "SELECT ts FROM security_events WHERE state = 'pending' ORDER BY id LIMIT 1"
    ).fetchone()
    oldest_sec = first[0] if first else None
    dead_parts = conn.execute("SELECT COUNT(*) FROM parts WHERE state = 'dead'").fetchone()[0]
    dead_sec = conn.execute(
        "SELECT COUNT(*) FROM security_events WHERE state = 'dead'"
    ).fetchone()[0]
    active = conn.execute("SELECT COUNT(*) FROM sessions WHERE state = 'open'").fetchone()[0]
    oldest = min((t for t in (oldest_part, oldest_sec) if t is not None), default=None)
    pending_events = conn.execute(
        "SELECT COALESCE(SUM(last_seq - first_seq + 1), 0) FROM parts WHERE state = 'pending'"
    ).fetchone()[0]
    return {
        "active_sessions": active,
        "pending_parts": pending_parts,
        "pending_part_events": pending_events,
        "pending_security_events": pending_sec,
        "oldest_pending_age_seconds": round(max(0.0, now - oldest), 3) if oldest else 0.0,
        "dead_letter": dead_parts + dead_sec,
        "dead_letter_parts": dead_parts,
        "dead_letter_security_events": dead_sec,
    }


# -- the admin API's view of sessions still in the spool ---------------------

_SESSION_COLS = (
    "session_id, user, state, start_ts, end_ts, seal_reason, next_part, cut_events, cut_seq, sk"
)


def _uncut_counts(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> dict[int, int]:
    """The uncut events of the open sessions among ``rows`` (``_SESSION_COLS``),
    by ``sk``: each from ``event_keys`` alone, plus one scan of the unindexed
    tail for all of them (the view would scan it once per session)."""
    cuts = {r[9]: r[8] for r in rows if r[2] == "open"}
    if not cuts:
        return {}
    counts = {
        sk: conn.execute(
            "SELECT COUNT(*) FROM event_keys WHERE sk = ? AND seq > ?", (sk, cut_seq)
        ).fetchone()[0]
        for sk, cut_seq in cuts.items()
    }
    for sk, seq in conn.execute(
        "SELECT sk, seq FROM events WHERE rowid > (SELECT COALESCE(MAX(CAST(value AS INTEGER)),"
        " 0) FROM meta WHERE key = 'keys_mark') AND sk IN (SELECT value FROM json_each(?))",
        (json.dumps(list(cuts)),),
    ):
        if seq > cuts[sk]:
            counts[sk] += 1
    return counts


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction (unless the caller has one): what is read inside
    is one state of the spool."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        yield
    finally:
        if own:
            conn.execute("COMMIT")


def _summaries(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[Row]:
    # One read transaction: the writer may index the tail between the
    # statements, and each event must be counted in one half or the other.
    # The callers read ``rows`` in it too (see list_sessions).
    with _snapshot(conn):
        uncut = _uncut_counts(conn, rows)
        return [_summary(conn, r, uncut.get(r[9], 0)) for r in rows]


def _summary(conn: sqlite3.Connection, row: tuple[Any, ...], uncut: int) -> Row:
    sid, user, state, start, end, reason, next_part, cut_events = row[:8]
    if state == "open":
        shown = "open"
    else:
        left = conn.execute(
            "SELECT COUNT(*) FROM parts WHERE session_id = ? AND state != 'stored'", (sid,)
        ).fetchone()[0]
        shown = "pending" if left else "stored"
    return {
        "session_id": sid,
        "user": user,
        "state": shown,
        "session_start_time": format_ts(start),
        "session_end_time": format_ts(end) if end is not None else None,
        "session_duration_seconds": round(end - start, 3) if end is not None else None,
        "event_count": cut_events + uncut,
        "seal_reason": reason,
        "parts": next_part + (1 if uncut else 0),
    }


def list_sessions(
    conn: sqlite3.Connection,
    *,
    user: str | None,
    since: int | None,
    until: int | None,
    before: tuple[int, str] | None,
    limit: int,
    state: str | None = None,
) -> list[Row]:
    """Spool sessions newest first, by their start as clients see it (whole
    ms, then session id); ``since``/``until`` in ms, ``before`` = (ms,
    session_id) for paging; ``state`` is ``sessions.state`` (``open`` or
    ``sealed``), or ``pending``: sealed with a part the sink has not taken
    (pending or dead), as :func:`_summary` tells them apart. (Filtered after
    the query instead, a spool keeping 200,000 stored sessions read them
    all, page after page, to find none: 6 s a request.)"""
    where, args = sql_where(
        ("user = ?", user),
        ("state = ?", "sealed" if state == "pending" else state),
        ("session_id IN (SELECT session_id FROM parts WHERE state IN ('pending', 'dead'))",
         () if state == "pending" else None),
        ("start_ms >= ?", since),
        ("start_ms <= ?", until),
        ("(start_ms, session_id) < (?, ?)", before),
    )
    # The rows and their counts in one snapshot: a session that ended, was
    # flushed and purged between the two was shown open with its uncut
    # events gone from the count (0 for a session of one part).
    with _snapshot(conn):
        rows = conn.execute(
            f"SELECT {_SESSION_COLS} FROM sessions WHERE {where}"
            " ORDER BY start_ms DESC, session_id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return _summaries(conn, rows)


def sessions_by_id(conn: sqlite3.Connection, ids: list[str]) -> list[Row]:
    """The summaries of those of ``ids`` that the spool still holds."""
    with _snapshot(conn):  # (see list_sessions)
        rows = conn.execute(
            f"SELECT {_SESSION_COLS} FROM sessions"
            " WHERE session_id IN (SELECT value FROM json_each(?))",
            (json.dumps(ids),),
        ).fetchall()
        return _summaries(conn, rows)


def _session_summary(conn: sqlite3.Connection, session_id: str) -> tuple[Row, Any] | None:
    """A spool session's summary and its row (within the caller's snapshot)."""
    row = conn.execute(
        f"SELECT {_SESSION_COLS} FROM sessions WHERE session_id = ?", (session_id,)
    ).fetchone()
    if row is None:
        return None
    return _summaries(conn, [row])[0], row


def get_session(conn: sqlite3.Connection, session_id: str) -> Row | None:
    """A spool session's summary plus the events the spool still holds, in
    one snapshot (see list_sessions)."""
    with _snapshot(conn):
        found = _session_summary(conn, session_id)
        if found is None:
            return None
        summary, row = found
        rows = conn.execute(
            "SELECT json FROM session_events WHERE sk = ? ORDER BY seq", (row[-1],)
        ).fetchall()
    events = [json.loads(r[0]) for r in rows]
    summary["events"] = events
    return summary


def session_plan(conn: sqlite3.Connection, session_id: str) -> Row | None:
    """What the admin API streams a spool session's events by (see
    ``handlers/admin.py``), in one snapshot, holding no event: its summary;
    ``sk``; ``held``, how many of its events the spool holds; and
    ``segments``, ``[part, first_seq, last_seq]`` of each part the spool
    holds, by part, then the uncut events of an open session under the number
    of the part they will be cut into (up to the last one now). Each range is
    within the part limits, as :func:`segment_events` reads it."""
    with _snapshot(conn):
        found = _session_summary(conn, session_id)
        if found is None:
            return None
        summary, row = found
        next_part, cut_seq, sk = row[6], row[8], row[9]
        held, top = conn.execute(
            "SELECT COUNT(*), MAX(seq) FROM session_events WHERE sk = ?", (sk,)).fetchone()
        segments = [list(r) for r in conn.execute(
            "SELECT part, first_seq, last_seq FROM parts WHERE session_id = ? ORDER BY part",
            (session_id,))]
    if top is not None and top > cut_seq:
        segments.append([next_part, cut_seq + 1, top])
    return {"summary": summary, "sk": sk, "held": held, "segments": segments}


def segment_events(conn: sqlite3.Connection, sk: int, first: int, last: int) -> list[Row]:
    """The events the spool still holds of session ``sk`` from ``first`` to
    ``last``, by seq (parsed, as :func:`get_session` gives them). ``sk`` is
    never given to another session while this process runs."""
    return [json.loads(r[0]) for r in conn.execute(
        "SELECT json FROM session_events WHERE sk = ? AND seq BETWEEN ? AND ? ORDER BY seq",
        (sk, first, last))]


def list_security(
    conn: sqlite3.Connection,
    *,
    since: int | None,
    kind: str | None,
    limit: int,
    before: tuple[int, str] | None = None,
) -> list[Row]:
    """Security events still in the spool (pending, dead or kept), newest
    first by their time as clients see it (whole ms, then event id);
    ``since`` in ms, ``before`` = (ms, event_id) for paging."""
    where, args = sql_where(("ts_ms >= ?", since), ("action = ?", kind),
                            ("(ts_ms, event_id) < (?, ?)", before))
    rows = conn.execute(
        f"SELECT json FROM security_events WHERE {where}"
        " ORDER BY ts_ms DESC, event_id DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    out = []
    for (text,) in rows:
        ev = json.loads(text)
        ev["_id"] = ev["event_id"]
        out.append(ev)
    return out

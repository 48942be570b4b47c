"""Verify stored sessions: recompute every chain from what the sink holds.

Reports changed, removed and reordered events and missing parts, parts whose
own fields disagree with their events, and breaks in the security stream.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from sinks.base import Sink, SinkError, SinkUnreadable

from .events import canonical_json, chain_hash, event_hash, genesis, parse_ts
from .store import SECURITY_STREAM

FINAL_REASONS = frozenset({"logout", "idle_timeout", "token_expired", "max_duration"})
# A part's times are written from the same clock reading as its session's
# session.start and session.end events (exactly equal since this release;
# two readings microseconds apart before it): a difference beyond this is a
# changed part.
TIME_SLACK_SECONDS = 0.05
# session_duration_seconds is end - start of the unrounded times, to 3 places.
DURATION_SLACK_SECONDS = 0.002
# The fields of a part document (API.md "A part"; store.part_document): one
# more is outside the chain and the checks here, and so not the server's.
PART_FIELDS = frozenset({
    "_id", "session_id", "part", "final", "user", "session_start_time",
    "session_end_time", "session_duration_seconds", "event_count", "seal_reason",
    "first_seq", "last_seq", "prev_hash", "hash", "events",
})


@dataclass(frozen=True)
class Problem:
    session_id: str
    kind: str  # changed | removed | reordered | missing_part | bad_part | security_chain
    detail: str


@dataclass
class Report:
    sessions: int = 0
    parts: int = 0
    events: int = 0
    security_events: int = 0
    # Security chains that start from the genesis value: one per spool that
    # wrote to the sink (servers sharing it, or a new data directory).
    security_chains: int = 0
    # Sessions whose part 0 does not begin from this key's genesis value for
    # them: chained under another audit key (a server sharing the sink with
    # another key), or forged. Each is among the problems too.
    other_key_sessions: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_session(key: bytes, session_id: str, parts: list[dict[str, Any]]) -> list[Problem]:
    """All problems of one session's stored parts (sorted by ``part``)."""
    out: list[Problem] = []

    def add(kind: str, detail: str) -> None:
        out.append(Problem(session_id, kind, detail))

    # Only documents that may be this session's part n are checked as such:
    # ``part`` a number from 0, ``session_id`` this session, ``_id`` the two.
    # Any other (a part added past the final one, a second part n under
    # another ``_id``) is a finding, never silently left out: the admin API
    # shows every stored part's events.
    by_number: dict[int, dict[str, Any]] = {}
    for p in sorted(parts, key=lambda p: _number(p.get("part"))):
        n = p.get("part")
        if type(n) is not int or n < 0:
            add("bad_part", f"a part numbered {_short(n)} ({_doc_id(p)})")
            continue
        if p.get("session_id") != session_id:
            add("bad_part", f"part {n} ({_doc_id(p)}) names session {_short(p.get('session_id'))}")
        if p.get("_id") != f"{session_id}:{n}":
            add("bad_part", f"part {n} is stored under _id {_short(p.get('_id'))}")
        if n in by_number:
            add("changed", f"part {n} is stored twice ({_doc_id(by_number[n])},"
                f" {_doc_id(p)}): the first is the one checked")
            continue
        by_number[n] = p
        unknown = sorted(str(k) for k in p if k not in PART_FIELDS)
        if unknown:
            add("bad_part", f"part {n}: fields outside the record: {', '.join(unknown)}")
    numbers = sorted(by_number)
    expected_last = numbers[-1] if numbers else -1
    finals = [n for n in numbers if by_number[n].get("final")]
    if finals:
        expected_last = finals[0]
        for n in numbers:
            if n > expected_last:
                add("bad_part", f"part {n} comes after the final part {expected_last}")
    numbers = [n for n in numbers if n <= expected_last]
    # Gaps as runs, and only the stored parts walked: a forged part numbered
    # 10**12 must not make verify count up to it (it ran out of memory, and
    # 10**7 printed ten million lines).
    for lo, hi in _gaps(numbers, 0, expected_last):
        add("missing_part", f"part {lo} is not stored" if lo == hi
            else f"parts {lo} to {hi} are not stored")
    prev_hash = genesis(key, session_id)
    expected_seq = 1
    for i, n in enumerate(numbers):
        part = by_number[n]
        if n != (numbers[i - 1] + 1 if i else 0):
            prev_hash = ""  # the chain across a missing part cannot be checked
            expected_seq = -1
        # A tampered document may hold any JSON value in any field: each odd
        # one is a finding of its own, and the rest of the session is still
        # checked (a string first_seq or a number for a hash raised, and the
        # session's only finding was "cannot be checked").
        events = part.get("events") or []
        if not isinstance(events, list):
            add("bad_part", f"part {n}: events is not a list")
            events = []
        if not events:  # every cut takes at least one event (a seal: session.end)
            add("bad_part", f"part {n}: holds no events")
        for e in events:
            if not isinstance(e, dict):
                add("changed", f"part {n}: an event that is not an object: {_short(e)}")
        events = [_obj(e) for e in events]
        stored_prev = part.get("prev_hash")
        if prev_hash and stored_prev != prev_hash:
            add("bad_part", f"part {n}: prev_hash does not continue the chain")
        chain = stored_prev if isinstance(stored_prev, str) and stored_prev else prev_hash
        first, last = part.get("first_seq"), part.get("last_seq")
        if expected_seq > 0 and (type(first) is not int or first != expected_seq):
            add("bad_part", f"part {n}: first_seq {_short(first)} != {expected_seq}")
        seqs = [e.get("seq") for e in events]
        if type(first) is not int:
            if expected_seq <= 0:
                add("bad_part", f"part {n}: first_seq {_short(first)} is not a number")
            first = (expected_seq if expected_seq > 0
                     else seqs[0] if seqs and type(seqs[0]) is int else 1)
        if type(last) is not int:
            add("bad_part", f"part {n}: last_seq {_short(last)} is not a number")
            last = first + len(events) - 1
        # A range, never listed whole: last_seq is the part's own word.
        want = range(first, last + 1)
        if not _listed(seqs, want):
            ints = sorted(s for s in seqs if isinstance(s, int))
            if _listed(ints, want):
                add("reordered", f"part {n}: events out of seq order")
            else:
                gone = _gaps(sorted({s for s in ints if s in want}), want.start, want.stop - 1)
                if gone:
                    add("removed", f"part {n}: seq {_runs(gone)} missing")
                extra = sorted({s for s in ints if s not in want})
                if extra:
                    add("changed", f"part {n}: unexpected seq {extra}")
        if part.get("event_count") != len(events):
            add("bad_part", f"part {n}: event_count {_short(part.get('event_count'))}"
                f" != {len(events)}")
        for e in events:
            if e.get("session_id") != session_id:
                add("changed", f"seq {e.get('seq')}: session_id changed")
            h = event_hash(key, chain, e)
            if h != e.get("hash"):
                add("changed", f"seq {e.get('seq')}: hash does not verify")
            stored = e.get("hash")
            chain = stored if isinstance(stored, str) else ""
        if events and part.get("hash") != chain:
            add("bad_part", f"part {n}: hash is not the last event's")
        for problem in _part_fields(part, events, by_number.get(0)):
            add("bad_part", f"part {n}: {problem}")
        stored = part.get("hash")
        prev_hash = stored if isinstance(stored, str) else ""
        expected_seq = last + 1
    return out


def _listed(values: list[Any], want: range) -> bool:
    """Whether ``values`` is ``want``, in order (without listing a long ``want``)."""
    return want == range(want.start, want.start + len(values)) and values == list(want)


def _gaps(present: list[int], lo: int, hi: int) -> list[tuple[int, int]]:
    """The runs of numbers from ``lo`` to ``hi`` missing from ``present``
    (sorted, each within the bounds), as ``(first, last)``."""
    out = []
    for n in present:
        if n > lo:
            out.append((lo, n - 1))
        lo = n + 1
    if lo <= hi:
        out.append((lo, hi))
    return out


def _runs(gaps: list[tuple[int, int]]) -> str:
    """``[3, 5-9]``: runs of numbers as verify prints them."""
    return "[" + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in gaps) + "]"


def _number(value: Any) -> int:
    """A sort key for a part's ``part``, whatever a tampered document holds."""
    return value if type(value) is int else -1


def _doc_id(part: dict[str, Any]) -> str:
    return _short(part.get("_id"))


def _seconds(value: Any) -> float | None:
    try:
        return parse_ts(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _short(value: Any) -> str:
    """A stored value as every finding quotes it: ``repr``, cut at 60
    characters (a tampered field may hold a megabyte)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _part_fields(
    part: dict[str, Any], events: list[Any], first: dict[str, Any] | None
) -> list[str]:
    """A part's own fields against its session's chained events. The fields
    are outside the hash chain; these are the events that fix them: the
    session's ``session.start`` (in part 0) for ``user`` and
    ``session_start_time``, the final part's ``session.end`` for ``final``,
    ``seal_reason`` and ``session_end_time``. Never raises on odd documents."""
    out: list[str] = []
    first_events = _obj(first).get("events")
    start_ev = _obj(first_events[0]) if isinstance(first_events, list) and first_events else {}
    if start_ev.get("action") == "session.start":
        user = _obj(start_ev.get("actor")).get("user")
        if part.get("user") != user:
            out.append(f"user {_short(part.get('user'))} is not the session's ({_short(user)})")
        a, b = _seconds(part.get("session_start_time")), _seconds(start_ev.get("ts"))
        if a is None or b is None or abs(a - b) > TIME_SLACK_SECONDS:
            out.append("session_start_time is not the time of session.start")
    final, reason = part.get("final"), part.get("seal_reason")
    end_time, duration = part.get("session_end_time"), part.get("session_duration_seconds")
    last = _obj(events[-1]) if events else {}
    # A refused logout records a session.end with outcome failure, and the
    # session goes on: only a successful one ends it.
    ended_here = last.get("action") == "session.end" and last.get("outcome") == "success"
    if not isinstance(final, bool):
        out.append("final is not true or false")
        return out
    if not final:
        if reason != "checkpoint" or end_time is not None or duration is not None:
            out.append("a non-final part must be a checkpoint without end time or duration")
        if ended_here:
            out.append("a part that ends with session.end is not marked final")
        return out
    if not ended_here:
        out.append("the final part does not end with session.end")
        return out
    if not (isinstance(reason, str) and reason in FINAL_REASONS
            and reason == _obj(last.get("details")).get("reason")):
        out.append(f"seal_reason {_short(reason)} is not session.end's")
    end, ended = _seconds(end_time), _seconds(last.get("ts"))
    if end is None or ended is None or abs(end - ended) > TIME_SLACK_SECONDS:
        out.append("session_end_time is not the time of session.end")
    begin = _seconds(part.get("session_start_time"))
    if (end is None or begin is None or isinstance(duration, bool)
            or not isinstance(duration, int | float)
            or not abs(duration - (end - begin)) <= DURATION_SLACK_SECONDS):  # NaN fails too
        out.append("session_duration_seconds is not end - start")
    return out


@dataclass(frozen=True)
class SpoolAnchor:
    """Where this server's security chain stands in its own spool, read before
    the sink is: the chain's head, and the oldest security event the sink has
    not taken yet (pending or dead), if any."""

    head: str
    first_unsent: dict[str, Any] | None
    # Sessions still open in the spool, or with parts the sink has not taken
    # (pending, dead): their final part may rightly be missing from the sink.
    unfinished: frozenset[str] = frozenset()
    # Sessions this spool stored whole in this sink lately (stored_sessions):
    # the sink must hold their final part, and so hold them at all.
    stored: frozenset[str] = frozenset()
    # Where this sink's stretches of the chain begin (the hash before their
    # first event: a sink switch), and, when the server has since left this
    # sink for another, the last event it gave this one (sink_stretches).
    starts: frozenset[str] = frozenset()
    end: str | None = None
    # Where each earlier stretch this sink took ends: the sink must hold
    # those events (a chain accepted from a later stretch's start would
    # otherwise hide the removal of an earlier stretch's end, or all of it).
    ends: frozenset[str] = frozenset()
    # This sink took none of the chain, and the spool knows every stretch
    # since its start (switched to before, or left after, the security events
    # came): nothing of it is this sink's to hold, not even its end.
    took_none: bool = False


def spool_anchor(conn: sqlite3.Connection, key: bytes, sink: str | None = None) -> SpoolAnchor:
    """The anchor, with the sessions stored whole in ``sink`` (its
    :func:`~audit.config.sink_identity`; None: in any sink)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'security_head'").fetchone()
    first = conn.execute(
        "SELECT id, CAST(json AS BLOB) FROM security_events WHERE state != 'stored'"
        " ORDER BY id LIMIT 1"
    ).fetchone()
    unsent = None
    if first is not None:
        try:
            unsent = json.loads(first[1])  # (bytes: not UTF-8 is a ValueError too)
        except ValueError:
            raise ValueError(f"the text of security event {first[0]} in the spool is damaged"
                             " (not UTF-8 or not JSON)") from None
    unfinished = frozenset(r[0] for r in conn.execute(
        "SELECT session_id FROM sessions WHERE state = 'open'"
        " UNION SELECT session_id FROM parts WHERE state != 'stored'"))
    # A spool from before stored_sessions (not served since: verify opens it
    # read only) noted none; "the spool cannot be read" was not so.
    stored: frozenset[str] = frozenset()
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'stored_sessions'").fetchone():
        stored = frozenset(r[0] for r in conn.execute(
            "SELECT session_id FROM stored_sessions WHERE :sink IS NULL OR sink = :sink",
            {"sink": sink}))
    starts, end, ends, took_none = _stretches(conn, sink, genesis(key, SECURITY_STREAM))
    return SpoolAnchor(row[0] if row else genesis(key, SECURITY_STREAM),
                       unsent, unfinished, stored - unfinished,
                       starts, end, ends, took_none)


def _stretches(
    conn: sqlite3.Connection, sink: str | None, start: str
) -> tuple[frozenset[str], str | None, frozenset[str], bool]:
    """Where ``sink``'s stretches of the security chain begin; where its last
    one ends if the chain has gone on in another sink since (else None);
    where each ends; and whether it took none while every stretch is noted
    (the first begins at the chain's ``start``; one beginning elsewhere, or
    at "" after an upgrade, may follow a stretch no row names, which this
    sink may have taken). A spool from before sink_stretches has none."""
    if sink is None or conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'sink_stretches'").fetchone() is None:
        return frozenset(), None, frozenset(), False
    rows = conn.execute("SELECT took_from, took_to FROM sink_stretches WHERE sink = ?"
                        " ORDER BY rowid", (sink,)).fetchall()
    current = conn.execute("SELECT value FROM meta WHERE key = 'security_stretch'").fetchone()
    left = rows and current is not None and json.loads(current[0])[0] != sink
    first = conn.execute("SELECT took_from FROM sink_stretches ORDER BY rowid LIMIT 1").fetchone()
    took_none = not rows and first is not None and first[0] == start
    # Where its chain resumes around a security event one sink refused and
    # another took (the gap it left in the one, the event alone in the other).
    resumes: list[tuple[str, str]] = []
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sink_resumes'").fetchone():
        resumes = conn.execute(
            "SELECT took_from, took_to FROM sink_resumes WHERE sink = ?", (sink,)).fetchall()
    # (The last stretch's end is held by the checks of the chain's end.)
    return (frozenset(r[0] for r in [*rows, *resumes] if r[0]),
            rows[-1][1] if left else None,
            frozenset(r[1] for r in [*rows[:-1], *resumes] if r[1]), took_none)


def _overdue(session_id: str, parts: list[Any], anchor: SpoolAnchor | None,
             overdue_after: float | None, now: float) -> Problem | None:
    """A session without a final part that cannot still be open: it started
    longer ago than any session may last, and this server's spool does not
    hold it. Its final part (and the events in it) was removed, or is still
    waiting in another server's spool."""
    if anchor is None:  # without the spool it cannot tell
        return None
    if any(_obj(p).get("final") is True for p in parts) or session_id in anchor.unfinished:
        return None
    if session_id in anchor.stored:
        return Problem(session_id, "missing_part",
                       "no final part, which this server's spool stored in this sink:"
                       " it was removed")
    if overdue_after is None:
        return None
    starts = [t for t in (_seconds(_obj(p).get("session_start_time")) for p in parts)
              if t is not None]
    if not starts or now - min(starts) <= overdue_after:
        return None
    return Problem(session_id, "missing_part",
                   f"no final part, and the session started {now - min(starts):.0f} s ago,"
                   f" longer than any session lasts ({overdue_after:.0f} s with the margin):"
                   " its final part was removed, or waits in another server's spool")


async def verify_sink(
    sink: Sink, key: bytes, anchor: SpoolAnchor | None = None,
    *, overdue_after: float | None = None, now: float | None = None,
) -> Report:
    """Every session's chain and parts, and the security events' chains; with
    ``anchor`` (this server's spool), also that the sink holds this server's
    security chain up to where the spool has it (its newest events were not
    removed). With ``overdue_after`` (seconds: max_session_seconds and a
    margin), a session without a final part that started longer ago than
    that, and is not in the anchor's spool, is reported (:func:`_overdue`).
    Copies of a stored ``_id`` with another hash that the sink keeps beside
    the first (:meth:`Sink.conflicting_copies`) are reported as changed."""
    report = Report()
    now = time.time() if now is None else now
    # Of the sessions the anchor says were stored whole lately, those listed:
    # not every session id (about 100 bytes each, 100 MB for a million).
    seen: set[str] = set()
    recent = anchor.stored if anchor is not None else frozenset()
    try:
        async for sid in sink.session_ids():
            if sid in recent:
                seen.add(sid)
            report.sessions += 1
            try:
                parts = await sink.get_session_parts(sid)
                report.parts += len(parts)
                report.events += sum(len(p["events"]) for p in parts if isinstance(p, dict)
                                     and isinstance(p.get("events"), list))
                problems = check_session(key, sid, parts)
                report.problems.extend(problems)
                if problems and any(_obj(p).get("part") == 0
                                    and _obj(p).get("prev_hash") != genesis(key, sid)
                                    for p in parts):
                    report.other_key_sessions += 1
                overdue = _overdue(sid, parts, anchor, overdue_after, now)
                if overdue is not None:
                    report.problems.append(overdue)
            except SinkUnreadable as exc:  # a document the sink cannot hand out
                report.problems.append(Problem(
                    sid, "bad_part", "the session's parts cannot be checked"
                    f" ({type(exc.__cause__ or exc).__name__})"))
            except SinkError:
                raise
            except Exception as exc:  # a document too odd to follow is a finding
                report.problems.append(Problem(
                    sid, "bad_part",
                    f"the session's parts cannot be checked ({type(exc).__name__})"))
    except SinkError:
        raise
    except Exception as exc:  # a row the sink cannot even list
        report.problems.append(Problem(
            "", "bad_part", f"the sink's sessions cannot be listed to the end"
            f" ({type(exc).__name__})"))
    else:  # every session listed: those stored whole lately must be among them
        for sid in sorted(anchor.stored - seen if anchor is not None else ()):
            report.problems.append(Problem(
                sid, "missing_part", "the sink holds no part of this session, which this"
                " server's spool stored whole in it: it was removed"))
    for doc_id, kind, columns in await sink.index_mismatches():
        sid = doc_id.rpartition(":")[0] if kind == "part" else SECURITY_STREAM
        report.problems.append(Problem(
            sid, "bad_part" if kind == "part" else "changed",
            f"{kind} {doc_id}: the stored document is not JSON, or has a key twice in one"
            " object (readers differ on which value counts)" if columns == "doc" else
            f"{kind} {doc_id}: the sink's query columns ({columns}) are not the stored"
            " document's: the admin API's listings filter on them"))
    for doc_id, kind, where in await sink.conflicting_copies():
        sid = doc_id.rpartition(":")[0] if kind == "part" else ""
        report.problems.append(Problem(
            sid, "changed", f"{kind} {doc_id}: another copy with other content at {where}"
            " (the first copy is the one checked)"))
    for what in await sink.unchecked_records():
        report.problems.append(Problem(
            "", "changed", f"{what}: verify cannot check it, and a reader of the sink may"
            " take it"))
    await check_security_stream(sink, key, report, anchor)
    return report


# A chain that waits for its first event's predecessor (a sink ordering by
# ts alone gives equal times in any order; a dead letter retried late comes
# after its successors) waits until this many events wait in all.
SECURITY_WINDOW = 50_000
# Chains tried before the genesis value, most recently extended first: the
# chain an event continues is nearly always among them, and a new chain's
# first event is then found without trying every chain that ever ended.
SECURITY_RECENT = 8
# Waiting chains kept to be tried. Each event that continues no chain is
# tried against every chain kept: without a bound, rows forged to continue
# nothing (each a waiting chain of its own) made verify's time grow with the
# square of their number (1,000 took 11 s; 50,000 would take hours). Past
# this many, the oldest waiting chain of a single event is a break at once,
# and is no longer tried: only the key makes two events that chain, so a
# chain of two or more, or one from genesis, is a server's and stays.
SECURITY_WAITING = 200


def _security_body(event: dict[str, Any]) -> str | None:
    """The canonical JSON a security event's hash covers (all but ``_id``
    and ``hash``), encoded once per event however many chains it is tried
    against; None if no spool could have written it (NaN, odd keys, a lone
    surrogate, which chain_hash cannot encode)."""
    try:
        body = canonical_json({k: v for k, v in event.items() if k not in ("_id", "hash")})
        body.encode("utf-8")  # a lone surrogate ("\\ud800" in the JSON): HMAC'd, it raised
    except (TypeError, ValueError):  # (UnicodeEncodeError is a ValueError)
        return None
    return body


class _Chain:
    """A run of linked security events: its last hash, and (while it waits for
    its first event's predecessor) its events and its first event's body."""

    __slots__ = ("body", "events", "head", "size")

    def __init__(self, head: str, events: list[dict[str, Any]] | None,
                 body: str | None = None) -> None:
        self.head = head
        self.events = events  # None: linked (to genesis, or given up on)
        self.body = body  # _security_body(events[0]) while waiting
        self.size = 1  # events in the run


async def check_security_stream(
    sink: Sink, key: bytes, report: Report, anchor: SpoolAnchor | None = None
) -> None:
    """Follow the security events' chains through the sink.

    Each spool chains its security events from the same genesis value, so a
    sink that several servers write to (or one server with a new data
    directory) holds several chains, interleaved. The events come oldest
    first (:meth:`Sink.security_events_oldest_first`). Each must continue a
    chain, or start one from genesis; one that does neither starts a
    *waiting* chain (later events may continue it), which is linked as a
    whole once its first event's predecessor arrives, and joined to another
    waiting chain that continues it. When more than :data:`SECURITY_WINDOW`
    events wait, and at the end, the oldest waiting chain is a break: its
    first event, or the event before it, was changed or removed (or never
    reached the sink: a dead letter). It then counts as linked, so one
    tampered event is one problem. An event whose hash was seen before is a
    copy, and a problem too.

    Per event this costs one HMAC per chain tried, most recently extended
    first: one, while a single server writes. One that continues nothing is
    tried against every chain kept (at most :data:`SECURITY_WAITING` of them
    waiting).
    """
    start = genesis(key, SECURITY_STREAM)
    chains: list[_Chain] = []  # most recently extended first
    waiting: list[_Chain] = []  # oldest first
    waiting_events = 0
    seen: set[bytes] = set()

    def continues(prev: str, body: str | None, ev: dict[str, Any]) -> bool:
        """Whether ``ev`` (its :func:`_security_body` ``body``) follows ``prev``."""
        return body is not None and chain_hash(key, prev, body) == ev["hash"]

    def handed_over(ev: dict[str, Any], body: str | None) -> bool:
        """``ev`` begins a stretch of this server's chain that this sink took
        after a sink switch (the events before it are in the other sink)."""
        return anchor is not None and any(continues(h, body, ev)
                                          for h in anchor.starts - {start})

    def touch(chain: _Chain) -> None:
        chains.remove(chain)
        chains.insert(0, chain)

    def find(ev: dict[str, Any], body: str | None) -> _Chain | None:
        for i, chain in enumerate(chains):
            if i == SECURITY_RECENT and continues(start, body, ev):
                return None
            if continues(chain.head, body, ev):
                return chain
        return None

    def trim() -> None:
        """Past :data:`SECURITY_WAITING` waiting chains, the oldest of a single
        event (else the oldest) is a break, and is tried no more."""
        while len(waiting) > SECURITY_WAITING:
            victim = next((c for c in waiting if c.size == 1), waiting[0])
            give_up(victim)
            if victim in chains:  # (absorbed into another by give_up: gone already)
                chains.remove(victim)

    def absorb(chain: _Chain) -> None:
        """Append to ``chain`` every waiting chain that continues it: counted
        as linked if ``chain`` is, kept waiting with it if not."""
        nonlocal waiting_events
        joined = True
        while joined:
            joined = False
            for other in waiting:
                if (other is not chain and other.events
                        and continues(chain.head, other.body, other.events[0])):
                    waiting.remove(other)
                    chains.remove(other)
                    if chain.events is None:
                        waiting_events -= len(other.events)
                        report.security_events += len(other.events)
                    else:
                        chain.events.extend(other.events)
                    chain.head = other.head
                    chain.size += other.size
                    joined = True
                    break

    def give_up(chain: _Chain | None = None) -> None:
        """Report a waiting chain as a break (by default the oldest)."""
        nonlocal waiting_events
        if chain is None:
            chain = waiting[0]
        waiting.remove(chain)
        assert chain.events is not None
        ev = chain.events[0]
        waiting_events -= len(chain.events)
        report.security_events += len(chain.events)
        chain.events = chain.body = None
        report.problems.append(Problem(
            SECURITY_STREAM, "security_chain",
            f"event {ev.get('_id')} ({ev.get('ts')}, {ev.get('action')}) does not continue"
            " a security chain: it, or the event before it, was changed or removed"))
        absorb(chain)

    try:
        async for ev in sink.security_events_oldest_first():
            # (A hash is hex: one with a lone surrogate cannot be encoded.)
            if (not isinstance(ev, dict) or not isinstance(ev.get("hash"), str)
                    or not ev["hash"].isascii()):
                ev = {"_id": ev.get("_id") if isinstance(ev, dict) else None, "hash": ""}
            digest = ev["hash"][:32].encode()  # 128 bits tell copies apart
            if ev["hash"] and digest in seen:
                report.security_events += 1
                report.problems.append(Problem(
                    SECURITY_STREAM, "security_chain",
                    f"event {ev.get('_id')} ({ev.get('ts')}) is a copy of an earlier one"))
                continue
            seen.add(digest)
            if ev["hash"] and ev.get("_id") != ev.get("event_id"):  # outside the hash
                report.problems.append(Problem(
                    SECURITY_STREAM, "security_chain",
                    f"event {_short(ev.get('event_id'))} is stored under _id"
                    f" {_short(ev.get('_id'))}"))
            body = _security_body(ev)
            chain = find(ev, body)
            new_chain = chain is None and continues(start, body, ev)
            if new_chain:
                report.security_chains += 1
            # (A stretch after a sink switch is the same chain, not a new one.)
            if chain is None and (new_chain or handed_over(ev, body)):
                chain = _Chain(ev["hash"], None)
                chains.insert(0, chain)
                report.security_events += 1
                absorb(chain)
            elif chain is not None and chain.events is None:
                touch(chain)
                chain.head = ev["hash"]
                chain.size += 1
                report.security_events += 1
                absorb(chain)
            else:
                if chain is None:
                    chain = _Chain(ev["hash"], [ev], body)
                    chains.insert(0, chain)
                    waiting.append(chain)
                else:
                    touch(chain)
                    assert chain.events is not None
                    chain.events.append(ev)
                    chain.head = ev["hash"]
                    chain.size += 1
                waiting_events += 1
                absorb(chain)
                if waiting_events > SECURITY_WINDOW:
                    give_up()
                trim()
    except SinkError:
        raise
    except Exception as exc:  # a row the sink cannot even decode
        report.problems.append(Problem(
            SECURITY_STREAM, "security_chain",
            f"the sink's security events cannot be read to the end ({type(exc).__name__})"))
    while waiting:
        give_up()
    if anchor is None:
        return
    # Events stored after the spool was read are in ``seen``; before it, the
    # sink must hold the chain up to the spool's first unsent event (which
    # continues a head) or, with none unsent, up to the spool's head.
    # A sink the server has left since must hold its chain up to the last
    # event it gave it; one it gave none, nothing of it.
    unsent = anchor.first_unsent
    if anchor.took_none:
        whole = True
    elif anchor.end is not None:
        whole = anchor.end[:32].encode() in seen
    elif unsent is not None and isinstance(unsent.get("hash"), str):
        body = _security_body(unsent)
        whole = (unsent["hash"][:32].encode() in seen or continues(start, body, unsent)
                 or any(continues(c.head, body, unsent) for c in chains))
    else:
        whole = anchor.head == start or anchor.head[:32].encode() in seen
    if not whole:
        report.problems.append(Problem(
            SECURITY_STREAM, "security_chain",
            "the sink lacks this server's newest security events: its chain there ends"
            " before where the spool has it (they were removed, or the spool and the sink"
            " do not belong together)"))
    gone = sum(1 for h in anchor.ends if h[:32].encode() not in seen)
    if gone:
        report.problems.append(Problem(
            SECURITY_STREAM, "security_chain",
            f"the sink lacks the last security event of {gone} earlier stretch(es) of this"
            " server's chain it took (between sink switches): removed"))

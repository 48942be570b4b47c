"""Verify stored sessions: recompute every chain from what the sink holds.

Reports changed, removed and reordered events and missing parts, parts whose
own fields disagree with their events, and breaks in the security stream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sinks.base import Sink

from .events import event_hash, genesis, parse_ts
from .store import SECURITY_STREAM

FINAL_REASONS = frozenset({"logout", "idle_timeout", "token_expired", "max_duration"})
# A part's times are written from the same clock reading as its session's
# session.start and session.end events (exactly equal since this release;
# within microseconds before it): a difference beyond this is a changed part.
TIME_SLACK_SECONDS = 1.0


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
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_session(key: bytes, session_id: str, parts: list[dict[str, Any]]) -> list[Problem]:
    """All problems of one session's stored parts (sorted by ``part``)."""
    out: list[Problem] = []

    def add(kind: str, detail: str) -> None:
        out.append(Problem(session_id, kind, detail))

    parts = sorted(parts, key=lambda p: p["part"])
    numbers = [p["part"] for p in parts]
    expected_last = max(numbers) if numbers else -1
    if any(p.get("final") for p in parts):
        expected_last = max(p["part"] for p in parts if p.get("final"))
    missing = sorted(set(range(expected_last + 1)) - set(numbers))
    for m in missing:
        add("missing_part", f"part {m} is not stored")
    prev_hash = genesis(key, session_id)
    expected_seq = 1
    by_number = {p["part"]: p for p in parts}
    for n in range(expected_last + 1):
        part = by_number.get(n)
        if part is None:
            prev_hash = ""  # the chain across a missing part cannot be checked
            expected_seq = -1
            continue
        events = part.get("events") or []
        if prev_hash and part.get("prev_hash") != prev_hash:
            add("bad_part", f"part {n}: prev_hash does not continue the chain")
        chain = part.get("prev_hash") or prev_hash
        if expected_seq > 0 and part.get("first_seq") != expected_seq:
            add("bad_part", f"part {n}: first_seq {part.get('first_seq')} != {expected_seq}")
        seqs = [e.get("seq") for e in events]
        want = list(range(part.get("first_seq", 1), part.get("last_seq", 0) + 1))
        if seqs != want:
            if sorted(s for s in seqs if isinstance(s, int)) == want:
                add("reordered", f"part {n}: events out of seq order")
            else:
                gone = sorted(set(want) - set(seqs))
                if gone:
                    add("removed", f"part {n}: seq {gone} missing")
                extra = sorted(set(s for s in seqs if isinstance(s, int)) - set(want))
                if extra:
                    add("changed", f"part {n}: unexpected seq {extra}")
        if part.get("event_count") != len(events):
            add("bad_part", f"part {n}: event_count {part.get('event_count')} != {len(events)}")
        for e in events:
            if e.get("session_id") != session_id:
                add("changed", f"seq {e.get('seq')}: session_id changed")
            h = event_hash(key, chain, e)
            if h != e.get("hash"):
                add("changed", f"seq {e.get('seq')}: hash does not verify")
            chain = e.get("hash", "")
        if events and part.get("hash") != chain:
            add("bad_part", f"part {n}: hash is not the last event's")
        for problem in _part_fields(part, events, by_number.get(0)):
            add("bad_part", f"part {n}: {problem}")
        prev_hash = part.get("hash", "")
        expected_seq = part.get("last_seq", 0) + 1
    return out


def _seconds(value: Any) -> float | None:
    try:
        return parse_ts(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _part_fields(
    part: dict[str, Any], events: list[dict[str, Any]], first: dict[str, Any] | None
) -> list[str]:
    """A part's own fields against its session's chained events. The fields
    are outside the hash chain; these are the events that fix them: the
    session's ``session.start`` (in part 0) for ``user`` and
    ``session_start_time``, the final part's ``session.end`` for
    ``seal_reason`` and ``session_end_time``."""
    out: list[str] = []
    start_ev = (first.get("events") or [None])[0] if first else None
    if start_ev is not None and start_ev.get("action") == "session.start":
        user = (start_ev.get("actor") or {}).get("user")
        if part.get("user") != user:
            out.append(f"user {part.get('user')!r} is not the session's ({user!r})")
        a, b = _seconds(part.get("session_start_time")), _seconds(start_ev.get("ts"))
        if a is None or b is None or abs(a - b) > TIME_SLACK_SECONDS:
            out.append("session_start_time is not the time of session.start")
    final, reason = part.get("final"), part.get("seal_reason")
    end_time, duration = part.get("session_end_time"), part.get("session_duration_seconds")
    if not final:
        if reason != "checkpoint" or end_time is not None or duration is not None:
            out.append("a non-final part must be a checkpoint without end time or duration")
        return out
    last = events[-1] if events else {}
    if last.get("action") != "session.end":
        out.append("the final part does not end with session.end")
        return out
    if reason not in FINAL_REASONS or reason != (last.get("details") or {}).get("reason"):
        out.append(f"seal_reason {reason!r} is not session.end's")
    end, ended = _seconds(end_time), _seconds(last.get("ts"))
    if end is None or ended is None or abs(end - ended) > TIME_SLACK_SECONDS:
        out.append("session_end_time is not the time of session.end")
    begin = _seconds(part.get("session_start_time"))
    if (end is None or begin is None or not isinstance(duration, int | float)
            or abs(duration - (end - begin)) > 0.002):
        out.append("session_duration_seconds is not end - start")
    return out


async def verify_sink(sink: Sink, key: bytes) -> Report:
    report = Report()
    async for sid in sink.session_ids():
        parts = await sink.get_session_parts(sid)
        report.sessions += 1
        report.parts += len(parts)
        report.events += sum(len(p.get("events") or []) for p in parts)
        report.problems.extend(check_session(key, sid, parts))
    await check_security_stream(sink, key, report)
    return report


SECURITY_WINDOW = 256
SECURITY_HEADS = 256


def _security_hash(key: bytes, prev_hash: str, event: dict[str, Any]) -> str:
    return event_hash(key, prev_hash, {k: v for k, v in event.items() if k != "_id"})


async def check_security_stream(sink: Sink, key: bytes, report: Report) -> None:
    """Follow the security events' chains through the sink.

    Each spool chains its security events from the same genesis value, so a
    sink that several servers write to (or one server with a new data
    directory) holds several chains, interleaved. The events come oldest
    first (:meth:`Sink.security_events_oldest_first`); each must continue
    the head of a chain or start a new one from genesis. One that does
    neither waits for its predecessor (a sink that orders by ``ts`` alone
    may give equal times in another order) until :data:`SECURITY_WINDOW`
    events wait; then the oldest waiting one is a break: it, or the event
    before it, was changed or removed (or never reached the sink: a dead
    letter). Its chain goes on from its own hash, so one tampered event is
    one problem.
    """
    start = genesis(key, SECURITY_STREAM)
    heads: list[str] = []  # most recently extended first
    waiting: deque[dict[str, Any]] = deque()

    def extend(head: str) -> None:
        heads.insert(0, head)
        del heads[SECURITY_HEADS:]

    def link(ev: dict[str, Any]) -> bool:
        h = ev.get("hash")
        if not isinstance(h, str):
            return False
        for i, head in enumerate(heads):
            if _security_hash(key, head, ev) == h:
                del heads[i]
                extend(h)
                return True
        if _security_hash(key, start, ev) == h:
            report.security_chains += 1
            extend(h)
            return True
        return False

    def settle() -> None:
        """Link the waiting events that now continue a head."""
        linked = True
        while linked and waiting:
            linked = False
            for i, ev in enumerate(waiting):
                if link(ev):
                    del waiting[i]
                    report.security_events += 1
                    linked = True
                    break

    def give_up() -> None:
        ev = waiting.popleft()
        report.security_events += 1
        report.problems.append(Problem(
            SECURITY_STREAM, "security_chain",
            f"event {ev.get('_id')} ({ev.get('ts')}, {ev.get('action')}) does not continue"
            " a security chain: it, or the event before it, was changed or removed"))
        h = ev.get("hash")
        extend(h if isinstance(h, str) else "")
        settle()

    async for ev in sink.security_events_oldest_first():
        if not isinstance(ev, dict):
            continue
        if link(ev):
            report.security_events += 1
            settle()
        else:
            waiting.append(ev)
            if len(waiting) > SECURITY_WINDOW:
                give_up()
    while waiting:
        give_up()

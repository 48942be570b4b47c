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
# two readings microseconds apart before it): a difference beyond this is a
# changed part.
TIME_SLACK_SECONDS = 0.05
# session_duration_seconds is end - start of the unrounded times, to 3 places.
DURATION_SLACK_SECONDS = 0.002


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
            out.append(f"user {part.get('user')!r} is not the session's ({user!r})")
        a, b = _seconds(part.get("session_start_time")), _seconds(start_ev.get("ts"))
        if a is None or b is None or abs(a - b) > TIME_SLACK_SECONDS:
            out.append("session_start_time is not the time of session.start")
    final, reason = part.get("final"), part.get("seal_reason")
    end_time, duration = part.get("session_end_time"), part.get("session_duration_seconds")
    last = _obj(events[-1]) if events else {}
    if not isinstance(final, bool):
        out.append("final is not true or false")
        return out
    if not final:
        if reason != "checkpoint" or end_time is not None or duration is not None:
            out.append("a non-final part must be a checkpoint without end time or duration")
        if last.get("action") == "session.end":
            out.append("a part that ends with session.end is not marked final")
        return out
    if last.get("action") != "session.end":
        out.append("the final part does not end with session.end")
        return out
    if not (isinstance(reason, str) and reason in FINAL_REASONS
            and reason == _obj(last.get("details")).get("reason")):
        out.append(f"seal_reason {reason!r} is not session.end's")
    end, ended = _seconds(end_time), _seconds(last.get("ts"))
    if end is None or ended is None or abs(end - ended) > TIME_SLACK_SECONDS:
        out.append("session_end_time is not the time of session.end")
    begin = _seconds(part.get("session_start_time"))
    if (end is None or begin is None or isinstance(duration, bool)
            or not isinstance(duration, int | float)
            or not abs(duration - (end - begin)) <= DURATION_SLACK_SECONDS):  # NaN fails too
        out.append("session_duration_seconds is not end - start")
    return out


async def verify_sink(sink: Sink, key: bytes) -> Report:
    report = Report()
    async for sid in sink.session_ids():
        parts = await sink.get_session_parts(sid)
        report.sessions += 1
        report.parts += len(parts)
        report.events += sum(len(p.get("events") or []) for p in parts
                             if isinstance(p, dict) and isinstance(p.get("events"), list))
        try:
            report.problems.extend(check_session(key, sid, parts))
        except Exception as exc:  # a document too odd to follow is a finding, not a crash
            report.problems.append(Problem(
                sid, "bad_part", f"the session's parts cannot be checked ({type(exc).__name__})"))
    await check_security_stream(sink, key, report)
    return report


# A chain that waits for its first event's predecessor (a sink ordering by
# ts alone gives equal times in any order; a dead letter retried late comes
# after its successors) waits until this many events wait in all.
SECURITY_WINDOW = 50_000


def _security_hash(key: bytes, prev_hash: str, event: dict[str, Any]) -> str | None:
    try:
        return event_hash(key, prev_hash, {k: v for k, v in event.items() if k != "_id"})
    except (TypeError, ValueError):  # not JSON a spool could have written (NaN, odd keys)
        return None


async def check_security_stream(sink: Sink, key: bytes, report: Report) -> None:
    """Follow the security events' chains through the sink.

    Each spool chains its security events from the same genesis value, so a
    sink that several servers write to (or one server with a new data
    directory) holds several chains, interleaved. The events come oldest
    first (:meth:`Sink.security_events_oldest_first`). Each must continue
    the head of a chain, or start one from genesis; one that does neither
    opens a *waiting* chain (later events may continue it), which is linked
    as a whole once its first event's predecessor arrives. When more than
    :data:`SECURITY_WINDOW` events wait, and at the end, the oldest waiting
    chain is a break: its first event, or the event before it, was changed
    or removed (or never reached the sink: a dead letter). It then counts
    as linked, so one tampered event is one problem.

    Per event this costs one HMAC per chain head tried, most recently
    extended first: one, while a single server writes.
    """
    start = genesis(key, SECURITY_STREAM)
    heads: list[str] = []  # linked chains' last hashes, most recently extended first
    # Waiting chains, oldest first: [events...]; their tails are tried too.
    waiting: deque[list[dict[str, Any]]] = deque()
    waiting_events = 0

    def continues(prev: str, ev: dict[str, Any]) -> bool:
        return _security_hash(key, prev, ev) == ev.get("hash")

    def extend(old: str | None, new: str) -> None:
        if old is not None:
            heads.remove(old)
        heads.insert(0, new)

    def absorb(new_head: str) -> None:
        """Link every waiting chain that continues ``new_head`` (and so on)."""
        nonlocal waiting_events
        while True:
            for chain in waiting:
                if continues(new_head, chain[0]):
                    waiting.remove(chain)
                    waiting_events -= len(chain)
                    report.security_events += len(chain)
                    tail = str(chain[-1].get("hash"))
                    extend(new_head, tail)
                    new_head = tail
                    break
            else:
                return

    def give_up() -> None:
        nonlocal waiting_events
        chain = waiting.popleft()
        waiting_events -= len(chain)
        report.security_events += len(chain)
        ev = chain[0]
        report.problems.append(Problem(
            SECURITY_STREAM, "security_chain",
            f"event {ev.get('_id')} ({ev.get('ts')}, {ev.get('action')}) does not continue"
            " a security chain: it, or the event before it, was changed or removed"))
        tail = str(chain[-1].get("hash"))
        extend(None, tail)
        absorb(tail)

    async for ev in sink.security_events_oldest_first():
        if not isinstance(ev, dict) or not isinstance(ev.get("hash"), str):
            ev = {"_id": ev.get("_id") if isinstance(ev, dict) else None, "hash": ""}
        head = next((h for h in heads if continues(h, ev)), None)
        if head is not None or continues(start, ev):
            if head is None:
                report.security_chains += 1
            report.security_events += 1
            extend(head, ev["hash"])
            if waiting:
                absorb(ev["hash"])
            continue
        chain = next((c for c in waiting if continues(str(c[-1].get("hash")), ev)), None)
        if chain is not None:
            chain.append(ev)
        else:
            waiting.append([ev])
        waiting_events += 1
        if waiting_events > SECURITY_WINDOW:
            give_up()
    while waiting:
        give_up()

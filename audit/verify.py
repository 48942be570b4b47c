"""Verify stored sessions: recompute every chain from what the sink holds.

Reports changed, removed and reordered events and missing parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sinks.base import Sink

from .events import event_hash, genesis


@dataclass(frozen=True)
class Problem:
    session_id: str
    kind: str  # changed | removed | reordered | missing_part | bad_part
    detail: str


@dataclass
class Report:
    sessions: int = 0
    parts: int = 0
    events: int = 0
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
        prev_hash = part.get("hash", "")
        expected_seq = part.get("last_seq", 0) + 1
    return out


async def verify_sink(sink: Sink, key: bytes) -> Report:
    report = Report()
    async for sid in sink.session_ids():
        parts = await sink.get_session_parts(sid)
        report.sessions += 1
        report.parts += len(parts)
        report.events += sum(len(p.get("events") or []) for p in parts)
        report.problems.extend(check_session(key, sid, parts))
    return report

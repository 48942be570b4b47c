"""The JSONL sink's memory does not grow with the size of its stored history.

A reviewer measured 22 MB RSS before ``open`` and 1809 MB after, over an
865 MB directory: every document was parsed into one list at open, on every
rescan and for every admin query. Here a history of some 70 MB is written as
real files, and tracemalloc's peak over ``open`` and every query must stay a
small fraction of it (the old sink's peak was above the history's size).
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

from receiver import sample_part, sample_security_event

from sinks.jsonl import JsonlSink

SESSIONS = 1200  # 1000 of 2 parts, 200 of 1: 2200 parts
EVENTS = 1000
DETAIL = "x" * 15_000  # per event; a part of 2 events is ~31 kB


def _big_part(sid: str, part: int, final: bool, start: str) -> dict[str, Any]:
    p = sample_part(sid, part, final=final, start=start)
    for e in p["events"]:
        e["details"] = {"note": DETAIL}
    return p


def _write_history(directory: Path) -> tuple[int, list[dict[str, Any]]]:
    """Files as the sink writes them, over three days; returns (bytes, parts)."""
    directory.mkdir()
    parts = []
    for i in range(SESSIONS):
        sid = f"s{i:05d}"
        start = f"2026-11-{20 + i % 5}T10:{i // 60 % 60:02d}:{i % 60:02d}.000Z"
        if i < 1000:
            parts += [_big_part(sid, 0, False, start), _big_part(sid, 1, True, start)]
        else:
            parts.append(_big_part(sid, 0, True, start))
    events = [
        sample_security_event(f"ev{i:05d}", ts=f"2026-11-26T14:{i // 60:02d}:{i % 60:02d}.000Z")
        for i in range(EVENTS)
    ]
    lines = [{**e, "type": "security_event"} for e in events]
    lines += [{**p, "type": "session_part"} for p in parts]
    total = 0
    third = len(lines) // 3 + 1
    for day in range(3):
        with (directory / f"audit-2026-11-2{day}.jsonl").open("wb") as f:
            for doc in lines[day * third : (day + 1) * third]:
                total += f.write((json.dumps(doc, separators=(",", ":")) + "\n").encode())
    return total, parts


async def test_open_and_queries_do_not_hold_the_history_in_memory(tmp_path: Path) -> None:
    directory = tmp_path / "jsonl"
    total, parts = _write_history(directory)
    assert total > 60_000_000
    wanted = parts[-1]
    sink = JsonlSink(directory)
    tracemalloc.start()
    try:
        await sink.open()
        sessions, cursor = await sink.list_sessions(limit=50)
        bob, _ = await sink.list_sessions(user="bob", limit=50)
        got = await sink.get_session_parts(wanted["session_id"])
        ids = [sid async for sid in sink.session_ids()]
        events, ev_cursor = await sink.list_security_events(limit=100)
        denied, _ = await sink.list_security_events(kind="access.denied")
        await sink.write_part(_big_part("new", 0, True, "2027-01-01T00:00:00.000Z"))
        newest, _ = await sink.list_sessions(limit=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await sink.close()
    # The answers are right...
    assert len(sessions) == 50 and cursor is not None
    assert bob == []
    assert [p["_id"] for p in got] == [wanted["_id"]]
    assert got[0]["events"][0]["details"]["note"] == DETAIL
    assert len(ids) == len(set(ids)) == SESSIONS
    assert len(events) == 100 and ev_cursor is not None and denied == []
    assert newest[0]["session_id"] == "new"
    assert sink.rebuilds == 0  # every line was where the index said
    # ... and memory is a small fraction of the history, not a copy of it.
    assert peak < total / 10, f"peak {peak / 1e6:.1f} MB for a {total / 1e6:.1f} MB history"

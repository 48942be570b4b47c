"""JSONL sink specifics: file layout, torn lines after a crash, day rollover."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from receiver import sample_part, sample_security_event

from sinks.base import SinkConflict
from sinks.jsonl import JsonlSink

DAY1 = 1_764_115_200.0  # 2025-11-26T00:00:00Z
DAY2 = DAY1 + 86_400


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def lines(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(raw) for raw in data.splitlines()]


async def test_layout_one_object_per_line_with_type(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, clock=lambda: DAY1 + 3600)
    await sink.open()
    try:
        part = sample_part("s1")
        events = [sample_security_event("e1"), sample_security_event("e2")]
        await sink.write_part(part)
        await sink.write_security_events(events)
        await sink.write_part(part)  # no second line
    finally:
        await sink.close()
    assert names(tmp_path) == ["audit-2025-11-26.jsonl"]
    got = lines(tmp_path / "audit-2025-11-26.jsonl")
    assert got == [
        {**part, "type": "session_part"},
        {**events[0], "type": "security_event"},
        {**events[1], "type": "security_event"},
    ]


async def test_reopen_after_a_crash_between_fsync_and_marking_stored(tmp_path: Path) -> None:
    part = sample_part("s1")
    first = JsonlSink(tmp_path)
    await first.open()
    await first.write_part(part)
    await first.close()  # the spool never learnt it was stored
    second = JsonlSink(tmp_path)
    await second.open()
    try:
        await second.write_part(part)  # the flusher's retry
        with pytest.raises(SinkConflict):
            await second.write_part(sample_part("s1", salt="x"))
    finally:
        await second.close()
    (name,) = names(tmp_path)
    assert [d["_id"] for d in lines(tmp_path / name)] == ["s1:0"]


@pytest.mark.parametrize("keep_first", [True, False])
async def test_torn_last_line_is_removed_at_open(tmp_path: Path, keep_first: bool) -> None:
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    if keep_first:
        await sink.write_part(sample_part("a"))
    await sink.close()
    path = tmp_path / "audit-2025-11-26.jsonl"
    torn = json.dumps({**sample_part("b"), "type": "session_part"}).encode()[:70]
    with path.open("ab") as f:
        f.write(torn)  # a crash in the middle of a write
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        assert [d["_id"] for d in lines(path)] == (["a:0"] if keep_first else [])
        await sink.write_part(sample_part("b"))  # the retry appends it whole
        assert [p["_id"] for p in await sink.get_session_parts("b")] == ["b:0"]
    finally:
        await sink.close()
    assert [d["_id"] for d in lines(path)] == (["a:0", "b:0"] if keep_first else ["b:0"])


async def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "audit-2025-11-26.jsonl"
    part = sample_part("c")
    path.write_bytes(json.dumps({**part, "type": "session_part"}).encode())  # no "\n"
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        await sink.write_part(part)  # known already: nothing appended
        with pytest.raises(SinkConflict):
            await sink.write_part(sample_part("c", salt="x"))
        await sink.write_part(sample_part("d"))
    finally:
        await sink.close()
    assert [d["_id"] for d in lines(path)] == ["c:0", "d:0"]


async def test_day_rollover_and_index_across_files(tmp_path: Path) -> None:
    now = [DAY1 + 86_399]
    sink = JsonlSink(tmp_path, clock=lambda: now[0])
    await sink.open()
    await sink.write_part(sample_part("s1"))
    now[0] = DAY2 + 1
    await sink.write_part(sample_part("s2"))
    await sink.write_part(sample_part("s1"))  # stored yesterday: no-op
    await sink.close()
    assert names(tmp_path) == [
        "audit-2025-11-26.jsonl",
        "audit-2025-11-27.jsonl",
    ]
    reopened = JsonlSink(tmp_path, clock=lambda: DAY2 + 5)
    await reopened.open()
    try:
        with pytest.raises(SinkConflict):
            await reopened.write_part(sample_part("s1", salt="x"))
        sessions, _ = await reopened.list_sessions()
        assert sorted(s["session_id"] for s in sessions) == ["s1", "s2"]
    finally:
        await reopened.close()
    assert [d["_id"] for d in lines(tmp_path / "audit-2025-11-27.jsonl")] == ["s2:0"]


async def test_a_batch_with_a_conflict_writes_nothing(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    await sink.open()
    try:
        await sink.write_security_events([sample_security_event("e1")])
        with pytest.raises(SinkConflict):
            await sink.write_security_events(
                [sample_security_event("e2"), sample_security_event("e1", salt="x")]
            )
        with pytest.raises(SinkConflict):  # the same _id twice in one batch, other hash
            await sink.write_security_events(
                [sample_security_event("e3"), sample_security_event("e3", salt="x")]
            )
        await sink.write_security_events([sample_security_event("e4")] * 2)
        events, _ = await sink.list_security_events()
        assert sorted(e["_id"] for e in events) == ["e1", "e4"]
    finally:
        await sink.close()

"""JSONL sink specifics: file layout, torn lines after a crash, day rollover."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import os
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
from receiver import sample_part, sample_security_event

import sinks
from audit.verify import verify_sink
from sinks import jsonl
from sinks.base import SinkConflict, SinkUnavailable
from sinks.jsonl import LOCK_NAME, JsonlSink

DAY1 = 1_764_115_200.0  # 2025-11-26T00:00:00Z
DAY2 = DAY1 + 86_400


def names(directory: Path) -> list[str]:
    """The files in ``directory`` but the sink's write lock."""
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME)


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


@pytest.mark.parametrize("newline", [True, False], ids=["line", "torn-tail"])
async def test_a_line_nested_past_the_json_parsers_stack_is_not_json(
    tmp_path: Path, newline: bool
) -> None:
    """json.loads raises RecursionError, not ValueError, on it: the sink never
    opened (a traceback a retry, nothing sent until the spool filled), though
    a line that is not JSON is ignored and a torn tail cut off."""
    path = tmp_path / "audit-2025-11-26.jsonl"
    path.write_bytes(json.dumps({**sample_part("a"), "type": "session_part"}).encode()
                     + b"\n" + b"[" * 100_000 + (b"\n" if newline else b""))
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        await sink.write_part(sample_part("a"))  # known already: nothing appended
        await sink.write_part(sample_part("b"))
        assert [p["_id"] for p in await sink.get_session_parts("b")] == ["b:0"]
    finally:
        await sink.close()
    ids = [json.loads(raw)["_id"] for raw in path.read_bytes().splitlines()
           if not raw.startswith(b"[")]
    assert ids == ["a:0", "b:0"]


async def test_a_part_line_whose_event_count_is_past_a_float_is_still_indexed(
    tmp_path: Path, audit_key: bytes
) -> None:
    """JSON's 1e400 is a float infinity, and int() of it raises OverflowError,
    not the ValueError of a count that is no number: one such line (appended
    by whoever may write to the directory) stopped the sink for good. It
    never opened again (nothing sent until the spool filled), every query
    failed, and verify ended in a traceback instead of reporting the line."""
    path = tmp_path / "audit-2025-11-26.jsonl"
    forged = {**sample_part("x"), "event_count": 1e400, "type": "session_part"}
    path.write_bytes(part_line(sample_part("a")) + json.dumps(forged).encode() + b"\n")
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        await sink.write_part(sample_part("b"))
        sessions, _ = await sink.list_sessions(limit=10)
        assert sorted(x["session_id"] for x in sessions) == ["a", "b", "x"]
        report = await verify_sink(sink, audit_key)
        assert "x" in {problem.session_id for problem in report.problems}
    finally:
        await sink.close()


FILE_SIZE_LIMIT_SCRIPT = """
import asyncio, os, resource, sys
from pathlib import Path
sys.path.insert(0, "tests")
from receiver import sample_part
from sinks.base import SinkUnavailable
from sinks.jsonl import JsonlSink

async def main(directory):
    sink = JsonlSink(directory, clock=lambda: 1_764_115_200.0)
    await sink.open()
    await sink.write_part(sample_part("a"))
    path = Path(directory) / "audit-2025-11-26.jsonl"
    size = path.stat().st_size
    # Python ignores SIGXFSZ: a write past the limit fails with EFBIG, after
    # writing what fits, as on a disk that fills up mid-line.
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
    big = sample_part("b")
    big["pad"] = "x" * 1_000  # less than the file object's 8 KiB buffer
    try:
        await sink.write_part(big)
    except SinkUnavailable as exc:
        print("unavailable:", exc)
    print("sizes", size, path.stat().st_size)

asyncio.run(main(sys.argv[1]))
"""


async def test_a_write_the_disk_cuts_short_is_truncated_back(tmp_path: Path) -> None:
    """README: a failed write is truncated back. The line went through the
    file object's buffer: the disk took what fitted, the rest stayed in the
    buffer, and truncate(), which flushes first, failed the same way, so the
    torn line stayed until the next write's repair ("crash during a write")
    and a reader (verify) saw it meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(tmp_path),
        cwd=Path(__file__).parent.parent,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode == 0, out
    assert "unavailable: jsonl sink: write failed: [Errno 27]" in out, out
    before, after = out.split("sizes ")[1].split()
    assert after == before, out
    assert [d["_id"] for d in lines(tmp_path / "audit-2025-11-26.jsonl")] == ["a:0"]


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
        # The newline the repair added is part of the line it ended, not a
        # line of its own that is no JSON (verify would report one).
        assert await sink.unchecked_records() == []
        # ... and the index's offset is after that newline, not past it (the
        # next catch-up then took the file for one that shrank).
        assert sink.rebuilds == 0
    finally:
        await sink.close()
    assert [d["_id"] for d in lines(path)] == ["c:0", "d:0"]


async def test_a_last_line_that_is_json_but_no_document_does_not_stop_the_open(
    tmp_path: Path,
) -> None:
    """A tail without its newline that parses but is no object with an
    ``_id`` (a writer's other JSON; a line cut where it still parses) is
    not taken for a document the repair keeps: indexing it wanted its
    ``_id`` (a KeyError from open, no sink at all). The sink opens and
    writes, and every line of the file is whole."""
    path = tmp_path / "audit-2025-11-26.jsonl"
    path.write_bytes(part_line(sample_part("a")) + b'{"note": "no _id"}')
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        await sink.write_part(sample_part("b"))
        assert [p["_id"] for p in await sink.get_session_parts("b")] == ["b:0"]
    finally:
        await sink.close()
    ids = [d.get("_id") for d in lines(path)]  # (each line whole JSON)
    assert [i for i in ids if i is not None] == ["a:0", "b:0"]


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


def part_line(part: dict[str, object]) -> bytes:
    return (json.dumps({**part, "type": "session_part"}, separators=(",", ":")) + "\n").encode()


async def test_a_sink_opened_while_another_writes_leaves_its_line_alone(tmp_path: Path) -> None:
    """``server.py verify`` (or ``drain``) beside a server that is appending a
    part: the half-written line looks torn, but only the writer may repair,
    so the second sink leaves the bytes alone, reads the complete lines, and
    its own write waits for the lock and then sees the finished line."""
    first = JsonlSink(tmp_path, clock=lambda: DAY1)
    await first.open()
    await first.write_part(sample_part("a"))
    await first.write_security_events([sample_security_event("e1")])
    await first.close()
    path = tmp_path / "audit-2025-11-26.jsonl"
    b = sample_part("b")
    line = part_line(b)
    # The server is in the middle of appending b: it holds the write lock
    # (another open file description, as another process has) and half the
    # line is out.
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with path.open("ab") as f:
            f.write(line[:70])
        before = path.read_bytes()
        second = JsonlSink(tmp_path, clock=lambda: DAY1)
        await second.open()
        try:
            assert path.read_bytes() == before  # not truncated
            assert [p["_id"] for p in await second.get_session_parts("a")] == ["a:0"]
            assert await second.get_session_parts("b") == []
            assert [s["session_id"] for s in (await second.list_sessions())[0]] == ["a"]
            assert [e["_id"] for e in (await second.list_security_events())[0]] == ["e1"]
            # drain retries b: it waits for the server to finish its line.
            retry = asyncio.ensure_future(second.write_part(b))
            await asyncio.sleep(0.3)
            assert not retry.done() and path.read_bytes() == before
            with path.open("ab") as f:
                f.write(line[70:])
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            await asyncio.wait_for(retry, 5)  # b is stored already: nothing appended
            assert [p["_id"] for p in await second.get_session_parts("b")] == ["b:0"]
        finally:
            await second.close()
    finally:
        os.close(fd)
    assert [d["_id"] for d in lines(path)] == ["a:0", "e1", "b:0"]


async def test_a_directory_made_anew_is_locked_through_its_new_lock_file(
    tmp_path: Path,
) -> None:
    """The directory moved away (to archive it) and made anew while the
    server runs, then ``server.py drain`` beside it appending a line: the
    server kept its lock on the old directory's lock file, which excludes
    no one, so it took the drain's half-written line for a crash's torn
    tail, cut it off and appended its own; the drain's rest then ended up
    after it, as a line no reader can parse. The server must wait for the
    lock of the directory as it is now."""
    d = tmp_path / "audit-jsonl"
    d.mkdir(mode=0o700)
    server = JsonlSink(d, clock=lambda: DAY1)
    await server.open()
    try:
        await server.write_part(sample_part("a"))
        d.rename(tmp_path / "archived")
        d.mkdir(mode=0o700)
        path = d / "audit-2025-11-26.jsonl"
        line = part_line(sample_part("b"))
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)  # the drain
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with path.open("ab") as f:
                f.write(line[:70])
            write = asyncio.ensure_future(server.write_part(sample_part("c")))
            await asyncio.sleep(0.3)
            assert not write.done() and path.read_bytes() == line[:70]
            with path.open("ab") as f:
                f.write(line[70:])
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        await asyncio.wait_for(write, 5)
    finally:
        await server.close()
    assert [d["_id"] for d in lines(path)] == ["b:0", "c:0"]


async def test_two_writers_of_one_directory_append_nothing_twice(tmp_path: Path) -> None:
    """Each writer reads what the other appended before it appends itself."""
    one = JsonlSink(tmp_path, clock=lambda: DAY1)
    two = JsonlSink(tmp_path, clock=lambda: DAY2)
    await one.open()
    await two.open()
    try:
        await one.write_part(sample_part("s1"))
        await two.write_part(sample_part("s1"))  # stored by the other: a no-op
        with pytest.raises(SinkConflict):
            await two.write_part(sample_part("s1", salt="x"))
        await two.write_security_events([sample_security_event("e1")])
        await one.write_security_events([sample_security_event("e1"), sample_security_event("e2")])
        sessions, _ = await two.list_sessions()
        assert [s["session_id"] for s in sessions] == ["s1"]
        events, _ = await one.list_security_events()
        assert sorted(e["_id"] for e in events) == ["e1", "e2"]
    finally:
        await one.close()
        await two.close()
    assert [d["_id"] for d in lines(tmp_path / "audit-2025-11-26.jsonl")] == ["s1:0", "e2"]
    assert [d["_id"] for d in lines(tmp_path / "audit-2025-11-27.jsonl")] == ["e1"]


async def test_todays_file_moved_away_and_made_anew_by_another_writer_is_read_from_its_start(
    tmp_path: Path,
) -> None:
    """Today's file shipped (renamed away) while the server runs, and
    ``server.py drain`` beside it then made the file anew, as long as the
    old one was: the server's index knew the name only by its size, took
    the new file for the one it had read to its end, and never read the
    drain's line, so the server's own retry of that part appended it a
    second time."""
    path = tmp_path / "audit-2025-11-26.jsonl"
    server = JsonlSink(tmp_path, clock=lambda: DAY1)
    drain = JsonlSink(tmp_path, clock=lambda: DAY1)
    await server.open()
    await drain.open()
    try:
        await server.write_part(sample_part("a"))
        path.rename(tmp_path / "shipped.jsonl.bak")
        await drain.write_part(sample_part("b"))  # a line as long as a's
        await server.write_part(sample_part("b"))  # the same spool's retry: stored
        assert [p["_id"] for p in await server.get_session_parts("b")] == ["b:0"]
        assert await server.get_session_parts("a") == []
        with pytest.raises(SinkConflict):
            await server.write_part(sample_part("b", salt="x"))
    finally:
        await server.close()
        await drain.close()
    assert [d["_id"] for d in lines(path)] == ["b:0"]


@pytest.mark.parametrize("how", ["delete", "rename_away", "rename_to_another_audit_name"])
async def test_a_write_after_todays_file_was_deleted_or_renamed_is_not_lost(
    tmp_path: Path, how: str
) -> None:
    """The open file is today's file only while its path names that inode:
    a write after a delete or rename goes to a new file at the expected
    path (and is indexed), not into the old inode."""
    path = tmp_path / "audit-2025-11-26.jsonl"
    moved = {
        "delete": None,
        "rename_away": tmp_path / "audit-2025-11-26.jsonl.bak",
        "rename_to_another_audit_name": tmp_path / "audit-2025-11-26-old.jsonl",
    }[how]
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        await sink.write_part(sample_part("a"))
        if moved is None:
            path.unlink()
        else:
            path.rename(moved)
        await sink.write_part(sample_part("b"))
        await sink.write_part(sample_part("c"))
        assert [d["_id"] for d in lines(path)] == ["b:0", "c:0"]
        assert [p["_id"] for p in await sink.get_session_parts("b")] == ["b:0"]
        assert [p["_id"] for p in await sink.get_session_parts("c")] == ["c:0"]
    finally:
        await sink.close()
    if moved is not None:
        assert [d["_id"] for d in lines(moved)] == ["a:0"]  # nothing went to the old inode
    still_listed = how == "rename_to_another_audit_name"
    reopened = JsonlSink(tmp_path, clock=lambda: DAY1)
    await reopened.open()
    try:
        assert [p["_id"] for p in await reopened.get_session_parts("b")] == ["b:0"]
        assert [p["_id"] for p in await reopened.get_session_parts("a")] == (
            ["a:0"] if still_listed else []
        )
        await reopened.write_part(sample_part("b"))  # stored: nothing appended
    finally:
        await reopened.close()
    assert [d["_id"] for d in lines(path)] == ["b:0", "c:0"]


async def test_a_directory_that_keeps_changing_is_retryable_never_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catch-up gives up after three rounds of files vanishing between the
    listing and the read: SinkUnavailable, and the index it had is kept
    (an empty or partial one would let an _id be appended again)."""
    path = tmp_path / "audit-2025-11-26.jsonl"
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        await sink.write_part(sample_part("a"))
        await sink.write_security_events([sample_security_event("e1")])
        real_sizes = jsonl._sizes

        def racing(directory: Path) -> dict[str, int]:
            # Listed, and gone by the time it is read (every time).
            return {**real_sizes(directory), "audit-2025-11-25.jsonl": (100, 0, 0)}

        monkeypatch.setattr(jsonl, "_sizes", racing)
        with pytest.raises(SinkUnavailable):
            await sink.write_part(sample_part("a"))
        with pytest.raises(SinkUnavailable):
            await sink.write_security_events([sample_security_event("e1")])
        with pytest.raises(SinkUnavailable):
            await sink.get_session_parts("a")
        other = JsonlSink(tmp_path, clock=lambda: DAY1)
        with pytest.raises(SinkUnavailable):
            await other.open()
        assert [d["_id"] for d in lines(path)] == ["a:0", "e1"]
        monkeypatch.setattr(jsonl, "_sizes", real_sizes)  # the race is over
        await sink.write_part(sample_part("a"))  # the retries: stored already
        await sink.write_security_events([sample_security_event("e1")])
        with pytest.raises(SinkConflict):
            await sink.write_part(sample_part("a", salt="x"))
        await sink.write_part(sample_part("b"))
        assert [p["_id"] for p in await sink.get_session_parts("a")] == ["a:0"]
    finally:
        await sink.close()
    assert [d["_id"] for d in lines(path)] == ["a:0", "e1", "b:0"]


@pytest.mark.parametrize("when", ["before_open", "while_open"])
async def test_a_duplicate_in_lines_another_process_wrote_is_fsynced_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Lines this sink did not write may be from a process that died before
    its fsync: a retried write answers "stored" for them only after their
    file was fsynced. (A power cut cannot be simulated; the fsync can be
    observed.)"""
    path = tmp_path / "audit-2025-11-26.jsonl"
    b = sample_part("b")
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    if when == "before_open":
        path.write_bytes(part_line(b))  # written, never fsynced
        await sink.open()
    else:
        await sink.open()
        await sink.write_part(sample_part("a"))
        with path.open("ab") as f:
            f.write(part_line(b))  # another process's append, never fsynced
    synced = _recording_fsyncs(monkeypatch)

    try:
        st = path.stat()
        await sink.write_part(b)  # the flusher's retry: stored already
        assert (st.st_dev, st.st_ino) in synced
        synced.clear()
        await sink.write_part(b)  # known fsynced now: not again
        with pytest.raises(SinkConflict):
            await sink.write_part(sample_part("b", salt="x"))
        assert synced == []
    finally:
        await sink.close()
    assert [d["_id"] for d in lines(path)] == (["b:0"] if when == "before_open" else ["a:0", "b:0"])


async def test_a_writer_repairs_a_torn_tail_it_could_not_repair_at_open(tmp_path: Path) -> None:
    """Opened while another process held the lock over a torn line, the sink
    did not repair; that process then died. The sink's first write removes
    the fragment before appending, so every stored line parses."""
    first = JsonlSink(tmp_path, clock=lambda: DAY1)
    await first.open()
    await first.write_part(sample_part("a"))
    await first.close()
    path = tmp_path / "audit-2025-11-26.jsonl"
    b = sample_part("b")
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with path.open("ab") as f:
            f.write(part_line(b)[:70])
        before = path.read_bytes()
        sink = JsonlSink(tmp_path, clock=lambda: DAY1)
        await sink.open()
        assert path.read_bytes() == before  # not repaired: the lock was taken
    finally:
        os.close(fd)  # the holder dies: its lock goes, its fragment stays
    try:
        await sink.write_part(sample_part("c"))
        assert [d["_id"] for d in lines(path)] == ["a:0", "c:0"]  # every line parses
        assert [p["_id"] for p in await sink.get_session_parts("c")] == ["c:0"]
        assert await sink.get_session_parts("b") == []
        await sink.write_part(b)  # the dead writer's retry appends it whole
        assert [p["_id"] for p in await sink.get_session_parts("b")] == ["b:0"]
        assert sink.rebuilds == 0
    finally:
        await sink.close()
    assert [d["_id"] for d in lines(path)] == ["a:0", "c:0", "b:0"]


async def _paged(list_page: Any, key: str, limit: int) -> list[str]:
    """``key`` of every item of a paged query, page by page."""
    got: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await list_page(limit=limit, cursor=cursor)
        got += [item[key] for item in page]
        if cursor is None:
            return got


async def _read_everything(sink: JsonlSink, sids: set[str], eids: set[str]) -> None:
    """Every query, paging, so every indexed offset is read at least once."""
    assert sorted(await _paged(sink.list_sessions, "session_id", 2)) == sorted(sids)
    assert sorted([sid async for sid in sink.session_ids()]) == sorted(sids)
    for sid in sids:
        parts = await sink.get_session_parts(sid)
        assert parts and all(p["session_id"] == sid for p in parts)
    assert sorted(await _paged(sink.list_security_events, "_id", 3)) == sorted(eids)


async def test_normal_operation_never_rebuilds_the_index(tmp_path: Path) -> None:
    """The query path re-reads everything when a line is not at its indexed
    offset, which would hide an offset bug behind right answers: count it,
    and see it never happens in writes, queries, two writers, day rollover
    and repairs."""
    path1, path2 = tmp_path / "audit-2025-11-26.jsonl", tmp_path / "audit-2025-11-27.jsonl"
    path1.write_bytes(part_line(sample_part("pre")).rstrip(b"\n"))  # complete, no newline
    now = [DAY1 + 86_000]
    one = JsonlSink(tmp_path, clock=lambda: now[0])
    two = JsonlSink(tmp_path, clock=lambda: now[0])
    await one.open()
    await two.open()
    sids, eids = {"pre"}, set()
    try:
        for i in range(12):
            sink = (one, two)[i % 3 == 0]
            if i == 6:
                now[0] = DAY2 + 10  # rollover in the middle
            if i == 8:  # a crash left a torn line in today's file
                with path2.open("ab") as f:
                    f.write(part_line(sample_part("torn"))[:50])
            sid = f"s{i}"
            start = f"2026-11-26T1{i % 10}:00:00.000Z"
            await sink.write_part(sample_part(sid, 0, final=False, start=start))
            await sink.write_part(sample_part(sid, 1, start=start))
            await sink.write_part(sample_part(sid, 1, start=start))  # a retry: no-op
            batch = [
                sample_security_event(f"e{i}-{k}", ts=f"2026-11-26T14:00:{i:02d}.{k:03d}Z")
                for k in range(i % 4)
            ]
            await sink.write_security_events(batch)
            sids.add(sid)
            eids |= {e["_id"] for e in batch}
            for reader in (one, two):
                await _read_everything(reader, sids, eids)
        # Nor does it read its own lines back as copies of themselves (each
        # write then re-read the day file from that writer's last line on).
        for writer in (one, two):
            assert writer._index is not None and writer._index.repeats == []
    finally:
        await one.close()
        await two.close()
    reopened = JsonlSink(tmp_path, clock=lambda: now[0])
    await reopened.open()
    try:
        await _read_everything(reopened, sids, eids)
    finally:
        await reopened.close()
    assert (one.rebuilds, two.rebuilds, reopened.rebuilds) == (0, 0, 0)
    for path in (path1, path2):
        lines(path)  # every line parses


async def test_the_directory_entry_is_fsynced_even_after_a_failed_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new day file's directory entry must reach the disk before a write in
    it is acknowledged -- also when the first directory fsync failed, or when
    another process (or one that crashed) created the file."""
    dir_syncs: list[int] = []
    real_fsync = os.fsync
    fail = {"left": 1}

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            dir_syncs.append(fd)
            if fail["left"]:
                fail["left"] -= 1
                raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sink = JsonlSink(tmp_path, clock=lambda: 1795000000.0)  # 2026-11-19
    await sink.open()
    try:
        name = f"audit-{time.strftime('%Y-%m-%d', time.gmtime(1795000000.0))}.jsonl"
        (tmp_path / name).write_bytes(b"")  # today's file exists already
        with pytest.raises(SinkUnavailable):
            await sink.write_part(sample_part("a"))
        await sink.write_part(sample_part("a"))
        assert len(dir_syncs) == 2  # the failed one, then one that held
        await sink.write_part(sample_part("b"))
        assert len(dir_syncs) == 2  # once per file
        (tmp_path / name).unlink()  # deleted under the sink: a new entry, synced again
        await sink.write_part(sample_part("c"))
        assert len(dir_syncs) == 3
        assert (tmp_path / name).exists()
    finally:
        await sink.close()


async def test_a_day_file_planted_as_a_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    """In a group-writable directory (accepted with a warning) a member can
    plant ``audit-2000-01-01.jsonl -> /some/victim``: the repair at open
    would cut the victim's last line ("torn") off. The sink follows no
    symlink: it refuses to open, saying which name, and the victim keeps
    every byte."""
    directory = tmp_path / "jsonl"
    directory.mkdir(mode=0o770)
    os.chmod(directory, 0o770)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"someone else's data\nwith a last line without its newline")
    before = victim.read_bytes()
    (directory / "audit-2000-01-01.jsonl").symlink_to(victim)
    refused = await _refusal(JsonlSink(directory, clock=lambda: DAY1))
    assert victim.read_bytes() == before
    assert "jsonl/audit-2000-01-01.jsonl is a symbolic link" in refused


async def test_a_duplicate_in_a_later_file_is_fsynced_after_an_earlier_synced_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file with lines not known fsynced is fsynced before a duplicate
    is answered from it, not only those before the first already synced."""
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        await sink.write_part(sample_part("a"))  # today's file: fsynced by this sink
        later = tmp_path / "audit-2025-11-27.jsonl"
        b = sample_part("b")
        later.write_bytes(part_line(b))  # another process's, never fsynced
        synced = _recording_fsyncs(monkeypatch)
        st = later.stat()
        await sink.write_part(b)  # the flusher's retry: stored already
        assert (st.st_dev, st.st_ino) in synced
    finally:
        await sink.close()
    assert [d["_id"] for d in lines(later)] == ["b:0"]


async def test_day_files_are_named_by_the_utc_date_whatever_the_local_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """API.md: ``audit-YYYY-MM-DD.jsonl`` by UTC date. At 12:00 UTC it is
    already tomorrow at UTC+14."""
    monkeypatch.setenv("TZ", "Etc/GMT-14")
    time.tzset()
    try:
        sink = JsonlSink(tmp_path, clock=lambda: DAY1 + 12 * 3600)
        await sink.open()
        try:
            await sink.write_part(sample_part("a"))
        finally:
            await sink.close()
    finally:
        monkeypatch.undo()
        time.tzset()
    assert names(tmp_path) == ["audit-2025-11-26.jsonl"]


def _recording_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (device, inode) of every file or directory fsynced from now on (the
    real fsync still runs: a power cut cannot be simulated, only the calls seen)."""
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


async def _refusal(sink: JsonlSink) -> str:
    """Why ``open()`` refused (its SinkUnavailable), "" if it opened; closed after."""
    try:
        await sink.open()
    except SinkUnavailable as exc:
        return str(exc)
    finally:
        await sink.close()
    return ""


async def test_a_fifo_named_like_a_day_file_does_not_hang_open(tmp_path: Path) -> None:
    """A FIFO's ``open`` for reading waits for a writer, forever: the sink
    refuses the name at once instead. (Without that, the test lets the
    blocked thread go by opening the FIFO's other end itself.)"""
    fifo = tmp_path / "audit-2000-01-01.jsonl"
    os.mkfifo(fifo, 0o600)
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    opening = asyncio.ensure_future(sink.open())
    try:
        done, _ = await asyncio.wait({opening}, timeout=5)
        assert done, "open() hangs on a FIFO"
        with pytest.raises(SinkUnavailable, match="not a regular file"):
            opening.result()
    finally:
        if not opening.done():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF for the reader
            with contextlib.suppress(Exception):  # whatever it made of that
                await opening
        await sink.close()


async def test_a_lock_file_planted_as_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """``O_CREAT`` through a dangling symlink creates its target: the lock
    file is opened with ``O_NOFOLLOW`` too, and the sink says why it stops."""
    await (first := JsonlSink(tmp_path / "jsonl", clock=lambda: DAY1)).open()
    await first.close()
    target = tmp_path / "created-by-the-sink"
    lock = tmp_path / "jsonl" / LOCK_NAME
    lock.unlink()
    lock.symlink_to(target)
    refused = await _refusal(JsonlSink(tmp_path / "jsonl", clock=lambda: DAY1))
    assert not target.exists()
    assert "jsonl/.audit-jsonl.lock is a symbolic link" in refused


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND],
                         ids=["read", "repair", "append"])
def test_every_open_of_a_day_file_refuses_symlinks_and_fifos(tmp_path: Path, flags: int) -> None:
    """The one function every read, repair, fsync and append opens a day
    file with (a name swapped after the directory listing is caught there)."""
    real = tmp_path / "real.jsonl"
    real.write_bytes(b"{}\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo, 0o600)
    for bad in (link, fifo):
        with pytest.raises(SinkUnavailable, match="not a regular file"):
            os.close(jsonl._open_regular(bad, flags))
    fd = jsonl._open_regular(real, flags)
    try:
        assert os.get_blocking(fd)
    finally:
        os.close(fd)
    assert real.read_bytes() == b"{}\n"


async def test_a_directory_the_sink_creates_has_its_entry_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each directory level ``open`` creates is an entry in its parent: the
    parent is fsynced before any write can be acknowledged. (A power cut
    cannot be simulated; the real fsync is wrapped to see which
    directories it was given.) A directory that exists costs none."""
    synced = _recording_fsyncs(monkeypatch)

    def key(path: Path) -> tuple[int, int]:
        st = path.stat()
        return (st.st_dev, st.st_ino)

    directory = tmp_path / "a" / "b" / "jsonl"
    sink = JsonlSink(directory, clock=lambda: DAY1)
    await sink.open()
    await sink.close()
    assert {key(tmp_path), key(tmp_path / "a"), key(tmp_path / "a" / "b")} <= set(synced)
    synced.clear()
    await sink.open()  # nothing created this time
    await sink.close()
    assert synced == []


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_verify_opens_the_sink_read_only_and_changes_nothing(
    tmp_path: Path, make_config: Any, audit_key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """``verify`` (``create_sink(readonly=True)``) must not change what it
    checks: with the write lock free, a writable sink would cut a torn last
    line off and create the lock file; read only, the files stay byte for
    byte, the fragment is skipped and reported, and writes are refused."""
    config = make_config(sink={"type": "jsonl"})
    writer = JsonlSink(config.jsonl_dir, clock=lambda: DAY1)
    await writer.open()
    await writer.write_part(sample_part("a"))
    await writer.close()
    (config.jsonl_dir / LOCK_NAME).unlink()
    path = config.jsonl_dir / "audit-2025-11-26.jsonl"
    with path.open("ab") as f:
        f.write(part_line(sample_part("b"))[:70])  # a crash in the middle of a write
    before = _snapshot(config.jsonl_dir)
    sink = sinks.create_sink(config, readonly=True)
    await sink.open()
    try:
        await verify_sink(sink, audit_key)  # its findings do not matter here
        assert [p["_id"] for p in await sink.get_session_parts("a")] == ["a:0"]
        assert await sink.get_session_parts("b") == []
    finally:
        await sink.close()
    assert _snapshot(config.jsonl_dir) == before
    torn = [r for r in caplog.records if "not a complete line" in r.getMessage()]
    assert len(torn) == 1 and "audit-2025-11-26.jsonl" in torn[0].getMessage()
    await sink.open()
    try:
        with pytest.raises(SinkUnavailable, match="read only"):
            await sink.write_part(sample_part("c"))
    finally:
        await sink.close()
    assert _snapshot(config.jsonl_dir) == before


async def test_verify_over_a_missing_jsonl_directory_does_not_create_it(
    tmp_path: Path, make_config: Any
) -> None:
    config = make_config(sink={"type": "jsonl"})
    sink = sinks.create_sink(config, readonly=True)
    with pytest.raises(SinkUnavailable, match="does not exist"):
        await sink.open()
    await sink.close()
    assert not config.jsonl_dir.exists()
    assert not config.data_dir.exists()


async def test_the_index_costs_little_per_stored_session(tmp_path: Path) -> None:
    """The index lives as long as the sink, one entry per stored line: it
    keeps 16-byte digests of each ``_id`` and ``hash`` and one flat object
    per session (it kept both strings, and an object, two tuples, a list and
    a tuple per part: some 890 bytes per one-part session by tracemalloc,
    now some 550)."""
    n = 5_000
    with (tmp_path / "audit-2026-11-26.jsonl").open("wb") as f:
        for i in range(n):
            f.write(part_line(sample_part(str(uuid.UUID(int=i)))))
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        await sink.open()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    try:
        assert used / n < 700, f"{used / n:.0f} bytes per stored session"
        await sink.write_part(sample_part(str(uuid.UUID(int=7))))  # stored: a no-op
        with pytest.raises(SinkConflict):
            await sink.write_part(sample_part(str(uuid.UUID(int=7)), salt="x"))
        sessions, _ = await sink.list_sessions(limit=n + 1)
        assert len(sessions) == n and {s["parts"] for s in sessions} == {1}
    finally:
        await sink.close()
    assert len(lines(tmp_path / "audit-2026-11-26.jsonl")) == n


async def test_parts_are_found_by_number_in_any_file_even_below_zero(tmp_path: Path) -> None:
    """A part's location is one int (part, file, offset): a part number below
    0 (a file edited by hand, which verify reports) and parts in several
    files still come back in part order, each from its own line."""
    first, second = tmp_path / "audit-2025-11-26.jsonl", tmp_path / "audit-2025-11-27.jsonl"
    first.write_bytes(part_line(sample_part("s", 1, final=False)) + part_line(sample_part("t")))
    second.write_bytes(part_line(sample_part("s", 2)) + part_line(sample_part("s", -1)))
    sink = JsonlSink(tmp_path, clock=lambda: DAY2)
    await sink.open()
    try:
        await sink.write_part(sample_part("s", 0, final=False))
        parts = await sink.get_session_parts("s")
        assert [(p["_id"], p["part"]) for p in parts] == [
            ("s:-1", -1), ("s:0", 0), ("s:1", 1), ("s:2", 2)
        ]
        sessions, _ = await sink.list_sessions(limit=10)
        (summary,) = [x for x in sessions if x["session_id"] == "s"]
        assert summary["parts"] == 4 and summary["state"] == "stored"
        assert summary["event_count"] == 8
        assert sink.rebuilds == 0
    finally:
        await sink.close()


async def test_security_events_oldest_first_pages_on_past_the_second_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify walks the security stream a page at a time: each page starts
    where the one before ended, however many pages there are (a page that
    started again at the second would repeat it for ever)."""
    monkeypatch.setattr(jsonl, "EVENTS_PAGE", 2)
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        ids = [f"p{i}" for i in range(7)]
        await sink.write_security_events([sample_security_event(i) for i in ids[:4]])
        await sink.write_security_events([sample_security_event(i) for i in ids[4:]])
        got: list[str] = []
        async for doc in sink.security_events_oldest_first():
            got.append(doc["_id"])
            if len(got) > 2 * len(ids):
                break
        assert got == ids
    finally:
        await sink.close()


async def test_a_second_copy_of_a_security_event_is_compared_with_its_first(
    tmp_path: Path,
) -> None:
    """verify's check of later lines with a stored ``_id`` covers security
    events too (their first copy is found among the events, not the
    sessions): an identical copy is harmless, one with other content (its
    hash unchanged: whoever appends it chooses it) is named, as a security
    event, at its file and byte."""
    path = tmp_path / "audit-2025-11-26.jsonl"
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    await sink.write_security_events([sample_security_event("e1"), sample_security_event("e2")])
    await sink.write_part(sample_part("a"))
    await sink.close()
    (e1, e2, part) = path.read_bytes().splitlines(keepends=True)
    forged = json.loads(e2)
    forged["actor"]["user"] = "alice"
    with path.open("ab") as f:
        f.write(e1 + part)  # identical copies: not reported
        at = f.tell()
        f.write(json.dumps(forged).encode() + b"\n")
    reader = JsonlSink(tmp_path, readonly=True)
    await reader.open()
    try:
        assert await reader.conflicting_copies() == [
            ("e2", "security event", f"audit-2025-11-26.jsonl, byte {at}")]
        assert await reader.unchecked_records() == []
    finally:
        await reader.close()


async def test_lines_past_the_10000_unplaced_ones_noted_are_counted(tmp_path: Path) -> None:
    """The index notes where the first 10,000 lines it cannot place are, and
    counts the rest: verify reports them all, not only those noted."""
    path = tmp_path / "audit-2025-11-26.jsonl"
    path.write_bytes(b"[1]\n" * 10_002)  # JSON, but no object with an _id
    reader = JsonlSink(tmp_path, readonly=True)
    await reader.open()
    try:
        unchecked = await reader.unchecked_records()
    finally:
        await reader.close()
    assert len(unchecked) == 10_001
    assert unchecked[0] == (
        "audit-2025-11-26.jsonl, byte 0: a line that is not an object with an _id")
    assert unchecked[-1] == "2 more lines that are no document of the sink"


async def test_a_file_that_shrank_under_the_index_is_read_again(tmp_path: Path) -> None:
    """Lines another process appended, read by a query before that process's
    fsync failed and its write was truncated back: the file is shorter than
    the index says, so the index is rebuilt, and those lines (gone) are not
    taken for stored by a later write of the same part."""
    path = tmp_path / "audit-2025-11-26.jsonl"
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        await sink.write_part(sample_part("a"))
        size = path.stat().st_size
        with path.open("ab") as f:
            f.write(part_line(sample_part("b")) + part_line(sample_part("c")))
        assert [p["_id"] for p in await sink.get_session_parts("b")] == ["b:0"]
        os.truncate(path, size)  # the other writer's failed write, undone
        await sink.write_part(sample_part("b"))
        assert [p["_id"] for p in await sink.get_session_parts("b")] == ["b:0"]
        assert await sink.get_session_parts("c") == []
        assert sink.rebuilds == 1
    finally:
        await sink.close()
    assert [d["_id"] for d in lines(path)] == ["a:0", "b:0"]


async def test_a_line_not_where_the_index_says_is_read_again_once(tmp_path: Path) -> None:
    """A query that finds another line at an indexed offset (the file was
    rewritten in place, as long as it was) re-reads every file once and
    answers from what is there, not "keeps changing"."""
    path = tmp_path / "audit-2025-11-26.jsonl"
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        await sink.write_part(sample_part("a"))
        await sink.write_part(sample_part("b"))
        b_line, c_line = part_line(sample_part("b")), part_line(sample_part("c"))
        assert len(b_line) == len(c_line)
        with path.open("r+b") as f:
            f.seek(path.stat().st_size - len(b_line))
            f.write(c_line)
        assert await sink.get_session_parts("b") == []
        assert sink.rebuilds == 1
        assert [p["_id"] for p in await sink.get_session_parts("c")] == ["c:0"]
    finally:
        await sink.close()


async def test_a_lock_file_removed_while_the_sink_runs_is_made_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink keeps its lock file open: removed by hand, a lock on the
    old one would exclude no writer that opens the path (and makes a new
    file there). The next write locks through a file at the path again."""
    sink = JsonlSink(tmp_path, clock=lambda: DAY1)
    await sink.open()
    try:
        await sink.write_part(sample_part("a"))
        (tmp_path / LOCK_NAME).unlink()
        await sink.write_part(sample_part("b"))
        assert (tmp_path / LOCK_NAME).is_file()
        # A second writer opening the path now is excluded while the sink writes.
        fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            monkeypatch.setattr(jsonl, "LOCK_WAIT_SECONDS", 0.05)
            with pytest.raises(SinkUnavailable, match="is locked by another writer"):
                await sink.write_part(sample_part("c"))
        finally:
            os.close(fd)
    finally:
        await sink.close()
    assert [d["_id"] for d in lines(tmp_path / "audit-2025-11-26.jsonl")] == ["a:0", "b:0"]

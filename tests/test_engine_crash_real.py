"""Crash, real: a writer process killed with SIGKILL loses nothing it acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from audit.events import Source
from audit.verify import verify_sink
from sinks.sqlite import SqliteSink

WRITER = Path(__file__).with_name("crash_writer.py")


async def run_and_kill(data_dir: Path, acks_before_kill: int,
                       keys_every: int | None = None) -> tuple[list[str], set[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WRITER), str(data_dir), "4",
        *([str(keys_every)] if keys_every is not None else []),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    acked: list[str] = []
    sessions: set[str] = set()
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while len(acked) < acks_before_kill:
                line = await proc.stdout.readline()
                if not line:
                    err = await proc.stderr.read() if proc.stderr else b""
                    raise AssertionError(f"writer exited early: {err.decode()[-2000:]}")
                parts = line.decode().split()
                if parts[0] == "ack":
                    acked.append(parts[1])
                elif parts[0] == "start":
                    sessions.add(parts[1])
    finally:
        with contextlib.suppress(ProcessLookupError):  # (it exited early: the error above)
            proc.send_signal(signal.SIGKILL)
        # Acks already in the pipe were acknowledged before the kill: count them too.
        rest = await proc.stdout.read()
        await proc.wait()
    for line in rest.decode().split("\n")[:-1]:  # a last line without newline is cut off
        parts = line.split()
        if parts and parts[0] == "ack":
            acked.append(parts[1])
    assert proc.returncode == -signal.SIGKILL
    return acked, sessions


@pytest.mark.parametrize("keys_every", [None, 5])
async def test_sigkill_loses_and_duplicates_nothing(make_config, engines, audit_key, keys_every):
    """``keys_every``: the spool indexes its events at a commit as shipped
    (every 4,096 rows: here only before a stored part is deleted), or every
    few events, so that the kills land among index steps of both kinds."""
    config = make_config(
        audit={"part_max_events": 10},
        flush={"max_writes_per_second": 2000.0, "burst": 200},
    )
    acked, sessions = await run_and_kill(config.data_dir, 400, keys_every)
    # Run it again over the same files: it resumes and is killed once more.
    acked2, sessions2 = await run_and_kill(config.data_dir, 300, keys_every)
    acked += acked2
    sessions |= sessions2

    engine = await engines.open(config)
    for s in engine.spool.open_sessions():
        await engine.end_session(s.session_id, Source(user=s.user, role=s.role))
    await engines.drain(engine)
    status = await engine.status()
    assert status["pending_parts"] == 0 and status["dead_letter"] == 0
    sink: SqliteSink = engine.sink
    report = await verify_sink(sink, audit_key)
    assert report.ok, report.problems[:5]
    stored_sessions = {sid async for sid in sink.session_ids()}
    assert sessions <= stored_sessions
    stored: Counter[str] = Counter()
    for sid in stored_sessions:
        parts = await sink.get_session_parts(sid)
        seqs = [e["seq"] for p in parts for e in p["events"]]
        assert seqs == list(range(1, len(seqs) + 1)), sid
        assert parts and parts[-1]["final"]
        stored.update(e["event_id"] for p in parts for e in p["events"])
    assert sum(stored.values()) == report.events
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged events missing"
    dups = [k for k, v in stored.items() if v > 1]
    assert not dups
    assert len(acked) == len(set(acked)) >= 700

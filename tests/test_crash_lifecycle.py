"""Crash, real: SIGKILL across the whole session lifecycle, with the CLI beside.

``tests/crash_lifecycle.py`` runs a real AuditEngine whose every transition is
frequent: parts cut by size and by time checkpoint, sessions sealed by logout,
by the reaper's idle seal (several in one sweep) and by a logout racing that
seal, stored parts kept a moment then purged (keep_stored_seconds), parts the
sink rejects (dead letters). It is killed with SIGKILL at random moments,
restarted with other part limits (a start then cuts sessions in progress),
while ``server.py retry-dead`` or ``server.py drain`` runs beside it and is
killed too, part way. Then the oracle: every acknowledged event stored exactly
once, seqs contiguous, chains verify, every session sealed exactly once (one
final part, one ``session.end``) and the way its acknowledgement said, no part
stored twice with different content (that would be a conflict, a dead
letter), nothing left open or pending.

And the server's own graceful shutdown cut short: SIGTERM, then SIGKILL part
way through it, under the crash storm's users and oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
from collections import Counter
from pathlib import Path

import crash_lifecycle
import pytest
import test_crash_storm as storm
from live_server import AUDIT_KEY, SERVER, Live, server_env, to_toml

from audit.config import parse_config
from audit.engine import AuditEngine
from audit.events import Source
from audit.verify import verify_sink
from sinks import create_sink

RUN = Path(__file__).with_name("crash_lifecycle.py")
KEY = AUDIT_KEY.encode()


async def run_and_kill(data_dir: Path, seed: int, seconds: float, *, sink: str,
                       part_max: int, reject: float) -> list[list[str]]:
    """One run of the engine, SIGKILLed ``seconds`` after its imports (its
    ``begin``); its acknowledgements. Counted from the spawn, the run's time
    was spent on the interpreter's start on a loaded machine (most runs
    killed before the engine opened: 91 events acknowledged in all)."""
    env = {**server_env(), "CRASH_SINK": sink, "CRASH_PART_MAX": str(part_max),
           "CRASH_REJECT": str(reject)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(RUN), str(data_dir), str(seed), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 60)  # (a hang guard)
        if not first:  # (it ended before its imports did)
            raise AssertionError((await proc.stderr.read()).decode()[-2000:])
        assert first == b"begin\n", first
        await asyncio.sleep(seconds)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        out, err = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert b"Traceback" not in err, err.decode()[-2000:]
    # A last line without its newline was cut off by the kill: not acknowledged.
    return [line.split() for line in out.decode().split("\n")[:-1]]


async def cli(config_path: Path, command: str, kill_after: float | None = None) -> int | None:
    """``server.py COMMAND``; SIGKILLed after ``kill_after`` s if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER), command, "--config", str(config_path),
        env=server_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), kill_after)
    except TimeoutError:
        # It may have exited between the timeout and the signal (the CI flake of 29 Nov).
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        _, err = await proc.communicate()
    assert b"Traceback" not in err, err.decode()[-2000:]
    return proc.returncode


@pytest.mark.parametrize("sink, seed", [("sqlite", 1)])  # (jsonl too: 11 s more, nothing found)
@pytest.mark.timeout(120)
async def test_sigkill_across_the_session_lifecycle(tmp_path: Path, sink: str,
                                                    seed: int) -> None:
    data_dir = tmp_path / "data"
    config_path = tmp_path / "config.toml"
    config_path.write_text(to_toml(crash_lifecycle.settings(str(data_dir), sink)))
    rng = random.Random(seed)
    lines: list[list[str]] = []
    beside_ran = Counter[str]()
    for r in range(7):
        beside = rng.choice(["retry-dead", "drain", None]) if r else None
        side = (asyncio.ensure_future(cli(config_path, beside, rng.uniform(0.5, 2.0)))
                if beside else None)
        lines += await run_and_kill(data_dir, seed * 100 + r, rng.uniform(0.4, 1.6),
                                    sink=sink, part_max=rng.choice([1, 2, 4, 30]),
                                    reject=0.1)
        if side is not None:
            code = await side
            assert code in (0, 1, -signal.SIGKILL), (beside, code)  # (1: dead letters left)
            beside_ran[beside] += 1
    assert await cli(config_path, "retry-dead") == 0

    # The next start: ends what is still open, sends everything.
    config = parse_config(crash_lifecycle.settings(str(data_dir), sink))
    engine = AuditEngine(config, create_sink(config), KEY)
    await engine.open(background=False)
    try:
        for s in engine.spool.open_sessions():
            await engine.end_session(s.session_id, Source(user=s.user, role=s.role))
        for _ in range(100_000):
            delay = await engine.flusher.step()
            if delay is None:
                break
            await asyncio.sleep(delay)
        status = await engine.status()
        # A part sent again with other content would be a conflict: dead-lettered.
        assert (status["pending_parts"], status["pending_security_events"],
                status["dead_letter"], status["active_sessions"]) == (0, 0, 0, 0), status
        report = await verify_sink(engine.sink, KEY)
        assert report.ok, report.problems[:5]
        stored: Counter[str] = Counter()
        reasons: dict[str, str] = {}
        async for sid in engine.sink.session_ids():
            parts = await engine.sink.get_session_parts(sid)
            events = [e for p in parts for e in p["events"]]
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), sid
            assert [p["part"] for p in parts] == list(range(len(parts))), sid
            assert [p["final"] for p in parts] == [False] * (len(parts) - 1) + [True], sid
            assert [e["action"] for e in events].count("session.end") == 1, sid
            assert events[-1]["action"] == "session.end", sid
            reasons[sid] = parts[-1]["seal_reason"]
            stored.update(e["event_id"] for e in events)
    finally:
        await engine.close(flush_window=0)

    acked = [line[1] for line in lines if line[0] == "ack"]
    assert len(acked) >= 300 and len(acked) == len(set(acked))
    assert not set(acked) - set(stored), "acknowledged events missing"
    assert max(stored.values()) == 1, "events stored twice"
    started = {line[1] for line in lines if line[0] == "start"}
    assert started <= set(reasons)
    # A logout acknowledged sealed the session; one the reaper beat, the reaper did.
    for line in lines:
        if line[0] == "end":
            assert reasons[line[1]] == "logout", line
        elif line[0] == "gone":
            assert reasons[line[1]] == "idle_timeout", line
    seals = Counter(reasons.values())
    assert seals["logout"] and seals["idle_timeout"], seals
    assert sum(beside_ran.values()) >= 2, beside_ran


class StoppedPartWay(Live):
    """A server whose every "kill" is a SIGTERM (the graceful shutdown
    begins: requests in flight, the writer's queue, the flush window, the
    bucket and the sink's state saved) followed, part way, by SIGKILL."""

    rng = random.Random(5)
    cut_short = 0  # stops the SIGKILL ended before the process did

    async def kill(self) -> None:
        proc = self.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(self.rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if await asyncio.to_thread(proc.wait, 30) == -signal.SIGKILL:
            self.cut_short += 1
        self.kills += 1


@pytest.mark.timeout(120)
async def test_sigkill_part_way_through_the_graceful_shutdown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash storm's users and oracle, each stop a SIGTERM and a SIGKILL
    at a random moment of the shutdown it began (or after it ended)."""
    monkeypatch.setattr(storm, "KILLS", 2)
    lv = StoppedPartWay(tmp_path, {
        "audit": {"part_max_events": 6, "keep_stored_seconds": 0.5},
        "flush": {"max_writes_per_second": 200.0, "burst": 50,
                  "backoff_base_seconds": 0.05, "backoff_max_seconds": 1.0},
    })
    try:
        await storm._setup_users(lv)
        await lv.start()
        oracle, _ = await storm._storm(lv, seed=21)
        finish = await storm._finish(lv)
        r = await lv.cli("verify")
        assert r.returncode == 0, r.stdout + r.stderr
        parts, sec = storm._read_sqlite(lv.data_dir / "audit.db")
        counts = oracle.check(KEY, parts, sec)
        assert counts["events"] > 0 and lv.kills == 2
        print(f"\n{lv.cut_short} of {lv.kills} shutdowns cut short by SIGKILL")
        assert finish["active_sessions"] <= oracle.unanswered_logins
    finally:
        lv.close()

"""Helper for the lifecycle crash tests: a real AuditEngine run until killed.

    python tests/crash_lifecycle.py DATA_DIR SEED [SESSIONS]

The audit key is ``SESSION_AUDIT_AUDIT_KEY`` (as the CLI's), the sink
``CRASH_SINK`` (sqlite, jsonl), the share of part writes the sink rejects
``CRASH_REJECT`` and ``part_max_events`` ``CRASH_PART_MAX`` (changed between
runs: a start then cuts sessions in progress to the new limits).

Producers append to sessions and end each one of three ways: logout, left to
the reaper's idle seal, or a logout sent right at the idle deadline (racing
the reaper). The configuration makes every transition frequent: small parts,
time checkpoints, a fast reaper, stored parts kept a moment and then purged,
and a sink that rejects some writes (dead letters, for ``retry-dead``).

First ``begin`` (the imports done: the test's kill timer starts there),
``ready`` once the engine opened; then acknowledgements, each after its
commit returned: ``start SID``, ``ack EVENT_ID SID SEQ``, ``end SID`` (a logout that sealed),
``gone SID`` (a logout the reaper beat).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audit.config import parse_config
from audit.engine import AuditEngine
from audit.events import Draft, Source
from audit.store import SessionNotOpen
from sinks import create_sink
from sinks.base import Sink, SinkRejected

KEY = os.environ.get("SESSION_AUDIT_AUDIT_KEY", "test-audit-key-0123456789abcdef!").encode()
IDLE = 0.4


def settings(data_dir: str, sink: str = "sqlite", part_max_events: int = 4) -> dict[str, Any]:
    """The configuration of a run (the test writes it to config.toml for the CLI)."""
    return {
        "server": {"data_dir": data_dir},
        "sink": {"type": sink},
        "audit": {"part_max_events": part_max_events, "idle_timeout_seconds": IDLE,
                  "checkpoint_seconds": 0.15, "keep_stored_seconds": 0.3},
        "flush": {"max_writes_per_second": 2000.0, "burst": 200},
    }


def ack(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def rejecting(sink: Sink, share: float) -> Sink:
    """``sink``, rejecting (for good) the parts whose _id falls in ``share``
    (0..1) by its CRC: dead letters, for ``retry-dead``."""
    write = sink.write_part

    async def write_part(part: dict[str, Any]) -> None:
        if share and zlib.crc32(part["_id"].encode()) % 1000 < share * 1000:
            raise SinkRejected("test: rejected")
        await write(part)

    sink.write_part = write_part  # type: ignore[method-assign]
    return sink


async def producer(engine: AuditEngine, n: int, rng: random.Random) -> None:
    src = Source(user=f"user{n}", role="user", ip="127.0.0.1")
    while True:
        s = await engine.start_session(src.user or "", "user", src, 3600)
        ack(f"start {s.session_id}")
        for i in range(rng.randrange(1, 12)):
            draft = Draft("document.access", target={"type": "document", "id": f"{n}-{i}"})
            try:
                ev = json.loads(await engine.record(s.session_id, draft))
            except SessionNotOpen:
                break
            ack(f"ack {ev['event_id']} {ev['session_id']} {ev['seq']}")
            if rng.random() < 0.2:
                await asyncio.sleep(rng.uniform(0, 0.2))
        how = rng.random()
        if how < 0.4:
            pass  # logout now
        elif how < 0.7:
            continue  # left to the reaper's idle seal
        else:
            await asyncio.sleep(IDLE + rng.uniform(-0.05, 0.05))  # race the reaper
        try:
            await engine.end_session(s.session_id, src)
        except SessionNotOpen:
            ack(f"gone {s.session_id}")
        else:
            ack(f"end {s.session_id}")


async def main() -> None:
    ack("begin")
    data_dir, seed = sys.argv[1], int(sys.argv[2])
    sessions = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    config = parse_config(settings(data_dir, os.environ.get("CRASH_SINK", "sqlite"),
                                   int(os.environ.get("CRASH_PART_MAX", "4"))))
    share = float(os.environ.get("CRASH_REJECT", "0"))
    engine = AuditEngine(config, rejecting(create_sink(config), share), KEY,
                         reaper_interval=0.05)
    await engine.open()
    ack("ready")
    rng = random.Random(seed)
    await asyncio.gather(*(producer(engine, n, random.Random(rng.random()))
                           for n in range(sessions)))


if __name__ == "__main__":
    asyncio.run(main())

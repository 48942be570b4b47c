"""Helper for the real crash test: append in a loop until killed.

    python tests/crash_writer.py DATA_DIR [SESSIONS] [KEYS_EVERY]

Runs a real AuditEngine (background flusher into the SQLite sink, reaper)
over DATA_DIR. SESSIONS producers append concurrently; every 25 events a
producer logs out and starts a new session, so sealed parts are flushed while
it runs. After each ``record`` returns, the event is acknowledged on stdout
as ``ack <event_id> <session_id> <seq>`` (flushed at once). The test kills
the process with SIGKILL at some point and checks the acknowledged events.
KEYS_EVERY overrides how often the spool indexes its events at a commit
(``audit.store.KEYS_EVERY``), so that a kill can land in or after one.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audit import store
from audit.config import parse_config
from audit.engine import AuditEngine
from audit.events import Draft, Source
from sinks.sqlite import SqliteSink

KEY = b"test-audit-key-0123456789abcdef!"


def ack(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def producer(engine: AuditEngine, n: int) -> None:
    src = Source(user=f"user{n}", role="user", ip="127.0.0.1")
    while True:
        s = await engine.start_session(src.user or "", "user", src, 3600)
        ack(f"start {s.session_id}")
        for i in range(25):
            draft = Draft("document.access", target={"type": "document", "id": f"{n}-{i}"})
            ev = json.loads(await engine.record(s.session_id, draft))
            ack(f"ack {ev['event_id']} {ev['session_id']} {ev['seq']}")
        await engine.end_session(s.session_id, src)


async def main() -> None:
    data_dir, sessions = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
    if len(sys.argv) > 3:
        store.KEYS_EVERY = int(sys.argv[3])
    config = parse_config(
        {
            "server": {"data_dir": data_dir},
            "audit": {"part_max_events": 10},
            "flush": {"max_writes_per_second": 2000.0, "burst": 200},
        }
    )
    engine = AuditEngine(config, SqliteSink(config.sqlite_sink_path), KEY)
    await engine.open()
    ack("ready")
    await asyncio.gather(*(producer(engine, n) for n in range(sessions)))


if __name__ == "__main__":
    asyncio.run(main())

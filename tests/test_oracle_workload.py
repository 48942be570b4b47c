"""The oracle workload (tests/oracle_workload.py) on a real server: every
answer a client was told, held against the audit trail the sink received."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import oracle_workload
import pytest
from live_server import Live

SETTINGS: dict[str, Any] = {
    "auth": {"login_max_failures": 3, "login_window_seconds": 2},
    "flush": {"max_writes_per_second": 1000.0, "burst": 1000},
    "audit": {"synchronous": "normal"},
}


@pytest.mark.parametrize(("seed", "audit"), [
    (1, {}),
    # Checkpoint parts in the sink beside the spool's, and kept parts merged.
    (2, {"part_max_events": 3, "keep_stored_seconds": 60}),
])
async def test_trail_matches_what_clients_were_told(
    tmp_path: Path, seed: int, audit: dict[str, Any]
) -> None:
    settings = {**SETTINGS, "audit": {**SETTINGS["audit"], **audit}}
    live = Live(tmp_path, settings)
    try:
        await live.start()
        o = await oracle_workload.run(live, seed=seed, steps=40)
    finally:
        live.close()
    assert o.requests > 100
    assert not o.findings, "\n".join(o.findings[:30])

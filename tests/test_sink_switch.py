"""Switching sinks by configuration: verify on either sink is clean.

The security chain is one per spool: after a switch it goes on in the new
sink. verify on the new sink used to report its first event there as not
continuing a chain, and on the old sink the newest events as removed; both
exit 1 for good. The spool now notes the stretch of the chain each sink took.
"""

from __future__ import annotations

import contextlib
import sqlite3

import aiohttp
from live_server import Live, merge, to_toml


async def _failed_logins(live: Live, n: int) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            async with http.post(live.base + "/token",
                                 json={"username": f"nobody{i}", "password": "x" * 8}) as r:
                assert r.status == 401


def _use(live: Live, sink: dict[str, object]) -> None:
    live.settings = merge(live.settings, {"sink": sink})
    live.config_path.write_text(to_toml(live.settings), encoding="utf-8")


async def _verify(live: Live) -> tuple[int, str]:
    r = await live.cli("verify")
    return r.returncode, r.stdout + r.stderr


async def test_verify_is_clean_on_both_sinks_after_a_switch(live: Live) -> None:
    await live.start()
    await _failed_logins(live, 3)
    assert await live.stop() == 0  # its flush window sends them
    assert (await live.cli("drain")).returncode == 0
    sqlite_sink = {"type": "sqlite"}
    jsonl_sink = {"type": "jsonl"}
    _use(live, jsonl_sink)
    await live.start()
    await _failed_logins(live, 2)
    assert await live.stop() == 0
    assert (await live.cli("drain")).returncode == 0

    rc, out = await _verify(live)  # the new sink: the chain goes on there
    assert rc == 0 and "2 security events" in out and ": OK" in out, out
    _use(live, sqlite_sink)
    rc, out = await _verify(live)  # the old one: its stretch is whole
    assert rc == 0 and "3 security events" in out and ": OK" in out, out

    # Still held to the end of its stretch: its last event removed is found.
    with contextlib.closing(sqlite3.connect(live.data_dir / "audit.db")) as c, c:
        c.execute("DELETE FROM security_events"
                  " WHERE rowid = (SELECT MAX(rowid) FROM security_events)")
    rc, out = await _verify(live)
    assert rc == 1 and "lacks this server's newest security events" in out, out

"""Spool full, end to end: the sink is down, the spool fills, audited actions are
refused with 503 ``audit_unavailable`` and ``/readyz`` turns 503; nothing that
was acknowledged is lost; when the sink comes back the flusher drains, the spool
shrinks and the server accepts again.

The server is a real subprocess on the http sink pointing at a closed port; the
"sink coming back" is ``tests/receiver.py`` started on that port.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from live_server import AUDIT_KEY, Live, free_port
from storm_client import UNCERTAIN, Expect, Oracle, User
from waiting import wait_for

FRESH_SPOOL_PAGES = 19  # schema only; the admin and two users add a few more
MAX_BYTES = (FRESH_SPOOL_PAGES + 32) * 4096
PASSWORD = "full-password"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    rport = free_port()
    lv = Live(tmp_path, {
        "audit": {"spool_max_bytes": MAX_BYTES},
        "flush": {"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.5,
                  "max_writes_per_second": 50.0, "burst": 20},
        "sink": {"type": "http", "http": {"url": f"http://127.0.0.1:{rport}",
                                          "timeout_seconds": 2.0}},
    })
    lv.receiver_port = rport  # type: ignore[attr-defined]
    yield lv
    lv.close()


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as r:
        return r.status, await r.text()


def _spool_bytes(metrics: str) -> float:
    m = re.search(r"^session_audit_spool_bytes (\S+)$", metrics, re.M)
    assert m, metrics[:500]
    return float(m.group(1))


@pytest.mark.timeout(180)
async def test_spool_full_refuses_then_recovers(live: Live, tmp_path: Path) -> None:
    await live.adduser("alice", PASSWORD)
    await live.adduser("bob", PASSWORD)
    await live.start()
    oracle = Oracle()
    base = live.base

    async def never_down() -> None:
        raise AssertionError("the server went away")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        assert (await _get(http, base + "/readyz"))[0] == 200
        alice = User("alice", PASSWORD, base, http, oracle, never_down, 1)
        await alice.login()
        assert alice.token is not None
        rid, res = await alice.call("POST", "/documents", json={"title": "t", "content": "c"})
        assert res is not UNCERTAIN and res[0] == 201
        doc = res[1]["id"]
        oracle.expect(Expect(rid, "document.create", "alice", alice.sid, target_id=doc))

        # Fill the spool: the sink is down, so nothing leaves it.
        refused = None
        for i in range(5000):
            if i % 2:
                rid, res = await alice.call("GET", f"/documents/{doc}")
                action = ["document.access"]
            else:
                rid, res = await alice.call("POST", "/audit/events", json=[
                    {"action": "client.fill", "details": {"pad": "x" * 1500, "i": i}},
                    {"action": "client.fill2", "details": {"pad": "y" * 1500, "i": i}},
                ])
                action = ["client.fill", "client.fill2"]
            assert res is not UNCERTAIN
            status, body = res
            if status == 503:
                refused = (rid, body)
                break
            assert status in (200, 202), res
            oracle.expect(*(Expect(rid, a, "alice", alice.sid) for a in action))
        assert refused is not None, "the spool never filled"
        assert refused[1]["error"]["code"] == "audit_unavailable", refused
        acked_before_full = len(oracle.expected)

        # Full: every audited action is refused, readiness says so.
        status, text = await _get(http, base + "/readyz")
        assert status == 503, text
        status, metrics = await _get(http, base + "/metrics")
        assert status == 200 and _spool_bytes(metrics) >= MAX_BYTES
        full_bytes = _spool_bytes(metrics)
        for method, path, body in (
            ("GET", f"/documents/{doc}", None),
            ("PUT", f"/documents/{doc}", {"content": "changed"}),
            ("POST", "/documents", {"title": "no", "content": "no"}),
            ("POST", f"/documents/{doc}/chat", {"message": "hello?"}),
            ("GET", "/documents", None),
        ):
            _, res = await alice.call(method, path, json=body)
            assert res is not UNCERTAIN and res[0] == 503, (method, path, res)
            assert res[1]["error"]["code"] == "audit_unavailable"
        bob = User("bob", PASSWORD, base, http, oracle, never_down, 2)
        _, res = await bob.call("POST", "/token", auth=False,
                                json={"username": "bob", "password": PASSWORD})
        assert res is not UNCERTAIN and res[0] == 503, res
        oracle_len = len(oracle.expected)

        # The refusals above were expected (User.call notes every 5xx).
        assert all(": 503 " in u for u in oracle.unexpected), oracle.unexpected
        oracle.unexpected.clear()

        # Ending a session never needs space: alice logs out while full.
        await alice.logout()
        assert not oracle.unexpected, oracle.unexpected
        assert len(oracle.expected) == oracle_len + 1

        # The sink comes back: the flusher drains and the spool shrinks.
        store = tmp_path / "received.db"
        await live.start_receiver(live.receiver_port, store)  # type: ignore[attr-defined]

        async def ready() -> bool:
            return (await _get(http, base + "/readyz"))[0] == 200

        await wait_for(ready, 30, "/readyz 200 after the sink came back", interval=0.05)
        status, metrics = await _get(http, base + "/metrics")
        drained_bytes = _spool_bytes(metrics)
        assert drained_bytes < MAX_BYTES and drained_bytes < full_bytes

        # Accepting again.
        await bob.login()
        assert bob.token is not None
        rid, res = await bob.call("GET", "/documents")
        assert res is not UNCERTAIN and res[0] == 200
        oracle.expect(Expect(rid, "document.list", "bob", bob.sid))
        await bob.logout()
        rid, res = await alice.call("GET", "/me", token="garbage")
        assert res is not UNCERTAIN and res[0] == 401
        oracle.expect(Expect(rid, "auth.invalid_token", None, None, outcome="denied",
                             security=True))
        assert not oracle.unexpected, oracle.unexpected

        async def drained() -> bool:
            r = await live.cli("status")
            s = json.loads(r.stdout)
            return s["pending_parts"] == 0 and s["pending_security_events"] == 0

        await wait_for(drained, 30, "the spool to drain", interval=0.2)

    await live.stop()
    await live.stop_receiver()
    # Nothing of the refused actions happened: the one document is as created.
    with contextlib.closing(sqlite3.connect(live.data_dir / "spool.db")) as spool:
        assert spool.execute("SELECT id, content, version FROM documents").fetchall() == [
            (doc, "c", 1)]
    conn = sqlite3.connect(store)
    parts = [json.loads(r[0]) for r in conn.execute("SELECT doc FROM parts")]
    sec = [json.loads(r[0]) for r in conn.execute("SELECT doc FROM security_events")]
    conn.close()
    counts = oracle.check(AUDIT_KEY.encode(), parts, sec)
    # The failed attempts of logged-in callers while full were refused, not recorded.
    events = [e for p in parts for e in p["events"]]
    assert not [e for e in events if e["request_id"] == refused[0]]
    print(f"\nspool full: {acked_before_full} events acknowledged before full,"
          f" spool {full_bytes:.0f} B full -> {drained_bytes:.0f} B drained"
          f" (max {MAX_BYTES}); stored {counts}")

"""The chain, recomputed from README's recipe alone ("Recomputing a chain
yourself"): an auditor's own tools must get every stored hash."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import sqlite3
from typing import Any

from audit.events import Draft, Source


def _hmac(key: bytes, msg: bytes) -> str:
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


async def test_stored_hashes_follow_the_documented_recipe(make_config, engines, audit_key):
    config = make_config(audit={"part_max_events": 3})
    engine = await engines.open(config)
    src = Source(user="zoë", role="user", ip="127.0.0.1", user_agent="t\u00e9st")
    s = await engine.start_session("zoë", "user", src, 3600)
    for i in range(5):
        await engine.record(s.session_id, Draft(
            "document.access", target={"type": "document", "id": f"d{i}"},
            details={"n": i, "text": "é ü \u202e"}, source=src))
    await engine.record_security(Draft("auth.login_failed", outcome="denied", source=src,
                                       details={"username": "zoë"}))
    await engine.end_session(s.session_id, src)
    await engine.flusher.drain()

    with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as db:
        parts = sorted((json.loads(r[0]) for r in db.execute("SELECT doc FROM parts")),
                       key=lambda p: p["part"])
        security = [json.loads(r[0]) for r in db.execute("SELECT doc FROM security_events")]
    assert len(parts) == 3 and len(security) == 1

    prev = _hmac(audit_key, b"genesis:" + s.session_id.encode())
    for part in parts:
        assert part["prev_hash"] == prev
        for event in part["events"]:
            body = {k: v for k, v in event.items() if k != "hash"}
            prev = _hmac(audit_key, prev.encode("ascii") + _canonical(body).encode("utf-8"))
            assert event["hash"] == prev, (part["part"], event["seq"])
        assert part["hash"] == prev
    prev = _hmac(audit_key, b"genesis:security")
    for event in security:
        assert event["_id"] == event["event_id"]
        body = {k: v for k, v in event.items() if k not in ("hash", "_id")}
        prev = _hmac(audit_key, prev.encode("ascii") + _canonical(body).encode("utf-8"))
        assert event["hash"] == prev

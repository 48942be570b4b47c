"""The chain, recomputed from README's recipe alone ("Recomputing a chain
yourself"): an auditor's own tools must get every stored hash."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import sqlite3
from typing import Any

import pytest

from audit.events import Draft, Source


def _hmac(key: bytes, msg: bytes) -> str:
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _stored(config: Any, sink_type: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if sink_type == "sqlite":
        with contextlib.closing(sqlite3.connect(config.sqlite_sink_path)) as db:
            parts = [json.loads(r[0]) for r in db.execute("SELECT doc FROM parts")]
            security = [json.loads(r[0]) for r in db.execute("SELECT doc FROM security_events")]
        return parts, security
    lines = [json.loads(line) for path in sorted(config.jsonl_dir.glob("audit-*.jsonl"))
             for line in path.read_text(encoding="utf-8").splitlines()]
    # A JSONL line is the document plus its "type": the recipe drops it.
    parts = [{k: v for k, v in d.items() if k != "type"} for d in lines
             if d["type"] == "session_part"]
    security = [{k: v for k, v in d.items() if k != "type"} for d in lines
                if d["type"] == "security_event"]
    return parts, security


@pytest.mark.parametrize("sink_type", ["sqlite", "jsonl"])
async def test_stored_hashes_follow_the_documented_recipe(
    make_config, engines, audit_key, sink_type
):
    config = make_config(audit={"part_max_events": 3}, sink={"type": sink_type})
    sink = None
    if sink_type == "jsonl":
        from sinks.jsonl import JsonlSink

        sink = JsonlSink(config.jsonl_dir)
    engine = await engines.open(config, sink)
    src = Source(user="zoë", role="user", ip="127.0.0.1", user_agent="t\u00e9st")
    s = await engine.start_session("zoë", "user", src, 3600)
    for i in range(5):
        await engine.record(s.session_id, Draft(
            "document.access", target={"type": "document", "id": f"d{i}"},
            details={"n": i, "text": "é ü \u202e", "latency_ms": 12.0, "tiny": 1e-07},
            source=src))
    await engine.record_security(Draft("auth.login_failed", outcome="denied", source=src,
                                       details={"username": "zoë"}))
    await engine.end_session(s.session_id, src)
    await engine.flusher.drain()

    parts, security = _stored(config, sink_type)
    parts.sort(key=lambda p: p["part"])
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

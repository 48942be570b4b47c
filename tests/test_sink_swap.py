"""Sink swap by configuration alone, and a sink that cannot open at start.

The server must accept events while its sink is unreachable: they spool,
``/audit/status`` shows the sink unhealthy with its last error, and they
flow once the sink is reachable.
"""

from __future__ import annotations

from typing import Any

import pytest
from api_fixtures import MakeApi, make_api, wait_for
from live_server import free_port
from receiver import Receiver, serve

import sinks
from audit.config import parse_config

__all__ = ["make_api"]


@pytest.mark.parametrize(
    ("section", "cls"),
    [
        ({"type": "sqlite"}, "SqliteSink"),
        ({"type": "jsonl"}, "JsonlSink"),
        ({"type": "http", "http": {"url": "http://127.0.0.1:9"}}, "HttpSink"),
        ({"type": "mongodb"}, "MongoSink"),
    ],
)
def test_each_sink_is_chosen_by_config_alone(section: dict[str, Any], cls: str) -> None:
    config = parse_config({"sink": section})
    sink = sinks.create_sink(config)
    assert type(sink).__name__ == cls
    assert sink.type == section["type"]


async def _status(api: Any, headers: dict[str, str]) -> dict[str, Any]:
    resp = await api.client.get("/audit/status", headers=headers)
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def test_http_sink_down_at_start_then_reachable(make_api: MakeApi) -> None:
    port = free_port()
    api = await make_api(sink={"type": "http", "http": {"url": f"http://127.0.0.1:{port}",
                                                         "timeout_seconds": 1.0}},
                         flush={"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.2})
    admin = await api.admin()
    alice = await api.user("alice")
    doc = await api.create_doc(alice)
    for _ in range(3):
        resp = await api.client.get(f"/documents/{doc['id']}", headers=alice.headers)
        assert resp.status == 200  # accepted while the sink is down
    resp = await api.client.post("/logout", headers=alice.headers)
    assert resp.status == 200

    async def unhealthy() -> dict[str, Any] | None:
        st = await _status(api, admin.headers)
        return st if st["sink"]["last_error"] and st["pending_parts"] >= 1 else None

    st = await wait_for(unhealthy, message="the sink reported unhealthy")
    assert st["sink"]["type"] == "http"
    assert st["sink"]["healthy"] is False
    assert st["sink"]["writes_failed"] >= 1
    assert st["oldest_pending_age_seconds"] >= 0

    receiver = Receiver()
    runner, bound = await serve(receiver, "127.0.0.1", port)
    try:
        assert bound == port

        async def flowed() -> bool:
            st = await _status(api, admin.headers)
            return st["pending_parts"] == 0 and st["sink"]["healthy"] is True

        await wait_for(flowed, timeout=20, message="the backlog to reach the receiver")
        stored = [p for p in receiver.parts.values() if p["session_id"] == alice.session_id]
        assert len(stored) == 1
        actions = [e["action"] for e in stored[0]["events"]]
        assert actions.count("document.access") == 3
        assert actions[0] == "session.start" and actions[-1] == "session.end"
    finally:
        await runner.cleanup()
        receiver.close()

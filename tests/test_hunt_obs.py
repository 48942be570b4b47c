"""What operators see (logs, /metrics, /audit/status, /readyz): regressions of
a hunt for what they showed otherwise than it was, through the real app."""

from __future__ import annotations

from api_fixtures import MakeApi, make_api, wait_for

__all__ = ["make_api"]


async def _metric(api, name: str) -> float:  # type: ignore[no-untyped-def]
    text = await (await api.client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_sink_that_opens_after_failing_to_is_healthy_with_nothing_pending(
    make_api: MakeApi, tmp_path
) -> None:
    """A sink that could not be opened at start (down, unreachable) and then
    opens stayed unhealthy in /audit/status and session_audit_sink_healthy 0
    (README's alert: "down") until some write went through: on an idle
    server, for as long as nothing was pending, though the sink was back."""
    sink_path = tmp_path / "sink.db"
    sink_path.mkdir()  # not a database file: the sqlite sink cannot open it
    api = await make_api(sink={"sqlite": {"path": str(sink_path)}},
                         flush={"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05})
    flusher = api.engine.flusher
    await wait_for(lambda: flusher.last_error is not None, message="the sink to fail to open")
    assert await _metric(api, "session_audit_sink_healthy") == 0.0
    sink_path.rmdir()
    await wait_for(lambda: flusher.sink_open, message="the sink to open")
    assert await _metric(api, "session_audit_sink_healthy") == 1.0
    admin = await api.admin()
    resp = await api.client.get("/audit/status", headers=admin.headers)
    assert (await resp.json())["sink"]["healthy"] is True

"""/metrics and /readyz (handlers/ops.py): /metrics served while the spool is damaged."""

from __future__ import annotations

import re
import sqlite3

from api_fixtures import Api, MakeApi, make_api
from test_hunt_corrupt import zero_pages

__all__ = ["make_api"]


def _series(text: str) -> dict[str, float]:
    """Each sample line of /metrics: ``name{labels}`` -> value."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


async def _metrics(api: Api) -> dict[str, float]:
    resp = await api.client.get("/metrics")
    assert resp.status == 200, await resp.text()
    return _series(await resp.text())


async def test_metrics_are_served_while_the_spool_is_damaged(make_api: MakeApi) -> None:
    """README's alert for a damaged spool is ``session_audit_ready``. With
    the damage in the pending parts' pages, the gauges /metrics reads from
    the spool failed, and so did every scrape (503 audit_unavailable, for
    an action nobody asked for): no session_audit_ready 0, nor any other
    metric, for as long as the damage lasted. Now the rest is served."""
    api = await make_api(flush_at_close=False)  # (the parts cannot be read)
    admin = await api.admin()
    assert (await api.client.post("/logout", headers=admin.headers)).status == 200
    with sqlite3.connect(api.config.spool_path) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE tbl_name = 'parts' AND rootpage > 0")]
    conn.close()
    for name in names:
        zero_pages(api.config.spool_path, name)
    await api.user("bob")  # a commit: the reader sees the file as it is now
    for _ in range(2):
        m = await _metrics(api)
        assert m["session_audit_ready"] == 0
        assert m['session_audit_http_requests_total{method="POST",route="token",status="200"}'] == 2
        assert "session_audit_pending_parts" not in m  # not read: not made up
    resp = await api.client.get("/readyz")
    assert resp.status == 503 and "is damaged" in (await resp.json())["reason"]

"""Black-box conformance to API.md: what a client sees of the real app."""

from __future__ import annotations

from typing import Any

from api_fixtures import Api, MakeApi, expect_error, make_api  # noqa: F401
from test_hunt_corrupt import zero_pages


async def test_a_damaged_spool_names_no_file_path_to_a_client(
    make_api: MakeApi,  # noqa: F811
) -> None:
    """API.md: "No stack traces, SQL or file paths ever reach a client". A
    damaged spool made the unauthenticated GET /readyz answer "the audit
    spool /srv/.../data/spool.db is damaged: ...", and GET /audit/status's
    spool_damaged the same: the server's data directory told to anyone who
    asks. Both still say what is wrong; the path is shown as <path> (the log
    and `server.py status` keep it for the operator)."""
    api: Api = await make_api()
    admin = await api.admin()
    await api.create_doc(admin)
    zero_pages(api.config.spool_path, "documents")
    resp = await api.client.get("/documents", headers=admin.headers)
    await expect_error(resp, 503, "audit_unavailable")

    data_dir = str(api.config.data_dir)
    resp = await api.client.get("/readyz")
    body: dict[str, Any] = await resp.json()
    assert resp.status == 503, body
    assert "is damaged: database disk image is malformed" in body["reason"]
    assert data_dir not in body["reason"] and "<path>" in body["reason"]

    resp = await api.client.get("/audit/status", headers=admin.headers)
    status = await resp.json()
    assert resp.status == 200, status
    assert "is damaged: database disk image is malformed" in status["spool_damaged"]
    assert data_dir not in status["spool_damaged"]
    assert data_dir not in await resp.text()

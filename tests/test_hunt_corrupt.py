"""Damaged files, as after a bad disk, a bad copy or a careless operator: a
page of the spool SQLite cannot read, a text in it that is not UTF-8 or not
JSON, a -wal garbled while the server was stopped. Each test damages a real
file the way it happens (bytes of a page zeroed, a row's text changed behind
SQLite's back) and runs the real server parts on it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from api_fixtures import Api, MakeApi, expect_error, make_api  # noqa: F401


def zero_pages(path: Path, table: str) -> list[int]:
    """Zero every page of ``table`` (a table or index) in the spool file
    ``path``, its WAL checkpointed into it first; returns the pages."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name = ?",
                                            (table,))]
    finally:
        conn.close()
    assert pages
    with open(path, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * size)
            f.write(bytes(size))
    return pages


async def test_a_damaged_spool_page_is_503_audit_unavailable_and_not_ready(
    make_api: MakeApi,  # noqa: F811
) -> None:
    """A page of the documents table zeroed (a bad sector): GET /documents
    was a 500 internal_error, with a traceback logged for each request, and
    /readyz went on saying ready. The spool is damaged: the listing is 503
    audit_unavailable (nothing done, nothing recorded), /readyz 503 with the
    reason, and /audit/status says so; what the spool can still read works."""
    api: Api = await make_api()
    admin = await api.admin()
    doc = await api.create_doc(admin)
    zero_pages(api.config.spool_path, "documents")

    resp = await api.client.get("/documents", headers=admin.headers)
    await expect_error(resp, 503, "audit_unavailable")
    resp = await api.client.get(f"/documents/{doc['id']}", headers=admin.headers)
    await expect_error(resp, 503, "audit_unavailable")

    resp = await api.client.get("/readyz")
    body: dict[str, Any] = await resp.json()
    assert resp.status == 503, body
    assert "is damaged: database disk image is malformed" in body["reason"]
    resp = await api.client.get("/audit/status", headers=admin.headers)
    status = await resp.json()
    assert resp.status == 200, status
    assert "is damaged" in status["spool_damaged"]
    # The rest of the spool still takes records: the session ends as usual.
    resp = await api.client.post("/logout", headers=admin.headers)
    assert resp.status == 200, await resp.text()


async def test_a_text_that_is_not_utf8_is_damage_and_not_quoted(
    make_api: MakeApi, caplog: Any,  # noqa: F811
) -> None:
    """A byte of a document's content flipped into one that is not UTF-8
    (SQLite does not check texts): GET /documents/{id} was a 500 whose
    logged traceback quoted the content ("Could not decode to UTF-8 column
    'content' with text '...'"). It is the spool's damage: 503, and the log
    names the column only."""
    api: Api = await make_api()
    admin = await api.admin()
    doc = await api.create_doc(admin, content="a secret plan: \u00e9t\u00e9")
    with sqlite3.connect(api.config.spool_path) as conn:
        conn.execute("UPDATE documents SET content = CAST(? AS TEXT) WHERE id = ?",
                     ("a secret plan: \u00e9t\u00e9".encode()[:-1] + b"\xff", doc["id"]))
    conn.close()
    resp = await api.client.get(f"/documents/{doc['id']}", headers=admin.headers)
    await expect_error(resp, 503, "audit_unavailable")
    assert "column 'content' is not UTF-8" in caplog.text
    assert "secret plan" not in caplog.text
    resp = await api.client.get("/readyz")
    assert resp.status == 503

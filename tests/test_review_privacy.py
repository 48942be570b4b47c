"""Privacy review: what a client's request can make the server write, with a
real server process on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from live_server import Live, raw_request

from audit.spool import Spool
from audit.store import Limits


async def _metrics(lv: Live) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(lv.base + "/metrics") as r:
        assert r.status == 200
        return await r.text()


@pytest.fixture
def live_info(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SESSION_AUDIT_LOG_LEVEL", "INFO")  # with the access log
    lv = Live(tmp_path)
    yield lv
    lv.close()


async def test_a_path_cannot_split_or_reorder_a_log_line(live_info: Live) -> None:
    """A client's path reaches the access log. U+2028/U+2029 went out raw:
    str.splitlines() (and many log tools) read one line as two, the second
    a forged JSON object; bidirectional controls (U+202E...) make a terminal
    or viewer show the line otherwise than it reads."""
    lv = live_info
    await lv.start()
    forged = "%E2%80%A8{%22level%22:%22error%22}%E2%80%A9%E2%80%AEgnp.%E2%81%A6x%E2%81%A9"
    answer = await asyncio.to_thread(
        raw_request, lv.port,
        f"GET /nothing-{forged} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404")
    await lv.stop()
    lines = lv.log_path.read_text(encoding="utf-8").split("\n")
    access = [line for line in lines if "/nothing-" in line]
    assert len(access) == 1, lv.log_tail()
    line = access[0]
    assert line.splitlines() == [line]
    for c in "\u2028\u2029\u202e\u2066\u2069":
        assert c not in line
    msg = json.loads(line)["msg"]
    assert '/nothing-\u2028{"level":"error"}\u2029\u202egnp.\u2066x\u2069"' in msg


async def test_made_up_methods_do_not_become_metric_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's pure-Python HTTP parser (no C extension) takes any method
    token: each one a client made up became a series of
    session_audit_http_requests_total, without authentication and without
    bound (up to 16 KiB of label each)."""
    monkeypatch.setenv("AIOHTTP_NO_EXTENSIONS", "1")
    lv = Live(tmp_path)
    try:
        await lv.start()
        for i in range(5):
            answer = await asyncio.to_thread(
                raw_request, lv.port,
                f"X{i}{'A' * 200} /me HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 405"), answer[:80]
        text = await _metrics(lv)
    finally:
        lv.close()
    methods = set(re.findall(r'session_audit_http_requests_total\{method="([^"]*)"', text))
    assert methods == {"GET", "other"}, methods  # GET: the start's /healthz probes
    assert 'method="other",route="unmatched",status="405"} 5.0' in text


async def test_a_deleted_document_is_not_left_in_the_spool_file(
    tmp_path: Path, audit_key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted document's content was left in the file's free pages (and
    in every backup of it) on SQLite builds where secure_delete is off by
    default; the spool's connections turn it on. (Here it is on by default:
    the connections are made to start with it off.)"""
    real = sqlite3.connect

    def off_by_default(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real(*args, **kwargs)
        conn.execute("PRAGMA secure_delete = OFF")
        return conn

    monkeypatch.setattr(sqlite3, "connect", off_by_default)
    path = tmp_path / "spool.db"
    sp = Spool(path, audit_key, limits=Limits(500, 1 << 20))
    await sp.open()
    secret = "a-secret-that-was-deleted-" * 40
    await sp.submit(lambda w: w.conn.execute(
        "INSERT INTO documents (id, title, content, owner, version, created_at, updated_at)"
        " VALUES ('d1', 't', ?, 'alice', 1, 'x', 'x')", (secret,)))
    await sp.submit(lambda w: w.conn.execute("DELETE FROM documents WHERE id = 'd1'"))
    await sp.close()  # the last connection checkpoints the WAL into the file
    assert not path.with_name("spool.db-wal").exists()
    assert b"a-secret-that-was-deleted-" not in path.read_bytes()


async def test_the_access_log_names_the_client_behind_a_trusted_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a load balancer (server.trusted_proxies) the audit records
    name the client X-Forwarded-For gives; the access log named the proxy on
    every line, so the two could not be matched by address. Now both name
    the client; without a trusted proxy the header is ignored in both."""
    monkeypatch.setenv("SESSION_AUDIT_LOG_LEVEL", "INFO")
    lv = Live(tmp_path, {"server": {"trusted_proxies": "127.0.0.1/32"}})
    try:
        await lv.start()
        answer = await asyncio.to_thread(
            raw_request, lv.port,
            b"GET /documents/proxied HTTP/1.1\r\nHost: x\r\n"
            b"X-Forwarded-For: 198.51.100.9, 203.0.113.7"
            b"\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401")
        assert await lv.stop() == 0
        line = next(json.loads(t)["msg"] for t in lv.log_tail(50_000).splitlines()
                    if t.startswith("{") and '"GET /documents/proxied' in t)
        assert line.startswith('203.0.113.7 "GET /documents/proxied" 401'), line
    finally:
        lv.close()

"""Damaged files, as after a bad disk, a bad copy or a careless operator: a
page of the spool SQLite cannot read, a text in it that is not UTF-8 or not
JSON, a -wal garbled while the server was stopped. Each test damages a real
file the way it happens (bytes of a page zeroed, a row's text changed behind
SQLite's back) and runs the real server parts on it."""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import Api, MakeApi, expect_error, make_api  # noqa: F401
from live_server import free_port
from receiver import sample_security_event
from waiting import wait_for


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
    # No file path to a client (API.md): the spool's is left out.
    assert str(api.config.spool_path) not in status["spool_damaged"]
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
    with closing(sqlite3.connect(api.config.spool_path)) as conn, conn:
        conn.execute("UPDATE documents SET content = CAST(? AS TEXT) WHERE id = ?",
                     ("a secret plan: \u00e9t\u00e9".encode()[:-1] + b"\xff", doc["id"]))
    resp = await api.client.get(f"/documents/{doc['id']}", headers=admin.headers)
    await expect_error(resp, 503, "audit_unavailable")
    assert "column 'content' is not UTF-8" in caplog.text
    assert "secret plan" not in caplog.text
    resp = await api.client.get("/readyz")
    assert resp.status == 503


def _damage_text(path: Path, table: str, rowid: int, text: bytes) -> None:
    """Write ``text`` as a row's stored JSON behind the server's back, as a
    flipped byte does (SQLite checks no text)."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"UPDATE {table} SET json = CAST(? AS TEXT) WHERE rowid = ?",
                     (text, rowid))


async def test_records_damaged_in_the_spool_are_dead_letters_and_the_rest_flows(
    make_config: Any, engines: Any,
) -> None:
    """Pending records whose text in the spool was damaged: a security
    event that is not JSON crashed the flusher at each step (restarted with
    a traceback, 1 s, 2 s, 4 s... apart) and nothing was sent any more; a
    part with an event that is not UTF-8 held back every part behind it, for
    good; a part with an event that is not JSON was sent as it was (the sinks
    splice raw events) and made the sink's document unreadable. Each is now
    a dead letter saying what is wrong, the rest goes to the sink, and the
    spool is marked damaged."""
    from audit import queries
    from audit.events import Draft, Source

    config = make_config()
    engine = await engines.open(config)
    src = Source(user="alice", role="user")
    sessions = [await engine.start_session("alice", "user", src, 3600) for _ in range(3)]
    for s in sessions:
        await engine.record(s.session_id, Draft("document.list"))
        await engine.end_session(s.session_id, src)
    for _ in range(2):
        await engine.record_security(Draft("auth.login_failed", outcome="denied", source=src))

    def rows(c: sqlite3.Connection) -> tuple[list[int], list[int]]:
        events = [c.execute("SELECT e.rowid FROM events e JOIN sessions s USING (sk)"
                            " WHERE s.session_id = ? AND e.seq = 3", (s.session_id,)
                            ).fetchone()[0] for s in sessions[:2]]
        return events, [r[0] for r in c.execute("SELECT id FROM security_events ORDER BY id")]

    (not_json, not_utf8), (bad_security, _) = await engine.spool.read(rows)
    path = config.spool_path
    text = await engine.spool.read(
        lambda c: c.execute("SELECT json FROM events WHERE rowid = ?", (not_json,)).fetchone()[0])
    _damage_text(path, "events", not_json, b"#" + text[1:].encode())
    _damage_text(path, "events", not_utf8, b'{"action":\xff\xfe}')
    _damage_text(path, "security_events", bad_security, b'{"event_id": "x", ')

    await engines.drain(engine)

    counts = await engine.spool.read(lambda c: queries.counts(c, 0))
    assert counts["pending_parts"] == counts["pending_security_events"] == 0, counts
    assert counts["dead_letter_parts"] == 2 and counts["dead_letter_security_events"] == 1
    assert await engine.sink.get_session_parts(sessions[2].session_id)  # not held back
    for s in sessions[:2]:  # nothing of theirs sent half read or unreadable
        assert await engine.sink.get_session_parts(s.session_id) == []
    errors = await engine.spool.read(lambda c: c.execute(
        "SELECT last_error FROM parts WHERE state = 'dead' UNION ALL"
        " SELECT last_error FROM security_events WHERE state = 'dead'").fetchall())
    text = " | ".join(e[0] for e in errors)
    assert "event 3 of part" in text and "is not JSON" in text and "is not UTF-8" in text
    assert "this event: its text is not JSON" in text
    stored = [e async for e in engine.sink.security_events_oldest_first()]
    assert [e["action"] for e in stored] == ["auth.login_failed"]  # the one not damaged
    assert engine.spool.damaged is not None and engine.flusher.healthy
    assert not engine.task_failure


async def test_verify_says_a_damaged_security_event_in_the_spool_in_one_line(
    make_config: Any, engines: Any, audit_key: bytes, monkeypatch: Any, capsys: Any,
) -> None:
    """verify reads the oldest security event the sink has not taken from the
    spool (to check the sink's chain reaches it). With its text damaged (a
    dead letter the flusher could not read), verify died with a
    JSONDecodeError traceback. It says so in one line and checks the sink."""
    import server
    from audit.events import Draft, Source

    config = make_config()
    engine = await engines.open(config)
    draft = Draft("auth.login_failed", outcome="denied", source=Source(user="mallory", role=None))
    await engine.record_security(draft)
    await engines.drain(engine)  # the first in the sink, the second not yet
    await engine.record_security(draft)
    await engines.close(engine)
    _damage_text(config.spool_path, "security_events", 2, b"\xff not JSON")
    monkeypatch.setenv(server.AUDIT_KEY_ENV, audit_key.decode())

    assert await server._verify(config) == 0  # the sink holds nothing to fault
    err = capsys.readouterr().err
    assert "the text of security event 2 in the spool is damaged" in err
    assert "Traceback" not in err


def _commit_frames(wal: Path) -> list[int]:
    """The frames of ``wal`` that end a transaction (0-based)."""
    import struct

    data = wal.read_bytes()
    page = struct.unpack(">I", data[8:12])[0]
    return [i for i in range((len(data) - 32) // (page + 24))
            if struct.unpack_from(">I", data, 32 + i * (page + 24) + 4)[0]]


def _garble_frame(wal: Path, frame: int) -> None:
    """Flip a byte of the page in ``frame`` (0-based) of ``wal``."""
    import struct

    with open(wal, "r+b") as f:
        page = struct.unpack(">I", f.read(12)[8:12])[0]
        f.seek(32 + frame * (page + 24) + 24 + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_a_wal_sqlite_cannot_read_past_a_damaged_frame_is_said_and_kept(
    make_config: Any, engines: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The spool as a kill -9 leaves it (its -wal holding the last commits),
    then a frame of the -wal garbled (a bad copy, a bad sector): SQLite drops
    that frame and every transaction committed after it, events that were
    acknowledged, and the server started as if nothing had happened. It
    now says so (the spool damaged, /readyz 503) and keeps a copy of the
    -wal before its first commit reuses those frames; an intact -wal, or
    one whose last transaction was cut off, is not taken for damage."""
    import shutil

    from audit.events import Draft, Source

    config = make_config()
    engine = await engines.open(config)
    src = Source(user="alice", role="user")
    for _ in range(6):  # a commit each
        s = await engine.start_session("alice", "user", src, 3600)
        await engine.record(s.session_id, Draft("document.list"))

    def crashed(name: str, **sections: Any) -> Any:  # the files as the process left them
        other = make_config(server={"data_dir": str(tmp_path / name)}, **sections)
        other.data_dir.mkdir(mode=0o700)
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{config.spool_path}{suffix}", f"{other.spool_path}{suffix}")
        return other

    intact, cut, damaged = crashed("intact"), crashed("cut"), crashed("damaged")
    normal = crashed("normal", audit={"synchronous": "normal"})
    await engines.close(engine)
    commits = _commit_frames(Path(f"{damaged.spool_path}-wal"))
    assert len(commits) > 5
    for garbled in (damaged, normal):  # after the third commit
        _garble_frame(Path(f"{garbled.spool_path}-wal"), commits[2] + 1)
    cut_wal = Path(f"{cut.spool_path}-wal")
    _garble_frame(cut_wal, _commit_frames(cut_wal)[-2] + 1)  # the last transaction torn

    for ok in (intact, cut):
        engine = await engines.open(ok)
        assert engine.spool.damaged is None, engine.spool.damaged
        await engines.close(engine)
    engine = await engines.open(damaged)
    assert engine.spool.damaged is not None
    assert "its -wal holds" in engine.spool.damaged
    assert f"past a frame SQLite cannot read (after frame {commits[2] + 1})" \
        in engine.spool.damaged
    assert not engine.ready
    (kept,) = damaged.data_dir.glob("spool.db-wal.damaged-*")
    assert len(_commit_frames(kept)) == len(commits)  # every frame, as it was
    assert kept.stat().st_mode & 0o777 == 0o600
    await engines.close(engine)

    # Under synchronous = "normal" the -wal is not synced at each commit: a
    # power loss leaves just this, the loss README documents for that
    # setting. Said and kept, but not a damaged file: the server stays ready.
    with caplog.at_level(logging.ERROR, logger="session_audit.spool"):
        engine = await engines.open(normal)
    assert engine.spool.damaged is None and engine.ready
    assert "lost committed transactions at the last stop" in caplog.text
    (kept,) = normal.data_dir.glob("spool.db-wal.damaged-*")
    assert len(_commit_frames(kept)) == len(commits)


def _salted_commits(wal: Path) -> tuple[list[int], list[int]]:
    """The frames of ``wal`` that end a transaction: those of its current log
    (the header's salts) and those left of an earlier one."""
    import struct

    data = wal.read_bytes()
    page = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    current, stale = [], []
    for i in range((len(data) - 32) // (page + 24)):
        at = 32 + i * (page + 24)
        if struct.unpack_from(">I", data, at + 4)[0]:
            (current if data[at + 8:at + 16] == salts else stale).append(i)
    return current, stale


async def _sessions(engine: Any, n: int) -> None:
    from audit.events import Draft, Source

    src = Source(user="alice", role="user")
    for _ in range(n):  # a commit each
        s = await engine.start_session("alice", "user", src, 3600)
        await engine.record(s.session_id, Draft("document.list"))


async def _four_sessions_crashed(make_config: Any, engines: Any,
                                 tmp_path: Path) -> tuple[Any, Path, list[int]]:
    """Four sessions recorded, the spool's files copied as a kill -9 leaves
    them (their transactions still in the -wal): the copy's config, its
    -wal and the -wal's commit frames."""
    config = make_config()
    engine = await engines.open(config)
    await _sessions(engine, 4)
    crashed = _crash_copy(make_config, config, tmp_path, "crashed")
    await engines.close(engine)
    wal = Path(f"{crashed.spool_path}-wal")
    return crashed, wal, _commit_frames(wal)


def _crash_copy(make_config: Any, config: Any, tmp_path: Path, name: str) -> Any:
    """The spool's files as a kill -9 of the process would leave them."""
    import shutil

    other = make_config(server={"data_dir": str(tmp_path / name)})
    other.data_dir.mkdir(mode=0o700)
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{config.spool_path}{suffix}", f"{other.spool_path}{suffix}")
    return other


async def test_a_wal_restarted_after_a_checkpoint_is_not_taken_for_damage(
    make_config: Any, engines: Any, tmp_path: Path,
) -> None:
    """Once a checkpoint has copied the whole log into the file, the next
    commit starts the -wal over from its first frame, under new salts; the
    frames of the earlier log past the new one's end stay in the file, with
    their commit marks, until they are written over (nearly always, after
    the first automatic checkpoint). They are not transactions SQLite
    dropped: a server killed then is not told its spool is damaged."""
    config = make_config()
    engine = await engines.open(config)
    await _sessions(engine, 6)
    conn = sqlite3.connect(config.spool_path, isolation_level=None)
    try:
        assert conn.execute("PRAGMA wal_checkpoint(FULL)").fetchone()[0] == 0
    finally:
        conn.close()
    await _sessions(engine, 1)  # the log starts over
    crashed = _crash_copy(make_config, config, tmp_path, "crashed")
    await engines.close(engine)
    current, stale = _salted_commits(Path(f"{crashed.spool_path}-wal"))
    assert current and len(stale) > 2, (current, stale)

    engine = await engines.open(crashed)
    assert engine.spool.damaged is None, engine.spool.damaged
    assert not list(crashed.data_dir.glob("spool.db-wal.damaged-*"))


async def test_a_wal_held_by_a_reader_across_a_restart_is_not_taken_for_damage(
    make_config: Any, engines: Any,
) -> None:
    """An online backup (README: Backups) or a sqlite3 shell reading the
    spool while the server restarts: the checkpoint at open copies the
    log only up to that reader's snapshot, and the -wal holds committed
    frames past it, all valid. The server is not told its spool is damaged."""
    config = make_config()
    engine = await engines.open(config)
    await _sessions(engine, 2)
    reader = sqlite3.connect(config.spool_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM meta").fetchone()  # its snapshot, from now on
        await _sessions(engine, 4)
        await engines.close(engine)
        assert _salted_commits(Path(f"{config.spool_path}-wal"))[0]  # (past the snapshot)

        engine = await engines.open(config)
        assert engine.spool.damaged is None, engine.spool.damaged
        assert engine.ready
        await engines.close(engine)
    finally:
        reader.close()


async def test_a_damaged_text_is_not_quoted_by_a_logged_traceback(
    make_api: MakeApi, caplog: Any,  # noqa: F811
) -> None:
    """A revocation row whose cause is not UTF-8 (a bad disk): the reaper's
    hook and the server's check each logged the damage as a traceback every
    second, and its cause, SQLite's "Could not decode to UTF-8 column 'cause'
    with text '...'", quoted the text. The traceback names the column only.
    So does the log line of a query the embedded sink cannot read."""
    caplog.set_level(logging.INFO)
    api: Api = await make_api()
    admin = await api.admin()
    with closing(sqlite3.connect(api.config.spool_path)) as conn, conn:
        conn.execute("INSERT INTO revocations (session_id, cause, created_ts)"
                     " VALUES ('x', CAST(? AS TEXT), 0)", (b"secret payroll \xff",))

    async def logged() -> bool | None:
        return "end_revoked_sessions failed" in caplog.text or None

    await wait_for(logged, message="the reaper's hook failing")
    assert "column 'cause' is not UTF-8" in caplog.text
    assert "payroll" not in caplog.text

    await api.engine.sink.write_security_events([sample_security_event("e1")])
    db = sqlite3.connect(api.config.sqlite_sink_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("UPDATE security_events SET doc = CAST(? AS TEXT) WHERE id = 'e1'",
                   (b'{"title": "salaries 2027 \xff"}',))
    finally:
        db.close()
    async with api.client.get("/audit/security-events", headers=admin.headers) as r:
        assert r.status == 503, await r.text()
    assert "column 'doc' is not UTF-8" in caplog.text
    assert "salaries" not in caplog.text


async def test_a_loop_in_the_path_of_a_sink_not_in_use_is_no_500(
    make_api: MakeApi, tmp_path: Path,  # noqa: F811
) -> None:
    """The path of a sink not in use is not looked at by the start; the
    reason of /readyz not ready (a damaged spool here), made path-free,
    resolved it anyway: a loop of symbolic links there was RuntimeError, a
    500 for an unauthenticated probe."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    api: Api = await make_api(sink={"type": "sqlite", "jsonl": {"dir": str(tmp_path / "a/j")}})
    with closing(sqlite3.connect(api.config.spool_path)) as conn, conn:
        conn.execute("INSERT INTO revocations (session_id, cause, created_ts)"
                     " VALUES ('x', CAST(X'FF' AS TEXT), 0)")

    async def not_ready() -> int | None:
        resp = await api.client.get("/readyz")
        return resp.status if resp.status != 200 else None

    assert await wait_for(not_ready, message="/readyz not ready") == 503


async def test_a_revocation_pass_failing_every_second_is_logged_once_and_its_recovery(
    make_api: MakeApi, caplog: Any, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    """A revocation row whose cause is not UTF-8: the reaper's hook and the
    server's own check of revoked sessions each failed on every pass, and
    each logged its full traceback every second, for as long as the row
    was there. Now the first failure is logged in full, the repeats are
    counted (at most a line a minute), and each says when it succeeds
    again (the row deleted by hand)."""
    import server
    from handlers.keys import ACCOUNTS, ENGINE

    monkeypatch.setattr(server, "REVOKE_CHECK_SECONDS", 0.01)
    passes = {"reaper": 0, "check": 0}

    def setup(app: Any) -> None:
        app[ENGINE].reaper_interval = 0.01
        accounts = app[ACCOUNTS]
        check = accounts.end_revoked_sessions  # (the reaper's hook, bound before)

        async def counted() -> int:  # the server's own check, counted
            passes["check"] += 1
            return await check()

        async def reaper_pass() -> None:  # after the revocation hook
            passes["reaper"] += 1

        accounts.end_revoked_sessions = counted  # type: ignore[method-assign]
        app[ENGINE].before_reap.append(reaper_pass)

    caplog.set_level(logging.INFO)
    api: Api = await make_api(setup=setup)
    with closing(sqlite3.connect(api.config.spool_path)) as conn, conn:
        conn.execute("INSERT INTO revocations (session_id, cause, created_ts)"
                     " VALUES ('x', CAST(? AS TEXT), 0)", (b"secret payroll \xff",))
    failing = dict(passes)
    await wait_for(lambda: all(passes[k] >= failing[k] + 6 for k in passes),
                   message="a few passes of each over the damaged row")

    def lines(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if text in r.getMessage()]

    hook = lines("reaper: end_revoked_sessions failed")
    check = lines("looking for sessions of disabled or changed users failed")
    assert len(hook) == 1 and hook[0].exc_info is not None, [r.getMessage() for r in hook]
    assert len(check) == 1 and check[0].exc_info is not None, [r.getMessage() for r in check]
    assert "payroll" not in caplog.text

    with closing(sqlite3.connect(api.config.spool_path)) as conn, conn:
        conn.execute("DELETE FROM revocations WHERE session_id = 'x'")
    await wait_for(lambda: lines("succeeds again") if len(lines("succeeds again")) == 2
                   else None, message="both passes saying they succeed again")
    said = sorted(r.getMessage() for r in lines("succeeds again"))
    assert said[0].startswith("looking for sessions of disabled or changed users succeeds"
                              " again, after ")
    assert said[1].startswith("reaper: end_revoked_sessions succeeds again, after ")
    errors = [r for r in caplog.records
              if r.levelno >= logging.ERROR and r.name != "session_audit.spool"]
    # Nothing more; in either order (the reaper's hook and the server's check
    # are two tasks: which one meets the damaged row first is theirs to say).
    assert sorted(errors, key=id) == sorted(hook + check, key=id)


async def test_an_admin_listing_the_damaged_spool_cannot_read_is_recorded_as_such(
    make_api: MakeApi,  # noqa: F811
) -> None:
    """The spool's security events table damaged: GET /audit/security-events
    is 503 audit_unavailable, and its audit.query (the session's tables
    still take it) says why: reason audit_unavailable, not internal_error."""
    api: Api = await make_api(
        sink={"type": "http", "http": {"url": f"http://127.0.0.1:{free_port()}",
                                       "timeout_seconds": 1.0}},
        flush_at_close=False)
    admin = await api.admin()
    await api.client.get("/me", headers={"Authorization": "Bearer junk"})
    await api.wait_security("auth.invalid_token")
    zero_pages(api.config.spool_path, "security_events")
    resp = await api.client.get("/audit/security-events",
                                headers={**admin.headers, "X-Request-ID": "damaged"})
    await expect_error(resp, 503, "audit_unavailable")
    (ev,) = [e for e in await api.events(admin.session_id) if e["request_id"] == "damaged"]
    assert ev["action"] == "audit.query"
    assert (ev["outcome"], ev["details"]["reason"]) == ("failure", "audit_unavailable")


def _rewrite_header(wal: Path, change: Any) -> None:
    """Apply ``change`` to the 32-byte header of ``wal`` (a bytearray)."""
    with open(wal, "r+b") as f:
        head = bytearray(f.read(32))
        change(head)
        f.seek(0)
        f.write(head)


@pytest.mark.parametrize("at", [None, 0, 3, 10, 17, 22, 29, (17, 29)], ids=[
    "first-frame", "magic", "magic-endianness", "page-size", "salt-1", "salt-2", "checksum",
    "salt-1-and-checksum"])
async def test_a_wal_whose_first_frame_or_header_is_damaged_is_said(
    make_config: Any, engines: Any, tmp_path: Path, at: int | tuple[int, int] | None,
) -> None:
    """A damaged first frame, or a byte of the -wal's 32-byte header garbled
    (its magic, its page size, a salt or its checksum): SQLite reads no
    frame of the -wal at all and drops every transaction in it, without a
    word. That is said, as a later frame's damage is, though a damaged
    header's salts and page size cannot be trusted."""
    crashed, wal, commits = await _four_sessions_crashed(make_config, engines, tmp_path)
    if at is None:
        _garble_frame(wal, 0)
    else:
        def garble(head: bytearray) -> None:
            for byte in (at,) if isinstance(at, int) else at:
                head[byte] ^= 1 if byte == 3 else 0x40

        _rewrite_header(wal, garble)

    engine = await engines.open(crashed)
    assert engine.spool.damaged is not None
    assert f"its -wal holds {len(commits)} committed transactions past a frame SQLite" \
        " cannot read (after frame 0)" in engine.spool.damaged
    assert len(list(crashed.data_dir.glob("spool.db-wal.damaged-*"))) == 1


@pytest.mark.parametrize("at", [None, 0, 10, 22, 29], ids=[
    "intact", "magic", "page-size", "salt-2", "checksum"])
async def test_a_wal_header_restarted_before_its_first_frame_is_not_taken_for_damage(
    make_config: Any, engines: Any, tmp_path: Path, at: int | None,
) -> None:
    """A kill -9 between SQLite's rewrite of the -wal header (new salts, its
    checksum right) when the log starts over, and the write of the new
    log's first frame: every frame left is of the earlier log, checkpointed
    already. Nothing was dropped, nothing is said; nor when a byte of that
    header is garbled besides (SQLite then reads no frame, and loses
    nothing): the first frame is not the new log's, its salts and checksum
    say so (it was taken for the current log's, and all the earlier log's
    transactions for dropped ones)."""
    import struct

    from audit.walcheck import _checksum

    config = make_config()
    engine = await engines.open(config)
    await _sessions(engine, 4)
    conn = sqlite3.connect(config.spool_path, isolation_level=None)
    try:
        assert conn.execute("PRAGMA wal_checkpoint(FULL)").fetchone()[0] == 0
    finally:
        conn.close()
    crashed = _crash_copy(make_config, config, tmp_path, "crashed")
    await engines.close(engine)
    wal = Path(f"{crashed.spool_path}-wal")
    assert _commit_frames(wal)

    def new_salts(head: bytearray) -> None:  # as SQLite writes them, its checksum right
        salt1, salt2 = struct.unpack(">2I", head[16:24])
        head[16:24] = struct.pack(">2I", (salt1 + 1) & 0xFFFFFFFF, salt2 ^ 0x5A5A5A5A)
        magic = struct.unpack(">I", head[:4])[0]
        head[24:32] = struct.pack(">2I", *_checksum(bytes(head[:24]), bool(magic & 1)))

    _rewrite_header(wal, new_salts)
    if at is not None:
        _rewrite_header(wal, lambda head: head.__setitem__(at, head[at] ^ 0x40))

    engine = await engines.open(crashed)
    assert engine.spool.damaged is None, engine.spool.damaged
    assert not list(crashed.data_dir.glob("spool.db-wal.damaged-*"))


@pytest.mark.parametrize("damage", ["salt-1", "salts", "salt-1-and-checksum"], ids=[
    "salt-1-plus-one", "salt-1-plus-one-and-salt-2", "salt-1-plus-one-and-checksum"])
async def test_a_wal_header_whose_salt_1_is_garbled_to_one_more_is_said(
    make_config: Any, engines: Any, tmp_path: Path, damage: str,
) -> None:
    """The current log's header, its first salt garbled to exactly the first
    frame's plus one (one bit flipped does it, when salt-1 is even), as when
    SQLite starts the log over: SQLite reads no frame and drops every
    transaction. The frame is the current log's all the same, and that is
    said: its checksum continues the header's (the checksum field intact,
    even with salt-2 garbled too), or the header's salt-2 is still the
    frame's (a log started over has a new one)."""
    import shutil
    import struct

    crashed, wal, commits = await _four_sessions_crashed(make_config, engines, tmp_path)

    def garble(head: bytearray) -> None:
        salt1 = struct.unpack(">I", head[16:20])[0]
        head[16:20] = struct.pack(">I", (salt1 + 1) & 0xFFFFFFFF)
        if damage == "salts":
            head[22] ^= 0x40
        if damage == "salt-1-and-checksum":
            head[29] ^= 0x40

    def sessions_sqlite_reads(name: str) -> int:  # in a copy: SQLite's close ends the -wal
        (tmp_path / name).mkdir()
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{crashed.spool_path}{suffix}", tmp_path / name / f"db{suffix}")
        conn = sqlite3.connect(tmp_path / name / "db", isolation_level=None)
        try:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sessions'").fetchone():
                return 0
            return int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])
        finally:
            conn.close()

    assert sessions_sqlite_reads("before") == 4
    _rewrite_header(wal, garble)
    assert sessions_sqlite_reads("after") == 0  # SQLite dropped every transaction

    engine = await engines.open(crashed)
    assert engine.spool.damaged is not None
    assert f"its -wal holds {len(commits)} committed transactions past a frame SQLite" \
        " cannot read (after frame 0)" in engine.spool.damaged
    assert len(list(crashed.data_dir.glob("spool.db-wal.damaged-*"))) == 1

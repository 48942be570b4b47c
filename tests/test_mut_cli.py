"""The command line's exit codes, output and effect on the data, as API.md and
README's "Operations" say, found unpinned by a mutation review of server.py
(hand mutants: the commands are ``main``'s branches, run here through
``server.main`` on real files, with a real HTTP receiver on loopback).

- ``drain`` exits 1 with dead letters (README: "Exit 0 when all is written,
  1 with dead letters"), and ``retry-dead`` makes them pending again, saying
  how many; a drain once the receiver takes them exits 0.
- ``verify`` exits 1 (not 2: "the sink could not be read") for a changed
  event, and names the session on stdout.
- The user commands and ``status`` pointed at a data directory with no
  spool say so and make nothing; ``passwd`` of another user leaves the
  first admin's password file alone.
- ``drain`` that leaves what a damaged spool page keeps it from reading
  does not say ``drained`` (it did, exit 0).
- A damaged ``sink_status`` row in the spool (what ``status`` shows) stops
  neither ``serve`` nor ``status`` (each ended in a traceback).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import MakeApi, make_api  # noqa: F401

import server
from audit.config import parse_config
from audit.engine import AuditEngine
from audit.events import Draft, Source
from sinks.sqlite import SqliteSink

AUDIT_KEY = "cli-audit-key-0123456789abcdef-0123"


@pytest.fixture(autouse=True)
def _cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()  # server.main sets up logging: put it back after
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setenv("SESSION_AUDIT_AUDIT_KEY", AUDIT_KEY)
    monkeypatch.setenv("SESSION_AUDIT_LOG_LEVEL", "warning")
    monkeypatch.delenv("SESSION_AUDIT_HTTP_TOKEN", raising=False)
    monkeypatch.delenv("SESSION_AUDIT_CONFIG", raising=False)


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[auth]\nbcrypt_rounds = 4\n'
                    + extra, encoding="utf-8")
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``server.py ARGV`` in this process: its exit code, stdout and stderr."""
    capsys.readouterr()
    code = server.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class _Receiver:
    """An http sink's receiver on loopback: answers every POST with ``status``."""

    def __init__(self) -> None:
        self.status = 400
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if outer.status == 200:
                    outer.bodies.append(json.loads(body))
                payload = b'{"error": "refused"}' if outer.status != 200 else b"{}"
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    try:
        yield r
    finally:
        r.close()


def _engine(config_path: Path, tmp_path: Path, sink: Any = None) -> AuditEngine:
    import tomllib

    config = parse_config(tomllib.loads(config_path.read_text()), base_dir=str(tmp_path))
    return AuditEngine(config, sink if sink is not None else SqliteSink(config.sqlite_sink_path),
                       AUDIT_KEY.encode())


def _status(capsys: pytest.CaptureFixture[str], config: Path) -> dict[str, Any]:
    code, out, err = _run(capsys, "status", "--config", str(config))
    assert code == 0, err
    return dict(json.loads(out))


def test_drain_exits_1_with_dead_letters_and_retry_dead_makes_them_pending(
        tmp_path: Path, receiver: _Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, f'[sink]\ntype = "http"\n[sink.http]\nurl = "{receiver.url}"\n'
                               '[flush]\nmax_writes_per_second = 1000.0\nburst = 100\n')

    async def a_failed_login() -> None:
        engine = _engine(config, tmp_path)
        await engine.open(background=False)
        try:
            await engine.record_security(Draft("auth.login_failed", outcome="denied",
                                               source=Source(user="mallory")))
        finally:
            await engine.close(flush_window=0)

    asyncio.run(a_failed_login())
    assert _status(capsys, config)["pending_security_events"] == 1

    # The receiver refuses it for good (400): a dead letter, and drain says so.
    code, out, err = _run(capsys, "drain", "--config", str(config))
    assert (code, out) == (1, "drained; 1 dead-lettered, 0 sessions still open\n"), err
    status = _status(capsys, config)
    assert (status["pending_security_events"], status["dead_letter"]) == (0, 1)

    code, out, err = _run(capsys, "retry-dead", "--config", str(config))
    assert (code, out) == (0, "1 dead-lettered items are pending again\n"), err
    status = _status(capsys, config)
    assert (status["pending_security_events"], status["dead_letter"]) == (1, 0)

    receiver.status = 200  # its cause fixed
    code, out, err = _run(capsys, "drain", "--config", str(config))
    assert (code, out) == (0, "drained; 0 dead-lettered, 0 sessions still open\n"), err
    assert "1/1 written" in err  # the progress bar, on stderr
    assert [e["action"] for b in receiver.bodies for e in b["events"]] == ["auth.login_failed"]
    status = _status(capsys, config)
    assert (status["pending_security_events"], status["dead_letter"]) == (0, 0)

    code, out, err = _run(capsys, "retry-dead", "--config", str(config))
    assert (code, out) == (0, "0 dead-lettered items are pending again\n"), err


def test_verify_exits_1_for_a_changed_event_and_names_its_session(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)

    async def a_stored_session() -> str:
        engine = _engine(config, tmp_path)
        await engine.open(background=False)
        try:
            src = Source(user="alice", role="user")
            s = await engine.start_session("alice", "user", src, 3600)
            await engine.record(s.session_id, Draft("document.list"))
            await engine.end_session(s.session_id, src)
            await engine.flusher.drain()
        finally:
            await engine.close(flush_window=0)
        return str(s.session_id)

    sid = asyncio.run(a_stored_session())
    code, out, err = _run(capsys, "verify", "--config", str(config))
    assert code == 0, out + err
    assert out.endswith(": OK\n") and "verified 1 sessions, 1 parts" in out, out

    sink = tmp_path / "data" / "audit.db"
    with closing(sqlite3.connect(sink)) as conn, conn:
        (doc,) = conn.execute("SELECT doc FROM parts").fetchone()
        part = json.loads(doc)
        part["events"][-2]["outcome"] = "failure"
        conn.execute("UPDATE parts SET doc = ?", (json.dumps(part),))
    code, out, err = _run(capsys, "verify", "--config", str(config))
    assert code == 1, out + err  # problems found; 2 is "the sink could not be read"
    assert out.startswith(f"{sid}: ") and out.rstrip().endswith("problem"), out


@pytest.mark.parametrize("argv", [("users",), ("passwd", "alice", "--password-stdin"),
                                  ("disable", "alice"), ("enable", "alice")])
def test_user_commands_without_a_spool_say_so_and_make_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        argv: tuple[str, ...]) -> None:
    """Pointed at the wrong --config: one line, exit 1, and no data directory
    (nor spool) made where the server has none."""
    config = _config(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("a-new-password-1\n"))
    code, out, err = _run(capsys, argv[0], "--config", str(config), *argv[1:])
    assert (code, out) == (1, ""), err
    assert err == f"{argv[0]}: no spool at {tmp_path / 'data' / 'spool.db'}\n"
    assert not (tmp_path / "data").exists()


def test_status_without_a_spool_says_absent_and_makes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    code, out, _ = _run(capsys, "status", "--config", str(config))
    assert code == 1
    assert json.loads(out) == {"spool": "absent", "path": str(tmp_path / "data" / "spool.db")}
    assert not (tmp_path / "data").exists()


def test_passwd_of_another_user_leaves_the_first_admin_s_password_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("a-password-1\n"))
    code, out, err = _run(capsys, "adduser", "alice", "--password-stdin", "--config", str(config))
    assert (code, out) == (0, "added user alice\n"), err
    initial = tmp_path / "data" / "initial_admin_password"
    initial.write_text("the-generated-one\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("a-new-password-2\n"))
    code, out, err = _run(capsys, "passwd", "alice", "--password-stdin", "--config", str(config))
    assert code == 0, err
    assert out.startswith("changed the password of alice;") and "removed" not in out
    assert initial.read_text() == "the-generated-one\n"  # still the admin's


def test_drain_that_leaves_what_it_cannot_read_pending_does_not_say_drained(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A page of the spool's security events damaged (a bad sector) past the
    first batch: drain sent what it could read, then the flusher found
    nothing it could send and drain said ``drained; 0 dead-lettered`` and
    exited 0 with the rest still pending: a script that drains before
    decommissioning a machine (README) took the spool for empty. It says how
    many are left and why, and exits 1."""
    config = _config(tmp_path, '[flush]\nmax_writes_per_second = 1000.0\nburst = 100\n')

    async def failed_logins() -> None:
        engine = _engine(config, tmp_path)
        await engine.open(background=False)
        try:
            for i in range(200):
                await engine.record_security(Draft(
                    "auth.login_failed", outcome="denied",
                    source=Source(user=f"u{i}", user_agent="x" * 200)))
        finally:
            await engine.close(flush_window=0)

    asyncio.run(failed_logins())
    spool = tmp_path / "data" / "spool.db"
    conn = sqlite3.connect(spool, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        (last_leaf,) = conn.execute("SELECT MAX(pageno) FROM dbstat WHERE name ="
                                    " 'security_events' AND pagetype = 'leaf'").fetchone()
    finally:
        conn.close()
    with open(spool, "r+b") as f:  # the newest events' page zeroed
        f.seek((last_leaf - 1) * size)
        f.write(bytes(size))

    code, out, err = _run(capsys, "drain", "--config", str(config))
    left = _status(capsys, config)["pending_security_events"]
    assert 0 < left < 200
    assert (code, out) == (1, ""), err
    assert f"drain: stopped with {left} still pending (kept in the spool)" in err
    assert "is damaged: database disk image is malformed" in err


@pytest.mark.parametrize("damaged", ['{"type": "sqlite", "whe', "[1, 2]",
                                     b'{"type": "sqlite", "where": "Q3 layoffs \xff"}'])
async def test_a_damaged_saved_sink_state_stops_neither_serve_nor_status(
        make_api: MakeApi, capsys: pytest.CaptureFixture[str],  # noqa: F811
        damaged: str | bytes) -> None:
    """The sink's state a server saves in the spool for ``status`` (meta
    ``sink_status``), its text damaged (a flipped byte, cut short; as bytes:
    stored as text that is not UTF-8, which SQLite's error quoted): every
    start failed with a JSONDecodeError (or AttributeError) traceback, exit
    1, and so did ``status``. Only a display: the server starts, status
    shows the configured sink, and the next save replaces the row."""
    api = await make_api()
    config = api.config
    await api.client.close()
    with closing(sqlite3.connect(config.spool_path)) as conn, conn:
        conn.execute("INSERT INTO meta (key, value) VALUES ('sink_status', CAST(? AS TEXT))"
                     " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (damaged,))

    path = config.data_dir.parent / "config.toml"
    path.write_text(f'[server]\ndata_dir = "{config.data_dir}"\n', encoding="utf-8")
    code, out, err = _run(capsys, "status", "--config", str(path))
    assert code == 0, err
    assert json.loads(out)["sink"] == {"type": "sqlite", "where": str(config.sqlite_sink_path)}

    restarted = await make_api(server={"data_dir": str(config.data_dir)})
    resp = await restarted.client.get("/healthz")
    assert resp.status == 200


async def test_a_command_stopped_by_a_text_that_is_not_utf8_does_not_quote_it(
        make_api: MakeApi, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """A command that meets a damaged text (not UTF-8) ends in one line, as
    for other damage, naming the column: SQLite's words quoted the text."""
    api = await make_api()
    config = api.config
    await api.user("alice")
    await api.client.close()
    with closing(sqlite3.connect(config.spool_path)) as conn, conn:
        conn.execute("UPDATE users SET username = CAST(? AS TEXT) WHERE username = 'alice'",
                     (b"alice Q3 layoffs \xff",))
    path = config.data_dir.parent / "config.toml"
    path.write_text(f'[server]\ndata_dir = "{config.data_dir}"\n', encoding="utf-8")
    code, out, err = _run(capsys, "users", "--config", str(path))
    assert code == 1 and "layoffs" not in out + err, (out, err)
    assert "a text in column 'username' is not UTF-8" in err

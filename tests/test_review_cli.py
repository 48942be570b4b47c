"""Findings of a review of the command line and configuration, each a test
that fails without its fix.

The audit key a spool's chains were made with is the only one it takes: with
``data/audit.key`` lost (or ``SESSION_AUDIT_AUDIT_KEY`` set on one start and
not the next) ``serve`` made a new key without a word and chained the open
sessions on under it, and no key verified them afterwards. ``drain`` with
nothing pending needs no sink. Commands fail with one line, not a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from live_server import SERVER, Live, free_port, merge, server_env, take_port, to_toml

from audit.events import Draft
from audit.spool import AuditKeyMismatch, Spool, stored_key_check
from audit.store import Limits

OTHER_KEY = b"another-audit-key-0123456789abcdef"


async def _spool_with_a_session(path: Path, key: bytes) -> str:
    sp = Spool(path, key, limits=Limits(500, 1 << 20))
    await sp.open()
    try:
        s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [Draft("session.start")]))
        await sp.submit(lambda w: w.append(s.session_id, Draft("document.list")))
        return str(s.session_id)
    finally:
        await sp.close()


async def _opens(path: Path, key: bytes) -> bool:
    sp = Spool(path, key, limits=Limits(500, 1 << 20))
    try:
        await sp.open()
    except AuditKeyMismatch:
        return False
    await sp.close()
    return True


async def test_a_spool_refuses_a_key_its_chains_were_not_made_with(tmp_path, audit_key):
    path = tmp_path / "spool.db"
    await _spool_with_a_session(path, audit_key)
    assert not await _opens(path, OTHER_KEY)
    assert await _opens(path, audit_key)


async def test_a_spool_from_before_the_check_is_held_to_its_own_events(tmp_path, audit_key):
    path = tmp_path / "spool.db"
    await _spool_with_a_session(path, audit_key)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DELETE FROM meta WHERE key = 'key_check'")
    assert not await _opens(path, OTHER_KEY)  # a first event's hash tells
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert stored_key_check(conn) is None  # nothing recorded for the wrong key
    assert await _opens(path, audit_key)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert stored_key_check(conn) is not None
    assert not await _opens(path, OTHER_KEY)


def _forget_the_check(path: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DELETE FROM meta WHERE key = 'key_check'")
        for sql in statements:
            conn.execute(sql)


@pytest.mark.parametrize("left", ["before_first_cut", "after_a_cut", "pending_part",
                                  "security_events"])
async def test_a_spool_from_before_the_check_without_first_events(tmp_path, audit_key, left):
    """Found by a review: the first events go once the sink has part 0 (under
    keep_stored_seconds = 0 at once), and the check then found nothing to
    hold a key to and took any. Whatever chain state is left tells."""
    path = tmp_path / "spool.db"
    limits = Limits(3 if left in ("after_a_cut", "pending_part") else 500, 1 << 20)
    sp = Spool(path, audit_key, limits=limits)
    await sp.open()
    try:
        if left == "security_events":
            for i in range(2):
                await sp.submit(lambda w, i=i: w.append_security(
                    Draft("auth.login_failed", outcome="denied", details={"n": i}), None))
        else:
            s = await sp.submit(lambda w: w.start_session("u", "user", 1e12, [
                Draft("session.start")]))
            for _ in range(4):  # at 3 a part: events 1-3 cut, 4-5 not
                await sp.submit(lambda w: w.append(s.session_id, Draft("document.list")))
            if left == "pending_part":
                await sp.submit(lambda w: w.seal(s.session_id, "logout", Draft("session.end")))
    finally:
        await sp.close()
    gone = {  # what the sink took and the spool deleted
        "before_first_cut": ["DELETE FROM events WHERE seq = 1"],
        "after_a_cut": ["DELETE FROM events WHERE seq <= 3", "DELETE FROM parts"],
        "pending_part": ["DELETE FROM events WHERE seq <= 3",
                         "DELETE FROM parts WHERE part = 0"],
        "security_events": [],
    }[left]
    _forget_the_check(path, *gone)
    assert not await _opens(path, OTHER_KEY)
    assert await _opens(path, audit_key)


async def test_a_new_spool_takes_any_key(tmp_path):
    assert await _opens(tmp_path / "spool.db", OTHER_KEY)


async def test_serve_and_verify_refuse_a_lost_or_other_key(live: Live) -> None:
    await live.start()  # its key from SESSION_AUDIT_AUDIT_KEY: no audit.key file
    assert await live.stop() == 0
    key_file = live.data_dir / "audit.key"
    assert not key_file.exists()

    async def serve(key: str | None) -> tuple[int, str]:
        # The timeout: a guard against a server that serves on.
        r = await live.cli("serve", env={"SESSION_AUDIT_AUDIT_KEY": key or ""}, timeout=60)
        return r.returncode, r.stderr

    rc, err = await serve(None)  # the variable unset this time
    assert rc == 2, err
    assert "no audit key" in err and "restore that key" in err and "Traceback" not in err
    assert not key_file.exists()  # no new key was made

    rc, err = await serve(OTHER_KEY.decode())
    assert rc == 2, err
    assert "the audit key is not the one the chains in" in err

    r = await live.cli("verify", env={"SESSION_AUDIT_AUDIT_KEY": OTHER_KEY.decode()})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the audit key is not the one the server's spool uses" in r.stderr

    await live.start()  # the right key (the variable, as at first) still serves


async def test_drain_with_nothing_pending_needs_no_sink(live: Live) -> None:
    """Found by a review: drain opened the sink before looking for work, so
    with nothing pending and the sink unreachable (here: MongoDB without its
    URI) it retried forever instead of exiting."""
    await live.start()
    assert await live.stop() == 0
    settings = {**live.settings, "sink": {"type": "mongodb"}}
    live.config_path.write_text(to_toml(settings), encoding="utf-8")
    r = await live.cli("drain", env={"SESSION_AUDIT_MONGODB_URI": ""}, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("drained; 0 dead-lettered")


async def test_drain_of_pending_work_without_the_mongodb_uri_says_so(live: Live) -> None:
    """With something pending and the MongoDB URI's variable unset, drain
    retried for ever a sink it could never open (0/1 written, a pause every
    few seconds, until Ctrl-C), where serve refuses to start. It says so in
    one line and exits 2, leaving what is pending in the spool."""
    await _pending_behind_a_sink_that_is_down(live)
    before = await _pending(live)
    assert before >= 1
    settings = {**live.settings, "sink": {"type": "mongodb"}}
    live.config_path.write_text(to_toml(settings), encoding="utf-8")
    r = await live.cli("drain", env={"SESSION_AUDIT_MONGODB_URI": ""}, timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "SESSION_AUDIT_MONGODB_URI (the MongoDB URI) is not set" in r.stderr
    assert await _pending(live) == before


async def _pending_behind_a_sink_that_is_down(live: Live) -> None:
    """A failed login pending in the spool, the http sink unreachable."""
    live.settings = merge(live.settings, {"sink": {"type": "http", "http": {
        "url": f"http://127.0.0.1:{free_port()}", "timeout_seconds": 1.0}}})
    live.config_path.write_text(to_toml(live.settings), encoding="utf-8")
    await live.start()
    async with aiohttp.ClientSession() as http, http.post(
            live.base + "/token", json={"username": "nobody", "password": "x" * 8}) as r:
        assert r.status == 401
    assert await live.stop() == 0


async def _pending(live: Live) -> int:
    status = json.loads((await live.cli("status")).stdout)
    return int(status["pending_parts"] + status["pending_security_events"])


async def test_drain_gives_up_at_its_timeout_and_keeps_what_is_pending(live: Live) -> None:
    await _pending_behind_a_sink_that_is_down(live)
    before = await _pending(live)
    assert before >= 1
    r = await live.cli("drain", "--timeout", "1", timeout=60)  # (a hang guard)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "gave up after 1 s" in r.stderr and f"{before} still pending" in r.stderr
    assert "Traceback" not in r.stderr
    assert await _pending(live) == before


async def test_drain_timeout_before_any_answer_says_so_not_none(live: Live) -> None:
    """Found by a review (a newcomer's first hour): a drain whose timeout came
    before the sink's first answer ended with ``the sink: None``."""
    await _pending_behind_a_sink_that_is_down(live)
    url = live.settings["sink"]["http"]["url"]
    live.settings = merge(live.settings, {"sink": {"http": {"timeout_seconds": 30.0}}})
    live.config_path.write_text(to_toml(live.settings), encoding="utf-8")
    with take_port(int(url.rsplit(":", 1)[1])):  # takes the connection, never answers
        r = await live.cli("drain", "--timeout", "1", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "gave up after 1 s" in r.stderr
    assert "the sink: None" not in r.stderr
    assert "the sink: no error yet" in r.stderr


@pytest.mark.parametrize("command", ["users", "status", "verify"])
async def test_a_closed_output_pipe_is_no_error_message(live: Live, command: str) -> None:
    """Found by a review (a newcomer's first hour): ``server.py verify | head``
    printed ``[Errno 32] Broken pipe (SESSION_AUDIT_LOG_LEVEL=debug logs where
    it happened)`` when ``head`` had read enough."""
    await live.start()
    assert await live.stop() == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes
    try:
        r = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(SERVER), command, "--config",
                             str(live.config_path)],
            cwd=live.workdir, env=server_env(), stdout=write_end, stderr=subprocess.PIPE,
            text=True, timeout=60)
    finally:
        os.close(write_end)
    assert r.returncode == 1
    assert r.stderr == ""


@pytest.mark.parametrize(("sig", "code", "said"), [
    (signal.SIGINT, 130, "interrupted"),
    # SIGTERM (kill, a service manager stopping a drain) ended the process
    # at once: exit 143 without a word, the progress line unended, the
    # sink's connection and the spool unclosed.
    (signal.SIGTERM, 143, "stopped by SIGTERM"),
])
async def test_drain_interrupted_exits_without_a_traceback(
    live: Live, sig: signal.Signals, code: int, said: str
) -> None:
    """Ctrl-C or SIGTERM on a drain that cannot finish: one line, exit 130
    or 143, nothing lost."""
    await _pending_behind_a_sink_that_is_down(live)
    before = await _pending(live)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER), "drain", "--config", str(live.config_path),
        cwd=live.workdir, env=server_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    # It has opened the spool and tried the sink once when it logs the failure.
    line = b""
    while b"SinkUnavailable" not in line:
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert line, "drain ended before it tried the sink"
    proc.send_signal(sig)
    _, err = await asyncio.wait_for(proc.communicate(), 60)  # a hang guard
    text = err.decode()
    assert proc.returncode == code, text
    assert f"session-audit: drain: {said}; what was not written stays pending" in text
    assert "Traceback" not in text
    assert await _pending(live) == before


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit 2 and one line on stderr, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("session-audit: "), r.stderr
    return lines[0]


async def test_commands_fail_with_one_line_not_a_traceback(live: Live) -> None:
    """From a review: each of these ended in a Python traceback (or, for the
    admin password, made an admin who could never log in)."""
    line = _one_line(await live.cli("status", env={"SESSION_AUDIT_LOG_LEVEL": "trace"}))
    assert "SESSION_AUDIT_LOG_LEVEL: 'trace' is not one of debug, info" in line

    line = _one_line(await live.cli("serve", env={"SESSION_AUDIT_ADMIN_PASSWORD": "p" * 1025}))
    assert "SESSION_AUDIT_ADMIN_PASSWORD must have at most 1024 characters" in line
    # Refused before anything is made: no data directory, keys or spool left behind.
    line = _one_line(await live.cli("serve", env={"SESSION_AUDIT_ADMIN_PASSWORD": "short"}))
    assert "SESSION_AUDIT_ADMIN_PASSWORD must have at least 8 characters" in line
    assert not live.data_dir.exists()
    # Once there is a spool (and an admin), the variable is not used: not checked.
    await live.start()
    assert await live.stop() == 0
    live.proc = subprocess.Popen(  # noqa: ASYNC220 - as Live.spawn
        [sys.executable, str(SERVER), "serve", "--config", str(live.config_path)],
        cwd=live.workdir, env={**server_env(), "SESSION_AUDIT_ADMIN_PASSWORD": "short"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await live.wait_healthy()
    assert await live.stop() == 0

    live.data_dir.chmod(0o700)
    (live.data_dir / "jwt.key").write_bytes(b"\xff\xfe not text \x80" * 4)
    line = _one_line(await live.cli("serve", env={"SESSION_AUDIT_JWT_SECRET": ""}))
    assert "jwt.key is not UTF-8 text" in line
    # A directory others may read is warned about once (serve checked it twice).
    live.data_dir.chmod(0o755)
    r = await live.cli("serve", env={"SESSION_AUDIT_JWT_SECRET": ""})
    assert r.returncode == 2 and r.stderr.count("is open to other users") == 1, r.stderr

    r = await live.cli("status", "--config", str(live.workdir))  # a directory
    assert "cannot be read" in _one_line(r)


async def test_adduser_without_a_terminal_says_to_use_stdin(live: Live) -> None:
    r = await live.cli("adduser", "carol", stdin="")  # no --password-stdin, no terminal
    assert r.returncode != 0
    assert r.stderr.strip() == ("adduser: no terminal to ask on: give the password on stdin"
                                " with --password-stdin"), r.stderr
    assert "Warning" not in r.stderr and "password for" not in r.stdout


async def test_verify_on_a_sink_path_that_is_a_directory(live: Live) -> None:
    await live.start()
    assert await live.stop() == 0
    (live.workdir / "sinkdir").mkdir()
    settings = {**live.settings, "sink": {"sqlite": {"path": str(live.workdir / "sinkdir")}}}
    live.config_path.write_text(to_toml(settings), encoding="utf-8")
    r = await live.cli("verify")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == ("verify: the sink is unavailable: cannot open sinkdir:"
                                " not a database file"), r.stderr


async def test_a_data_dir_with_url_characters_in_its_name(tmp_path: Path) -> None:
    """Read-only connections open the spool and the sqlite sink by a ``file:``
    URI. A ``#``, ``?`` or ``%`` in a directory's name cut the path short:
    ``status``, ``verify`` and the document listing opened another file,
    which SQLite created empty beside the data directory."""
    odd = tmp_path / "audit #1? 100%"
    odd.mkdir()
    lv = Live(odd)
    try:
        await lv.start()
        await lv.adduser("alice", "alice-password-1")
        async with aiohttp.ClientSession() as http:
            async with http.post(lv.base + "/token", json={
                    "username": "alice", "password": "alice-password-1"}) as r:
                assert r.status == 200
                auth = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            async with http.post(lv.base + "/documents", json={"title": "t", "content": "c"},
                                 headers=auth) as r:
                assert r.status == 201
                doc = await r.json()
            async with http.get(lv.base + "/documents", headers=auth) as r:
                assert r.status == 200, await r.text()
                assert [d["id"] for d in (await r.json())["documents"]] == [doc["id"]]
            async with http.post(lv.base + "/logout", headers=auth) as r:
                assert r.status == 200
        assert await lv.stop() == 0
        r = await lv.cli("drain")
        assert r.returncode == 0, r.stdout + r.stderr
        r = await lv.cli("verify")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verified 1 sessions" in r.stdout and r.stdout.rstrip().endswith("OK")
        r = await lv.cli("status")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        lv.close()
    assert os.listdir(tmp_path) == [odd.name]  # nothing made beside it


def test_make_clean_leaves_the_data_directory_alone() -> None:
    """Found by a review (a newcomer's first hour): ``make clean``, the usual
    way to rebuild the venv, removed ``data/``: the audit key, the users and
    documents, the events not yet in the sink and the default sink's
    ``audit.db``, the audit trail itself."""
    r = subprocess.run(["make", "-n", "clean"], cwd=SERVER.parent, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "rm -rf" in r.stdout
    assert "data" not in r.stdout.split()


def test_a_command_run_from_another_thread_still_runs() -> None:
    """Ctrl-C is taken on the event loop only where signals arrive (the main
    thread): elsewhere the command runs as plain ``asyncio.run`` would."""
    import threading

    import server

    async def command() -> int:
        return 7

    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(server._run_interruptible(command())))
    t.start()
    t.join(30)
    assert out == [7]
    assert server._run_interruptible(command()) == 7


def _run_bytes(live: Live, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None,
               io_errors: str | None = None) -> subprocess.CompletedProcess[bytes]:
    environ = {**server_env(), **(env or {})}
    if io_errors is not None:
        environ["PYTHONIOENCODING"] = f"utf-8:{io_errors}"
    return subprocess.run(
        [sys.executable, str(SERVER), *args[:1], "--config", str(live.config_path), *args[1:]],
        cwd=live.workdir, env=environ, input=stdin, capture_output=True, timeout=90)


# Bytes that are not UTF-8, as the environment or a pipe gives them to Python
# (os.environ decodes them with surrogateescape).
NOT_UTF8 = b"pass\xff\xfeword-1234"


@pytest.mark.parametrize("io_errors", [None, "strict"])
async def test_a_password_that_is_not_utf8_is_refused_in_one_line(
        live: Live, io_errors: str | None) -> None:
    """Found by a CLI hunt: a password on stdin with bytes that are not UTF-8
    ended adduser and passwd in a UnicodeEncodeError traceback (under a
    strict locale, UnicodeDecodeError) quoting where the odd byte was."""
    await live.start()
    assert await live.stop() == 0
    for args in (("adduser", "carol", "--password-stdin"), ("passwd", "admin",
                                                              "--password-stdin")):
        r = await asyncio.to_thread(_run_bytes, live, *args, stdin=NOT_UTF8 + b"\n",
                                    io_errors=io_errors)
        err = r.stderr.decode("utf-8", "replace")
        assert r.returncode == 2, (args, r.returncode, err)
        assert err.strip() == f"{args[0]}: the password is not UTF-8 text", err
    assert "carol" not in (await live.cli("users")).stdout


@pytest.mark.parametrize("variable, command", [
    ("SESSION_AUDIT_ADMIN_PASSWORD", "serve"),
    ("SESSION_AUDIT_JWT_SECRET", "serve"),
    ("SESSION_AUDIT_AUDIT_KEY", "serve"),
    ("SESSION_AUDIT_AUDIT_KEY", "verify"),
])
async def test_a_secret_variable_that_is_not_utf8_is_one_line(
        live: Live, variable: str, command: str) -> None:
    """Found by a CLI hunt: such a variable (the admin password, a key) ended
    serve and verify in a traceback whose last line quoted the odd byte of
    the secret and its position; the admin password's made the data
    directory and spool before it failed."""
    if command == "verify":
        await live.start()
        assert await live.stop() == 0
    value = os.fsdecode(NOT_UTF8 + b"-0123456789abcdef0123456789abcdef")
    r = await asyncio.to_thread(_run_bytes, live, command, env={variable: value})
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err and "\\udc" not in err, err
    assert err.strip().splitlines()[-1] == f"session-audit: {variable} is not UTF-8 text", err
    if command == "serve" and variable == "SESSION_AUDIT_ADMIN_PASSWORD":
        assert not live.data_dir.exists()


@pytest.mark.parametrize("settings, key", [
    ({"server": {"data_dir": "loop/data"}}, "server.data_dir"),
    ({"sink": {"sqlite": {"path": "loop/audit.db"}}}, "sink.sqlite.path"),
    ({"sink": {"type": "jsonl", "jsonl": {"dir": "loop/jsonl"}}}, "sink.jsonl.dir"),
])
async def test_a_path_into_a_loop_of_symbolic_links_is_named(
        live: Live, settings: dict[str, object], key: str) -> None:
    """Found by a CLI hunt: a data directory or sink path through a loop of
    symbolic links (``ln -s loop loop``) ended every command, serve too, in
    a RuntimeError traceback from pathlib."""
    (live.workdir / "loop").symlink_to("loop")
    live.config_path.write_text(to_toml(merge(live.settings, settings)), encoding="utf-8")
    for command in ("serve", "status", "users", "verify", "drain"):
        line = _one_line(await live.cli(command))
        assert line.startswith(f"session-audit: {key}: ") and "loop of symbolic links" in line, (
            command, line)


@pytest.mark.parametrize("key, reply", [
    ("sk-test-stub-key\n", "ok"),  # a key read from a file, its newline kept
    ("  sk-test-stub-key \r\n", "ok"),
    ("sk-test\nstub-key", "control character"),
])
async def test_an_openai_key_with_a_newline_is_sent_without_it(
        live: Live, monkeypatch: pytest.MonkeyPatch, key: str, reply: str) -> None:
    """Found by a CLI hunt: the http sink strips its token and names a control
    character in it, but the variable named by ``ai.openai.api_key_env`` was
    sent as it was: with the newline a key read from a secret file often
    ends with, aiohttp refused the header and every chat was a 502 whose
    only reason was ``provider request failed: ValueError``."""
    from openai_stub import OpenAIStub

    stub = OpenAIStub(api_key="sk-test-stub-key")
    await stub.start()
    try:
        monkeypatch.setenv("TEST_OPENAI_KEY", key)
        live.config_path.write_text(to_toml(merge(live.settings, {"ai": {
            "provider": "openai", "openai": {"base_url": stub.base_url,
                                             "api_key_env": "TEST_OPENAI_KEY"}}})),
            encoding="utf-8")
        await live.start()
        async with aiohttp.ClientSession() as http:
            async with http.post(live.base + "/token", json={
                    "username": "admin", "password": "admin-password-for-tests"}) as r:
                auth = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            async with http.post(live.base + "/documents", headers=auth,
                                 json={"title": "t", "content": "some text"}) as r:
                doc = (await r.json())["id"]
            async with http.post(f"{live.base}/documents/{doc}/chat", headers=auth,
                                 json={"message": "what?"}) as r:
                status = r.status
        assert await live.stop() == 0
    finally:
        await stub.stop()
    if reply == "ok":
        assert status == 200, live.log_tail()
        assert [q["headers"]["Authorization"] for q in stub.requests] == [
            "Bearer sk-test-stub-key"]
    else:
        assert status == 502 and stub.requests == []
        log = live.log_tail()
        assert "the API key in $TEST_OPENAI_KEY contains a control character" in log, log
        assert "stub-key" not in log


@pytest.mark.parametrize("command", ["serve", "adduser", "status", "verify", "drain",
                                     "passwd", "disable", "enable", "users", "retry-dead"])
def test_every_command_s_help_names_config_path_as_api_md_does(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """API.md: every command takes ``--config PATH`` after its name. The help
    named its argument after the option (``--config CONFIG``)."""
    import server

    with pytest.raises(SystemExit) as exc:
        server.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config PATH" in out and "--config CONFIG" not in out


async def test_serve_refuses_ai_credentials_in_the_url_beside_an_api_key(tmp_path: Path) -> None:
    """ai.openai.base_url with user:password@ (a gateway behind Basic auth)
    and the API key's variable set: aiohttp refuses a request with both in
    the Authorization header, and every chat got 502. serve says so at
    start, exit 2, quoting neither secret; without the key it starts."""
    settings = {"ai": {"provider": "openai", "openai": {
        "base_url": "https://gw-user:gw-pass-1234@127.0.0.1:9/v1"}}}
    lv = Live(tmp_path, settings)
    try:
        r = await lv.cli("serve", env={"OPENAI_API_KEY": "sk-key-5678"}, timeout=30)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "use one" in r.stderr and "OPENAI_API_KEY is set" in r.stderr
        assert "gw-pass-1234" not in r.stderr + r.stdout
        assert "sk-key-5678" not in r.stderr + r.stdout
        lv.env = {"OPENAI_API_KEY": ""}
        await lv.start()  # (no key: the URL's credentials alone)
    finally:
        lv.close()


async def test_min_password_chars_holds_for_adduser_passwd_and_the_first_admin(
        tmp_path: Path) -> None:
    """auth.min_password_chars (NIST SP 800-63B-4: 15 for a password that is
    the only factor) is what adduser, passwd and SESSION_AUDIT_ADMIN_PASSWORD
    are held to; the generated first admin password is at least as long."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    live = Live(tmp_path / "a", {"auth": {"min_password_chars": 15}})
    try:
        line = _one_line(await live.cli("serve", env={"SESSION_AUDIT_ADMIN_PASSWORD": "p" * 14}))
        assert "SESSION_AUDIT_ADMIN_PASSWORD must have at least 15 characters" in line
        short = await live.cli("adduser", "carol", "--password-stdin", stdin="x" * 14 + "\n")
        assert short.returncode == 2 and "at least 15 characters" in short.stderr
        ok = await live.cli("adduser", "carol", "--password-stdin", stdin="x" * 15 + "\n")
        assert ok.returncode == 0, ok.stderr
        short = await live.cli("passwd", "carol", "--password-stdin", stdin="y" * 14 + "\n")
        assert short.returncode == 2 and "at least 15 characters" in short.stderr
    finally:
        live.close()

    live = Live(tmp_path / "b", {"auth": {"min_password_chars": 40}})
    live.env = {"SESSION_AUDIT_ADMIN_PASSWORD": ""}  # the first start generates one
    try:
        await live.start()
        initial = (live.data_dir / "initial_admin_password").read_text().strip()
        assert len(initial) >= 40
        async with aiohttp.ClientSession() as http, http.post(live.base + "/token", json={
                "username": "admin", "password": initial}) as r:
            assert r.status == 200
        assert await live.stop() == 0
    finally:
        live.close()

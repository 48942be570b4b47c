"""The real server and the command line in the environments deployments
give them: locales that are not UTF-8, paths whose names are not UTF-8,
closed standard streams. Real processes; each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from live_server import ADMIN_PASSWORD, SERVER, Live, server_env
from waiting import wait_for

# A directory name in Latin-1 (a legacy name on a UTF-8 system): its bytes are
# no UTF-8, so Python holds it as text with a lone surrogate (surrogateescape).
LATIN1_NAME = os.fsdecode(b"caf\xe9")


async def _session(live: Live) -> tuple[dict[str, str], str]:
    """Log in as admin: the headers to send and the session id."""
    async with aiohttp.ClientSession(live.base) as http, http.post(
            "/token", json={"username": "admin", "password": ADMIN_PASSWORD}) as r:
        body = await r.json()
        assert r.status == 200, body
    return {"Authorization": f"Bearer {body['access_token']}"}, body["session_id"]


async def _call(live: Live, method: str, path: str, headers: dict[str, str],
                body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(live.base) as http, http.request(
            method, path, json=body, headers=headers) as r:
        return r.status, await r.json()


async def _status(live: Live) -> dict[str, Any]:
    r = await live.cli("status")
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


async def test_a_data_directory_whose_name_is_not_utf8_flushes_and_is_verified(
    tmp_path: Path,
) -> None:
    """A data directory under a directory named in Latin-1: the flusher
    crashed on every part it stored (the sink's path went into the spool as
    text: "surrogates not allowed"), so no session ever reached the sink,
    and ``status`` and ``verify`` died with a traceback (the read-only URI
    of the spool and the sink quoted the path as UTF-8 text). Now the
    path's bytes are quoted, and the sink's place is kept as text with the
    bytes that are not UTF-8 shown as \\xNN."""
    workdir = tmp_path / LATIN1_NAME
    workdir.mkdir()
    live = Live(workdir, {"server": {"data_dir": "data"}})  # relative to the cwd
    try:
        await live.start()
        headers, _ = await _session(live)
        status, _ = await _call(live, "POST", "/logout", headers)
        assert status == 200

        async def stored() -> bool:
            now = await _status(live)
            return now["active_sessions"] == 0 and now["pending_parts"] == 0

        await wait_for(stored, timeout=60, interval=0.2,
                       message="the session's part stored in the sink")
        assert (await _status(live))["sink"]["where"] == (
            str(tmp_path) + "/caf\\xe9/data/audit.db")
        r = await live.cli("verify")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verified 1 sessions, 1 parts" in r.stdout, r.stdout
        assert "Traceback" not in live.log_tail(100_000)
    finally:
        live.close()


# A locale that is not UTF-8: Python then names files in ASCII (or Latin-1...).
ASCII_LOCALE = {"LC_ALL": "C", "PYTHONUTF8": "0", "LANG": "C"}


async def test_a_non_ascii_data_dir_is_one_directory_whatever_the_locale(
    tmp_path: Path,
) -> None:
    """``data_dir = "données"`` (TOML is UTF-8) under a locale that is not
    UTF-8: every command died with a UnicodeEncodeError traceback as the
    path was resolved (Python encodes file names in the locale's encoding).
    It is now the directory named by the text's UTF-8 bytes under any
    locale: adduser under LC_ALL=C adds to the spool that users under
    UTF-8 reads."""
    live = Live(tmp_path, {"server": {"data_dir": "données d'audit"}})
    r = await live.cli("adduser", "bob", "--password-stdin", stdin="a-password-1\n",
                       env=ASCII_LOCALE)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "données d'audit" / "spool.db").is_file()
    r = await live.cli("users", env={"LC_ALL": "C.UTF-8"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("bob\tuser\tenabled"), r.stdout
    r = await live.cli("status", env=ASCII_LOCALE)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pending_parts"] == 0


async def test_verify_reports_a_non_ascii_session_id_under_an_ascii_locale(
    tmp_path: Path,
) -> None:
    """What verify reports of a sink is anyone's text (a session id another
    writer put there). Under a locale that is not UTF-8 an ``ë`` in it made
    verify die with a UnicodeEncodeError traceback at the first line of its
    report, the rest of it lost; it is escaped now."""
    live = Live(tmp_path, {"server": {"data_dir": "data"}, "sink": {"type": "jsonl"}})
    (tmp_path / "data" / "audit-jsonl").mkdir(parents=True)
    part = {"type": "session_part", "_id": "sëssion:0", "session_id": "sëssion", "part": 0,
            "final": True, "session_start_time": "2026-01-01T00:00:00.000Z", "events": []}
    (tmp_path / "data" / "audit-jsonl" / "audit-2026-01-01.jsonl").write_text(
        json.dumps(part) + "\n", encoding="utf-8")
    r = await live.cli("verify", env=ASCII_LOCALE)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("s\\xebssion: bad_part: part 0:"), lines
    assert lines[-1].startswith("verified 1 sessions, 1 parts, 0 events"), lines


async def test_log_lines_stay_json_under_an_ascii_locale(tmp_path: Path) -> None:
    """The log is one JSON object per line. Under a locale that is not UTF-8
    stderr's encoder wrote a character it lacks as ``\\xfc``, which is no
    JSON escape: the access log line of a request for ``/documents/ü☃`` was
    no JSON to a log shipper. Such a stream now gets ``\\u00fc``."""
    live = Live(tmp_path)
    live.env = {**ASCII_LOCALE, "SESSION_AUDIT_LOG_LEVEL": "INFO"}
    try:
        await live.start()
        async with aiohttp.ClientSession(live.base) as http, http.get(
                "/documents/%C3%BC%E2%98%83") as r:
            assert r.status == 401
        assert await live.stop() == 0
    finally:
        live.close()
    lines = [line for line in live.log_path.read_text("utf-8").splitlines()
             if not line.startswith("--- start")]
    records = [json.loads(line) for line in lines]
    assert any('"GET /documents/ü☃"' in rec["msg"] for rec in records), lines


# Keys with a character past ASCII: the variables' bytes are UTF-8.
KEYS = {"SESSION_AUDIT_AUDIT_KEY": "schlüssel-für-die-audit-kette-0123456789",
        "SESSION_AUDIT_JWT_SECRET": "schlüssel-für-die-tokens-0123456789abcdef"}


async def test_keys_from_the_environment_are_their_bytes_whatever_the_locale(
    tmp_path: Path,
) -> None:
    """SESSION_AUDIT_AUDIT_KEY and SESSION_AUDIT_JWT_SECRET are used as their
    UTF-8 bytes (API.md). They were decoded in the locale's encoding and
    encoded again as UTF-8: under LC_ALL=C PYTHONUTF8=0 a key with a 'ü'
    was refused ("is not UTF-8 text": the server did not start), and under
    a Latin-1 locale it became other bytes (verify there said "the audit key
    is not the one the server's spool uses"). Now the server under one
    locale and verify under another use the same key."""
    live = Live(tmp_path)
    live.env = {**ASCII_LOCALE, **KEYS}
    try:
        await live.start()
        headers, _ = await _session(live)
        assert (await _call(live, "GET", "/me", headers))[0] == 200
        assert (await _call(live, "POST", "/logout", headers))[0] == 200
        assert await live.stop() == 0
    finally:
        live.close()
    r = await live.cli("verify", env={**KEYS, "LC_ALL": "C.UTF-8"})
    assert r.returncode == 0, r.stdout + r.stderr
    # (The spool's record of its key is checked first: another key is refused.)
    assert r.stdout.rstrip().endswith(": OK"), r.stdout


async def test_passwords_given_as_utf8_log_in_whatever_the_locale(tmp_path: Path) -> None:
    """SESSION_AUDIT_ADMIN_PASSWORD and ``adduser --password-stdin`` read
    the password in the locale's encoding: under LC_ALL=C PYTHONUTF8=0 a
    'pässwort' in UTF-8 was refused ("is not UTF-8 text": no start, no
    user), and under a Latin-1 locale it became 'pÃ¤sswort', a password no
    login could give. Their bytes are now read as UTF-8 when they are."""
    password = "pässwort-für-admin"
    live = Live(tmp_path)
    live.env = {**ASCII_LOCALE, "SESSION_AUDIT_ADMIN_PASSWORD": password}
    r = await live.cli("adduser", "bob", "--password-stdin", stdin="pässwort-für-bob\n",
                       env=ASCII_LOCALE)
    assert r.returncode == 0, r.stderr
    try:
        await live.start()
        async with aiohttp.ClientSession(live.base) as http:
            for user, given in (("admin", password), ("bob", "pässwort-für-bob")):
                async with http.post("/token", json={"username": user,
                                                     "password": given}) as resp:
                    assert resp.status == 200, (user, await resp.json())
    finally:
        live.close()


@pytest.mark.parametrize("args", [("adduser", "bob", "--password-stdin"), ("adduser", "bob"),
                                  ("passwd", "admin", "--password-stdin")])
async def test_a_password_command_with_stdin_closed_says_so(
    live: Live, args: tuple[str, ...],
) -> None:
    """adduser and passwd started with standard input closed (``0<&-``, a
    service manager's job with no stdin) died with an AttributeError
    traceback ('NoneType' object has no attribute 'readline'); they say
    why in one line now, and change nothing."""
    await live.start()
    assert await live.stop() == 0
    r = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(SERVER), args[0], "--config", str(live.config_path), *args[1:]],
        cwd=live.workdir, env=server_env(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=60, preexec_fn=lambda: os.close(0))
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"{args[0]}: standard input is closed: give the password on it with"
                        " --password-stdin\n")
    assert "bob" not in (await live.cli("users")).stdout


def _close_standard_descriptors() -> None:
    for fd in (0, 1, 2):
        os.close(fd)


async def test_a_server_started_without_standard_descriptors_stops_cleanly(
    tmp_path: Path,
) -> None:
    """``serve 0<&- 1>&- 2>&-``: the files opened first took descriptors 0-2,
    among them uvloop's epoll descriptor, which libuv will not close
    (an assertion): the server served, recorded and stopped, then died of
    SIGABRT (exit -6, a core dump) at every SIGTERM. They are /dev/null now."""
    live = Live(tmp_path)
    live.preexec_fn = _close_standard_descriptors
    try:
        await live.start()
        assert live.proc is not None
        held = {fd: os.readlink(f"/proc/{live.proc.pid}/fd/{fd}") for fd in (0, 1, 2)}
        headers, _ = await _session(live)
        assert (await _call(live, "POST", "/logout", headers))[0] == 200
        assert await live.stop() == 0
    finally:
        live.close()
    assert held == dict.fromkeys((0, 1, 2), os.devnull), held
    assert (await _status(live))["active_sessions"] == 0


@pytest.fixture(scope="module")
def latin1_locale(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a Latin-1 locale, made for the test (localedef)."""
    if shutil.which("localedef") is None:
        pytest.skip("no localedef here to make a Latin-1 locale with")
    where = tmp_path_factory.mktemp("locale")
    made = subprocess.run(["localedef", "-i", "de_DE", "-f", "ISO-8859-1",
                           str(where / "de_DE.ISO-8859-1")], capture_output=True, check=False)
    env = {"LOCPATH": str(where), "LC_ALL": "de_DE.ISO-8859-1", "PYTHONUTF8": "0"}
    probe = subprocess.run([sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"],
                           capture_output=True, text=True, env={**os.environ, **env}, check=False)
    if made.returncode != 0 or probe.stdout.strip() != "iso8859-1":
        pytest.skip("no Latin-1 locale can be made here (localedef)")
    return env


async def test_the_sink_is_one_place_under_a_latin1_locale(
        tmp_path: Path, latin1_locale: dict[str, str]) -> None:
    # data_dir = "données" names one directory under any locale (its UTF-8
    # bytes); the sink's place as text was those bytes read in the locale's
    # encoding: under Latin-1, ".../donnÃ©es/audit.db". A server started there
    # said "the sink changed from sqlite (.../données/audit.db) to sqlite
    # (.../donnÃ©es/audit.db)", and status took the server's sink for another.
    live = Live(tmp_path, {"server": {"data_dir": "données"}})
    try:
        await live.start()
        assert await live.stop() == 0
        r = await live.cli("status", env=latin1_locale)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert "last_server_sink" not in out, out
        assert out["sink"]["where"] == f"{tmp_path}/données/audit.db"
    finally:
        live.close()

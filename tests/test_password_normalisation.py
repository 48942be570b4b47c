"""Passwords are NFKC-normalised when set and when checked (NIST SP 800-63B
5.1.1.2): a password set as NFD ('café' as macOS types it) logs in typed as
NFC, and the reverse. A hash made before (of the text as given) still logs
in: a password that is not NFKC and fails is tried as given too, for an
unknown user as for a known one. ``auth.min_password_chars`` counts the
normalised text, so a password's NFC and NFD forms pass or fail it alike.

Real bcrypt (4 rounds), real spool files, the app over loopback HTTP, the
command line through ``server.main``.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import unicodedata
from pathlib import Path

import bcrypt
import pytest
from api_fixtures import NFC, NFD, Api, MakeApi, api, expect_error, legacy_hash, make_api

import server
from audit.spool import connect
from handlers.auth import change_user_sync, check_password

__all__ = ["api", "make_api"]

async def status(api: Api, username: str, password: str) -> int:
    resp = await api.client.post("/token", json={"username": username, "password": password})
    await resp.read()
    return resp.status


async def test_a_password_logs_in_typed_as_nfc_or_as_nfd(make_api: MakeApi,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert NFC != NFD and len(NFD) > len(NFC)
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, NFD)  # the first admin's, as NFD
    api = await make_api()
    await api.add_user("set-nfc", password=NFC)
    await api.add_user("set-nfd", password=NFD)
    for name in ("set-nfc", "set-nfd", "admin"):
        for typed in (NFC, NFD):
            assert await status(api, name, typed) == 200, (name, typed)
        resp = await api.client.post("/token", json={"username": name,
                                                     "password": NFC + "x"})
        await expect_error(resp, 401, "invalid_credentials")
    # A compatibility form too (NFKC, not only NFC): the ligature U+FB01 is 'fi'.
    await api.add_user("ligature", password="\ufb01ne-password")
    assert await status(api, "ligature", "fine-password") == 200


async def test_a_hash_of_a_password_as_given_before_normalising_still_logs_in(api: Api) -> None:
    """Accounts made before: their hash is of the raw text. Each logs in
    with the password typed as it was set; a wrong one still fails."""
    conn = connect(api.config.spool_path, "normal")
    try:
        for name, raw in (("old-nfd", NFD), ("old-ligature", "\ufb01ne-password")):
            await api.add_user(name)
            assert change_user_sync(conn, name, password_hash=legacy_hash(raw))
    finally:
        conn.close()
    assert await status(api, "old-nfd", NFD) == 200
    assert await status(api, "old-ligature", "\ufb01ne-password") == 200
    for name, wrong in (("old-nfd", NFD + "\u0301"), ("old-nfd", "wrong-password"),
                        ("old-ligature", "\ufb01ne-passwor"), ("old-ligature", "fine-passwor")):
        resp = await api.client.post("/token", json={"username": name, "password": wrong})
        await expect_error(resp, 401, "invalid_credentials")


def _stored_hash(tmp_path: Path, user: str) -> str:
    """``user``'s password hash as the spool holds it."""
    conn = sqlite3.connect(tmp_path / "data" / "spool.db")
    try:
        (stored,) = conn.execute(
            "SELECT password_hash FROM users WHERE username = ?", (user,)).fetchone()
    finally:
        conn.close()
    return str(stored)


async def test_an_unknown_user_costs_the_checks_a_known_users_wrong_password_does(
    api: Api, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A password that is not NFKC is checked twice when the first check
    fails (normalised, then as given): for an unknown name as well, so
    that the number of hashes (and so the time) does not tell which names
    exist. Counted, not timed."""
    await api.add_user("alice")
    checks: list[bytes] = []
    check = bcrypt.checkpw

    def counted(password: bytes, hashed: bytes) -> bool:
        checks.append(hashed)
        return check(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counted)
    for password, expected in ((NFD, 2), ("a-wrong-password", 1)):
        for name in ("alice", "no-such-user", "not a valid name"):
            checks.clear()
            resp = await api.client.post("/token", json={"username": name, "password": password})
            await expect_error(resp, 401, "invalid_credentials")
            assert len(checks) == expected, (name, password, checks)


def test_min_password_chars_counts_the_normalised_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NFD 'café' has one code point more than NFC 'café': counted as given,
    a password one character short of ``auth.min_password_chars`` was taken
    typed as NFD and refused typed as NFC. Both forms now pass or fail alike,
    for adduser, passwd and ``SESSION_AUDIT_ADMIN_PASSWORD``; what they take
    is hashed normalised (the other form checks against it)."""
    root = logging.getLogger()  # server.main sets up logging: put it back after
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[auth]\nbcrypt_rounds = 4\n'
                      'min_password_chars = 10\n', encoding="utf-8")
    short = unicodedata.normalize("NFC", "café-café")  # 9 characters
    enough = short + "!"  # 10
    nfd = unicodedata.normalize("NFD", short)
    assert len(nfd) == 11 and len(short) == 9

    def cli(*argv: str, stdin: str) -> tuple[int, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin + "\n"))
        capsys.readouterr()
        code = server.main([*argv, "--password-stdin", "--config", str(config)])
        return code, capsys.readouterr().err

    for typed in (short, nfd):
        code, err = cli("adduser", "carol", stdin=typed)
        assert code == 2 and "at least 10 characters" in err, (typed, err)
        monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, typed)
        with pytest.raises(server.StartupError, match="at least 10 characters"):
            server.admin_password_from_env(10)
    code, err = cli("adduser", "carol", stdin=unicodedata.normalize("NFD", enough))
    assert code == 0, err
    code, err = cli("passwd", "carol", stdin=nfd)
    assert code == 2 and "at least 10 characters" in err, err
    stored = _stored_hash(tmp_path, "carol")
    assert check_password(enough, stored)  # set as NFD, checked as NFC
    code, err = cli("passwd", "carol", stdin=enough + "x")
    assert code == 0, err
    stored = _stored_hash(tmp_path, "carol")
    assert check_password(unicodedata.normalize("NFD", enough + "x"), stored)
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, unicodedata.normalize("NFD", enough))
    assert server.admin_password_from_env(10) is not None

"""Accounts changed beside the running server: a new password or a disabled
user ends that user's open sessions (and no one else's), a disabled user
cannot log in, and a login checked against a password changed meanwhile is
refused. Real spool files; the command line's changes go through a
connection of their own, as ``server.py passwd`` / ``disable`` make them.

The server's own check runs every second beside these tests; the tests call
it too, so they assert what became of sessions, not which call ended them.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import USER_PASSWORD, Api, Login, MakeApi, api, expect_error, make_api, wait_for
from test_config_effects import _hold_writer

import server
from audit.spool import connect
from audit.store import Writer
from handlers.auth import (
    Accounts,
    LastAdmin,
    UserExists,
    add_user_sync,
    change_user_sync,
    check_password,
    hash_password,
    os_user,
)
from handlers.keys import ACCOUNTS

__all__ = ["api", "make_api"]


def cli_change(api: Api, name: str, **change: Any) -> bool:
    """What the command line does: its own connection to the spool file."""
    conn = connect(api.config.spool_path, "normal")
    try:
        return change_user_sync(conn, name, **change)
    finally:
        conn.close()


def accounts(api: Api) -> Accounts:
    return api.app[ACCOUNTS]


async def status_of(api: Api, who: Login) -> int:
    resp = await api.client.get("/me", headers=who.headers)
    return resp.status


async def revoked(api: Api) -> None:
    """One pass of the server's check, now (not within the next second)."""
    await accounts(api).end_revoked_sessions()


async def end_event(api: Api, session_id: str) -> dict[str, Any]:
    events = await api.events(session_id)
    assert events[-1]["action"] == "session.end", [e["action"] for e in events]
    return events[-1]


async def test_a_new_password_ends_the_users_sessions_and_only_theirs(api: Api) -> None:
    alice = await api.user("alice")
    alice_too = await api.login("alice")
    bob = await api.user("bob")
    assert cli_change(api, "alice", password_hash=hash_password("a-new-password-1", 4))

    await revoked(api)
    for old in (alice, alice_too):
        resp = await api.client.get("/me", headers=old.headers)
        await expect_error(resp, 401, "session_ended")
        end = await end_event(api, old.session_id)
        assert end["details"] == {"reason": "logout", "cause": "password_changed"}
    assert await status_of(api, bob) == 200  # the wrong user's change is not bob's
    bob_events = await api.actions(bob.session_id)
    assert "session.end" not in bob_events

    # The old password is refused; a session with the new one stays open.
    resp = await api.client.post("/token", json={"username": "alice",
                                                 "password": USER_PASSWORD})
    await expect_error(resp, 401, "invalid_credentials")
    fresh = await api.login("alice", "a-new-password-1")
    await revoked(api)
    assert await status_of(api, fresh) == 200
    assert await api.engine.spool.read(
        lambda c: c.execute("SELECT COUNT(*) FROM revocations").fetchone()[0]) == 0


async def test_the_server_notices_a_change_by_itself(api: Api) -> None:
    alice = await api.user("alice")
    assert cli_change(api, "alice", password_hash=hash_password("a-new-password-1", 4))

    async def ended() -> bool:
        return await status_of(api, alice) == 401

    await wait_for(ended, timeout=15, message="the background check to end the session")
    assert (await end_event(api, alice.session_id))["details"]["cause"] == "password_changed"


async def test_a_disabled_user_cannot_log_in_until_enabled(api: Api) -> None:
    alice = await api.user("alice")
    bob = await api.user("bob")
    assert cli_change(api, "alice", disabled=True)
    await revoked(api)
    assert (await end_event(api, alice.session_id))["details"] == {
        "reason": "logout", "cause": "user_disabled"}
    assert await status_of(api, bob) == 200

    # The right password gets the answer of a wrong one; the records say which.
    for password in (USER_PASSWORD, "not-the-password"):
        resp = await api.client.post("/token", json={"username": "alice",
                                                     "password": password})
        await expect_error(resp, 401, "invalid_credentials")
    failed = await api.wait_security("auth.login_failed", 2)
    assert [e["details"]["reason"] for e in failed] == ["user_disabled", "invalid_credentials"]
    assert all(e["details"]["username"] == "alice" for e in failed)

    assert cli_change(api, "alice", disabled=False)
    again = await api.login("alice")
    await revoked(api)
    assert await status_of(api, again) == 200


async def test_disabled_then_enabled_before_the_check_still_ends_as_disabled(
        api: Api) -> None:
    alice = await api.user("alice")
    assert cli_change(api, "alice", disabled=True)
    assert cli_change(api, "alice", disabled=False)  # revokes nothing, undoes nothing
    await revoked(api)
    assert (await end_event(api, alice.session_id))["details"]["cause"] == "user_disabled"
    await api.login("alice")


async def test_a_revocation_that_fails_is_tried_again(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = await api.user("alice")
    real_seal = Writer.seal
    failures = [sqlite3.OperationalError("disk I/O error")]

    def seal_failing_once(self: Writer, *args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real_seal(self, *args, **kwargs)

    monkeypatch.setattr(Writer, "seal", seal_failing_once)
    assert cli_change(api, "alice", disabled=True)
    await revoked(api)  # this pass, or the server's own before it, fails to seal
    assert not failures
    await revoked(api)  # the revocation stayed: it is ended by now
    assert (await end_event(api, alice.session_id))["details"]["cause"] == "user_disabled"
    resp = await api.client.get("/me", headers=alice.headers)
    await expect_error(resp, 401, "session_ended")


async def test_a_change_during_the_password_check_refuses_the_login(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The password is checked (bcrypt, a while) against the hash read before;
    a passwd or disable committed meanwhile must not let the login through."""
    await api.add_user("alice")
    await api.add_user("bob")
    real_check = Accounts._hash_check
    change: dict[str, Any] = {}

    async def check_then_change(self: Accounts, password: str, stored: str) -> bool:
        ok = await real_check(self, password, stored)
        if change:
            assert cli_change(api, **change)
            change.clear()
        return ok

    monkeypatch.setattr(Accounts, "_hash_check", check_then_change)
    for name, what in (("alice", {"password_hash": hash_password("a-new-password-1", 4)}),
                       ("bob", {"disabled": True})):
        change.update(name=name, **what)
        resp = await api.client.post("/token", json={"username": name,
                                                     "password": USER_PASSWORD})
        await expect_error(resp, 401, "invalid_credentials")
        assert not change  # the change ran inside the check
    failed = await api.wait_security("auth.login_failed", 2)
    assert [(e["details"]["username"], e["details"]["reason"]) for e in failed] == [
        ("alice", "account_changed"), ("bob", "account_changed")]
    sessions = await api.engine.spool.read(
        lambda c: c.execute("SELECT COUNT(*) FROM sessions WHERE user IN ('alice', 'bob')")
        .fetchone()[0])
    assert sessions == 0  # nothing was started, nothing recorded in a session


async def test_the_last_enabled_admin_cannot_be_disabled(api: Api) -> None:
    admin = await api.admin()
    with pytest.raises(LastAdmin):
        cli_change(api, "admin", disabled=True)
    await revoked(api)
    assert await status_of(api, admin) == 200
    await api.add_user("root2", role="admin")
    assert cli_change(api, "admin", disabled=True)
    with pytest.raises(LastAdmin):  # root2 is now the only enabled one
        cli_change(api, "root2", disabled=True)
    assert cli_change(api, "root2", password_hash=hash_password("a-new-password-1", 4))
    assert not cli_change(api, "nobody", disabled=True)


async def test_adduser_refuses_a_name_alike_in_case_and_changes_nothing(api: Api) -> None:
    """What ``server.py adduser`` does: ``Carol`` beside ``carol`` is refused
    naming the existing user, the transaction is rolled back (the connection
    is usable and nothing was added), and a new name is added with its role
    and a hash of its password."""
    conn = connect(api.config.spool_path, "normal")
    try:
        add_user_sync(conn, "carol", "a-password-1", "admin", 4)
        for alike in ("Carol", "carol"):
            with pytest.raises(UserExists) as refused:
                add_user_sync(conn, alike, "a-password-2", "user", 4)
            assert refused.value.existing == "carol"
            assert not conn.in_transaction
        add_user_sync(conn, "dave", "a-password-3", "user", 4)
        rows = conn.execute("SELECT username, role, password_hash FROM users"
                            " WHERE lower(username) IN ('carol', 'dave') ORDER BY username"
                            ).fetchall()
    finally:
        conn.close()
    assert [(name, role) for name, role, _ in rows] == [("carol", "admin"), ("dave", "user")]
    assert check_password("a-password-1", rows[0][2])
    assert check_password("a-password-3", rows[1][2])


async def test_a_change_made_while_the_server_was_down_applies_at_start(
    make_api: MakeApi,
) -> None:
    api = await make_api()
    alice = await api.user("alice")
    await api.client.close()  # the server stops with alice's session open
    conn = sqlite3.connect(api.config.spool_path)
    try:
        assert conn.execute("SELECT state FROM sessions WHERE session_id = ?",
                            (alice.session_id,)).fetchone() == ("open",)
    finally:
        conn.close()
    assert cli_change(api, "alice", disabled=True)
    restarted = await make_api(server={"data_dir": str(api.config.data_dir)})
    # Ended before the server serves: its token is refused at the first request.
    assert await status_of(restarted, alice) == 401

    async def ended() -> bool:
        # Its session.end committed (the writer's cache drops the session
        # while the seal's batch runs, a moment before the commit).
        return (await restarted.actions(alice.session_id))[-1] == "session.end"

    await wait_for(ended, timeout=15, message="alice's session to end at start")
    assert restarted.engine.spool.open_session(alice.session_id) is None
    assert (await end_event(restarted, alice.session_id))["details"]["cause"] == "user_disabled"


def test_passwd_and_disable_on_a_spool_of_an_earlier_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line brings a users table without ``disabled`` up to date."""
    root = logging.getLogger()  # server.main sets up logging: put it back after
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[auth]\nbcrypt_rounds = 4\n')
    (tmp_path / "data").mkdir()
    conn = sqlite3.connect(tmp_path / "data" / "spool.db")
    conn.executescript(
        "CREATE TABLE users (username TEXT PRIMARY KEY, password_hash TEXT NOT NULL,"
        " role TEXT NOT NULL, created_at TEXT NOT NULL);"
        "INSERT INTO users VALUES ('alice', 'h', 'user', '2026-11-26T00:00:00.000Z');"
    )
    conn.commit()
    conn.close()
    monkeypatch.setattr("sys.stdin", io.StringIO("a-new-password-1\n"))
    assert server.main(["passwd", "alice", "--password-stdin", "--config", str(config)]) == 0
    assert server.main(["disable", "alice", "--config", str(config)]) == 0
    assert server.main(["users", "--config", str(config)]) == 0
    assert "alice\tuser\tdisabled" in capsys.readouterr().out
    conn = sqlite3.connect(tmp_path / "data" / "spool.db")
    try:
        hashed, disabled = conn.execute(
            "SELECT password_hash, disabled FROM users WHERE username = 'alice'").fetchone()
    finally:
        conn.close()
    assert hashed.startswith("bcrypt-sha256$") and disabled == 1


async def user_events(api: Api, admin: Login, kind: str | None = None, *,
                      first_start: bool = False) -> list[dict[str, Any]]:
    """The changes of accounts an admin reads at GET /audit/security-events;
    without the admin a first start made unless ``first_start``."""
    params = {"limit": "500", **({"kind": kind} if kind else {})}
    resp = await api.client.get("/audit/security-events", params=params,
                                headers=admin.headers)
    body = await resp.json()
    assert resp.status == 200, body
    return [e for e in body["events"] if e["action"].startswith("user.")
            and (first_start or e["actor"]["role"] != "server")]


async def test_changes_of_accounts_are_security_events_recorded_once(api: Api) -> None:
    """adduser, passwd, disable, enable beside the server each become one
    security event (no password in it); the
    change and its record commit together, the server records each once."""
    with pytest.raises(LastAdmin):  # refused: nothing changed, nothing recorded
        cli_change(api, "admin", disabled=True)
    conn = connect(api.config.spool_path, "normal")
    try:
        add_user_sync(conn, "carol", "carols-secret-password", "admin", 4)
    finally:
        conn.close()
    carol = await api.login("carol", "carols-secret-password")
    new_hash = hash_password("carols-next-password", 4)
    assert cli_change(api, "carol", password_hash=new_hash)
    assert cli_change(api, "carol", disabled=True)
    assert cli_change(api, "carol", disabled=True)  # already disabled: no second record
    assert cli_change(api, "carol", disabled=False)
    assert cli_change(api, "carol", disabled=False)  # already enabled: likewise
    assert not cli_change(api, "nobody", disabled=True)  # no change: nothing recorded
    await accounts(api).record_account_changes()
    assert await accounts(api).record_account_changes() == 0  # each once
    assert await api.engine.spool.read(
        lambda c: c.execute("SELECT COUNT(*) FROM account_changes").fetchone()[0]) == 0

    admin = await api.admin()
    events = await user_events(api, admin, first_start=True)
    assert sorted((e["action"], e["target"]["id"]) for e in events) == [
        ("user.create", "admin"), ("user.create", "carol"), ("user.disable", "carol"),
        ("user.enable", "carol"), ("user.password_change", "carol")]
    me = os_user()
    for e in events:
        assert (e["outcome"], e["session_id"], e["seq"], e["request_id"]) == (
            "success", None, None, None)
        assert e["target"]["type"] == "user"
        # The admin a first start made: by the account the server ran as.
        first = e["target"]["id"] == "admin"
        assert e["actor"] == {"user": me, "role": "server" if first else "cli"}
        assert e["details"]["changed_at"].endswith("Z")
    by = {e["action"]: e["details"] for e in events if e["target"]["id"] == "carol"}
    assert by["user.create"]["role"] == "admin"
    first_start = [e["details"] for e in events if e["target"]["id"] == "admin"]
    assert [{k: v for k, v in d.items() if k != "changed_at"} for d in first_start] == [
        {"role": "admin", "first_start": True}]
    assert by["user.password_change"]["sessions_revoked"] == 1  # carol's session
    # kind= takes the new actions
    assert [e["action"] for e in await user_events(api, admin, "user.enable")] == ["user.enable"]
    # Nothing of a password anywhere: not in the records, not in the spool's rows.
    text = json.dumps(events)
    for secret in ("carols-secret-password", "carols-next-password", new_hash, "bcrypt"):
        assert secret not in text
    await revoked(api)
    assert await status_of(api, carol) == 401


async def first_admin_recorded(api: Api) -> None:
    """Record the one change a fresh spool names: the admin its first start
    made (a test's own changes are then the only ones)."""
    assert await accounts(api).record_account_changes() == 1


async def test_passes_at_once_record_each_change_of_an_account_once(api: Api) -> None:
    """Two passes running at once (each reads the rows before the other's
    commits): a row the other took records nothing and is not counted."""
    await first_admin_recorded(api)
    await api.user("alice")
    for disabled in (True, False, True):
        assert cli_change(api, "alice", disabled=disabled)
    spool = api.engine.spool
    # The writer held until both passes read the rows: held in a commit
    # before they start (a job only queued was taken in one batch with
    # theirs, and the queue never showed their six: the CI failure of 29 Nov).
    gate, held = await _hold_writer(spool)
    passes = asyncio.gather(accounts(api).record_account_changes(),
                            accounts(api).record_account_changes())
    try:
        # (counted by kind: a loaded machine's flusher or reaper may queue
        # its own job behind the held one meanwhile)
        await wait_for(lambda: sum(getattr(job, "__qualname__", "").startswith(
            "_change_recorder.") for job, _ in spool._pending) == 6, timeout=20,
            interval=0.01, message="both passes' jobs queued")
    finally:
        gate.set()
    await held
    counts = await passes
    assert sum(counts) == 3, counts
    events = await user_events(api, await api.admin())
    assert sorted(e["action"] for e in events) == ["user.disable", "user.disable",
                                                   "user.enable"]
    assert len({e["event_id"] for e in events}) == 3


async def test_a_full_spool_still_records_a_change_of_an_account(api: Api) -> None:
    """The change happened (the command line committed it): a spool at its
    limit under on_spool_full = "reject" takes its record all the same."""
    await first_admin_recorded(api)
    await api.user("alice")
    assert cli_change(api, "alice", disabled=True)
    spool = api.engine.spool
    spool.on_full, spool.max_bytes = "reject", 1
    assert spool.full
    assert await accounts(api).record_account_changes() == 1
    assert await spool.read(lambda c: c.execute(
        "SELECT COUNT(*) FROM account_changes").fetchone()[0]) == 0


async def test_a_change_with_damaged_details_is_recorded_with_its_time(api: Api) -> None:
    """A row whose details are not JSON (damaged) is recorded all the same:
    the change happened; its details say when."""
    await first_admin_recorded(api)
    conn = connect(api.config.spool_path, "normal")
    try:
        conn.execute(
            "INSERT INTO account_changes (action, username, actor_user, actor_role,"
            " details, created_ts) VALUES ('user.disable', 'bob', 'root', 'cli', '{bad', 0)")
    finally:
        conn.close()
    assert await accounts(api).record_account_changes() == 1
    (event,) = await user_events(api, await api.admin())
    assert (event["action"], event["target"]["id"], event["details"]) == (
        "user.disable", "bob", {"changed_at": "1970-01-01T00:00:00.000Z"})


async def test_a_recording_pass_that_fails_is_logged_and_the_revocations_go_on(
        make_api: MakeApi, caplog: pytest.LogCaptureFixture) -> None:
    """The server's pass: a failure to record the changes of accounts (here
    their table gone under it) is logged, in full once, and the sessions of
    a disabled user are ended all the same."""
    api = await make_api(audit={"record_account_changes": True})
    alice = await api.user("alice")
    assert cli_change(api, "alice", disabled=True)
    conn = sqlite3.connect(api.config.spool_path)
    try:
        conn.execute("DROP TABLE account_changes")
    finally:
        conn.close()
    said = server.FailingPass(server.log, "looking for sessions")
    recorded = server.FailingPass(server.log, "recording the changes of accounts")
    with caplog.at_level(logging.WARNING, logger=server.log.name):
        await server._revocation_pass(accounts(api), said, recorded)
    (line,) = [r for r in caplog.records if "recording the changes" in r.getMessage()]
    assert line.getMessage() == "recording the changes of accounts failed" and line.exc_info
    assert "account_changes" in str(line.exc_info[1])
    assert (said.failures, recorded.failures) == (0, 1)
    assert await status_of(api, alice) == 401


@pytest.mark.parametrize("created", ["not a time", 1e300])
async def test_a_damaged_change_of_an_account_does_not_hold_up_the_others(
        api: Api, created: Any) -> None:
    """A row of account_changes that cannot be read (its time damaged) is
    left, and said; the changes after it are recorded all the same."""
    await first_admin_recorded(api)
    alice = await api.user("alice")
    conn = connect(api.config.spool_path, "normal")
    try:
        conn.execute(
            "INSERT INTO account_changes (action, username, actor_user, actor_role,"
            " details, created_ts) VALUES ('user.disable', 'bob', 'root', 'cli', '{}', ?)",
            (created,))
    finally:
        conn.close()
    assert cli_change(api, "alice", disabled=True)
    assert await accounts(api).record_account_changes() == 1
    assert await accounts(api).record_account_changes() == 0
    events = await user_events(api, await api.admin())
    assert [(e["action"], e["target"]["id"]) for e in events] == [("user.disable", "alice")]
    assert await api.engine.spool.read(lambda c: c.execute(
        "SELECT username FROM account_changes").fetchall()) == [("bob",)]
    await revoked(api)
    assert await status_of(api, alice) == 401

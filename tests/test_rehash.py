"""A successful login of a password whose hash has another bcrypt cost than
``auth.bcrypt_rounds``, or that matched only as given (a hash made before
passwords were NFKC-normalised), hashes the password anew at the configured
cost, normalised, and stores it if the hash is still the one checked. It is
not a change of password: no revocation, no ``user.password_change``, the
user's sessions stay open and parallel logins go through.

Real bcrypt (rounds 4 and 5), real spool files, the app over loopback HTTP;
the command line's changes through a connection of their own.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Any

import pytest
from api_fixtures import (
    NFC,
    NFD,
    USER_PASSWORD,
    Api,
    Login,
    MakeApi,
    api,
    legacy_hash,
    make_api,
    wait_for,
)

from audit.spool import connect
from handlers.auth import (
    AccountChanged,
    Accounts,
    Match,
    change_user_sync,
    hash_password,
    hash_rounds,
    match_password,
)
from handlers.keys import ACCOUNTS

__all__ = ["api", "make_api"]

def set_hash(api: Api, name: str, stored: str) -> None:
    """A hash left by an earlier setting or release: written as it was then,
    not as a ``passwd`` (which revokes and is recorded)."""
    conn = sqlite3.connect(api.config.spool_path)
    try:
        with conn:
            assert conn.execute("UPDATE users SET password_hash = ? WHERE username = ?",
                                (stored, name)).rowcount == 1
    finally:
        conn.close()


async def stored_hash(api: Api, name: str) -> str:
    row = await api.engine.spool.read(lambda c: c.execute(
        "SELECT password_hash FROM users WHERE username = ?", (name,)).fetchone())
    return str(row[0])


async def rehashed(api: Api, name: str, old: str) -> str:
    """The user's hash once the login's renewal has stored it."""
    async def renewed() -> str | None:
        now = await stored_hash(api, name)
        return now if now != old else None
    new: str = await wait_for(renewed, message=f"{name}'s hash renewed")
    await wait_for(lambda: not api.app[ACCOUNTS]._rehash_tasks, message="renewals done")
    return new


async def me(api: Api, who: Login) -> int:
    resp = await api.client.get("/me", headers=who.headers)
    await resp.read()
    return resp.status


async def count(api: Api, table: str) -> int:
    n: int = await api.engine.spool.read(
        lambda c: c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    return n


async def test_a_login_renews_a_hash_of_another_cost_and_changes_nothing_else(
    make_api: MakeApi,
) -> None:
    api = await make_api(audit={"record_account_changes": True})
    accounts: Accounts = api.app[ACCOUNTS]
    await accounts.prepare()
    await api.add_user("alice")
    await api.add_user("bob")  # at the server's cost: left as it is
    old = hash_password(USER_PASSWORD, 5)
    set_hash(api, "alice", old)
    bob_hash = await stored_hash(api, "bob")

    alice = await api.login("alice")
    new = await rehashed(api, "alice", old)
    assert hash_rounds(new) == 4 and match_password(USER_PASSWORD, new) == Match.NORMAL
    bob = await api.login("bob")
    await wait_for(lambda: not accounts._rehash_tasks, message="no renewal running")
    assert await stored_hash(api, "bob") == bob_hash

    # Not a change of password: the session and token work, nothing revoked.
    await accounts.end_revoked_sessions()
    assert await me(api, alice) == 200
    again = await api.login("alice")
    assert await me(api, again) == 200 and await me(api, alice) == 200
    await wait_for(lambda: not accounts._rehash_tasks, message="no renewal running")
    assert await stored_hash(api, "alice") == new  # at the cost now: not renewed again
    assert await count(api, "revocations") == 0
    assert await count(api, "account_changes") == 0
    await accounts.record_account_changes()
    # The login's records are those of any login; no account change is
    # recorded (only the admin the first start made).
    assert await api.actions(alice.session_id) == await api.actions(bob.session_id)
    assert "session.end" not in await api.actions(alice.session_id)
    assert [(e["action"], e["target"]["id"]) for e in await api.security()
            if e["action"].startswith(("user.", "auth.login"))] == [("user.create", "admin")]


async def test_a_hash_of_the_text_as_given_is_renewed_normalised(api: Api) -> None:
    """A password set as NFD before normalising logged in only typed as NFD
    (the raw-text fallback): once it has, its NFC form logs in too."""
    await api.add_user("old-nfd")
    old = legacy_hash(NFD)
    set_hash(api, "old-nfd", old)
    resp = await api.client.post("/token", json={"username": "old-nfd", "password": NFC})
    assert resp.status == 401
    first = await api.login("old-nfd", NFD)
    new = await rehashed(api, "old-nfd", old)
    assert hash_rounds(new) == 4 and match_password(NFC, new) == Match.NORMAL
    second = await api.login("old-nfd", NFC)
    assert await me(api, first) == 200 and await me(api, second) == 200
    assert await count(api, "revocations") == 0


async def test_a_passwd_between_the_check_and_the_store_wins(api: Api) -> None:
    await api.add_user("alice")
    set_hash(api, "alice", hash_password(USER_PASSWORD, 5))
    accounts: Accounts = api.app[ACCOUNTS]
    found = await accounts.verify("alice", USER_PASSWORD)
    assert found is not None and found.stale
    theirs = hash_password("a-new-password-1", 4)
    conn = connect(api.config.spool_path, "normal")
    try:
        assert change_user_sync(conn, "alice", password_hash=theirs)
    finally:
        conn.close()
    assert not await accounts.rehash(found, USER_PASSWORD)
    assert await stored_hash(api, "alice") == theirs
    # And a login checked against the old hash is still refused.
    with pytest.raises(AccountChanged):
        await api.engine.spool.submit(lambda w: accounts.unchanged(found)(w.conn))


async def test_a_parallel_login_checked_against_the_old_hash_goes_through(
    api: Api, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two logins of one user at once: the first's renewal is stored while
    the second's password is checked against the hash before it. That is not
    a change of password: the second login gets its session."""
    await api.add_user("alice")
    old = hash_password(USER_PASSWORD, 5)
    set_hash(api, "alice", old)
    real_check = Accounts._hash_check
    first: list[Login] = []
    calls = []

    async def another_login_meanwhile(self: Accounts, password: str, stored: str) -> Any:
        match = await real_check(self, password, stored)
        calls.append(stored)
        if len(calls) == 1 and stored == old:  # (the second login's check)
            first.append(await api.login("alice"))  # (the first login's: the next call)
            await rehashed(api, "alice", old)
        return match

    monkeypatch.setattr(Accounts, "_hash_check", another_login_meanwhile)
    second = await api.login("alice")
    assert first and await me(api, first[0]) == 200 and await me(api, second) == 200
    assert not await api.security("auth.login_failed")


async def test_a_renewal_that_fails_does_not_fail_the_login(
    api: Api, caplog: pytest.LogCaptureFixture,
) -> None:
    await api.add_user("alice")
    old = hash_password(USER_PASSWORD, 5)
    set_hash(api, "alice", old)
    conn = sqlite3.connect(api.config.spool_path)
    try:
        with conn:  # the spool refuses this one write (a real SQLite error)
            conn.execute("CREATE TRIGGER no_renewal BEFORE UPDATE OF password_hash ON users"
                         " BEGIN SELECT RAISE(ABORT, 'refused for the test'); END")
    finally:
        conn.close()
    accounts: Accounts = api.app[ACCOUNTS]
    caplog.set_level(logging.WARNING, "session_audit.accounts")
    logins = []
    for _ in range(2):
        logins.append(await api.login("alice"))
        await wait_for(lambda: not accounts._rehash_tasks, message="the renewal tried")
        await asyncio.sleep(0)
    said = [r for r in caplog.records if "new hash" in r.getMessage()]
    assert len(said) == 1 and "refused for the test" in said[0].getMessage()  # once a minute
    assert await stored_hash(api, "alice") == old
    for who in logins:
        assert await me(api, who) == 200
    # Once the spool takes it, the next login renews it (a failed renewal
    # leaves none running for the user).
    conn = sqlite3.connect(api.config.spool_path)
    try:
        with conn:
            conn.execute("DROP TRIGGER no_renewal")
    finally:
        conn.close()
    who = await api.login("alice")
    assert hash_rounds(await rehashed(api, "alice", old)) == 4
    assert await me(api, who) == 200


async def test_a_renewal_does_not_queue_for_a_bcrypt_slot_ahead_of_logins(api: Api) -> None:
    """A renewal is not a login: with every bcrypt slot busy it is left for a
    later login rather than queued (it held the user's plaintext meanwhile,
    and took the next free slot before the logins waiting behind it, which
    a burst after a change of ``auth.bcrypt_rounds`` turned into 429s)."""
    await api.add_user("alice")
    await api.add_user("bob")
    old = hash_password(USER_PASSWORD, 5)
    set_hash(api, "alice", old)
    accounts: Accounts = api.app[ACCOUNTS]
    await accounts.prepare()
    found = await accounts.verify("alice", USER_PASSWORD)
    assert found is not None and found.stale
    slots = accounts._slots
    held = 0
    while not slots.locked():  # every slot busy, as with other users' logins
        await slots.acquire()
        held += 1
    try:
        renewal = asyncio.create_task(accounts.rehash(found, USER_PASSWORD))
        login = asyncio.create_task(accounts.verify("bob", USER_PASSWORD))
        await wait_for(lambda: accounts._waiting == 1, message="bob's check waiting")
        for _ in range(5):
            await asyncio.sleep(0)
        assert renewal.done(), "the renewal waits for a slot ahead of a login"
        assert renewal.result() is False
    finally:
        for _ in range(held):
            slots.release()
    assert await login is not None
    assert await stored_hash(api, "alice") == old
    # A later login, with a slot free, renews it.
    who = await api.login("alice")
    assert hash_rounds(await rehashed(api, "alice", old)) == 4
    assert await me(api, who) == 200


async def test_a_renewal_lets_through_only_logins_checked_against_the_hash_it_replaced(
    api: Api,
) -> None:
    """A renewal stands for the hash it replaced, and only while its own
    hash is stored: a login checked against an older hash (a passwd came
    between), or against the renewed one after a passwd replaced the
    renewal, is refused (the old password is not let in)."""
    await api.add_user("alice")
    accounts: Accounts = api.app[ACCOUNTS]

    def passwd(stored: str) -> None:
        conn = connect(api.config.spool_path, "normal")
        try:
            assert change_user_sync(conn, "alice", password_hash=stored)
        finally:
            conn.close()

    async def goes_on(found: Any) -> bool:
        try:
            await api.engine.spool.submit(lambda w: accounts.unchanged(found)(w.conn))
        except AccountChanged:
            return False
        return True

    before = await accounts.verify("alice", USER_PASSWORD)  # checked, not yet committed
    assert before is not None
    passwd(hash_password("alices-next-password", 5))  # then a passwd (another cost)
    found = await accounts.verify("alice", "alices-next-password")
    assert found is not None and found.stale
    assert await accounts.rehash(found, "alices-next-password")
    assert await goes_on(found)  # checked against the hash the renewal replaced
    assert not await goes_on(before)  # the password before the passwd
    passwd(hash_password("alices-third-password", 4))
    assert not await goes_on(found)  # the renewal's password, replaced since

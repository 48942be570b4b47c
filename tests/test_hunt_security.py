"""Security review findings, each proved through the real app over loopback HTTP."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import bcrypt
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from api_fixtures import USER_PASSWORD, Api, MakeApi, api, api_config, expect_error, make_api
from live_server import Live

import server
from audit.spool import connect
from handlers.auth import change_user_sync
from handlers.keys import ACCOUNTS, ENGINE
from sinks.sqlite import SqliteSink

__all__ = ["api", "make_api"]


# -- token claims of the wrong type ------------------------------------------------

# Validly signed (the tests hold the key), but with claims this server never
# issues: a NumericDate must be a JSON number (RFC 7519), and ours are integers.
WRONG_TYPES: list[tuple[str, dict[str, Any]]] = [
    ("exp as a numeric string", {"exp": "+600"}),
    ("iat as a numeric string", {"iat": "+0"}),
    ("iat true", {"iat": True}),
    ("exp as a float", {"exp": 600.5}),
    ("iat a numeric string in the future", {"iat": "+3600", "exp": 7200}),
]


def _token(key: bytes, session_id: str, now: int, **claims: Any) -> str:
    good: dict[str, Any] = {"sub": "alice", "sid": session_id, "role": "user", "iat": now,
                            "exp": now + 600, "jti": "j"}
    for name, value in claims.items():
        if isinstance(value, str) and value.startswith("+"):
            value = str(now + int(value[1:]))  # a time, as a string
        elif name in ("iat", "exp") and isinstance(value, int | float) \
                and not isinstance(value, bool):
            value = now + value
        good[name] = value
    return jwt.encode(good, key, algorithm="HS256")


@pytest.mark.parametrize(("what", "claims"), WRONG_TYPES, ids=[w for w, _ in WRONG_TYPES])
async def test_a_time_claim_of_the_wrong_type_is_an_invalid_token(
    api: Api, what: str, claims: dict[str, Any]
) -> None:
    alice = await api.user("alice")
    token = _token(server.jwt_key(api.config), alice.session_id, int(time.time()), **claims)
    resp = await api.client.get("/me", headers={"Authorization": f"Bearer {token}",
                                                "X-Request-ID": "wrong-type"})
    await expect_error(resp, 401, "invalid_token")
    ev = (await api.wait_security("auth.invalid_token"))[0]
    assert ev["details"]["reason"] == "bad_claim", ev
    assert ev["request_id"] == "wrong-type"
    # The real token still works.
    resp = await api.client.get("/me", headers=alice.headers)
    assert resp.status == 200


async def test_an_expired_token_with_malformed_claims_is_invalid_not_recorded_as_them(
    api: Api,
) -> None:
    alice = await api.user("alice")
    now = int(time.time())
    token = _token(server.jwt_key(api.config), alice.session_id, now - 7200,
                   sid=["not", "a", "session"], role=5)
    resp = await api.client.get("/me", headers={"Authorization": f"Bearer {token}"})
    await expect_error(resp, 401, "invalid_token")
    ev = (await api.wait_security("auth.invalid_token"))[0]
    assert ev["details"]["reason"] == "bad_claim"
    # Not an auth.token_expired naming a list as its session and 5 as a role.
    assert await api.security("auth.token_expired") == []
    assert ev["session_id"] is None and ev["actor"] == {"user": None, "role": None}


# -- login timing after a change of auth.bcrypt_rounds ------------------------------


async def test_an_unknown_name_costs_what_the_users_hashes_cost_after_a_rounds_change(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hash keeps the cost it was made with: after ``bcrypt_rounds`` went
    from 12 to 13 (or 14), every existing user's check took half (a quarter)
    of an unknown name's, which was checked against a dummy hash of the new
    cost: which names exist could be told apart by the answer's time. Proved
    by the cost of the hash bcrypt is asked to check, not by timing it."""
    first = await make_api()
    for name in ("alice", "bob"):
        await first.add_user(name)  # (the tests' cost: 4)
    await first.client.close()
    costs: list[bytes] = []
    check = bcrypt.checkpw

    def checked(password: bytes, hashed: bytes) -> bool:
        costs.append(hashed[:7])  # "$2b$04$"
        return check(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", checked)
    config = api_config(Path(first.config.base_dir), auth={"bcrypt_rounds": 5})
    async with TestClient(TestServer(server.create_app(config))) as client:
        for name in ("alice", "no-such-user", "Alice", "not a valid name"):
            costs.clear()
            resp = await client.post("/token", json={"username": name,
                                                     "password": "a-wrong-password"})
            await expect_error(resp, 401, "invalid_credentials")
            assert costs == [b"$2b$04$"], (name, costs)
        # A new password is hashed at the configured cost, and logins work.
        await client.app[ACCOUNTS].create("carol", USER_PASSWORD, "user")
        costs.clear()
        resp = await client.post("/token", json={"username": "carol",
                                                 "password": USER_PASSWORD})
        assert resp.status == 200 and costs == [b"$2b$05$"]


# -- verify's report on a terminal ---------------------------------------------------


async def test_verify_shows_what_a_sink_holds_without_terminal_controls(tmp_path: Path) -> None:
    """Whoever can write to the sink (whom verify is there to catch) chose
    the text of verify's report: a session id is printed as stored. One
    with terminal controls moved the cursor up over its own line, printed a
    made-up "...: OK" summary and hid the rest of the output, the true
    summary included (conceal, ESC [8m), from the operator reading it."""
    live = Live(tmp_path)
    sink = SqliteSink(live.data_dir / "audit.db")
    await sink.open()
    await sink.close()
    fake = "\x1b[1A\x1b[2K\rverified 3 sessions, 3 parts, 9 events: OK\x1b[8m\u202e"
    doc = {"_id": f"{fake}:0", "session_id": fake, "part": 0, "final": True, "events": []}
    with contextlib.closing(sqlite3.connect(live.data_dir / "audit.db")) as conn, conn:
        conn.execute("INSERT INTO parts (id, session_id, part, user, session_start_time,"
                     " final, hash, doc) VALUES (?, ?, 0, 'alice', '2026-11-27T16:00:00.000Z',"
                     " 1, 'x', ?)", (f"{fake}:0", fake, json.dumps(doc)))
    done = await live.cli("verify")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].endswith(": 7 problems"), done.stdout
    for line in lines:
        assert line.isprintable(), repr(line)
    assert "\\x1b[1A\\x1b[2K\\x0dverified 3 sessions" in lines[0], lines[0]
    assert "\\u202e" in lines[0]


# -- a user disabled (or given a new password) while the server was down -------------


@pytest.mark.parametrize("change", [{"disabled": True}, {"password_hash": "bcrypt-sha256$x"}],
                         ids=["disable", "passwd"])
async def test_sessions_revoked_while_the_server_was_down_end_before_it_serves(
    make_api: MakeApi, change: dict[str, Any],
) -> None:
    """``disable`` and ``passwd`` say the user's sessions end "when the server
    starts, if it is not running". They ended in a task started with the
    server, racing its first requests: a disabled user's token, held from
    before the restart, still read (and could change) documents right after
    the start (2 runs in 3 here). Checked when the server is about to serve,
    then with a real request."""
    api = await make_api()
    alice = await api.user("alice")
    doc = await api.create_doc(alice)
    await api.client.close()  # the server stops with alice's session open
    conn = connect(api.config.spool_path, "normal")
    try:
        assert change_user_sync(conn, "alice", **change)  # what the command does
    finally:
        conn.close()
    at_start: list[object] = []

    def setup(app: web.Application) -> None:
        async def serving(app: web.Application) -> None:  # (after every cleanup_ctx)
            at_start.append(app[ENGINE].session(alice.session_id))
        app.on_startup.append(serving)

    restarted = await make_api(setup=setup, server={"data_dir": str(api.config.data_dir)})
    assert at_start == [None]
    resp = await restarted.client.get(f"/documents/{doc['id']}", headers=alice.headers)
    await expect_error(resp, 401, "session_ended")
    cause = "user_disabled" if "disabled" in change else "password_changed"
    end = (await restarted.events(alice.session_id))[-1]
    assert end["action"] == "session.end" and end["details"]["cause"] == cause

"""Security review findings, each proved through the real app over loopback HTTP."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import bcrypt
import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from api_fixtures import USER_PASSWORD, Api, MakeApi, api, api_config, expect_error, make_api

import server
from handlers.keys import ACCOUNTS

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

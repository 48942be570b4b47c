"""Security review findings, each proved through the real app over loopback HTTP."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from api_fixtures import Api, api, expect_error, make_api

import server

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

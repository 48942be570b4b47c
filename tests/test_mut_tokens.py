"""Token issue and decode, password checks and the login throttle: behaviour
that mutation testing of audit/tokens.py and handlers/auth.py found unpinned."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import bcrypt
import jwt
import pytest
from api_fixtures import Api, api, make_api
from conftest import FakeClock

from audit.tokens import MIN_KEY_BYTES, Claims, TokenExpired, TokenInvalid, TokenService
from handlers.auth import (
    PREFIX,
    LoginBusy,
    LoginThrottle,
    check_password,
    hash_password,
)
from handlers.keys import ACCOUNTS

__all__ = ["api", "make_api"]

KEY = b"k" * MIN_KEY_BYTES


# -- audit/tokens.py ----------------------------------------------------------------


def test_the_key_must_be_at_least_32_bytes() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenService(b"k" * (MIN_KEY_BYTES - 1), 60)
    assert TokenService(KEY, 60).ttl == 60


def test_an_issued_token_decodes_to_the_claims_it_was_issued_with() -> None:
    """HS256, iat from the service's clock, exp the session's expiry (whole
    seconds), a fresh jti each time; decode gives every claim back."""
    tokens = TokenService(KEY, 60, clock=lambda: time.time() - 0.5)
    now = int(tokens.clock())
    first = tokens.issue("alice", "s-1", "admin", now + 600.9)
    second = tokens.issue("alice", "s-1", "admin", now + 600.9)
    assert jwt.get_unverified_header(first)["alg"] == "HS256"
    claims = tokens.decode(first)
    assert claims == Claims("alice", "s-1", "admin", now, now + 600, claims.jti)
    assert re.fullmatch(r"[0-9a-f]{32}", claims.jti), claims.jti
    assert tokens.decode(second).jti != claims.jti
    # Another service's key: not ours.
    with pytest.raises(TokenInvalid) as info:
        TokenService(b"x" * MIN_KEY_BYTES, 60).decode(first)
    assert info.value.reason == "bad_signature"


@pytest.mark.parametrize("extra", [{"jti": 7}, {"aud": "elsewhere"}, {"sub": 5}])
def test_an_expired_token_failing_a_later_check_is_invalid_not_expired(
    extra: dict[str, Any],
) -> None:
    """PyJWT checks exp before jti, aud and iss: an expired token with a
    jti that is not a string, or an audience, is still not one of ours
    (TokenInvalid with a reason), never TokenExpired carrying its claims."""
    now = int(time.time())
    claims = {"sub": "alice", "sid": "s-1", "role": "user", "iat": now - 7200,
              "exp": now - 3600, "jti": "j" * 32, **extra}
    token = jwt.encode(claims, KEY, algorithm="HS256")
    with pytest.raises(TokenInvalid) as info:
        TokenService(KEY, 60).decode(token)
    assert info.value.reason == "invalid"
    # The same token, in time, is refused the same way.
    token = jwt.encode({**claims, "exp": now + 600}, KEY, algorithm="HS256")
    with pytest.raises(TokenInvalid) as info:
        TokenService(KEY, 60).decode(token)
    assert info.value.reason == "invalid"


def test_an_expired_token_of_ours_carries_its_claims() -> None:
    tokens = TokenService(KEY, 60, clock=lambda: time.time() - 7200)
    token = tokens.issue("alice", "s-1", "user", time.time() - 3600)
    with pytest.raises(TokenExpired) as info:
        tokens.decode(token)
    assert {k: info.value.claims[k] for k in ("sub", "sid", "role")} == {
        "sub": "alice", "sid": "s-1", "role": "user"}


# -- handlers/auth.py: password checks ------------------------------------------------


def test_a_stored_hash_without_our_prefix_never_matches() -> None:
    """Only ``bcrypt-sha256$`` hashes are checked; anything else (a bare
    bcrypt hash of the very password, an empty or a locked-out value) is
    refused, whatever the password."""
    bare = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
    for stored in (bare, "", "!", "*", "bcrypt$" + bare):
        assert not check_password("secret", stored), stored
        assert not check_password("", stored), stored
    ours = hash_password("secret", 4)
    assert ours.startswith(PREFIX)
    assert check_password("secret", ours)
    assert not check_password("secret!", ours)


async def test_the_waiting_limit_counts_each_waiting_check_once(api: Api) -> None:
    """``max_waiting`` checks may wait for a bcrypt slot, the next is refused
    at once (LoginBusy); once they ran, as many may wait again."""
    accounts = api.app[ACCOUNTS]
    await accounts.prepare()  # its dummy hash out of the way of the slots
    accounts.max_waiting = 2
    stored = hash_password("secret", 4)
    slots = accounts._slots
    for _ in range(2):  # a second round: the count went back to zero
        held = 0
        while not slots.locked():
            await slots.acquire()
            held += 1
        try:
            waiting = [asyncio.create_task(accounts._hash_check("secret", stored))
                       for _ in range(2)]
            await asyncio.sleep(0)  # each runs up to the slot it waits for
            assert not any(t.done() for t in waiting)
            with pytest.raises(LoginBusy):
                await accounts._hash_check("secret", stored)
        finally:
            for _ in range(held):
                slots.release()
        assert await asyncio.wait_for(asyncio.gather(*waiting), 30) == [True, True]


# -- handlers/auth.py: LoginThrottle ----------------------------------------------------


async def test_admit_refuses_at_once_when_failures_alone_block() -> None:
    """Held back by failures (not by checks still running), an attempt gets
    its Retry-After at once: it does not wait out the patience."""
    clock = FakeClock(1000.0)
    throttle = LoginThrottle(2, 300.0, clock=clock)
    for _ in range(2):
        throttle.failed("alice", "10.0.0.1")
    with throttle.checking("alice", "10.0.0.1"):  # one running as well
        task = asyncio.create_task(throttle.admit("alice", "10.0.0.1", patience=60.0))
        await asyncio.sleep(0)
        assert task.done()
        assert task.result() == 300
    assert await throttle.admit("bob", "10.0.0.1", patience=60.0) is None


async def test_admit_waits_for_running_checks_and_takes_their_outcome() -> None:
    """Held back only by checks still running, an attempt waits for them:
    let in when they succeed, told to come back in a second when they are
    still running at the end of its patience."""
    throttle = LoginThrottle(1, 300.0, clock=FakeClock(1000.0))
    with throttle.checking("alice", "10.0.0.1"):
        task = asyncio.create_task(throttle.admit("alice", "10.0.0.1", patience=30.0))
        await asyncio.sleep(0)
        assert not task.done()
    throttle.succeeded("alice", "10.0.0.1")
    assert await asyncio.wait_for(task, 10) is None
    with throttle.checking("alice", "10.0.0.1"):  # never decided in time
        wait = await asyncio.wait_for(
            throttle.admit("alice", "10.0.0.1", patience=0.05), 10)
    assert wait == 1


def test_past_max_keys_the_oldest_failures_are_forgotten_first() -> None:
    throttle = LoginThrottle(1, 300.0, clock=FakeClock(1000.0))
    throttle.MAX_KEYS = 4  # two attempts: (user, ip) and ("", ip) each
    throttle.failed("alice", "10.0.0.1")
    throttle.failed("bob", "10.0.0.2")
    assert throttle.retry_after("alice", "10.0.0.1") == 300
    throttle.failed("carol", "10.0.0.3")
    assert throttle.retry_after("alice", "10.0.0.1") is None  # the oldest, dropped
    assert throttle.retry_after("bob", "10.0.0.2") == 300
    assert throttle.retry_after("carol", "10.0.0.3") == 300


def test_keys_whose_failures_left_the_window_are_dropped_by_any_attempt() -> None:
    """Memory follows the failures of the last window: a key is dropped
    once its newest failure left it, when any other attempt comes."""
    clock = FakeClock(1000.0)
    throttle = LoginThrottle(3, 300.0, clock=clock)
    throttle.failed("alice", "10.0.0.1")
    clock.advance(100)
    throttle.failed("bob", "10.0.0.2")
    clock.advance(200)  # alice's failure is at the edge of the window: out
    assert throttle.retry_after("carol", "10.0.0.3") is None
    assert set(throttle._fails) == {("bob", "10.0.0.2"), ("", "10.0.0.2")}
    clock.advance(100)
    throttle.failed("dave", "10.0.0.4")
    assert set(throttle._fails) == {("dave", "10.0.0.4"), ("", "10.0.0.4")}


# -- handlers/auth.py: logout ------------------------------------------------------------


async def test_a_logout_body_over_the_login_limit_is_413_and_the_session_stays(
    api: Api,
) -> None:
    """Logout bodies hold one short string: past 64 KiB, 413 before parsing."""
    alice = await api.user("alice")
    body = b'{"session_id": "' + b"x" * (64 * 1024) + b'"}'
    resp = await api.client.post("/logout", data=body,
                                 headers={**alice.headers, "Content-Type": "application/json"})
    assert resp.status == 413, await resp.text()
    assert (await api.client.get("/me", headers=alice.headers)).status == 200

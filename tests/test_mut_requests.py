"""Mutation review of handlers/requests.py: which error code each kind of bad
body gets, and where the limits are.

API.md tells the two 400s apart: ``invalid_json`` when the body is not JSON,
``invalid_request`` when it is JSON but the wrong thing (wrong fields or
types, or what the audit trail cannot carry). test_bad_input takes either
for every bad body; here each kind has its own, recorded as the attempt's
``details.reason``.
"""

from __future__ import annotations

import io

import pytest
from api_fixtures import Api, api, expect_error, make_api

from handlers.auth import LOGIN_BODY_MAX

__all__ = ["api", "make_api"]

NOT_JSON = "invalid_json"
WRONG = "invalid_request"

EV = b'{"action": "client.x", "details": {"n": %s}}'

BODIES: list[tuple[str, bytes, str]] = [
    ("empty", b"", NOT_JSON),
    ("whitespace", b" \r\n\t ", NOT_JSON),
    ("truncated", b'{"action": "client.x"', NOT_JSON),
    ("trailing garbage", b'{"action": "client.x"} x', NOT_JSON),
    ("not UTF-8", b'{"action": "client.x", "details": {"n": "\xff"}}', NOT_JSON),
    ("UTF-16", '{"action": "client.x"}'.encode("utf-16"), NOT_JSON),
    ("NaN", EV % b"NaN", NOT_JSON),
    ("-Infinity", EV % b"-Infinity", NOT_JSON),
    ("raw control character", EV % b'"a\x01"', NOT_JSON),
    ("number", b"7", WRONG),
    ("1e400", EV % b"1e400", WRONG),
    ("-1e400", EV % b"-1e400", WRONG),
    ("2**63", EV % b"9223372036854775808", WRONG),
    ("-2**63 - 1", EV % b"-9223372036854775809", WRONG),
    ("5000 digits", EV % (b"7" * 5000), WRONG),
    ("lone surrogate", EV % b'"\\udc00"', WRONG),
    ("NUL in a key", EV % b'{"a\\u0000": 1}', WRONG),
    ("repeated key", EV % b'{"a": 1, "a": 2}', WRONG),
    ("wrong type", b'{"action": 5}', WRONG),
]


@pytest.mark.parametrize(("name", "raw", "code"), BODIES, ids=[b[0] for b in BODIES])
async def test_each_kind_of_bad_body_gets_its_own_code_and_is_recorded(
    api: Api, name: str, raw: bytes, code: str
) -> None:
    alice = await api.user("alice")
    rid = "bad-" + "".join(c if c.isalnum() else "-" for c in name)
    resp = await api.client.post("/audit/events", data=raw, headers={
        **alice.headers, "Content-Type": "application/json", "X-Request-ID": rid})
    await expect_error(resp, 400, code)
    (ev,) = [e for e in await api.events(alice.session_id) if e["request_id"] == rid]
    assert (ev["action"], ev["outcome"], ev["details"]["reason"]) == (
        "client.rejected", "failure", code)
    assert "client.x" not in await api.actions(alice.session_id)


async def test_integers_at_the_ends_of_64_bits_are_taken(api: Api) -> None:
    """The ends of the range fit: -2**63 is 20 characters with its sign."""
    alice = await api.user("alice")
    raw = b'{"action": "client.ends", "details": {"max": 9223372036854775807,' \
          b' "min": -9223372036854775808, "id": 12345678901234567890123e0}}'
    resp = await api.client.post("/audit/events", data=raw, headers={
        **alice.headers, "Content-Type": "application/json"})
    assert resp.status == 202, await resp.text()
    (ev,) = [e for e in await api.events(alice.session_id) if e["action"] == "client.ends"]
    assert ev["details"]["max"] == (1 << 63) - 1 and ev["details"]["min"] == -(1 << 63)


async def test_a_body_of_exactly_the_limit_is_read_one_byte_more_is_not(api: Api) -> None:
    """``limit`` bytes are allowed (413 only past it), whether the size is
    declared by Content-Length or found while reading a chunked body."""
    await api.add_user("alice")
    head = b'{"username": "alice", "password": "x", "pad": "'
    exact = head + b"y" * (LOGIN_BODY_MAX - len(head) - 2) + b'"}'
    assert len(exact) == LOGIN_BODY_MAX
    over = exact[:-2] + b'y"}'

    async def chunked(raw: bytes):  # type: ignore[no-untyped-def]
        for i in range(0, len(raw), 4096):
            yield raw[i:i + 4096]

    for data in (io.BytesIO, chunked):
        resp = await api.client.post("/token", data=data(exact),
                                     headers={"Content-Type": "application/json"})
        body = await resp.json()
        assert resp.status == 401, body  # read, and "x" is not her password
        resp = await api.client.post("/token", data=data(over),
                                     headers={"Content-Type": "application/json"})
        await expect_error(resp, 413, "too_large")

"""Regressions for what a longer hand-fuzzing run found: each was a
traceback in the log for a client's odd input (the first two a 500
``internal_error``).

- A bearer token with bytes that are not UTF-8: aiohttp reads header bytes
  with ``surrogateescape``, and PyJWT could not encode the lone surrogates.
  API.md: 401 ``invalid_token``, recorded as ``auth.invalid_token``.
- A login form whose charset (UTF-7) decodes to lone surrogates: bcrypt's
  prehash could not encode the password. A JSON login with ``"\\ud800"`` is
  400 ``invalid_request``; so is the form now.
- ``Expect: 100-continue`` from a client gone before the ``100 Continue``:
  not a 500 (nobody to send it to) but an error with a traceback in the log,
  and the attempt unrecorded.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from api_fixtures import Api, api, assert_clean, expect_error, make_api

__all__ = ["api", "make_api"]


async def _exchange(api: Api, request: bytes) -> bytes:
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)  # Connection: close
    writer.close()
    return raw


async def _raw(api: Api, request: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    raw = await _exchange(api, request)
    head, _, text = raw.decode("latin-1").partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert_clean(text)
    return int(status.split()[1]), headers, json.loads(text)


@pytest.mark.parametrize("token", [b"\xff\xfe", b"\xff.\xfe.\xfd", b"eyJ\xc3(.x.y"])
async def test_a_token_that_is_not_utf8_is_invalid_token_and_recorded(
    api: Api, token: bytes
) -> None:
    status, headers, body = await _raw(
        api, b"GET /documents HTTP/1.1\r\nHost: x\r\nX-Request-ID: not-utf8-token\r\n"
             b"Authorization: Bearer " + token + b"\r\nConnection: close\r\n\r\n")
    assert status == 401, body
    assert body["error"]["code"] == "invalid_token"  # type: ignore[index]
    assert headers["x-request-id"] == "not-utf8-token"
    found = [e for e in await api.wait_security("auth.invalid_token")
             if e["request_id"] == "not-utf8-token"]
    assert len(found) == 1 and found[0]["details"]["reason"] == "malformed"


async def test_a_login_form_that_decodes_to_lone_surrogates_is_400(api: Api) -> None:
    await api.add_user("alice")
    # "+2QA-" is UTF-7 for U+D900, a lone surrogate.
    for ctype, data in [
        ("application/x-www-form-urlencoded; charset=utf-7", b"username=alice&password=+2QA-"),
        ("application/x-www-form-urlencoded; charset=utf-7", b"username=+2QA-&password=secret1"),
        ("multipart/form-data; boundary=XyZ",
         b'--XyZ\r\nContent-Disposition: form-data; name="username"\r\n\r\nalice\r\n'
         b'--XyZ\r\nContent-Disposition: form-data; name="password"\r\n'
         b"Content-Type: text/plain; charset=utf-7\r\n\r\n+2QA-\r\n--XyZ--\r\n"),
    ]:
        resp = await api.client.post("/token", data=data, headers={"Content-Type": ctype})
        await expect_error(resp, 400, "invalid_request")
    # The server still logs alice in.
    await api.login("alice")


async def test_a_client_gone_before_100_continue_is_recorded_without_a_traceback(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """``Expect: 100-continue``, then the client closes before the ``100
    Continue`` is written. aiohttp's expect handler runs before any
    middleware: its failed write was logged as an error with a traceback,
    and the attempt (here with a bad token) was never recorded. Now it is
    refused like a client gone mid-body, and recorded."""
    server = api.client.server
    n = 10
    with caplog.at_level(logging.WARNING):
        for i in range(n):
            _, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"POST /documents HTTP/1.1\r\nHost: x\r\n"
                         b"X-Request-ID: gone-" + str(i).encode() + b"\r\n"
                         b"Authorization: Bearer not-a-token\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 20\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        found = await api.wait_security("auth.invalid_token", n)
    assert {f"gone-{i}" for i in range(n)} <= {e["request_id"] for e in found}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("expect", [b"Expect: 100-continue, foo\r\n",
                                    b"Expect: foo\r\nExpect: 100-Continue\r\n"])
async def test_100_continue_beside_another_expectation_still_gets_its_100(
    api: Api, expect: bytes
) -> None:
    """``100-continue`` in a list of expectations (or beside another
    ``Expect`` header): the client waits for its ``100 Continue`` before it
    sends the body, and got none (only a lone ``100-continue`` was looked
    for): it waited until its own timeout, or for ever. The other
    expectation is ignored; the request is answered (201) and recorded once.
    Refused without its body (401: no token), the answer comes at once
    instead, recorded once too."""
    alice = await api.user("alice")
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(b"POST /documents HTTP/1.1\r\nHost: x\r\n" + expect
                     + b"X-Request-ID: listed-expect\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {alice.token}\r\n".encode()
                     + b"Content-Length: 2\r\nConnection: close\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)  # (none came: a timeout)
        assert line.startswith(b"HTTP/1.1 100 "), line
        writer.write(b"{}")
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert b"HTTP/1.1 400 " in raw, raw  # ({} is no document)
    found = [e for e in await api.events(alice.session_id) if e["request_id"] == "listed-expect"]
    assert [(e["action"], e["outcome"]) for e in found] == [("document.create", "failure")]
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(b"POST /documents HTTP/1.1\r\nHost: x\r\n" + expect
                     + b"X-Request-ID: listed-expect-401\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2\r\n\r\n")
        await writer.drain()
        # (The server then waits a while for the body the client may send anyway.)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in head, head
    found = [e for e in await api.wait_security("auth.invalid_token")
             if e["request_id"] == "listed-expect-401"]
    assert len(found) == 1


async def test_another_expectation_is_ignored_and_the_request_answered_and_recorded(
    api: Api,
) -> None:
    """An expectation other than ``100-continue`` is ignored (RFC 9110 lets a
    server do so): aiohttp answered it with a plain-text 417 that quoted the
    header back, before the middlewares, so nothing was recorded. HTTP/1.0
    gets no ``100 Continue`` (it has none). Both requests are answered by the
    route (401: no token) and recorded once."""
    for version, expect, rid in ((b"1.1", b"200-ok <b>x</b>", b"other-expect"),
                                 (b"1.0", b"100-continue", b"ten-continue")):
        raw = await _exchange(api, b"POST /documents HTTP/" + version + b"\r\nHost: x\r\n"
                                   b"Expect: " + expect + b"\r\nX-Request-ID: " + rid + b"\r\n"
                                   b"Content-Type: application/json\r\nContent-Length: 2\r\n"
                                   b"Connection: close\r\n\r\n{}")
        assert raw.startswith(b"HTTP/" + version + b" 401 "), raw
        assert b" 100 Continue" not in raw and b"<b>" not in raw
        found = [e for e in await api.wait_security("auth.invalid_token")
                 if e["request_id"] == rid.decode()]
        assert len(found) == 1

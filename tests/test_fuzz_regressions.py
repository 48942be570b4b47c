"""Regressions for what a longer hand-fuzzing run found: each was a 500
``internal_error`` with a traceback in the log, for a client's bad input.

- A bearer token with bytes that are not UTF-8: aiohttp reads header bytes
  with ``surrogateescape``, and PyJWT could not encode the lone surrogates.
  API.md: 401 ``invalid_token``, recorded as ``auth.invalid_token``.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from api_fixtures import Api, api, assert_clean, make_api

__all__ = ["api", "make_api"]


async def _raw(api: Api, request: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)  # Connection: close
    writer.close()
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

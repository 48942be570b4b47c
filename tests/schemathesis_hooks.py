"""Schemathesis hooks for test_schemathesis.py (loaded by the CLI via SCHEMATHESIS_HOOKS).

Not a test module. Reads ``SA_BASE_URL`` and ``SA_ADMIN_PASSWORD`` from the
environment the test sets.

- Auth: one admin token for every operation except ``POST /logout``, which
  gets a fresh login per case. Logout seals the session its token belongs to,
  so fuzzing it with the shared token would turn every later request into 401
  ``session_ended`` and the run would stop testing anything behind the token.
  ``POST /token`` needs no token and is fuzzed in a separate run (failed logins
  throttle the client IP, which would break these logins).
- ``X-Audit-Session-ID``: any value other than the token's session is
  (rightly) 403, so a random value stops a case before the handler. Half the
  cases (by the generated value's length, to stay deterministic) send the
  token's real session id instead, so both paths are exercised.
- Accepted failures: a random ``cursor`` is schema-valid (the cursor is an
  opaque string the server issued; a schema cannot say which strings those
  are) but rightly refused with 400 ``invalid_request`` "cursor is not valid".
  Only that exact answer to a cursor that is not one the server could have
  issued is dropped; a 500 for any cursor is still a failure. Likewise a body
  whose nested object has a key with a NUL character or starting with ``$``,
  or an integer past 64 bits, in free-form ``details`` (the schema says so in
  words, and for keys at the top level: a recursive schema would make
  generation crawl) is dropped only with the exact answer for it.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime
from typing import Any

import requests
import schemathesis
from schemathesis import Case

BASE_URL = os.environ.get("SA_BASE_URL", "http://127.0.0.1:8080")
ADMIN_PASSWORD = os.environ.get("SA_ADMIN_PASSWORD", "")


def login() -> str:
    resp = requests.post(f"{BASE_URL}/token",
                         data={"username": "admin", "password": ADMIN_PASSWORD}, timeout=30)
    resp.raise_for_status()
    return str(resp.json()["access_token"])


@schemathesis.auth(refresh_interval=3000).skip_for(path=["/logout", "/token"])
class AdminToken:
    """The shared admin token (re-fetched on a 401, e.g. if its session ended)."""

    def get(self, case: Case, ctx: Any) -> str:
        return login()

    def set(self, case: Case, data: str, ctx: Any) -> None:
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"


@schemathesis.auth(refresh_interval=None).apply_to(path="/logout")
class FreshTokenForLogout:
    """A new session per logout case, so logout never ends the shared session."""

    def get(self, case: Case, ctx: Any) -> str:
        return login()

    def set(self, case: Case, data: str, ctx: Any) -> None:
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"


def _token_sid(headers: dict[str, Any]) -> str | None:
    auth = str(headers.get("Authorization", ""))
    if not auth.startswith("Bearer "):
        return None
    try:
        payload = auth[7:].split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims["sid"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


@schemathesis.hook
def before_call(context: Any, case: Case, kwargs: dict[str, Any]) -> None:
    headers = kwargs.get("headers")
    if not isinstance(headers, dict):
        return
    claimed = headers.get("X-Audit-Session-ID")
    if isinstance(claimed, str) and len(claimed) % 2 == 0:
        sid = _token_sid(headers)
        if sid is not None:
            headers["X-Audit-Session-ID"] = sid


def _server_could_issue(cursor: Any) -> bool:
    """True if ``cursor`` decodes like the server's own (base64url JSON [str, str])."""
    if not isinstance(cursor, str):
        return False
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError:
        return False
    if not (isinstance(values, list) and len(values) == 2
            and all(isinstance(v, str) for v in values)):
        return False
    try:
        datetime.fromisoformat(values[0].replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _nul_key(value: Any) -> bool:
    if isinstance(value, dict):
        return any("\x00" in k or _nul_key(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_nul_key(v) for v in value)
    return False


def _dollar_key(value: Any) -> bool:
    if isinstance(value, dict):
        return any(k.startswith("$") or _dollar_key(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_dollar_key(v) for v in value)
    return False


def _deeper_than(value: Any, levels: int) -> bool:
    if levels < 0:
        return True
    if isinstance(value, dict):
        return any(_deeper_than(v, levels - 1) for v in value.values())
    if isinstance(value, list):
        return any(_deeper_than(v, levels - 1) for v in value)
    return False


def _big_int(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_big_int(v) for v in value.values())
    if isinstance(value, list):
        return any(_big_int(v) for v in value)
    return (isinstance(value, int) and not isinstance(value, bool)
            and not -(1 << 63) <= value < (1 << 63))


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Case, response: Any) -> bool:
    """Keep every failure except a 400 for a cursor the server never issued,
    or for a body with a NUL in a nested key."""
    if getattr(failure, "code", None) != "ST202" or response.status_code != 400:
        return True
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return True
    if message == "object keys must not contain NUL characters":
        return not _nul_key(case.body)
    if message == "integers must fit in 64 bits":
        return not _big_int(case.body)
    if message.endswith("keys in details must not start with '$'"):
        return not _dollar_key(case.body)
    if message.endswith("details are nested deeper than 32 levels"):
        return not _deeper_than(case.body, 32)
    cursor = (case.query or {}).get("cursor")
    return not (message == "cursor is not valid" and not _server_could_issue(cursor))

"""Reading request bodies: JSON only, with clear errors for every bad input."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .errors import ApiError, bad_request

# aiohttp refuses bodies above this with 413 before any handler reads them.
CLIENT_MAX_SIZE = 8 * 1024 * 1024


async def read_json(request: web.Request, *, allow_empty: bool = False) -> Any:
    """The body as JSON; 400 ``invalid_json`` if it is not JSON (or not UTF-8).

    Strings must be valid Unicode: lone surrogates (``"\\ud800"``) are refused
    with ``invalid_request`` rather than failing later when stored; so are
    numbers too large to be finite (``1e400``), which the audit trail's
    canonical JSON cannot carry.
    """
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return None
        raise ApiError(400, "invalid_json", "the body must be JSON")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("strings must be valid Unicode (no lone surrogates)") from None
    except RecursionError:
        raise bad_request("the body is nested too deeply") from None
    except ValueError:  # 1e400 parses as inf, which no JSON (nor the audit trail) can carry
        raise bad_request("numbers must be finite") from None
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object")
    return value


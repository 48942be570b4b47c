"""Client events: ``POST /audit/events`` joins them to the caller's own session.

A request that is refused (400, 413) records none of its events, but the
attempt itself: one ``client.rejected`` event with outcome ``failure`` and
``details.reason`` the error code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from audit.events import Draft, canonical_json
from audit.spool import JOB_BYTES, SpoolFull

from .errors import bad_request, json_response
from .keys import CTX, ENGINE
from .requests import audited_input

ACTION_RE = re.compile(r"^client\.[a-z0-9_.:-]{1,64}$")
MAX_EVENTS = 100
MAX_DETAILS_BYTES = 4096
# A stored part nests an event's details 4 levels down (part, events, event,
# details): MongoDB refuses documents deeper than 100 levels, and would refuse
# the whole part. 32 is ample for a client's details.
MAX_DETAILS_DEPTH = 32
# 100 events of 4 KiB of details, with room for JSON escapes.
EVENTS_BODY_MAX = 4 * 1024 * 1024
MAX_TARGET_CHARS = 128
# What a refused POST /audit/events records (outcome "failure", with the
# error's code): a name in the client.* namespace of API.md. A client may send
# it too (API.md takes every name its pattern matches): its event is a
# "success" with the client's details, never the server's "failure".
REJECTED = "client.rejected"


Parsed = tuple[str, dict[str, str] | None, dict[str, Any], int]


def _parse_one(item: Any, i: int) -> Parsed:
    """The event's action, target, details, and its details' size as JSON."""
    where = f"event {i}: "
    if not isinstance(item, dict):
        raise bad_request(where + "must be an object")
    unknown = set(item) - {"action", "target", "details"}
    if unknown:
        raise bad_request(where + f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    action = item.get("action")
    if not isinstance(action, str) or not ACTION_RE.fullmatch(action):
        raise bad_request(where + "action must match ^client\\.[a-z0-9_.:-]{1,64}$")
    target = item.get("target")
    if target is not None and (
        not isinstance(target, dict)
        or set(target) != {"type", "id"}
        or not all(isinstance(v, str) and 0 < len(v) <= MAX_TARGET_CHARS
                   for v in target.values())
    ):
        raise bad_request(where + "target must be {\"type\": str, \"id\": str}")
    details = item.get("details", {})
    if details is None:
        details = {}
    if not isinstance(details, dict):
        raise bad_request(where + "details must be an object")
    size = len(canonical_json(details).encode("utf-8"))
    if size > MAX_DETAILS_BYTES:
        raise bad_request(where + "details are larger than 4 KiB as JSON")
    depth, dollar = _shape(details)
    if depth > MAX_DETAILS_DEPTH:
        raise bad_request(where + f"details are nested deeper than {MAX_DETAILS_DEPTH} levels")
    if dollar:
        raise bad_request(where + "keys in details must not start with '$'")
    return action, target, details, size


def _shape(value: Any) -> tuple[int, bool]:
    """How deep objects and arrays nest in ``value`` (a scalar: 0), and
    whether an object key starts with ``$``: MongoDB reads an object with
    ``$ref`` and ``$id`` back as a reference (not the object stored), and
    servers before 5.0 refuse such keys, and with them the whole part."""
    deepest, dollar, stack = 0, False, [(value, 1)]
    while stack:
        v, level = stack.pop()
        children: Iterable[Any]
        if isinstance(v, dict):
            dollar = dollar or any(k.startswith("$") for k in v)
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((c, level + 1) for c in children)
    return deepest, dollar


def _parse(body: Any) -> list[Parsed]:
    items = body if isinstance(body, list) else [body]
    if not items:
        raise bad_request("no events")
    if len(items) > MAX_EVENTS:
        raise bad_request(f"at most {MAX_EVENTS} events per request")
    return [_parse_one(item, i) for i, item in enumerate(items)]


async def post_events(request: web.Request) -> web.Response:
    ctx = request[CTX]
    engine = request.app[ENGINE]
    if engine.spool.full:
        # Refused before the body is read: whatever it holds, its events and
        # the record of a refused one would both be refused (503). Parsing and
        # checking 100 events of 4 KiB only to refuse them let one user's flood
        # of them, refused by the full spool it filled, take the event loop
        # from everyone (another user's GET /me: 327 ms median on 64
        # connections; 68 ms so).
        raise SpoolFull("the audit spool is full")
    # Refused whole, none of them recorded; the attempt itself is.
    parsed = await audited_input(request, Draft(REJECTED, source=ctx.source()), _parse,
                                 limit=EVENTS_BODY_MAX)
    drafts = [Draft(a, target=t, details=d, source=ctx.source()) for a, t, d, _ in parsed]
    # Until its commit, the spool counts it as what it adds: a full request
    # is some 400 KiB, not one event's JOB_BYTES.
    size = sum(JOB_BYTES + n for *_, n in parsed)
    n = await engine.record_events(ctx.session_id, drafts, size=size)
    return json_response({"accepted": n}, status=202)

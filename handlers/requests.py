"""Reading request bodies: JSON only, with clear errors for every bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from audit.events import Draft

from .errors import CLOSE_AFTER, CONTINUE_OWED, ApiError, bad_request
from .keys import CTX, ENGINE

T = TypeVar("T")

# aiohttp refuses bodies above this with 413 before any handler reads them.
CLIENT_MAX_SIZE = 8 * 1024 * 1024
# A body must have arrived this long after its handler began to read it,
# plus a second for every MIN_BYTES_PER_SECOND of it that came. aiohttp
# bounds only the wait for a request's headers (its keep-alive timeout,
# 75 s): a client that sent the headers and then stalled, or trickled its
# body a byte at a time, held its connection (and the body read so far, up
# to the route's limit) for as long as it liked, anonymously on POST /token.
# A large body over a slow link is given the time it needs; a trickle is not.
BODY_SECONDS = 75.0
# The slowest transfer taken past those first seconds, in either direction
# (answers: server.send_middleware).
MIN_BYTES_PER_SECOND = 4096


def transfer_seconds(grace: float, size: int) -> float:
    """How long ``size`` bytes may take at :data:`MIN_BYTES_PER_SECOND`,
    after ``grace`` seconds."""
    return grace + size / MIN_BYTES_PER_SECOND


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def send_continue(request: web.Request) -> None:
    """The ``100 Continue`` a request with ``Expect: 100-continue`` is owed
    (routes.expect_handler), once, before its body is first read: only
    then, past authentication and the route's size check. A client gone
    meanwhile is not an error: the read of the body finds out."""
    if request.pop(CONTINUE_OWED, False):
        with contextlib.suppress(ConnectionError):
            await request.writer.write(CONTINUE)
        request.writer.output_size = 0  # the answer's own bytes have not begun


def too_large() -> ApiError:
    return ApiError(413, "too_large", "the request body is too large")


async def read_body(request: web.Request, limit: int = CLIENT_MAX_SIZE) -> bytes:
    """The body, refused with 413 ``too_large`` past ``limit`` bytes: by its
    ``Content-Length`` before reading anything, else as soon as it is over;
    400 ``invalid_request`` if it cannot be read (a ``Content-Encoding``
    that does not decode, a broken chunked encoding) or has not arrived
    within :data:`BODY_SECONDS`."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large()
    await send_continue(request)
    body = bytearray()
    try:
        async with body_deadline(request) as came:
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > limit:
                    raise too_large()
                came(len(body))
    except (RequestPayloadError, HttpProcessingError):
        # The rest of the body cannot be read either: it is taken as ended
        # (aiohttp would otherwise read it again after the answer, and log
        # that failure), and the connection closes after the answer.
        request.content.feed_eof()
        request[CLOSE_AFTER] = True
        raise bad_request("the request body could not be read (is its Content-Encoding"
                          " right?)") from None
    except ConnectionError:
        # The client went away before its body ended: the attempt is still
        # recorded (as invalid input) by the caller, like any unreadable body.
        request[CLOSE_AFTER] = True
        raise bad_request("the connection was lost before the request body ended") from None
    return bytes(body)


@contextlib.asynccontextmanager
async def body_deadline(request: web.Request) -> AsyncIterator[Callable[[int], None]]:
    """Reading the body within :data:`BODY_SECONDS`, and a second longer for
    every :data:`MIN_BYTES_PER_SECOND` the reader says came (the callable
    it is given, with the bytes so far), else 400 ``invalid_request``; the
    connection closes after the answer (the rest of the body is not waited
    for). Counted from what came, not from a Content-Length: a large one
    declared would otherwise buy a trickle its time. Nor is what came
    counted for more than :data:`BODY_SECONDS` ahead: a body sent fast and
    then stalled (8 MB but a byte, on 200 connections at once: 1.6 GB of
    the server's memory) was kept waiting for 75 s and a second per 4 KiB
    of it, 35 minutes; now 75 s after it stopped."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    # Seconds left at the last time something came, and how much had come.
    left, last, had = BODY_SECONDS, start, 0

    def came(received: int) -> None:
        nonlocal left, last, had
        now = loop.time()
        left = min(BODY_SECONDS, left - (now - last) + (received - had) / MIN_BYTES_PER_SECOND)
        last, had = now, received
        deadline.reschedule(now + left)

    try:
        async with asyncio.timeout_at(start + BODY_SECONDS) as deadline:
            yield came
    except TimeoutError:
        request.content.feed_eof()
        request[CLOSE_AFTER] = True
        raise bad_request(
            f"the request body did not arrive in time (within {BODY_SECONDS:g} s, then at"
            f" {MIN_BYTES_PER_SECOND // 1024} KiB a second at least)") from None
    except asyncio.CancelledError:
        # The graceful shutdown, its wait for requests in flight over, ends
        # the body's stream with CancelledError (not this task: it then waits
        # for the answer). Uncaught, the attempt went unrecorded and the
        # client got no answer: here for every reader of a body, read_body's
        # and request.post()'s (a multipart login). A cancellation of the
        # task itself goes on.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        request[CLOSE_AFTER] = True
        raise bad_request("the server is shutting down: the request body was cut off before"
                          " its end; nothing was done, try again") from None


async def read_json(
    request: web.Request, *, allow_empty: bool = False, limit: int = CLIENT_MAX_SIZE
) -> Any:
    """The body as JSON; 400 ``invalid_json`` if it is not JSON (or not UTF-8),
    413 ``too_large`` past ``limit`` bytes (each route's own: JSON parsing runs
    on the event loop).

    Strings must be valid Unicode: lone surrogates (``"\\ud800"``) are refused
    with ``invalid_request`` rather than failing later when stored; so are
    numbers too large to be finite (``1e400``), which the audit trail's
    canonical JSON cannot carry, and what a sink's format cannot (MongoDB's
    BSON): integers outside 64 bits and object keys with a NUL character.
    Recorded, they would make a whole session part undeliverable. So is an
    object with a key twice (``{"title": "a", "title": "b"}``): which one
    counts differs from one reader to the next.
    """
    raw = await read_body(request, limit)
    if not raw.strip():
        if allow_empty:
            return None
        raise ApiError(400, "invalid_json", "the body must be JSON")
    # The checks for integers past 64 bits and NUL in keys run in the parser,
    # and only for bodies where they can apply: 19 digits in a row somewhere,
    # a \u0000 escape (JSON strings hold no raw NUL). The first look costs
    # 15 ms for 8 MiB; the hooks up to 3-4 x the parse, for such bodies only.
    # Every object's keys are checked for repeats (RFC 7493's I-JSON: readers
    # differ on which value of a repeated key counts, and a proxy or filter in
    # front may have judged another one than the one applied and recorded):
    # measured, 4 % more for 100 client events, 2 x for a body of tiny objects.
    hooks: dict[str, Any] = {"object_pairs_hook": _unique_keys}
    try:
        text = raw.decode("utf-8")
        if _DIGIT_RUN in raw.translate(_DIGITS_ONLY):
            hooks["parse_int"] = _int64
        if "\\u0000" in text:
            hooks["object_pairs_hook"] = _no_nul_keys
        value = json.loads(text, parse_constant=_no_constants, **hooks)
    except _OutOfRange:
        raise bad_request("integers must fit in 64 bits") from None
    except _NulKey:
        raise bad_request("object keys must not contain NUL characters") from None
    except _RepeatedKey:
        raise bad_request("an object has the same key twice") from None
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


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class _OutOfRange(Exception):
    pass


def _int64(digits: str) -> int:
    if len(digits) > 20:  # before int(): Python refuses over 4300 digits with ValueError
        raise _OutOfRange
    n = int(digits)
    if not INT64_MIN <= n <= INT64_MAX:
        raise _OutOfRange
    return n


# Every digit becomes "9", every other byte " ": 19 digits in a row is a find.
_DIGITS_ONLY = bytes(0x39 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_DIGIT_RUN = b"9" * 19


class _NulKey(Exception):
    pass


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _RepeatedKey
    return obj


def _no_nul_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, _ in pairs:
        if "\x00" in key:
            raise _NulKey
    return _unique_keys(pairs)


def json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object")
    return value



async def audited_input(
    request: web.Request, draft: Draft, parse: Callable[[Any], T], *,
    allow_empty: bool = False, limit: int = CLIENT_MAX_SIZE,
) -> T:
    """The parsed body; bad input is recorded as a failed attempt (``draft``
    with outcome ``failure`` and ``details.reason`` the error code), then
    refused with that error."""
    try:
        return parse(await read_json(request, allow_empty=allow_empty, limit=limit))
    except ApiError as err:
        raise await refuse(request, draft, err) from None


async def refuse(request: web.Request, draft: Draft, error: ApiError) -> ApiError:
    """Record a failed attempt (bad input) and return the error to raise."""
    draft.outcome = "failure"
    draft.details = {**draft.details, "reason": error.code}
    await request.app[ENGINE].record(request[CTX].session_id, draft)
    return error

"""API errors and the middleware that turns every failure into API.md's format.

``{"error": {"code", "message", "request_id"}}`` for every error, including
aiohttp's own 404/405/413 and unexpected exceptions (500 ``internal_error``,
logged with the request id, never detailed to the client). Every response
carries ``X-Request-ID``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web, web_server
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler

try:  # (private: BoundedRequestHandler is installed only with it, see _handler_fits)
    from aiohttp.web_protocol import _ErrInfo
except ImportError:  # pragma: no cover - another aiohttp
    _ErrInfo = None  # type: ignore[assignment,misc]

from audit.config import Config
from audit.events import Draft, new_id
from audit.logthrottle import LogThrottle, more
from audit.middleware import AuthError
from audit.spool import SpoolClosed, SpoolFull, SpoolUnavailable
from audit.store import SessionNotOpen

from .keys import CTX, ENGINE, REQUEST_ID

log = logging.getLogger("session_audit.http")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# Set on a request whose body could not be read: its connection closes after
# the answer, whatever the answer (the HTTP parser cannot go on after it).
CLOSE_AFTER = web.RequestKey("close_after", bool)
# Set on a request with ``Expect: 100-continue`` until its ``100 Continue`` is
# sent, when the body is first read (routes.expect_handler). Answered with
# the body unread, the client may never send it: the connection closes.
CONTINUE_OWED = web.RequestKey("continue_owed", bool)


# A quoted absolute file path in an error's text, as the OS quotes them
# ("[Errno 20] Not a directory: '/srv/audit/x'").
_QUOTED_PATH = re.compile(r"'/[^']*'")


def without_paths(text: str, config: Config) -> str:
    """``text`` without the server's own file paths (data dir, spool, sink
    file or directory) and without quoted absolute paths: API.md lets no
    file path reach a client (the log and ``server.py status`` keep them)."""
    paths = {str(config.data_dir), str(config.spool_path)}
    # The sink in use only: another's path is in no text, and is not checked
    # at start (a loop of symbolic links there raised RuntimeError: a 500).
    if config.sink.type == "sqlite":
        paths |= {str(config.sqlite_sink_path), str(config.sqlite_sink_path.parent)}
    elif config.sink.type == "jsonl":
        paths.add(str(config.jsonl_dir))
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, "<path>")
    return _QUOTED_PATH.sub("'<path>'", text)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def not_found(message: str = "not found") -> ApiError:
    return ApiError(404, "not_found", message)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, ensure_ascii=False, separators=(",", ":")),
        status=status,
        content_type="application/json",
        charset="utf-8",
    )


def error_response(
    request: web.Request, status: int, code: str, message: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"code": code, "message": message, "request_id": request[REQUEST_ID]}}
    resp = json_response(body, status)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    if status == 401 and code != "invalid_credentials":  # (a login's, not a bearer's)
        resp.headers["WWW-Authenticate"] = _bearer_challenge(code)
    return resp


def _bearer_challenge(code: str) -> str:
    """RFC 6750's challenge for a 401 of a protected resource: no error
    code when the request had no token, else ``invalid_token`` (bad,
    expired or of an ended session), its description API.md's code."""
    if code == "missing_token":
        return 'Bearer realm="session-audit"'
    return f'Bearer realm="session-audit", error="invalid_token", error_description="{code}"'


def request_id_of(request: web.BaseRequest) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if _REQUEST_ID_RE.fullmatch(given) else new_id()


_HTTP_CODES = {
    400: "invalid_request",
    401: "missing_token",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "invalid_request",
}


_UNAVAILABLE_LOG = LogThrottle()


def _audit_unavailable(request: web.Request, exc: Exception) -> web.Response:
    """503: the spool cannot take the record, so the action was not done."""
    # One line a minute per cause: while the spool is full or cannot commit,
    # every audited request comes here (each has its 503 in the access log).
    left_out = _UNAVAILABLE_LOG.allow(type(exc).__name__)  # (a bounded set of keys)
    if left_out is not None:
        log.warning("audit unavailable rid=%s: %s%s", request[REQUEST_ID], exc, more(left_out))
    return error_response(request, 503, "audit_unavailable",
                          "the audit trail cannot record this action now; nothing was done",
                          {"Retry-After": "5"})


async def _session_ended(request: web.Request, exc: SessionNotOpen) -> web.Response:
    ctx = request.get(CTX)
    if ctx is not None and not exc.recorded:
        draft = Draft("auth.session_ended", outcome="denied", source=ctx.source(),
                      details={"reason": "session_ended_during_action",
                               "method": request.method, "path": request.path[:256]})
        try:
            await request.app[ENGINE].record_security(draft, ctx.session_id)
        except (SpoolFull, SpoolUnavailable, SpoolClosed) as err:
            return _audit_unavailable(request, err)
    return error_response(request, 401, "session_ended", "the session has ended")


# On every answer the app prepares (OWASP's REST security headers): nothing
# here is for a cache to keep (tokens, documents, audit records: RFC 6749
# requires no-store on a token answer), a browser must neither sniff a type
# nor frame or run anything from it, and the server names no version.
# Strict-Transport-Security belongs to the TLS proxy in front (README).
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Server": "session-audit",
}


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: :data:`SECURITY_HEADERS` on every answer."""
    response.headers.update(SECURITY_HEADERS)


_AIOHTTP_HANDLE_ERROR = RequestHandler.handle_error


def _parser_error_answer(
    self: RequestHandler, request: web.BaseRequest, status: int = 500,
    exc: BaseException | None = None, message: str | None = None,
) -> web.StreamResponse:
    """aiohttp's answer to a request it could not parse (a bad request line,
    a header over the limits or with a control character) or to a failure
    outside every middleware, in API.md's error format. aiohttp's own runs
    before any of our code (no middleware, no ``on_response_prepare``, no
    hook: aiohttp issue #3287) and was a text/plain 400 with ``Server:
    Python/3.11 aiohttp/3.x``, none of the security headers, no
    ``X-Request-ID``, and the offending request line quoted back, a whole
    ``Authorization: Bearer ...`` header included. aiohttp's still does the
    logging (our filter keeps it to one line) and refuses once an answer
    has begun."""
    _AIOHTTP_HANDLE_ERROR(self, request, status, exc, message)
    # A failure outside the middlewares comes with the request's headers
    # (and, past the error middleware, its id): the id is the request's, as
    # on every answer, and named in the log next to aiohttp's traceback. An
    # unparsed request has no headers: a fresh id.
    given = request.get(REQUEST_ID)
    rid = given if isinstance(given, str) else request_id_of(request)
    if status >= 500:
        log.error("unhandled error outside the middlewares rid=%s", rid)
    code = _HTTP_CODES.get(status, "invalid_request" if status < 500 else "internal_error")
    text = ("the request's header fields are too large" if status == 431 else
            "the request is not well-formed HTTP, or its body's encoding cannot be decoded"
            if status < 500 else "internal server error")
    body = {"error": {"code": code, "message": text, "request_id": rid}}
    resp = json_response(body, status)
    resp.headers.update(SECURITY_HEADERS)
    resp.headers["X-Request-ID"] = rid
    resp.force_close()
    return resp


def install_parser_error_answer() -> None:
    """Make :func:`_parser_error_answer` aiohttp's error answer, and
    :class:`BoundedRequestHandler` its connections' handler (for the
    process: aiohttp has no per-application hook). Idempotent."""
    RequestHandler.handle_error = _parser_error_answer  # type: ignore[method-assign]
    if handler_fits():
        web_server.RequestHandler = BoundedRequestHandler  # type: ignore[attr-defined]
    else:  # pragma: no cover - another aiohttp: its handler is kept, unbounded
        log.warning("this aiohttp's connection handler is not the one session-audit knows:"
                    " a request's header block is bounded field by field only")


# The private parts of aiohttp's handler BoundedRequestHandler uses.
_HANDLER_PARTS = ("_force_close", "_close", "_request_count", "_messages", "_reading_paused",
                  "_buffer_paused", "_waiter")


def handler_fits() -> bool:
    """Whether this aiohttp's connection handler has what
    :class:`BoundedRequestHandler` uses (an upgrade may rename its private
    parts: the server then keeps aiohttp's own handler, and says so)."""
    slots = {n for k in RequestHandler.__mro__ for n in getattr(k, "__slots__", ())}
    return (_ErrInfo is not None and getattr(web_server, "RequestHandler", None) is not None
            and all(n in slots for n in _HANDLER_PARTS))


# A request's header block (request line, fields, the blank line) at most:
# the request line (16 KiB) and a long junk token (32 KiB: recorded 401s)
# with room for the rest.
MAX_HEADER_BYTES = 64 * 1024


class HeadersTooLarge(BadHttpMessage):
    code = 431


# A chunked body's framing, at most, per byte of it: "1\r\nX\r\n" for a
# byte sent alone (some clients send what a JSON encoder yields as it comes).
FRAMING_PER_BODY_BYTE = 5


class BoundedRequestHandler(RequestHandler):
    """aiohttp's connection handler, with a bound on a request's header
    block as a whole. aiohttp bounds each field (server.MAX_HEADER_FIELD)
    and their number (128), so a block that never ended held up to 4 MB
    (7.5 MB of memory: parsed as bytes and as text) for the keep-alive
    timeout, from any client: 100 such connections took 800 MB. So could
    a chunked body's trailer fields, for the body's deadline.

    What came since the last request's headers ended, less what went into
    its body and that body's framing (at most :data:`FRAMING_PER_BODY_BYTE`
    a byte), is the next block so far, or trailers; past
    :data:`MAX_HEADER_BYTES` (and what came in the read that ended the last
    request's headers: at most one read more) the request is refused with
    431 (as aiohttp refuses one field over its limit with 400) and the
    connection closes; not while reading is paused (the parser may hold
    body bytes back until it resumes).
    Private parts of aiohttp's handler are used (its message queue and
    waiter, ``_close``, ``_ErrInfo``): tests/test_hunt_edge.py checks the
    behaviour."""

    # (no __slots__: the two below live in the instance's __dict__)
    header_bytes = 0  # of the block so far
    body: StreamReader | None = None  # the last request's

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        count, body = self._request_count, self.body
        body_before = body.total_bytes if body is not None else 0
        super().data_received(data)
        if self._request_count != count:  # a request's headers ended: a new block begins
            self.header_bytes = 0
            self.body = self._messages[-1][1] if self._messages else None
            return
        into_body = body.total_bytes - body_before if body is not None else 0
        # A running sum: body bytes the parser held back while its reader was
        # paused (a tail it feeds on resuming) go into the body later.
        self.header_bytes = max(0, self.header_bytes + len(data)
                                - (1 + FRAMING_PER_BODY_BYTE) * into_body)
        if (self.header_bytes <= MAX_HEADER_BYTES or self._close or self._force_close
                or self._reading_paused or self._buffer_paused):
            return
        exc = HeadersTooLarge(f"the header block is over {MAX_HEADER_BYTES} bytes")
        self._messages.append((_ErrInfo(status=431, exc=exc, message=exc.message),
                               EMPTY_PAYLOAD))
        self._close = True  # nothing more is read; the answer closes the connection
        if body is not None and not body.is_eof():
            # Trailers: the body's reader fails now (400, recorded as a body
            # that could not be read) rather than wait out its deadline.
            body.set_exception(exc)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[REQUEST_ID] = request_id_of(request)
    try:
        resp = await handler(request)
    except ApiError as exc:
        resp = error_response(request, exc.status, exc.code, exc.message, exc.headers)
    except AuthError as exc:
        resp = error_response(request, exc.status, exc.code, exc.message)
    except (SpoolFull, SpoolUnavailable, SpoolClosed) as exc:
        resp = _audit_unavailable(request, exc)
    except SessionNotOpen as exc:
        # It ended (logout elsewhere, the reaper, passwd or disable) after the
        # request was let in: 401, recorded like the middleware's.
        resp = await _session_ended(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        fallback = "invalid_request" if exc.status < 500 else "internal_error"
        code = _HTTP_CODES.get(exc.status, fallback)
        message = {
            404: "no such resource",
            405: "method not allowed",
            413: "the request body is too large",
        }.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        resp = error_response(request, exc.status, code, message, headers)
    except Exception:
        log.exception("unhandled error rid=%s %s %s", request[REQUEST_ID], request.method,
                      request.path)
        resp = error_response(request, 500, "internal_error", "internal server error")
    resp.headers["X-Request-ID"] = request[REQUEST_ID]
    if request.get(CLOSE_AFTER) or (request.get(CONTINUE_OWED)
                                    and not request.content.is_eof()):
        resp.force_close()
    return resp

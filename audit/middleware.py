"""The aiohttp middleware that attaches the audit session context.

For every route that needs a caller: authenticate the bearer token, load the
open session (401 ``session_ended`` after logout, idle timeout or expiry),
check ``X-Audit-Session-ID``, and attach a :class:`RequestContext` under a
typed key. Every authentication failure is recorded as a security event
before the answer goes out, or, past the client IP's budget, counted into a
summary event (``AuditEngine.record_security``).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from .engine import AuditEngine
from .events import Draft, Source
from .tokens import Claims, TokenExpired, TokenInvalid, TokenNotYetValid, TokenService

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A token's ``iat`` is read from the clock just after its session's start was:
# at most a commit apart (a clock step between the two aside).
ISSUED_AT_START_SECONDS = 60.0


class AuthError(Exception):
    """An authentication or session failure with its API status and code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who is calling, from where, in which audit session."""

    user: str
    role: str
    session_id: str
    ip: str | None
    user_agent: str | None
    request_id: str
    session_start: float = 0.0
    expires_at: float = 0.0

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def source(self) -> Source:
        return Source(self.user, self.role, self.ip, self.user_agent, self.request_id)


REQUEST_ID = web.RequestKey("request_id", str)
CTX = web.RequestKey("ctx", RequestContext)
PUBLIC = web.AppKey("public_routes", frozenset)


TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple)


def client_ip(request: web.Request) -> str | None:
    """The connection's address; behind a trusted proxy (``server.trusted_proxies``)
    the rightmost X-Forwarded-For address that is not itself a trusted proxy.
    Addresses left of it are the client's to invent and are ignored; so is a
    malformed one (the last trusted hop is used then). A hop may carry a port
    (``1.2.3.4:5555``, ``[2001:db8::1]:443``), which is dropped, as is an IPv6
    zone; IPv4-mapped IPv6 addresses count as their IPv4 address."""
    remote = request.remote
    proxies = request.app.get(TRUSTED_PROXIES, ())
    if not proxies or remote is None:
        return remote
    addr = parse_hop(remote)
    if addr is None:
        return remote
    if not any(addr in net for net in proxies):
        return str(addr)  # an IPv4-mapped address in its IPv4 form
    client = str(addr)
    hops = [h.strip() for line in request.headers.getall("X-Forwarded-For", ())
            for h in line.split(",")]
    for hop in reversed(hops):
        addr = parse_hop(hop)
        if addr is None:
            break
        client = str(addr)
        if not any(addr in net for net in proxies):
            break
    return client


def parse_hop(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """One X-Forwarded-For entry as an address, or None if it is not one."""
    if len(text) > 64:
        return None
    if text.startswith("["):  # [v6] or [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    text = text.partition("%")[0]  # an IPv6 zone
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def anonymous_source(request: web.Request) -> Source:
    ua = request.headers.get("User-Agent")
    return Source(None, None, client_ip(request), ua[:512] if ua else None, request[REQUEST_ID])


def session_middleware(engine: AuditEngine, tokens: TokenService) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Unmatched paths (404/405) go on to become API errors; every matched
        # route needs a caller unless it is named public. An unnamed route is
        # not public: authentication fails closed.
        if request.match_info.http_exception is not None:
            return await handler(request)
        route = request.match_info.route
        name = route.name if route is not None else None
        if name is not None and name in request.app[PUBLIC]:
            return await handler(request)
        request[CTX] = await authenticate(request, engine, tokens)
        return await handler(request)

    return middleware


async def _deny(
    request: web.Request,
    engine: AuditEngine,
    action: str,
    status: int,
    code: str,
    message: str,
    *,
    reason: str | None = None,
    session_id: str | None = None,
    user: str | None = None,
    role: str | None = None,
) -> AuthError:
    src = anonymous_source(request)
    src.user, src.role = user, role
    details = {"reason": reason or code, "method": request.method, "path": request.path[:256]}
    await engine.record_security(
        Draft(action, outcome="denied", details=details, source=src), session_id
    )
    return AuthError(status, code, message)


def _issued_at_start(engine: AuditEngine, claims: Claims) -> bool:
    """Whether a signed token with ``iat`` in the future may be taken as this
    server's from before its clock stepped back: ``iat`` is its open
    session's start. One naming no open session of its user goes on too:
    the session check answers it 401 ``session_ended``, as for any token of
    ours after logout (it was ``invalid_token``, recorded as such)."""
    s = engine.spool.open_session(claims.sid)
    if s is None or s.user != claims.sub:
        return True
    return abs(claims.iat - s.start_ts) <= ISSUED_AT_START_SECONDS


async def authenticate(
    request: web.Request, engine: AuditEngine, tokens: TokenService
) -> RequestContext:
    headers = request.headers.getall("Authorization", ())
    if len(headers) > 1:
        # Not a list field (RFC 9110): which one a proxy in front checked or
        # logged, and which one we would take, is anybody's guess.
        raise await _deny(request, engine, "auth.invalid_token", 401, "invalid_token",
                          "the token is not valid", reason="several_authorization_headers")
    header = headers[0] if headers else ""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise await _deny(request, engine, "auth.invalid_token", 401, "missing_token",
                          "a bearer token is required")
    try:
        claims = tokens.decode(token)
    except TokenExpired as exc:
        c = exc.claims
        raise await _deny(request, engine, "auth.token_expired", 401, "token_expired",
                          "the token has expired", session_id=c.get("sid"),
                          user=c.get("sub"), role=c.get("role")) from None
    except TokenNotYetValid as exc:
        # Issued (iat) after now: by this server before its clock stepped
        # back, if iat is its open session's start (or its session has ended:
        # session_ended below); else refused as before.
        early = exc.claims
        if not _issued_at_start(engine, early):
            # Validly signed, as an expired token is: its session and actor are known.
            raise await _deny(request, engine, "auth.invalid_token", 401, "invalid_token",
                              "the token is not valid", reason=exc.reason,
                              session_id=early.sid, user=early.sub, role=early.role) from None
        claims = early
    except TokenInvalid as exc:
        raise await _deny(request, engine, "auth.invalid_token", 401, "invalid_token",
                          "the token is not valid", reason=exc.reason) from None
    session = engine.session(claims.sid)
    if session is None or session.user != claims.sub:
        raise await _deny(request, engine, "auth.session_ended", 401, "session_ended",
                          "the session has ended", session_id=claims.sid,
                          user=claims.sub, role=claims.role)
    # Every value must match: a second one (a proxy's, or added to slip a
    # mismatch past a check of the first) is not ignored.
    if not all(hmac.compare_digest(claimed.encode("utf-8", "surrogateescape"),
                                   claims.sid.encode())
               for claimed in request.headers.getall("X-Audit-Session-ID", ())):
        raise await _deny(request, engine, "auth.session_mismatch", 403, "session_mismatch",
                          "X-Audit-Session-ID does not match the token's session",
                          session_id=claims.sid, user=claims.sub, role=session.role)
    engine.touch(claims.sid)
    ua = request.headers.get("User-Agent")
    return RequestContext(
        user=session.user,
        role=session.role,
        session_id=claims.sid,
        ip=client_ip(request),
        user_agent=ua[:512] if ua else None,
        request_id=request[REQUEST_ID],
        session_start=session.start_ts,
        expires_at=session.expires_at,
    )

"""JWT access tokens: HS256 only, every claim required, key of at least 32 bytes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from .events import new_id

ALGORITHM = "HS256"
REQUIRED_CLAIMS = ("sub", "sid", "role", "iat", "exp", "jti")
MIN_KEY_BYTES = 32


class TokenInvalid(Exception):
    """Bad signature, malformed, wrong algorithm, ``alg: none``, missing claims."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenNotYetValid(TokenInvalid):
    """Validly signed and not expired, but issued (``iat``) after now by this
    clock. This server issued it; its clock has since stepped back (NTP, a
    clock wrong at boot): :func:`audit.middleware.authenticate` accepts it
    when ``iat`` is its open session's start. Carries the checked claims."""

    def __init__(self, claims: Claims) -> None:
        super().__init__("not_yet_valid")
        self.claims = claims


class TokenExpired(Exception):
    """Validly signed but past ``exp``; carries the claims for the audit trail."""

    def __init__(self, claims: dict[str, Any]) -> None:
        super().__init__("token expired")
        self.claims = claims


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    sid: str
    role: str
    iat: int
    exp: int
    jti: str


class TokenService:
    def __init__(self, key: bytes, ttl_seconds: int, clock: Callable[[], float] = time.time):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the JWT key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self.ttl = ttl_seconds
        self.clock = clock

    def issue(self, user: str, session_id: str, role: str, expires_at: float) -> str:
        now = int(self.clock())
        claims = {
            "sub": user,
            "sid": session_id,
            "role": role,
            "iat": now,
            "exp": int(expires_at),
            "jti": new_id(),
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def decode(self, token: str) -> Claims:
        if not token.isascii():
            # A JWT is base64url and dots. aiohttp reads header bytes that are
            # not UTF-8 as lone surrogates, which PyJWT cannot encode (a 500).
            raise TokenInvalid("malformed")
        options: Any = {"require": list(REQUIRED_CLAIMS)}
        try:
            data = jwt.decode(token, self._key, algorithms=[ALGORITHM], options=options)
        except jwt.ExpiredSignatureError:
            # The signature was checked before the expiry: these claims are genuine.
            expired_opts: Any = {"require": list(REQUIRED_CLAIMS), "verify_exp": False}
            try:
                data = jwt.decode(token, self._key, algorithms=[ALGORITHM], options=expired_opts)
            except jwt.PyJWTError as exc:
                raise TokenInvalid(_reason(exc)) from None
            _claims(data)  # of the types this server issues, or invalid
            raise TokenExpired(data) from None
        except jwt.ImmatureSignatureError as exc:
            # iat after now (PyJWT checks it first): everything else checked,
            # the caller decides whether the clock went back since the issue.
            later_opts: Any = {"require": list(REQUIRED_CLAIMS), "verify_iat": False}
            try:
                data = jwt.decode(token, self._key, algorithms=[ALGORITHM], options=later_opts)
            except jwt.ExpiredSignatureError:
                raise TokenInvalid(_reason(exc)) from None
            except jwt.PyJWTError as again:
                raise TokenInvalid(_reason(again)) from None
            raise TokenNotYetValid(_claims(data)) from None
        except jwt.PyJWTError as exc:
            raise TokenInvalid(_reason(exc)) from None
        except RecursionError:
            # A header of JSON nested too deep: PyJWT before 2.14 lets the
            # parser's error out, before any signature check (a 500).
            raise TokenInvalid("malformed") from None
        return _claims(data)


def _claims(data: dict[str, Any]) -> Claims:
    """The claims, each of the type this server issues: PyJWT checks ``iat``
    and ``exp`` by ``int()``, which takes ``"1795796565"`` and ``true``."""
    for name in ("sub", "sid", "role", "jti"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise TokenInvalid("bad_claim")
    for name in ("iat", "exp"):
        if type(data.get(name)) is not int:  # not a bool, a float or a string
            raise TokenInvalid("bad_claim")
    return Claims(data["sub"], data["sid"], data["role"], data["iat"], data["exp"], data["jti"])


def _reason(exc: Exception) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return "missing_claim"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "wrong_algorithm"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad_signature"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "not_yet_valid"
    if isinstance(exc, jwt.DecodeError):
        return "malformed"
    return "invalid"

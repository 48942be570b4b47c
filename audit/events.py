"""Audit event records: canonical JSON, identifiers, times and the hash chain.

An event (API.md, "Audit records") has exactly the keys of :data:`EVENT_KEYS`.
``hash`` = HMAC-SHA256(audit key, previous hash + canonical JSON of the event
without ``hash``); the chain of a session starts from :func:`genesis`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

EVENT_KEYS = (
    "event_id",
    "session_id",
    "seq",
    "ts",
    "action",
    "outcome",
    "actor",
    "target",
    "source",
    "request_id",
    "details",
    "hash",
)

OUTCOMES = frozenset({"success", "failure", "denied"})

SECURITY_ACTIONS = frozenset(
    {
        "auth.login_failed",
        "auth.login_throttled",
        "auth.invalid_token",
        "auth.token_expired",
        "auth.session_ended",
        "auth.session_mismatch",
        "access.denied",
        "admin.denied",
    }
)

SEAL_REASONS = frozenset({"logout", "idle_timeout", "token_expired", "max_duration"})
CHECKPOINT = "checkpoint"

_dumps = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def canonical_json(obj: Any) -> str:
    """Sorted keys, compact separators, no NaN; UTF-8 when encoded."""
    return _dumps(obj)


def new_id() -> str:
    """A random 128-bit identifier as 32 hex digits."""
    return secrets.token_hex(16)


def format_ts(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-11-26T14:31:07.123Z``."""
    ms = round(epoch * 1000)
    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def parse_ts(text: str) -> float:
    """Parse an RFC 3339 time (``Z`` or an offset) into epoch seconds."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def now() -> float:
    return time.time()


def scrub(value: Any) -> Any:
    """``value`` with every string made valid UTF-8 (lone surrogates -> "?")."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def genesis(key: bytes, stream: str) -> str:
    """The chain's starting value for a session id or the security stream."""
    return hmac.new(key, b"genesis:" + stream.encode("utf-8"), hashlib.sha256).hexdigest()


def chain_hash(key: bytes, prev_hash: str, body_json: str) -> str:
    """HMAC-SHA256 over the previous hash and the canonical body."""
    msg = prev_hash.encode("ascii") + body_json.encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def event_hash(key: bytes, prev_hash: str, event: dict[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k != "hash"}
    return chain_hash(key, prev_hash, canonical_json(body))


@dataclass(slots=True)
class Source:
    """Who and where an action came from; part of every event."""

    user: str | None = None
    role: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


@dataclass(slots=True)
class Draft:
    """An event before the spool gives it its session, ``seq``, time and hash."""

    action: str
    outcome: str = "success"
    target: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    source: Source = field(default_factory=Source)
    event_id: str = field(default_factory=new_id)

    def body(self, session_id: str | None, seq: int | None, ts: float) -> dict[str, Any]:
        """The event record without ``hash``."""
        src = self.source
        return {
            "event_id": self.event_id,
            "session_id": session_id,
            "seq": seq,
            "ts": format_ts(ts),
            "action": self.action,
            "outcome": self.outcome,
            "actor": {"user": src.user, "role": src.role},
            "target": self.target,
            "source": {"ip": src.ip, "user_agent": src.user_agent},
            "request_id": src.request_id,
            "details": self.details,
        }


def seal_event(
    key: bytes, prev_hash: str, draft: Draft, session_id: str | None, seq: int | None, ts: float
) -> tuple[dict[str, Any], str]:
    """Complete a draft: returns the full event and its canonical JSON."""
    body = draft.body(session_id, seq, ts)
    body_json = canonical_json(body)
    if not body_json.isascii():
        try:
            body_json.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates (from odd headers or paths) cannot be stored as
            # UTF-8: they become "?", and the record is kept.
            body = scrub(body)
            body_json = canonical_json(body)
    body["hash"] = chain_hash(key, prev_hash, body_json)
    return body, canonical_json(body)

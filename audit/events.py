"""Audit event records: canonical JSON, identifiers, times and the hash chain.

An event (API.md, "Audit records") has exactly the keys of :data:`EVENT_KEYS`.
``hash`` = HMAC-SHA256(audit key, previous hash + canonical JSON of the event
without ``hash``); the chain of a session starts from :func:`genesis`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import json.encoder
import os
from collections.abc import Callable
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

# Changes of accounts (the command line's adduser, passwd, disable, enable):
# security events of outcome success, recorded
# from the spool's account_changes (handlers.auth.Accounts.record_account_changes).
USER_ACTIONS = frozenset(
    {
        "user.create",
        "user.password_change",
        "user.disable",
        "user.enable",
    }
)

SECURITY_ACTIONS = USER_ACTIONS | frozenset(
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


def _not_serializable(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_slow_dumps = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
# CPython's C encoder, made once (json.dumps builds one per call): same output.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_basestring = getattr(json.encoder, "c_encode_basestring", None)

if _c_make_encoder is not None and _c_basestring is not None:
    # markers=None: no circular-reference bookkeeping (events are trees).
    _c_encode = _c_make_encoder(
        None, _not_serializable, _c_basestring, None, ":", ",", True, False, False
    )

    def _dumps(obj: Any) -> str:
        return "".join(_c_encode(obj, 0))

else:  # pragma: no cover - other Pythons

    def _dumps(obj: Any) -> str:
        return _slow_dumps(obj)


_string: Callable[[str], str] = _c_basestring or _dumps


def _scalar(value: Any) -> str:
    """The canonical JSON of a str or None; anything else via the full encoder."""
    if type(value) is str:
        return _string(value)
    if value is None:
        return "null"
    return _dumps(value)


def canonical_json(obj: Any) -> str:
    """Sorted keys, compact separators, no NaN; UTF-8 when encoded."""
    return _dumps(obj)


def new_id() -> str:
    """A random 128-bit identifier as 32 hex digits."""
    return os.urandom(16).hex()  # what secrets.token_hex does, minus two calls


# Second -> "YYYY-MM-DDTHH:MM:SS". Not one entry: GET /me formats its
# session's start and expiry, two seconds that alternate, and each miss
# costs a datetime and a strftime (py-spy: 10 % of a /me request).
_PREFIXES: dict[int, str] = {}
_PREFIXES_MAX = 4096


# The last millisecond formatted and its text: events come dozens to a
# millisecond under load (one tuple, replaced whole: safe from any thread).
_last_ts: tuple[int, str] = (-1, "")


def format_ts(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-11-26T14:31:07.123Z``."""
    global _last_ts
    whole_ms = round(epoch * 1000)
    last = _last_ts
    if last[0] == whole_ms:
        return last[1]
    sec, ms = divmod(whole_ms, 1000)
    prefix = _PREFIXES.get(sec)  # dict reads and writes are safe from any thread
    if prefix is None:
        prefix = f"{datetime.fromtimestamp(sec, tz=UTC):%Y-%m-%dT%H:%M:%S}"
        if len(_PREFIXES) >= _PREFIXES_MAX:
            _PREFIXES.clear()
        _PREFIXES[sec] = prefix
    text = f"{prefix}.{ms:03d}Z"
    _last_ts = (whole_ms, text)
    return text


def parse_ts(text: str) -> float:
    """Parse an RFC 3339 time (``Z`` or an offset) into epoch seconds."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()



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


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_key_pads: dict[bytes, tuple[Any, Any]] = {}


def _pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states after the HMAC inner and outer key pads (RFC 2104), per key."""
    pads = _key_pads.get(key)
    if pads is None:
        k = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
        pads = (hashlib.sha256(k.translate(_IPAD)), hashlib.sha256(k.translate(_OPAD)))
        if len(_key_pads) > 64:
            _key_pads.clear()
        _key_pads[key] = pads
    return pads


def chain_hash(key: bytes, prev_hash: str, body_json: str) -> str:
    """HMAC-SHA256 over the previous hash and the canonical body.

    Same value as ``hmac.new(key, msg, sha256)``; the key pads are hashed
    once per key and copied, which is several times cheaper per event.
    """
    inner, outer = _pads(key)
    h = inner.copy()
    h.update((prev_hash + body_json).encode("utf-8"))
    o = outer.copy()
    o.update(h.digest())
    digest: str = o.hexdigest()
    return digest


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


# The record in sorted key order, cut where "hash" sorts (after "event_id",
# before "outcome"); each %s is a value's canonical JSON.
_HEAD = '{"action":%s,"actor":{"role":%s,"user":%s},"details":%s,"event_id":%s'
_TAIL = (
    '"outcome":%s,"request_id":%s,"seq":%s,"session_id":%s,'
    '"source":{"ip":%s,"user_agent":%s},"target":%s,"ts":"%s"}'
)


def _target_json(target: Any) -> str:
    """The canonical JSON of a target: ``{"id":…,"type":…}`` assembled when it
    is just those two strings (a document's, once an event), else encoded."""
    if type(target) is dict and len(target) == 2:
        tid, kind = target.get("id"), target.get("type")
        if type(tid) is str and type(kind) is str:
            return f'{{"id":{_string(tid)},"type":{_string(kind)}}}'
    return _dumps(target)


def _halves(draft: Draft, session_id: str | None, seq: int | None,
            stamp: str) -> tuple[str, str] | None:
    """The record's canonical JSON in two halves split where ``hash`` sorts
    (after ``event_id``, before ``outcome``); None if a string in it cannot
    be encoded as UTF-8 (a lone surrogate)."""
    src = draft.source
    action, outcome, event_id = draft.action, draft.outcome, draft.event_id
    user, role, ip, agent, request_id = (
        src.user, src.role, src.ip, src.user_agent, src.request_id
    )
    details, target = draft.details, draft.target
    enc = _string  # inlined for str (the common case): one call less per field
    head = _HEAD % (
        enc(action) if type(action) is str else _scalar(action),
        enc(role) if type(role) is str else _scalar(role),
        enc(user) if type(user) is str else _scalar(user),
        "{}" if type(details) is dict and not details else _dumps(details),
        enc(event_id) if type(event_id) is str else _scalar(event_id),
    )
    tail = _TAIL % (
        enc(outcome) if type(outcome) is str else _scalar(outcome),
        enc(request_id) if type(request_id) is str else _scalar(request_id),
        str(seq) if type(seq) is int else _dumps(seq),
        enc(session_id) if type(session_id) is str else _scalar(session_id),
        enc(ip) if type(ip) is str else _scalar(ip),
        enc(agent) if type(agent) is str else _scalar(agent),
        "null" if target is None else _target_json(target),
        stamp,
    )
    if not (head.isascii() and tail.isascii()):
        try:
            head.encode("utf-8")
            tail.encode("utf-8")
        except UnicodeEncodeError:
            return None
    return head, tail


def seal_text(
    key: bytes, prev_hash: str, draft: Draft, session_id: str | None, seq: int | None, ts: float
) -> tuple[str, str]:
    """:func:`seal_event` without the event as a dict: its ``hash`` and its
    canonical JSON (the spool's hot path, which stores only the text)."""
    halves = _halves(draft, session_id, seq, format_ts(ts))
    if halves is None:
        event, text = _seal_scrubbed(key, prev_hash, draft, session_id, seq, ts)
        return event["hash"], text
    head, tail = halves
    digest = chain_hash(key, prev_hash, head + "," + tail)
    return digest, f'{head},"hash":"{digest}",{tail}'


def seal_event(
    key: bytes, prev_hash: str, draft: Draft, session_id: str | None, seq: int | None, ts: float
) -> tuple[dict[str, Any], str]:
    """Complete a draft: returns the full event and its canonical JSON.

    The record is encoded once, in two halves (:func:`_halves`): the body
    without ``hash`` and the full record are both cut from the same two
    strings, byte for byte what :func:`canonical_json` gives for each, at
    half the encoding cost. The top level is assembled in sorted key order
    around per-value encodings (the caller's ``details`` and ``target`` with
    sorted keys).
    """
    stamp = format_ts(ts)
    halves = _halves(draft, session_id, seq, stamp)
    if halves is None:
        return _seal_scrubbed(key, prev_hash, draft, session_id, seq, ts)
    head, tail = halves
    digest = chain_hash(key, prev_hash, head + "," + tail)
    event = draft.body(session_id, seq, ts)  # (its time is format_ts's kept text)
    event["hash"] = digest
    return event, f'{head},"hash":"{digest}",{tail}'


def _seal_scrubbed(
    key: bytes, prev_hash: str, draft: Draft, session_id: str | None, seq: int | None, ts: float
) -> tuple[dict[str, Any], str]:
    # Lone surrogates (from odd headers or paths) cannot be stored as
    # UTF-8: they become "?", and the record is kept.
    body = scrub(draft.body(session_id, seq, ts))
    body["hash"] = chain_hash(key, prev_hash, canonical_json(body))
    return body, canonical_json(body)

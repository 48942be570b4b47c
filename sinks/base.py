"""The sink interface: where sealed session parts and security events end up.

A sink write is idempotent by ``_id``: writing the same document twice is a
success; writing a different document (another ``hash``) under an ``_id``
that is already stored raises :class:`SinkConflict`, which the flusher
treats as a permanent rejection (dead letter, alarm).

Errors are classified into three kinds, and only these may escape a sink:

* :class:`SinkRateLimited` (``retry_after`` seconds, or ``None``): the sink
  asked us to slow down; the flusher pauses *all* sending.
* :class:`SinkUnavailable`: may or may not have landed; retried forever with
  the same ``_id``.
* :class:`SinkRejected`: permanent for this document; dead letter.
"""

from __future__ import annotations

import base64
import json
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

Doc = dict[str, Any]


class SinkError(Exception):
    """Base of the three classified sink errors."""


class SinkRateLimited(SinkError):
    def __init__(self, message: str = "rate limited", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkUnavailable(SinkError):
    pass


class SinkRejected(SinkError):
    pass


class SinkUnreadable(SinkError):
    """A query's answer holds a document the sink cannot hand out (text that
    is not UTF-8, a damaged page, no JSON: another process's doing): the
    admin API's 503 ``sink_unavailable``, a finding of ``verify``."""


class SinkConflict(SinkRejected):
    """The ``_id`` is stored already with a different ``hash``."""


class QueryNotSupported(SinkError):
    pass


def event_count(part: Doc) -> int:
    """A stored part's ``event_count``; 0 if it is no count (a part another
    process wrote: a string, null, or JSON's 1e400, a float infinity; or
    past 64 bits: summed, JSON's digits went past the 4,300 Python prints)."""
    try:
        n = int(part.get("event_count", 0))
    except (TypeError, ValueError, OverflowError):
        return 0
    return n if n < 1 << 63 else 0


# JSON's escape of one half of a UTF-16 surrogate pair ("\ud800").
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate(text: str, doc: Any) -> bool:
    """Whether ``doc``, parsed from the JSON ``text``, holds a lone surrogate
    (JSON's ``"\\ud800"`` alone: a pair is one character), which no answer
    can encode as UTF-8: a UnicodeEncodeError, a 500, for every answer
    holding the document. Text that is not UTF-8, as SQLite's that cannot
    be decoded; the sink never writes one (its JSON is not ASCII-escaped,
    and the spool stores none): another writer's."""
    if _SURROGATE_ESCAPE.search(text) is None:
        return False
    try:
        _encode(doc).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def odd_part(part: Any, *, events: bool = True) -> bool:
    """Whether a stored part is one the admin API cannot hand out: it sorts
    parts by ``part``, summarises them by ``session_id`` and merges their
    events by ``seq``. A document another writer put in the sink (not an
    object, without a string ``session_id`` or a number, or with events
    that are not objects with an integer ``seq``) was a KeyError or
    TypeError there, a 500 with a traceback; a sink raises
    :class:`SinkUnreadable` for it instead (503, and verify's finding).
    Without ``events``, only what a listing's summary reads is looked at."""
    if not isinstance(part, dict):
        return True
    number, found = part.get("part"), part.get("events", []) if events else []
    return (not isinstance(part.get("session_id"), str)
            or not isinstance(number, (int, float)) or isinstance(number, bool)
            or not isinstance(found, list)
            or not all(isinstance(e, dict) and isinstance(e.get("seq"), int)
                       and not isinstance(e["seq"], bool) for e in found))


def summarize_parts(parts: list[Doc]) -> Doc:
    """A session summary (API.md) from the stored parts of one session.

    ``state`` is ``stored`` when the final part is among them; a session
    whose only stored parts are checkpoints is still open or pending in the
    spool, and the admin API merges that in.
    """
    parts = sorted(parts, key=lambda p: p["part"])
    first, last = parts[0], parts[-1]
    final = last.get("final", False)
    return {
        "session_id": first["session_id"],
        "user": first.get("user"),
        "state": "stored" if final else "pending",
        "session_start_time": first.get("session_start_time"),
        "session_end_time": last.get("session_end_time") if final else None,
        "session_duration_seconds": last.get("session_duration_seconds") if final else None,
        "event_count": sum(event_count(p) for p in parts),
        "seal_reason": last.get("seal_reason") if final else None,
        "parts": len(parts),
    }


class RawJSON(str):
    """Text that is JSON already: an event exactly as the spool stored it."""

    __slots__ = ()


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(doc: Doc) -> str:
    """Compact JSON of a sink document.

    A part whose ``events`` are :class:`RawJSON` (the flusher gives those to
    sinks with ``raw_events``) has them spliced in as they are, instead of
    parsing 500 stored events only to encode them again.
    """
    events = doc.get("events")
    if isinstance(events, list) and events and all(type(e) is RawJSON for e in events):
        rest = {k: v for k, v in doc.items() if k != "events"}
        head = _encode(rest)[:-1]
        return head + ("," if rest else "") + '"events":[' + ",".join(events) + "]}"
    return _encode(doc)


def sql_where(*filters: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A SQL ``WHERE`` body of the ``(clause, value)`` filters whose value is set.

    A tuple value fills several placeholders (a cursor's ``(ts, id)``); an
    empty one sets a clause without any.
    """
    clauses: list[str] = []
    args: list[Any] = []
    for clause, value in filters:
        if value is None:
            continue
        clauses.append(clause)
        args.extend(value if isinstance(value, tuple) else (value,))
    return " AND ".join(clauses) or "1 = 1", args


def encode_cursor(*values: Any) -> str:
    raw = json.dumps(list(values), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> list[Any]:
    """Decode a cursor from :func:`encode_cursor`; ``ValueError`` if malformed."""
    try:
        pad = "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(cursor + pad))
    # RecursionError: arrays nested deeper than the recursion limit ("[[[[...").
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError("malformed cursor") from exc
    if not isinstance(values, list):
        raise ValueError("malformed cursor")
    return values


class Sink(ABC):
    """One destination for audit records.

    ``write_part`` gets a part document (API.md "A part") with its ``_id``;
    ``write_security_events`` a list of security event documents, each with
    ``_id`` = ``event_id``. Both must be idempotent.

    Queries are optional (``queryable = False`` raises
    :class:`QueryNotSupported`). Times in filters are RFC 3339 strings, which
    compare correctly as text because they are all UTC with milliseconds.
    """

    type: str = "base"
    queryable: bool = False
    # True when the sink only serialises parts to JSON (never looks into the
    # events): the flusher then hands it the stored event text as RawJSON.
    raw_events: bool = False

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect; raise a sink error if the sink cannot be reached."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; safe to call twice and after a failed open."""

    @abstractmethod
    async def write_part(self, part: Doc) -> None: ...

    @abstractmethod
    async def write_security_events(self, events: list[Doc]) -> None: ...

    async def list_sessions(
        self,
        *,
        user: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Doc], str | None]:
        """Session summaries, newest ``session_start_time`` first.

        ``since``/``until`` bound ``session_start_time``; the cursor is opaque.
        """
        raise QueryNotSupported(f"the {self.type} sink cannot be queried")

    async def get_session_parts(self, session_id: str) -> list[Doc]:
        """Every stored part of one session, by ``part``; ``[]`` if none."""
        raise QueryNotSupported(f"the {self.type} sink cannot be queried")

    async def session_part_heads(self, session_id: str) -> list[Doc]:
        """:meth:`get_session_parts` without their ``events``: what a session's
        summary is made of, and which parts to read one at a time with
        :meth:`session_part` (the admin API streams a session's events so).

        By default from :meth:`get_session_parts`, which holds every event of
        the session at once: a queryable sink overrides both."""
        return [{k: v for k, v in p.items() if k != "events"}
                for p in await self.get_session_parts(session_id)]

    async def session_part(self, session_id: str, part: Any) -> list[Doc]:
        """The stored parts of one session numbered ``part``, whole, as
        :meth:`get_session_parts` gives them: one, or ``[]`` if none (more
        only where another writer stored a second under another ``_id``)."""
        return [p for p in await self.get_session_parts(session_id) if p.get("part") == part]

    async def conflicting_copies(self) -> list[tuple[str, str, str]]:
        """Documents stored twice under one ``_id`` with different content,
        that the sink keeps both of (an append-only file can): ``(_id, "part"
        or "security event", where)``. For ``verify``; most sinks refuse them."""
        return []

    async def unchecked_records(self) -> list[str]:
        """What the sink holds that ``verify`` cannot check as a part or a
        security event, nor compare with one (an append-only file can hold
        anything: a line that is not JSON, or lacks what places it), each
        said in words with where it is. For ``verify``: another reader may
        take such a record; a sink whose rows are its documents has none."""
        return []

    async def index_mismatches(self) -> list[tuple[str, str, str]]:
        """Documents whose copies in the sink's own query columns (what the
        admin API filters and sorts on) disagree with the document: ``(_id,
        "part" or "security event", the columns)``. For ``verify``; a sink
        that queries the documents themselves has none."""
        return []

    async def session_ids(self) -> AsyncIterator[str]:
        """Every session the sink holds any part of, once each (for verify).

        By default the sessions :meth:`list_sessions` pages through; a sink
        whose listing starts from a session's part 0 must override it, or a
        session whose part 0 went missing would never be checked.
        """
        cursor: str | None = None
        while True:
            summaries, cursor = await self.list_sessions(limit=200, cursor=cursor)
            for s in summaries:
                yield str(s["session_id"])
            if cursor is None:
                return

    async def list_security_events(
        self,
        *,
        since: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Doc], str | None]:
        """Security events, newest ``ts`` first; ``kind`` filters on ``action``."""
        raise QueryNotSupported(f"the {self.type} sink cannot be queried")

    async def security_events_oldest_first(self) -> AsyncIterator[Doc]:
        """Every security event the sink holds, oldest first (for verify): in
        the order they were written where the sink keeps it, else by ``ts``.

        By default it pages through :meth:`list_security_events` (newest
        first) and reverses them, holding them all in memory; a sink that
        can stream them in order overrides it.
        """
        docs: list[Doc] = []
        cursor: str | None = None
        while True:
            page, cursor = await self.list_security_events(limit=1000, cursor=cursor)
            docs.extend(page)
            if cursor is None:
                break
        for doc in reversed(docs):
            yield doc

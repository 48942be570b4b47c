"""Audit administration (role ``admin``): sessions, security events, status, flush.

Open and pending sessions come from the spool, stored ones from the sink
where it can be queried; the two are merged newest first with one cursor.
Reading the audit API is itself audited (``audit.query``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from audit import queries
from audit.engine import AuditEngine
from audit.events import SECURITY_ACTIONS, Draft, format_ts, parse_ts
from audit.logthrottle import LogThrottle, more
from audit.spool import SpoolClosed, SpoolFull, SpoolUnavailable
from audit.store import SessionNotOpen, Writer, shown_ms
from sinks.base import (
    Doc,
    QueryNotSupported,
    SinkError,
    SinkUnreadable,
    decode_cursor,
    encode_cursor,
    summarize_parts,
)

from .errors import ApiError, bad_request, json_response, not_found, without_paths
from .keys import CONFIG, CTX, ENGINE, REQUEST_ID
from .streaming import StreamedJson

log = logging.getLogger("session_audit.admin")

MAX_LIMIT = 500
STATES = ("open", "pending", "stored")
# With a state filter, how many merged pages one request may read to fill
# its page; past that it answers a short page with a next_cursor.
_MAX_PAGES = 20


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# An action of the handler done only once its audit.query is committed (the
# flush): a record refused (503 "nothing was done", or 401 for a session
# ended meanwhile) leaves it undone.
AFTER_RECORD: web.RequestKey[Callable[[], None]] = web.RequestKey("after_record")


# While one cause lasts (the sink down, a document it cannot hand out), an
# admin's page polled every few seconds logged a line each time.
_QUERY_LOG = LogThrottle()


def _sink_unavailable(engine: AuditEngine, exc: SinkError) -> ApiError:
    """503 ``sink_unavailable``; the sink's own words (a file path, a driver's
    message) go to the log, not to the client: once, then at most once a
    minute while the same kind of error lasts."""
    left_out = _QUERY_LOG.allow(type(exc).__name__)
    if left_out is not None:
        log.warning("admin query: the %s sink cannot be queried: %s%s", engine.sink.type, exc,
                    more(left_out))
    return ApiError(503, "sink_unavailable", "the sink cannot be queried now; try again"
                    " later", {"Retry-After": "5"})


def _recorded_query(request: web.Request) -> tuple[dict[str, str], str | None]:
    """The query as the handlers read it (the first value of each name, as
    ``request.query.get`` gives), for ``details.query``; and the first name
    given more than once, if any."""
    query: dict[str, str] = {}
    seen: set[str] = set()
    repeated = None
    for k, v in request.query.items():
        if k in seen:
            repeated = repeated or k[:64]
        seen.add(k)
        # Names without NUL (a key with one cannot be stored in MongoDB's
        # BSON, and its whole session part would be refused) and without a
        # leading "$" (MongoDB reads $ref and $id back as a reference, and
        # servers before 5.0 refuse the key): shown as U+FFFD and U+FF04.
        name = k[:64].replace("\x00", "\ufffd")
        if name.startswith("$"):
            name = "\uff04" + name[1:]
        if len(query) < 20 and name not in query:
            query[name] = v[:200]
    return query, repeated


def audited(handler: Handler) -> Handler:
    """Every call is recorded as ``audit.query`` in the caller's session, with
    its outcome, before the answer leaves: ``success``; ``failure`` with
    ``details.reason`` the error code (bad parameters, not found, sink
    unavailable); ``denied`` for a non-admin (403 ``forbidden``, checked
    before anything else), who also gets the security event ``admin.denied``.

    A parameter given twice is 400 ``invalid_request``: the record names the
    values the handler would have used, and there must be no other.
    """
    return _audited(handler, needs_space=True)


def audited_operational(handler: Handler) -> Handler:
    """:func:`audited`, but its ``audit.query`` is taken even by a full spool,
    up to :func:`operational_reserve` past its limit: status and flush are how
    an operator sees and clears one. Only for calls without query parameters
    (the endpoints take none), whose records are small; a monitor polling
    status for days still cannot grow the spool without bound."""
    return _audited(handler, needs_space=False)


def operational_reserve(max_bytes: int) -> int:
    """How far past ``spool_max_bytes`` status and flush are still recorded."""
    return max(256 * 1024, max_bytes // 100)


def _audited(handler: Handler, *, needs_space: bool) -> Handler:

    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        ctx = request[CTX]
        engine = request.app[ENGINE]
        spool = engine.spool
        space = (needs_space or bool(request.query)
                 or spool.spool_bytes >= spool.max_bytes + operational_reserve(spool.max_bytes))
        query, repeated = _recorded_query(request)
        details: dict[str, Any] = {"endpoint": request.path[:256], "query": query}
        draft = Draft("audit.query", details=details, source=ctx.source())
        sid = ctx.session_id
        if not ctx.is_admin:
            draft.outcome = "denied"
            draft.details = {**details, "reason": "not_admin"}
            denied = Draft("admin.denied", outcome="denied", details=draft.details,
                           source=ctx.source())

            def both(w: Writer) -> None:  # one job: both records or neither
                w.append(sid, draft)
                w.append_security(denied, sid)

            await engine.spool.submit(both)
            raise ApiError(403, "forbidden", "this endpoint needs the admin role")
        try:
            if repeated is not None:
                raise bad_request(f"parameter {repeated!r} is given more than once")
            resp = await handler(request)
        except SessionNotOpen:
            raise  # ended meanwhile: error_middleware records auth.session_ended
        except ApiError as err:  # bad parameters, not found, sink unavailable
            draft.outcome = "failure"
            draft.details = {**details, "reason": err.code}
            # If that fails, its 503 answers instead.
            await engine.record(sid, draft, needs_space=space)
            raise
        except Exception as exc:
            draft.outcome = "failure"
            unavailable = isinstance(exc, (SpoolFull, SpoolUnavailable, SpoolClosed))
            draft.details = {**details, "reason": "audit_unavailable" if unavailable
                             else "internal_error"}
            with contextlib.suppress(Exception):  # best effort: the error answers anyway
                await engine.record(sid, draft, needs_space=space)
            raise
        # Awaited whatever audit.ack says: the answer is out once this returns,
        # and a session ended meanwhile must get 401, not audit data unrecorded.
        await engine.record(sid, draft, needs_space=space, durable=True)
        act = request.get(AFTER_RECORD)
        if act is not None:
            act()
        return resp

    return run


# RFC 3339's date-time: a full date and time, with a zone (Python's parser
# alone takes dates, hours, week dates and times without a zone). Its digits
# are ASCII: \d alone is any Unicode digit, and int() reads a fraction of
# Arabic-Indic or fullwidth ones.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})",
                      re.ASCII)


def _time_param(request: web.Request, name: str, *, upper: bool = False) -> tuple[str, int] | None:
    """The time as clients see times (whole ms, UTC) and in ms since the epoch.

    Both bounds are inclusive of the times shown: a time given finer than a
    millisecond is taken at the first shown time not before it (``since``),
    or the last not after it (``until``, ``upper``). Rounded to the nearest,
    ``since=...07.1231Z`` listed a session shown as ``...07.123Z``, before
    it, and ``until=...07.1229Z`` one shown as ``...07.123Z``, after it."""
    value = request.query.get(name)
    if value is None or value == "":
        return None
    m = _RFC3339.fullmatch(value)
    if not m:
        raise bad_request(f"{name} must be an RFC 3339 time (2026-11-26T14:31:07Z)")
    digits = (m.group(1) or ".")[1:]
    try:
        # Whole seconds (exact as a float), the fraction read from the text:
        # the parser keeps 6 digits at most, and a float no exact thousandths.
        seconds = round(parse_ts(value[:m.start(1)] + value[m.end(1):] if digits else value))
    except ValueError:
        raise bad_request(f"{name} must be an RFC 3339 time (2026-11-26T14:31:07Z)") from None
    ms = int((digits + "000")[:3])
    if not upper and digits[3:].strip("0"):
        ms += 1  # past the millisecond: the next one shown is the first within
    return _shown(seconds * 1000 + ms)


# The range of times as shown: format_ts writes a year below 1000 without its
# leading zeros (which would compare as text after every other time) and
# cannot write one past 9999. A time outside it is taken at its edge.
_EARLIEST, _LATEST = "1000-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z"


def _shown(ms: int) -> tuple[str, int]:
    """``ms`` since the epoch as a time is shown, within years 1000-9999: a
    valid RFC 3339 time with an offset (``9999-12-31T23:59:59-23:00``) can
    fall outside them in UTC."""
    earliest, latest = shown_ms(parse_ts(_EARLIEST)), shown_ms(parse_ts(_LATEST))
    if ms < earliest:
        return _EARLIEST, earliest
    if ms > latest:
        return _LATEST, latest
    return format_ts(ms / 1000), ms


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit") or "50"  # empty, as every other parameter: not given
    # isdigit() alone lets '²' or '٣' through to int(), which then raises (500);
    # so does int() of more than 4300 digits (leading zeros included): what
    # has more digits than MAX_LIMIT past its zeros is out of range unread.
    digits = raw.lstrip("0") or "0"
    if (not (raw.isascii() and raw.isdigit()) or len(digits) > len(str(MAX_LIMIT))
            or not 1 <= int(digits) <= MAX_LIMIT):
        raise bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(digits)


def _cursor(request: web.Request) -> tuple[str, str] | None:
    """The (time as shown, id) a page ends at: as this server wrote it (a
    time in another form would compare as text against the shown ones)."""
    raw = request.query.get("cursor")
    if not raw:
        return None
    try:
        ts, key = decode_cursor(raw)
        if not isinstance(ts, str) or not isinstance(key, str):
            raise ValueError
        if format_ts(parse_ts(ts)) != ts:
            raise ValueError
        # JSON's "\ud800" is a lone surrogate, which no query can bind:
        # UnicodeEncodeError (a ValueError) here, not in the spool's query.
        key.encode("utf-8")
    except (ValueError, TypeError, OverflowError):
        raise bad_request("cursor is not valid") from None
    return ts, key


def _keyed(cursor: tuple[str, str] | None) -> tuple[int, str] | None:
    """A cursor as the spool's key: (ms, id)."""
    return (shown_ms(parse_ts(cursor[0])), cursor[1]) if cursor is not None else None


def _params(request: web.Request, allowed: set[str]) -> None:
    unknown = set(request.query) - allowed
    if unknown:
        raise bad_request(f"unknown parameters: {', '.join(sorted(unknown))[:200]}")


@audited
async def list_sessions(request: web.Request) -> web.Response:
    _params(request, {"user", "since", "until", "state", "limit", "cursor"})
    window = (_time_param(request, "since"), _time_param(request, "until", upper=True))
    limit = _limit(request)
    cursor = _cursor(request)
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        raise bad_request("state must be open, pending or stored")
    user = request.query.get("user") or None
    engine = request.app[ENGINE]
    # Where the next page starts: after the last session listed or, when a
    # filtered request stops early, after the last session it looked at.
    resume: tuple[str, str] | None = None
    if state is None:
        page, more = await _merged_page(engine, user, window, cursor, limit, state)
        if more and page:
            resume = _session_key(page[-1])
    else:
        # The state filter drops sessions after the merge: page on until the
        # page is full, so that a short page really is the last one.
        page, more, after = [], True, cursor
        for _ in range(_MAX_PAGES):
            got, more = await _merged_page(engine, user, window, after,
                                           limit + 1 - len(page), state)
            if not got:
                break  # no step forward: never hand back the cursor it was given
            after = _session_key(got[-1])
            page += [s for s in got if s["state"] == state]
            if len(page) > limit or not more:
                break
        if len(page) > limit:
            page = page[:limit]
            resume = _session_key(page[-1])
        elif more and after != cursor:
            resume = after
    next_cursor = encode_cursor(*resume) if resume is not None else None
    return json_response({"sessions": page, "next_cursor": next_cursor})


# Where a time that is no string sorts (:func:`_session_key`): last, and in
# a cursor as a time a cursor may hold.
_NO_TIME = format_ts(0)


def _text(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _session_key(s: Doc) -> tuple[str, str]:
    """Where a session sorts in a listing (and its page's cursor): by start,
    then id, newest first. A sink's document another process changed may
    hold a start of another type (a number, null): sorted beside strings it
    was a TypeError, every listing a 500. It sorts as the epoch, last;
    verify reports the document."""
    return _text(s.get("session_start_time"), _NO_TIME), _text(s.get("session_id"))


def _event_key(e: Doc) -> tuple[str, str]:
    """:func:`_session_key` for a security event: by ts, then _id."""
    return _text(e.get("ts"), _NO_TIME), _text(e.get("_id"))


async def _merged_page(
    engine: AuditEngine, user: str | None,
    window: tuple[tuple[str, int] | None, tuple[str, int] | None],
    cursor: tuple[str, str] | None, limit: int, state: str | None,
) -> tuple[list[Doc], bool]:
    """Up to ``limit`` sessions after ``cursor``, newest first, from the spool
    and the sink merged; and whether there may be more.

    Both are asked by the key clients see and send back: the start time
    shown (whole ms), then the session id. Open and pending sessions are
    always in the spool: with ``state`` one of those, the sink is not asked;
    the spool is asked for sessions in its matching ``sessions.state`` only
    (for ``pending``, those with a part the sink has not taken).
    """
    since, until = window
    spool_state = {"open": "open", "pending": "pending", "stored": "sealed"}.get(state or "")
    from_spool = await engine.spool.read(
        lambda c: queries.list_sessions(
            c, user=user, since=since[1] if since else None, until=until[1] if until else None,
            before=_keyed(cursor), limit=limit + 1, state=spool_state)
    )
    spool_more = len(from_spool) > limit
    from_sink: list[Doc] = []
    sink_more = False
    if state in (None, "stored"):
        try:
            sink_cursor = encode_cursor(*cursor) if cursor else None
            from_sink, nxt = await engine.sink.list_sessions(
                user=user, since=since[0] if since else None,
                until=until[0] if until else None, limit=limit + 1, cursor=sink_cursor)
            sink_more = nxt is not None or len(from_sink) > limit
        except QueryNotSupported:
            pass
        except SinkError as exc:
            raise _sink_unavailable(engine, exc) from None
    if cursor is not None:  # (see security_events)
        from_sink = [s for s in from_sink if _session_key(s) < cursor]
    merged: dict[str, Doc] = {s["session_id"]: s for s in from_sink}
    spooled = {s["session_id"] for s in from_spool}
    ids = [s["session_id"] for s in from_sink if s["session_id"] not in spooled]
    if ids:
        # A session the sink holds (a part of) may be open or pending in the
        # spool, yet not in the spool's answer above: beyond its window (a
        # state filter), or begun after that read, with a checkpoint part
        # flushed before the sink's (it looked ended: "pending"). The spool
        # knows more.
        known = await engine.spool.read(lambda c: queries.sessions_by_id(c, ids))
        merged.update({s["session_id"]: s for s in known})
    merged.update({s["session_id"]: s for s in from_spool})  # the spool knows more
    ordered = sorted(merged.values(), key=_session_key, reverse=True)
    return ordered[:limit], len(ordered) > limit or spool_more or sink_more


@audited
async def get_session(request: web.Request) -> web.StreamResponse:
    """The session's summary, then its events, merged from the spool and the
    sink a part at a time and written as they come (:class:`StreamedJson`):
    memory for about one part, whatever the session's length.

    Everything that can fail with an error answer is done before the first
    byte: the spool's plan of the session (its summary, the ranges of events
    it holds), the sink's parts without their events (a part that cannot be
    read, a sink down) and the answer's first chunk (all of it, for most
    sessions: a part of it found unreadable is a 503, recorded as such). A
    part found unreadable later cuts the answer off (see
    ``handlers/streaming.py``)."""
    _params(request, set())
    sid = request.match_info["session_id"]
    engine = request.app[ENGINE]
    plan = await engine.spool.read(lambda c: queries.session_plan(c, sid))
    heads: list[Doc] | None = None
    queryable = True
    try:
        heads = await engine.sink.session_part_heads(sid)
        for head in heads:
            if not _a_number(head.get("part")):
                raise SinkUnreadable(f"{engine.sink.type} sink: a part of session {sid!r}"
                                     f" has no number: {head.get('part')!r}")
    except QueryNotSupported:
        queryable = False
    except SinkError as exc:
        # The spool alone answers only while it still holds every event.
        if plan is None or plan["held"] < plan["summary"]["event_count"]:
            raise _sink_unavailable(engine, exc) from None
        heads = None
    if plan is None and not heads:
        raise not_found("no such session")
    summary = plan["summary"] if plan is not None else summarize_parts(heads or [])
    resp = StreamedJson(_session_json(engine, sid, summary, plan, heads, queryable),
                        request_id=request[REQUEST_ID], what=f"the events of session {sid}",
                        expected=(SinkError, SpoolFull, SpoolUnavailable, SpoolClosed))
    try:
        await resp.begin()  # (the spool's errors are 503 audit_unavailable as they are)
    except SinkError as exc:
        raise _sink_unavailable(engine, exc) from None
    return resp


def _a_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


async def _session_json(engine: AuditEngine, sid: str, summary: Doc, plan: Doc | None,
                        heads: list[Doc] | None, queryable: bool) -> AsyncIterator[str]:
    """The text of ``summary`` plus ``"events"`` (every event, by seq, each
    seq once: the spool's copy over the sink's) and ``"events_complete"``,
    as ``json_response`` wrote it whole: the same bytes.

    The events come by part number, each part the events the spool holds of
    it (read first) and the sink's copies of it (read after: a part the
    flusher stores and the spool drops meanwhile is found in the sink), then
    the uncut events of an open session as they were at the plan, with the
    sink's part they were cut into since, if any. Without ``heads`` (the
    sink was down and the spool held everything) the sink is asked only for
    a part the spool no longer holds whole; a sink that cannot be queried
    (http), never."""
    head = _encode(summary)
    yield head[:-1] + ("," if summary else "") + '"events":['
    spooled = {int(p): (first, last) for p, first, last in plan["segments"]} if plan else {}
    stored = {h["part"] for h in heads or ()}
    count = 0
    contiguous = True
    last_seq: int | None = None
    for number in sorted(set(spooled) | stored):
        events: dict[Any, Doc] = {}
        from_spool: list[Doc] = []
        short = False
        if number in spooled and plan is not None:
            first, last = spooled[number]
            from_spool = await engine.spool.read(functools.partial(
                queries.segment_events, sk=plan["sk"], first=first, last=last))
            short = len(from_spool) < last - first + 1
        if number in stored or (short and queryable):
            for part in await engine.sink.session_part(sid, number):
                for e in _part_events(engine, sid, part):
                    events[e["seq"]] = e
        for e in from_spool:
            events[e["seq"]] = e
        if not events:
            continue
        seqs = sorted(events)
        if last_seq is not None and seqs[0] <= last_seq:
            raise SinkUnreadable(
                f"{engine.sink.type} sink: part {number} of session {sid!r} holds events"
                f" at or before seq {last_seq}, which an earlier part holds")
        pieces = []
        for seq in seqs:
            count += 1
            contiguous = contiguous and seq == count
            pieces.append(_encode(events[seq]))
        yield ("," if last_seq is not None else "") + ",".join(pieces)
        last_seq = seqs[-1]
    # Behind a sink that cannot be queried (http), the parts already sent are
    # gone from here (and from a sink, a part may be missing): say so rather
    # than pass a partial list off as whole. A session this spool does not
    # know, of which the sink holds no final part, goes on elsewhere (in the
    # spool of another server sharing the sink): its summary counts only the
    # stored parts' events, and more are to come.
    complete = (count >= summary["event_count"] and contiguous
                and (plan is not None or summary.get("state") == "stored"))
    yield '],"events_complete":' + _encode(complete) + "}"


def _part_events(engine: AuditEngine, sid: str, part: Doc) -> list[Doc]:
    """A stored part's events; a part whose events are no list of objects
    with an integer seq is unreadable (another writer's)."""
    events = part.get("events") or []
    if not isinstance(events, list) or not all(
            isinstance(e, dict) and isinstance(e.get("seq"), int)
            and not isinstance(e["seq"], bool) for e in events):
        raise SinkUnreadable(f"{engine.sink.type} sink: part {part.get('part')!r} of session"
                             f" {sid!r} holds events that are not events with a seq")
    return events


@audited
async def security_events(request: web.Request) -> web.Response:
    _params(request, {"since", "kind", "limit", "cursor"})
    since = _time_param(request, "since")
    limit = _limit(request)
    cursor = _cursor(request)
    kind = request.query.get("kind") or None
    if kind is not None and kind not in SECURITY_ACTIONS:
        raise bad_request(f"kind must be one of: {', '.join(sorted(SECURITY_ACTIONS))}")
    engine = request.app[ENGINE]
    spooled = await engine.spool.read(
        lambda c: queries.list_security(c, since=since[1] if since else None, kind=kind,
                                        before=_keyed(cursor), limit=limit + 1))
    from_sink: list[Doc] = []
    sink_more = False
    try:
        from_sink, nxt = await engine.sink.list_security_events(
            since=since[0] if since else None, kind=kind, limit=limit + 1,
            cursor=encode_cursor(*cursor) if cursor else None)
        sink_more = nxt is not None
    except QueryNotSupported:
        pass
    except SinkError as exc:
        raise _sink_unavailable(engine, exc) from None
    if cursor is not None:
        # Only what sorts after the cursor, by the fields the page's order and
        # cursor come from. A sink that pages by columns of its own (sqlite)
        # answers a row whose document another writer moved later than its
        # columns past every cursor from then on: it ended every page, with
        # the same next_cursor, page after page.
        from_sink = [e for e in from_sink if _event_key(e) < cursor]
    # By _id, the spool's copy over the sink's. A document another writer
    # changed may have none, or one of another type: an object (MongoDB
    # takes one) was no dict key, a TypeError, a 500 for every listing
    # holding it. Such an _id (the spool's are text) is nobody's copy.
    merged: dict[Any, Doc] = {}
    for i, e in enumerate(from_sink):
        merged[e["_id"] if isinstance(e.get("_id"), str) else (i,)] = e
    merged.update({e["_id"]: e for e in spooled})
    ordered = sorted(merged.values(), key=_event_key, reverse=True)
    page = ordered[:limit]
    next_cursor = None
    if (len(ordered) > limit or sink_more) and page:
        next_cursor = encode_cursor(*_event_key(page[-1]))
    return json_response({"events": page, "next_cursor": next_cursor})


@audited_operational
async def status(request: web.Request) -> web.Response:
    _params(request, set())
    body = await request.app[ENGINE].status()
    config = request.app[CONFIG]
    # No file paths to a client (API.md); `server.py status` shows them.
    if body.get("spool_damaged"):
        body["spool_damaged"] = without_paths(body["spool_damaged"], config)
    sink = body.get("sink")
    if isinstance(sink, dict):
        sink.pop("where", None)
        if sink.get("last_error"):
            sink["last_error"] = without_paths(sink["last_error"], config)
    return json_response(body)


@audited_operational
async def flush(request: web.Request) -> web.Response:
    _params(request, set())
    request[AFTER_RECORD] = request.app[ENGINE].flusher.flush_now
    return json_response({"message": "flush requested"}, status=202)

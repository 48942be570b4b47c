"""Documents: CRUD with owner checks (admins see all) and optimistic ``version``.

Every action records its event through the engine before the response; the
SQL of a change runs on the spool's writer thread in the same transaction as
its event, so a document and its audit record commit together or not at all.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from audit.events import Draft, format_ts, new_id
from audit.middleware import RequestContext
from audit.spool import SpoolFull
from audit.store import DOCUMENT_COLUMNS, ActionError, read_document

from .errors import ApiError, bad_request, json_response
from .keys import CTX, ENGINE
from .requests import CLIENT_MAX_SIZE, INT64_MAX, audited_input, json_object, read_json

TITLE_MAX_CHARS = 200
CONTENT_MAX_BYTES = 1024 * 1024
DOC_ID_MAX = 64
T = TypeVar("T")


def document_json(row: tuple[Any, ...]) -> dict[str, Any]:
    keys = ("id", "title", "content", "owner", "version", "created_at", "updated_at")
    return dict(zip(keys, row, strict=True))


def _target(doc_id: str) -> dict[str, str]:
    return {"type": "document", "id": doc_id}


def fetch_visible(conn: sqlite3.Connection, ctx: RequestContext, doc_id: str) -> tuple[Any, ...]:
    """The document row if the caller may see it; ActionError otherwise."""
    return visible(ctx, read_document(conn, doc_id))


def visible(ctx: RequestContext, row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """A document's row (None: no such document) if the caller may see it;
    ActionError otherwise."""
    _check_visible(ctx, None if row is None else row[3])
    assert row is not None
    return tuple(row)


def check_visible(conn: sqlite3.Connection, ctx: RequestContext, doc_id: str) -> None:
    """:func:`fetch_visible` without reading the document (its owner only)."""
    if not _valid_id(doc_id):
        raise ActionError("not_found", message="no such document")
    row = conn.execute("SELECT owner FROM documents WHERE id = ?", (doc_id,)).fetchone()
    _check_visible(ctx, None if row is None else row[0])


def _check_visible(ctx: RequestContext, owner: str | None) -> None:
    if owner is None:
        raise ActionError("not_found", message="no such document")
    if owner != ctx.user and not ctx.is_admin:
        raise ActionError("not_owner", outcome="denied", message="no such document")


def _map(err: ActionError) -> ApiError:
    if err.reason in ("not_found", "not_owner"):
        return ApiError(404, "not_found", "no such document")
    if err.reason == "version_conflict":
        return ApiError(409, "version_conflict", err.message)
    return ApiError(400, "invalid_request", err.message)


async def _record(
    request: web.Request, draft: Draft, change: Any = None, *, read_only: bool = False,
    durable: bool = False, document: str | None = None,
) -> Any:
    ctx = request[CTX]
    try:
        return await request.app[ENGINE].record(ctx.session_id, draft, change,
                                                read_only=read_only, durable=durable,
                                                document=document)
    except ActionError as err:
        raise _map(err) from None


def _draft(request: web.Request, action: str, doc_id: str | None = None) -> Draft:
    return Draft(action, target=_target(doc_id) if doc_id else None,
                 source=request[CTX].source())


def _doc_id(request: web.Request) -> str:
    return request.match_info["doc_id"]


def _valid_id(doc_id: str) -> bool:
    return 0 < len(doc_id) <= DOC_ID_MAX and doc_id.isascii() and doc_id.isalnum()


def _check_fields(body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    allowed = {"title", "content"} | ({"version"} if partial else set())
    unknown = set(body) - allowed
    if unknown:
        raise bad_request(f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    out: dict[str, Any] = {}
    for name in ("title", "content"):
        if name not in body:
            if not partial:
                raise bad_request(f"{name} is required")
            continue
        if not isinstance(body[name], str):
            raise bad_request(f"{name} must be a string")
        out[name] = body[name]
    if "title" in out:
        if not out["title"].strip():
            raise bad_request("title must not be empty")
        if len(out["title"]) > TITLE_MAX_CHARS:
            raise bad_request(f"title is longer than {TITLE_MAX_CHARS} characters")
    if "content" in out and len(out["content"].encode("utf-8")) > CONTENT_MAX_BYTES:
        raise ApiError(413, "too_large", "content is larger than 1 MiB")
    if partial and "version" in body:
        v = body["version"]
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # JSON has one number type: 3.0 is the integer 3 (JSON Schema agrees)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= INT64_MAX:
            raise bad_request("version must be a positive integer")
        out["version"] = v
    return out


async def refuse_action(request: web.Request, draft: Draft, err: ActionError) -> ApiError:
    """Record an action refused by a check made outside the writer (e.g. chat)."""

    def refuse(conn: sqlite3.Connection, d: Draft) -> None:
        raise err

    try:
        await request.app[ENGINE].record(request[CTX].session_id, draft, refuse,
                                         read_only=True)
    except ActionError as recorded:
        return _map(recorded)
    raise AssertionError("a refused change always raises")  # pragma: no cover


async def _body(request: web.Request, draft: Draft, *, partial: bool) -> dict[str, Any]:
    return await audited_input(
        request, draft, lambda b: _check_fields(json_object(b), partial=partial)
    )


async def document_input(
    request: web.Request, draft: Draft, doc_id: str, parse: Callable[[Any], T], *,
    limit: int = CLIENT_MAX_SIZE,
) -> T:
    """The parsed body of an action on the document ``doc_id``.

    A bad body on a document the caller may not see is answered as that
    document: 404 ``not_found``, recorded ``denied`` with its security event
    ``access.denied`` (or ``failure``, ``not_found``, when there is no such
    document), not 400: the check of who may act on it comes first. On a
    document the caller may see, it is recorded as a failure with the error
    code as reason, and refused with that error.
    """
    try:
        return parse(await read_json(request, limit=limit))
    except ApiError as err:
        bad_input = err
    ctx = request[CTX]

    def check(conn: sqlite3.Connection, d: Draft) -> None:
        if not _valid_id(doc_id):
            raise ActionError("not_found", message="no such document")
        fetch_visible(conn, ctx, doc_id)
        raise ActionError(bad_input.code, message=bad_input.message)

    try:
        await request.app[ENGINE].record(ctx.session_id, draft, check, read_only=True)
    except ActionError as recorded:
        if recorded.reason in ("not_found", "not_owner"):
            raise _map(recorded) from None
        raise bad_input from None
    raise AssertionError("the check always raises")  # pragma: no cover


async def create(request: web.Request) -> web.Response:
    draft = _draft(request, "document.create")
    fields = await _body(request, draft, partial=False)
    ctx = request[CTX]
    doc_id = new_id()
    draft.target = _target(doc_id)
    draft.details = {"title_length": len(fields["title"]),
                     "content_bytes": len(fields["content"].encode("utf-8"))}
    now = format_ts(time.time())
    row = (doc_id, fields["title"], fields["content"], ctx.user, 1, now, now)

    def change(conn: sqlite3.Connection, d: Draft) -> tuple[Any, ...]:
        conn.execute(f"INSERT INTO documents ({DOCUMENT_COLUMNS})"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        return row

    await _record(request, draft, change)
    resp = json_response(document_json(row), status=201)
    resp.headers["Location"] = f"/documents/{doc_id}"  # RFC 9110 15.3.2
    return resp


async def list_documents(request: web.Request) -> web.Response:
    ctx = request[CTX]
    draft = _draft(request, "document.list")

    def listing(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
        sql = "SELECT id, title, owner, version, updated_at FROM documents"
        args: tuple[Any, ...] = ()
        if not ctx.is_admin:
            sql += " WHERE owner = ?"
            args = (ctx.user,)
        return conn.execute(sql + " ORDER BY updated_at DESC, id", args).fetchall()

    spool = request.app[ENGINE].spool
    if not spool.accepting:  # 503 before reading what the record could not follow
        raise SpoolFull("the audit spool cannot take the listing's event")
    rows = await spool.read_apart(listing)
    draft.details = {"count": len(rows)}
    # Read before it is recorded: awaited whatever audit.ack says, so that a
    # session ended meanwhile gets 401 session_ended, not the documents with
    # no record (under "fast" the failed append would only be logged).
    await _record(request, draft, durable=True)
    keys = ("id", "title", "owner", "version", "updated_at")
    return json_response({"documents": [dict(zip(keys, r, strict=True)) for r in rows]})


async def get_document(request: web.Request) -> web.Response:
    ctx = request[CTX]
    doc_id = _doc_id(request)
    draft = _draft(request, "document.access", doc_id[:DOC_ID_MAX * 2])

    if _valid_id(doc_id):
        # The row is read with the other reads of its batch (one statement).
        row = await _record(request, draft, lambda row, d: visible(ctx, row), read_only=True,
                            document=doc_id)
    else:
        def missing(conn: sqlite3.Connection, d: Draft) -> tuple[Any, ...]:
            raise ActionError("not_found", message="no such document")

        row = await _record(request, draft, missing, read_only=True)
    return json_response(document_json(row))


async def update_document(request: web.Request) -> web.Response:
    ctx = request[CTX]
    doc_id = _doc_id(request)
    draft = _draft(request, "document.update", doc_id[:DOC_ID_MAX * 2])
    fields = await document_input(request, draft, doc_id,
                                  lambda b: _check_fields(json_object(b), partial=True))
    now = format_ts(time.time())

    def change(conn: sqlite3.Connection, d: Draft) -> tuple[Any, ...]:
        if not _valid_id(doc_id):
            raise ActionError("not_found", message="no such document")
        row = fetch_visible(conn, ctx, doc_id)
        version = row[4]
        if "version" in fields and fields["version"] != version:
            d.details = {"expected_version": fields["version"], "current_version": version}
            raise ActionError("version_conflict",
                              message=f"the document is at version {version}")
        title = fields.get("title", row[1])
        content = fields.get("content", row[2])
        # Never before the document's last change (nor so its creation): a
        # wall clock stepped back (NTP) made updated_at < created_at, and the
        # listing, newest first, put the update below older ones. (RFC 3339
        # texts of one width compare as their times do.)
        stamp = max(now, row[6]) if isinstance(row[6], str) else now
        conn.execute(
            "UPDATE documents SET title = ?, content = ?, version = ?, updated_at = ?"
            " WHERE id = ?",
            (title, content, version + 1, stamp, doc_id),
        )
        d.details = {"version": version + 1, "fields": sorted(k for k in fields
                                                             if k != "version")}
        return (doc_id, title, content, row[3], version + 1, row[5], stamp)

    row = await _record(request, draft, change)
    return json_response(document_json(row))


async def delete_document(request: web.Request) -> web.Response:
    ctx = request[CTX]
    doc_id = _doc_id(request)
    draft = _draft(request, "document.delete", doc_id[:DOC_ID_MAX * 2])

    def change(conn: sqlite3.Connection, d: Draft) -> None:
        if not _valid_id(doc_id):
            raise ActionError("not_found", message="no such document")
        row = fetch_visible(conn, ctx, doc_id)
        conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
        d.details = {"version": row[4]}

    await _record(request, draft, change)
    return web.Response(status=204)

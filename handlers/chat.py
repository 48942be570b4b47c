"""Chat about a document through the configured AI provider, audited as ``ai.interaction``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from audit.engine import BEGUN, AuditEngine
from audit.events import Draft
from audit.spool import SpoolFull
from audit.store import ActionError, SessionNotOpen

from .ai import AIUnavailable
from .documents import (
    DOC_ID_MAX,
    _valid_id,
    check_visible,
    document_input,
    fetch_visible,
    refuse_action,
)
from .errors import ApiError, bad_request, json_response
from .keys import AI, CHAT_SLOTS, CHAT_TURNS, CONFIG, CTX, ENGINE
from .requests import json_object

log = logging.getLogger(__name__)

MESSAGE_MAX_BYTES = 16 * 1024
# A failing provider is logged at most once in this many seconds (each chat's
# own failure is in its record).
PROVIDER_WARN_SECONDS = 60.0
_provider_warned = -PROVIDER_WARN_SECONDS
# A chat waits this long for one of the CHAT_SLOTS, then gets 502 ai_unavailable.
CHAT_QUEUE_SECONDS = 30.0
CHAT_BODY_MAX = 256 * 1024  # a 16 KiB message, with room for JSON escapes


class UserTurns:
    """Each user's turns at the chat slots: at most ``limit`` of a user's
    chats hold or wait for one at once; the user's others wait here first
    (within the same :data:`CHAT_QUEUE_SECONDS`). A user is forgotten when
    none of theirs holds or waits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._users: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, user: str) -> AsyncIterator[None]:
        sem, n = self._users.get(user) or (asyncio.Semaphore(self.limit), 0)
        self._users[user] = (sem, n + 1)
        try:
            async with sem:
                yield
        finally:
            sem, n = self._users[user]
            if n == 1:
                del self._users[user]
            else:
                self._users[user] = (sem, n - 1)


def _digest(text: str) -> dict[str, Any]:
    data = text.encode("utf-8")
    return {"sha256": hashlib.sha256(data).hexdigest(), "length": len(text)}


def _message(body: Any) -> str:
    body = json_object(body)
    unknown = set(body) - {"message"}
    if unknown:
        raise bad_request(f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise bad_request("message must be a non-empty string")
    if len(message.encode("utf-8")) > MESSAGE_MAX_BYTES:
        raise ApiError(413, "too_large", "message is larger than 16 KiB")
    return message


async def chat(request: web.Request) -> web.Response:
    ctx = request[CTX]
    doc_id = request.match_info["doc_id"]
    draft = Draft("ai.interaction", target={"type": "document", "id": doc_id[:DOC_ID_MAX * 2]},
                  source=ctx.source())
    message = await document_input(request, draft, doc_id, _message, limit=CHAT_BODY_MAX)
    async with _kept_active(request.app[ENGINE], ctx.session_id,
                            request.app[CONFIG].audit.idle_timeout_seconds):
        return await _chat_accepted(request, draft, message)


@contextlib.asynccontextmanager
async def _kept_active(engine: AuditEngine, session_id: str, idle: float) -> AsyncIterator[None]:
    """A session whose user waits for a chat (for a slot, for the provider's
    answer) is not idle: touched every quarter of the idle timeout (at most
    every second) while the chat runs. (Its last request was the chat's
    start, so with ``ai.openai.timeout_seconds`` or the wait for a slot
    longer than ``audit.idle_timeout_seconds`` the reaper sealed the session
    as idle under a chat still waiting, and its user got 401 for the answer.)
    Token expiry and ``max_session_seconds`` still end it."""
    interval = max(0.05, min(1.0, idle / 4))

    async def touching() -> None:
        while True:
            await asyncio.sleep(interval)
            engine.touch(session_id)

    task = asyncio.ensure_future(touching())
    try:
        yield
    finally:
        task.cancel()


async def _chat_accepted(request: web.Request, draft: Draft, message: str) -> web.Response:
    ctx = request[CTX]
    doc_id = request.match_info["doc_id"]
    # Who may chat about the document is settled before the wait for a slot:
    # with every slot busy (a slow provider, or somebody's many chats),
    # another user's attempt is still 404 and access.denied, not ai_busy.
    try:
        await request.app[ENGINE].spool.read(lambda c: check_visible(c, ctx, doc_id))
    except ActionError as err:
        raise await refuse_action(request, draft, err) from None
    except asyncio.CancelledError:
        # Cut off while the check waits for the spool's reader: nothing was
        # sent, the attempt is recorded, as one cut off waiting for a slot.
        await _cut_off_unsent(request, draft)
        raise
    slots = request.app[CHAT_SLOTS]  # taken before the document is read into memory
    async with contextlib.AsyncExitStack() as turn:
        try:
            async with asyncio.timeout(CHAT_QUEUE_SECONDS):
                await turn.enter_async_context(request.app[CHAT_TURNS].turn(ctx.user))
                await slots.acquire()
        except TimeoutError:
            draft.outcome = "failure"
            draft.details = {"reason": "ai_busy", "queued_seconds": CHAT_QUEUE_SECONDS}
            await request.app[ENGINE].record(ctx.session_id, draft)
            raise ApiError(502, "ai_unavailable", "the AI provider is busy; try again later",
                           {"Retry-After": "5"}) from None
        except asyncio.CancelledError:
            # Cut off by the shutdown while waiting (every slot held by a slow
            # provider): nothing was sent, but the attempt is recorded.
            await _cut_off_unsent(request, draft)
            raise
        try:
            return await _chat(request, draft, message)
        finally:
            slots.release()


async def _chat(request: web.Request, draft: Draft, message: str) -> web.Response:
    ctx = request[CTX]
    engine = request.app[ENGINE]
    doc_id = request.match_info["doc_id"]
    if engine.session(ctx.session_id) is None:
        # It ended (or passed a deadline) while this chat waited for a slot:
        # nothing is sent.
        await engine.record_security(
            Draft("auth.session_ended", outcome="denied", target=draft.target,
                  source=draft.source, details={"reason": "session_ended",
                                                "action": draft.action}),
            ctx.session_id)
        raise SessionNotOpen(ctx.session_id, recorded=True)
    try:
        row = await engine.spool.read(lambda c: _visible(c, ctx, doc_id))
    except ActionError as err:
        raise await refuse_action(request, draft, err) from None
    except asyncio.CancelledError:
        await _cut_off_unsent(request, draft)  # (nothing sent: as above)
        raise
    if not engine.spool.accepting:
        # Asking the provider is the action: not without a place for its record.
        raise SpoolFull("the audit spool cannot take the interaction's event")
    provider = request.app[AI]
    capture = request.app[CONFIG].audit.capture_ai_content
    details: dict[str, Any] = {"model": provider.model, "prompt": _digest(message)}
    if capture:
        details["prompt_text"] = message
    draft.details = details
    # Noted before the document leaves: a process killed while the provider
    # has it records the interaction at its next start (AuditEngine.begin).
    try:
        begun = await engine.begin(ctx.session_id, draft)
    except asyncio.CancelledError:
        # Cut off while the note commits: nothing is sent. The record deletes
        # the note in its own commit (begin's deletion comes later, or in the
        # same commit when the note had committed as the cut came), so that
        # a kill between the two does not record the chat again at the next
        # start, as interrupted.
        await _cut_off_unsent(request, draft, BEGUN + draft.event_id)
        raise
    started = time.perf_counter()
    try:
        answer = await provider.answer(row[1], row[2], message)
    except AIUnavailable as exc:
        details["latency_ms"] = round(1000 * (time.perf_counter() - started), 1)
        details["error"] = str(exc)[:200]
        _warn_provider(details["error"])
        draft.outcome = "failure"
        draft.details = {**details, "reason": "ai_unavailable"}
        await _record_done(engine, ctx.session_id, draft, begun)
        raise ApiError(502, "ai_unavailable", "the AI provider is unavailable") from None
    except Exception:
        # A bug (a provider raising what it should not): the document may have
        # been sent, so the interaction is recorded before the 500.
        details["latency_ms"] = round(1000 * (time.perf_counter() - started), 1)
        draft.outcome = "failure"
        draft.details = {**details, "reason": "internal_error"}
        await _record_done(engine, ctx.session_id, draft, begun)
        raise
    except asyncio.CancelledError:
        # Cut off while the provider had the document: by the shutdown once
        # its wait for requests in flight is over (or by a dropped client where
        # aiohttp cancels handlers). The interaction is recorded all the same,
        # detached from this task: the engine's close waits for it.
        details["latency_ms"] = round(1000 * (time.perf_counter() - started), 1)
        draft.outcome = "failure"
        draft.details = {**details, "reason": "cancelled"}
        recording = engine.detach(engine.record_done(ctx.session_id, draft, begun))
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(recording)
        raise
    details.update({
        "model": answer.model,
        "latency_ms": round(1000 * (time.perf_counter() - started), 1),
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "reply": _digest(answer.reply),
    })
    if capture:
        details["reply_text"] = answer.reply
    draft.details = details
    await _record_done(engine, ctx.session_id, draft, begun)
    return json_response({
        "reply": answer.reply,
        "model": answer.model,
        "usage": {"prompt_tokens": answer.prompt_tokens,
                  "completion_tokens": answer.completion_tokens},
    })


async def _record_done(engine: AuditEngine, session_id: str, draft: Draft, begun: str) -> None:
    """:meth:`AuditEngine.record_done`, not left half way by a cancelled
    request (the shutdown, its grace over): the record of a chat whose
    document was sent runs on in a task of its own, which the engine's
    close waits for. (Cancelled with the request, a record that found the
    session ended never took its way into the security stream, and the
    chat's note was left for the next start, which recorded the chat as
    interrupted.)"""
    await asyncio.shield(engine.detach(engine.record_done(session_id, draft, begun)))


async def _cut_off_unsent(request: web.Request, draft: Draft, begun: str | None = None) -> None:
    """Record a chat cut off (by the shutdown, its grace over) before its
    document was sent: a failure, reason ``cancelled``, with no other details
    (one cut off while the provider has it keeps its model, prompt and
    latency). Detached from the cancelled task, as :func:`_chat` records
    that one: the engine's close waits for it. As that one, it is taken by
    a full spool (the request is over: a refusal would reach nobody), and
    if the session has ended it goes to the security stream. ``begun``: the
    key of the chat's note, deleted in the record's commit."""
    engine = request.app[ENGINE]
    draft.outcome = "failure"
    draft.details = {"reason": "cancelled"}
    recording = engine.detach(engine.record_done(request[CTX].session_id, draft, begun))
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.shield(recording)


def _warn_provider(error: str) -> None:
    """Tell the operator the provider fails (clients only see 502), at most
    once a :data:`PROVIDER_WARN_SECONDS`."""
    global _provider_warned
    now = time.monotonic()
    if now - _provider_warned >= PROVIDER_WARN_SECONDS:
        _provider_warned = now
        log.warning("AI provider unavailable: %s (chats get 502 ai_unavailable; logged at"
                    " most once a minute)", error)


def _visible(conn: sqlite3.Connection, ctx: Any, doc_id: str) -> tuple[Any, ...]:
    if not _valid_id(doc_id):
        raise ActionError("not_found", message="no such document")
    return fetch_visible(conn, ctx, doc_id)

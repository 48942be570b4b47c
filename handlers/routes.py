"""The route table: every endpoint of API.md, by name."""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler

from . import admin, auth, chat, documents, events, ops

# Routes that need no bearer token.
PUBLIC_ROUTES = frozenset({"token", "healthz", "readyz", "metrics", "openapi"})


async def expect_handler(request: web.Request) -> None:
    """aiohttp's own (``100 Continue``; 417 for another expectation), which
    runs before any middleware, except that a client gone before the ``100
    Continue`` could be written is not an error: aiohttp logged that with a
    traceback, and the attempt went unrecorded. Now the route goes on as for
    a client gone mid-body: refused, and recorded, with no answer to send."""
    try:
        await _default_expect_handler(request)
    except ConnectionError:
        request.writer.output_size = 0  # nothing was sent


class _Router:
    """``app.router``'s ``add_*`` methods with :func:`expect_handler` on every
    route (aiohttp has no default for all routes)."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        self._router = router

    def __getattr__(self, name: str) -> Any:
        add = getattr(self._router, name)
        return functools.partial(add, expect_handler=expect_handler)


def setup(app: web.Application) -> None:
    r = _Router(app.router)
    r.add_post("/token", auth.login, name="token")
    r.add_post("/logout", auth.logout, name="logout")
    r.add_get("/me", auth.me, name="me", allow_head=False)
    r.add_post("/documents", documents.create, name="document_create")
    r.add_get("/documents", documents.list_documents, name="document_list", allow_head=False)
    r.add_get("/documents/{doc_id}", documents.get_document, name="document_get",
              allow_head=False)
    r.add_put("/documents/{doc_id}", documents.update_document, name="document_update")
    r.add_delete("/documents/{doc_id}", documents.delete_document, name="document_delete")
    r.add_post("/documents/{doc_id}/chat", chat.chat, name="document_chat")
    r.add_post("/audit/events", events.post_events, name="client_events")
    r.add_get("/audit/sessions", admin.list_sessions, name="admin_sessions", allow_head=False)
    r.add_get("/audit/sessions/{session_id}", admin.get_session, name="admin_session",
              allow_head=False)
    r.add_get("/audit/security-events", admin.security_events, name="admin_security",
              allow_head=False)
    r.add_get("/audit/status", admin.status, name="admin_status", allow_head=False)
    r.add_post("/audit/flush", admin.flush, name="admin_flush")
    # HEAD too, for load balancers that probe with it.
    r.add_get("/healthz", ops.healthz, name="healthz")
    r.add_get("/readyz", ops.readyz, name="readyz")
    r.add_get("/metrics", ops.metrics, name="metrics", allow_head=False)
    r.add_get("/openapi.yaml", ops.openapi, name="openapi", allow_head=False)

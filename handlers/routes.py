"""The route table: every endpoint of API.md, by name."""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import HttpVersion11, hdrs, web, web_urldispatcher

from . import admin, auth, chat, documents, events, ops
from .errors import CONTINUE_OWED
from .keys import ENGINE

# Routes that need no bearer token.
PUBLIC_ROUTES = frozenset({"token", "healthz", "readyz", "metrics", "openapi"})


async def expect_handler(request: web.Request) -> None:
    """``Expect: 100-continue`` over HTTP/1.1: its ``100 Continue`` is owed
    (:data:`CONTINUE_OWED`) and sent when the route first reads the body
    (``requests.send_continue``), not here. aiohttp's own handler (private:
    ``_default_expect_handler``) runs before any middleware and sent it at
    once, before the token and the route's body limit were looked at: a
    client with no token, or announcing 100 MB, was told to send it all and
    then got its 401 or 413. An answer given without reading the body now
    comes at once, with ``Connection: close`` (error_middleware): the client
    may never send the body. Besides:

    - a client gone before the ``100 Continue`` could be written is not an
      error: the route goes on as for a client gone mid-body, refused and
      recorded, with no answer to send;
    - another expectation is ignored (RFC 9110 lets a server answer 417 or
      not): aiohttp's plain-text 417 quoted the header back, and came before
      the middlewares, so the request went unrecorded. The route now answers
      it like any other request, and ``100-continue`` beside it still gets
      its ``100 Continue``.
    """
    if request.version != HttpVersion11:
        return
    # A list of expectations ("100-continue, foo"), or the header twice: the
    # client waits for its 100 Continue all the same; the others are ignored.
    expected = {item.strip().lower() for value in request.headers.getall(hdrs.EXPECT, ())
                for item in value.split(",")}
    if "100-continue" in expected:
        request[CONTINUE_OWED] = True


# aiohttp's own, for the routes of any other application in the process.
_AIOHTTP_EXPECT_HANDLER = web_urldispatcher._default_expect_handler


async def _default_expect_handler(request: web.Request) -> None:
    """:func:`expect_handler` for this server's applications, aiohttp's own
    for any other: the default is the process's, and a route of another
    application in it (an embedder's, made after ``create_app``) got ours,
    which leaves the ``100 Continue`` to this server's routes: none went
    out, and a client waiting for it before sending its body waited until
    its own timeout."""
    if ENGINE in request.app:
        await expect_handler(request)
    else:
        await _AIOHTTP_EXPECT_HANDLER(request)


def install_expect_handler() -> None:
    """:func:`expect_handler` also for requests no route matches (404, 405):
    aiohttp makes a route for each of those with its default handler, which
    sent a ``100 Continue`` before the 404 and answered another expectation
    with its plain-text 417 (the header quoted back, no ``X-Request-ID``).
    For the process, like ``errors.install_parser_error_answer``, but only
    for this server's applications; idempotent."""
    assert callable(getattr(web_urldispatcher, "_default_expect_handler", None))
    web_urldispatcher._default_expect_handler = _default_expect_handler


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
    app[ops.OPENAPI] = ops.read_openapi()
    r.add_get("/openapi.yaml", ops.openapi, name="openapi", allow_head=False)

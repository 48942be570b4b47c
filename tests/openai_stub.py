"""A real local aiohttp server speaking the OpenAI chat-completions protocol.

``POST /v1/chat/completions`` answers like the OpenAI API (``choices``,
``usage``, ``model``). The behaviour is switchable per test: ``mode`` is
``"ok"``, ``"error"`` (HTTP 500 with an OpenAI-style error body), ``"slow"``
(holds the request until the stub stops, so the client times out),
``"held"`` (sets ``arrived``, then answers normally once ``gate`` is set),
``"garbage"`` (200 with a body that is not a completion), ``"raw"``
(``raw_status``, 200 unless set, with ``raw_body``, bytes as they are: odd
completions) or ``"raw_chunked"``
(the same, chunked: no Content-Length). Every request is kept
in ``requests`` for assertions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web


class OpenAIStub:
    def __init__(self, *, model: str = "stub-model-1", api_key: str | None = None) -> None:
        self.model = model
        self.api_key = api_key
        self.mode = "ok"
        self.raw_body = b""
        self.raw_status = 200
        self.requests: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()
        self.arrived = asyncio.Event()
        self.gate = asyncio.Event()
        self.base_url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        if self.api_key is not None and (
            request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            return web.json_response(
                {"error": {"message": "Incorrect API key provided", "type":
                           "invalid_request_error", "code": "invalid_api_key"}}, status=401)
        if self.mode == "error":
            return web.json_response(
                {"error": {"message": "The server had an error", "type": "server_error"}},
                status=500)
        if self.mode == "slow":
            await self._release.wait()
            return web.json_response({})
        if self.mode == "held":
            self.arrived.set()
            await self.gate.wait()
        if self.mode == "garbage":
            return web.json_response({"unexpected": True})
        if self.mode == "raw":
            return web.Response(body=self.raw_body, status=self.raw_status,
                                content_type="application/json")
        if self.mode == "raw_chunked":  # raw_body without a Content-Length
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(self.raw_body), 256 * 1024):
                await resp.write(self.raw_body[i : i + 256 * 1024])
            await resp.write_eof()
            return resp
        messages = body.get("messages") or []
        question = messages[-1]["content"] if messages else ""
        reply = f"Stub answer to: {question}"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        return web.json_response({
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": prompt_tokens,
                      "completion_tokens": len(reply.split()),
                      "total_tokens": prompt_tokens + len(reply.split())},
        })


@pytest.fixture
async def stub() -> AsyncIterator[OpenAIStub]:
    """A started stub without an API key of its own (import it as a fixture)."""
    s = OpenAIStub()
    await s.start()
    yield s
    await s.stop()

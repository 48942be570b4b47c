"""AI providers for document chat: offline ``extractive`` and OpenAI-compatible."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp import web
from yarl import URL

from audit.config import Config, OpenAIConfig
from sinks import cleartext_to_remote

from .keys import CLIENT

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n{2,}")


class AIUnavailable(Exception):
    """The provider failed or answered something unusable."""


@dataclass(frozen=True, slots=True)
class Answer:
    reply: str
    model: str
    prompt_tokens: int
    completion_tokens: int


class Provider(Protocol):
    model: str

    async def answer(self, document_title: str, document: str, message: str) -> Answer: ...


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class ExtractiveProvider:
    """Offline: quotes the passages of the document that best match the question.

    Scoring a 1 MiB document takes about 0.15 s of CPU here: it runs on a
    worker thread, at most :attr:`CONCURRENCY` at a time, never on the event
    loop (whose requests still wait for the GIL meanwhile: a few chats on
    large documents at once slow other requests by tens of milliseconds).
    """

    model = "extractive-1"
    MAX_PASSAGES = 3
    CONCURRENCY = 2

    def __init__(self) -> None:
        self._slots: asyncio.Semaphore | None = None
        self.busy = 0  # answers being scored now

    async def answer(self, document_title: str, document: str, message: str) -> Answer:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.CONCURRENCY)
        async with self._slots:
            self.busy += 1
            try:
                return await asyncio.to_thread(self._answer, document_title, document, message)
            finally:
                self.busy -= 1

    def _answer(self, document_title: str, document: str, message: str) -> Answer:
        query = set(_words(message))
        passages = [p.strip() for p in _SENTENCE.split(document) if p.strip()]
        scored = []
        for i, p in enumerate(passages):
            words = _words(p)
            overlap = len(query & set(words))
            if overlap:
                scored.append((-overlap, i, p))
        scored.sort()
        best = sorted(scored[: self.MAX_PASSAGES], key=lambda t: t[1])
        if best:
            reply = "From \u201c" + document_title + "\u201d:\n" + "\n".join(
                f"> {p[:500]}" for _, _, p in best
            )
        else:
            reply = f"\u201c{document_title}\u201d has no passage matching the question."
        prompt_tokens = len(_words(message)) + len(_words(document))
        return Answer(reply, self.model, prompt_tokens, len(_words(reply)))


class OpenAIProvider:
    """Any server speaking the OpenAI chat-completions protocol."""

    def __init__(self, cfg: OpenAIConfig, app: web.Application) -> None:
        self.cfg = cfg
        self.model = cfg.model
        self._app = app
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._url_secrets = _userinfo_secrets(cfg.base_url)

    async def answer(self, document_title: str, document: str, message: str) -> Answer:
        # Without surrounding blanks, as the http sink's token: a key read
        # from a secret file often ends with a newline, which aiohttp refuses
        # in a header (every chat a 502 "provider request failed: ValueError").
        env = self.cfg.api_key_env
        key = (os.environ.get(env) or "").strip() if env else ""
        if any(ord(c) < 32 or ord(c) == 127 for c in key):
            raise AIUnavailable(f"the API key in ${env} contains a control character (a line"
                                " break?); it cannot be sent as a header")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:  # aiohttp would drop the bytes and send the rest
            raise AIUnavailable(f"the API key in ${env} is not UTF-8 text; it cannot be sent"
                                " as it is") from None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        payload = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": "Answer questions about the document below, "
                 "using only its content.\n\nTitle: " + document_title + "\n\n" + document},
                {"role": "user", "content": message},
            ],
        }
        client: aiohttp.ClientSession = self._app[CLIENT]
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_seconds)
        try:
            # Redirects are not followed: the document goes only to base_url
            # (a 307 or 308 would send it on to any host, in clear text too).
            async with client.post(self._url, json=payload, headers=headers,
                                   timeout=timeout, allow_redirects=False) as resp:
                if 300 <= resp.status < 400:
                    raise AIUnavailable(f"provider answered HTTP {resp.status}: a redirect,"
                                        " not followed; set ai.openai.base_url to the"
                                        " provider's address")
                if resp.status != 200:
                    raise AIUnavailable(f"provider answered HTTP {resp.status}")
                body = await _read_capped(resp, ANSWER_MAX_BYTES)
            # RecursionError: JSON nested deeper than the parser's stack.
            data = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            raise AIUnavailable(f"provider request failed: {type(exc).__name__}") from None
        try:
            reply = data["choices"][0]["message"]["content"]
            usage = data.get("usage") or {}
            model = data.get("model")
            if model is None or model == "":  # (not said: the one asked for)
                model = self.model
            if not isinstance(reply, str):
                raise TypeError("content is not a string")
            if not isinstance(model, str):  # (was recorded as its Python repr)
                raise TypeError("model is not a string")
            # A provider echoing our request must not hand the key, or the
            # base_url's credentials (sent as Basic auth), on.
            for secret in sorted({key, *self._url_secrets}, key=len, reverse=True):
                if len(secret) >= 8:
                    reply = reply.replace(secret, "[redacted]")
                    model = model.replace(secret, "[redacted]")
            model = model[:MODEL_MAX_CHARS]  # after: a cut must not leave part of a key
            reply.encode("utf-8")  # a lone surrogate could be neither answered nor recorded
            model.encode("utf-8")
            return Answer(reply, model, _tokens(usage.get("prompt_tokens", 0)),
                          _tokens(usage.get("completion_tokens", 0)))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError):
            raise AIUnavailable("provider answered an unexpected body") from None


def _userinfo_secrets(url: str) -> set[str]:
    """The password of ``url``'s ``user:password@`` as written and decoded,
    and the ``Authorization: Basic`` credential aiohttp makes of them.
    Without a password, the user (a gateway's token: ``TOKEN@``) is it."""
    try:
        parts = urlsplit(url)
        password = parts.password or parts.username
        auth = aiohttp.BasicAuth.from_url(URL(url))
        basic = auth.encode().partition(" ")[2] if auth is not None else ""
    except (ValueError, UnicodeError):  # then no request goes out either
        return set()
    return {s for s in (password, unquote(password or ""), basic) if s}


class AnswerTooLarge(ValueError):
    pass


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response body (decompressed), refused past ``limit`` bytes: by its
    ``Content-Length`` before reading, else as soon as it is over."""
    if resp.content_length is not None and resp.content_length > limit:
        raise AnswerTooLarge(f"more than {limit} bytes")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(f"more than {limit} bytes")
    return bytes(body)


# The provider's whole answer (a chat completion is a few KiB): read into
# memory by up to CHAT_CONCURRENCY chats at once, and its reply recorded
# (under capture_ai_content) in one event, which must fit a sink's part.
ANSWER_MAX_BYTES = 1024 * 1024


# A model name is recorded with every interaction: a provider's odd one is cut.
MODEL_MAX_CHARS = 200
TOKENS_MAX = (1 << 63) - 1  # what every sink stores as an integer (BSON: int64)


def _tokens(value: object) -> int:
    """A token count from the provider: a whole number from 0 to TOKENS_MAX."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("a token count is not a number")
    n = int(value)  # inf: OverflowError; nan: ValueError
    if n != value or not 0 <= n <= TOKENS_MAX:
        raise ValueError("a token count out of range")
    return n


def create_provider(config: Config, app: web.Application) -> Provider:
    if config.ai.provider == "openai":
        if cleartext_to_remote(config.ai.openai.base_url):
            # As for the http sink: every chat sends its whole document.
            log.warning("ai.openai.base_url is plain http:// to a host that is not this"
                        " machine: documents, chat messages, replies and the API key"
                        " travel in clear text; use https://")
        return OpenAIProvider(config.ai.openai, app)
    return ExtractiveProvider()

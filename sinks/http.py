"""The HTTP sink: POST each part as JSON to a receiver, idempotent by ``_id``.

* one part per ``POST {url}/sessions`` with ``Idempotency-Key: <_id>`` and the
  part as the JSON body;
* security events as ``POST {url}/security-events`` with ``{"events": [...]}``
  (each event carries its ``_id``);
* ``Authorization: Bearer <token>`` when the variable named by ``token_env``
  is set (read at :meth:`HttpSink.open`; never logged, never in a message).

Answers: 2xx and 409 (duplicate ``_id``) are success, as API.md fixes it
("A receiver answers a duplicate ``_id`` with 200 or 409, both success").
A receiver must therefore store a part before it answers and must not use
409 for anything else: the IETF Idempotency-Key draft's 409 ("a request
with this key is still being processed") would be taken as stored. 422 is
the answer the draft gives for a key reused with a different body, so it is
:class:`~sinks.base.SinkConflict`. 429, and 503 with ``Retry-After``, are
:class:`~sinks.base.SinkRateLimited`; 503 without it, other 5xx, 408,
connection errors and timeouts are :class:`~sinks.base.SinkUnavailable`.
3xx is :class:`~sinks.base.SinkUnavailable` too: redirects are not followed,
and a redirect says nothing about the part (the receiver moved, or ``url``
is wrong), so nothing is dead-lettered while an operator fixes ``url``.
Other 4xx (401, 403 and 404 included) are :class:`~sinks.base.SinkRejected`.

The receiver cannot be queried through this sink (``queryable = False``).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp

from audit.config import HttpSinkConfig

from .base import (
    Doc,
    Sink,
    SinkConflict,
    SinkError,
    SinkRateLimited,
    SinkRejected,
    SinkUnavailable,
    dumps,
)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or ``None``.

    ``value`` is delta-seconds (``"120"``; a decimal is tolerated) or an
    HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``), compared with ``now``
    (epoch seconds, ``time.time()`` in production). A date in the past gives
    ``0.0``; a missing, empty or unparsable value gives ``None``.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
            return None
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC per RFC 5322
        return None
    return max(0.0, when.timestamp() - now)


_CREDENTIAL = re.compile(r"key|token|secret|sig|pass|auth|cred", re.IGNORECASE)


def _strip_userinfo(url: str) -> str:
    """``url`` without ``user:password@``; host and port kept as written
    (an IPv6 literal keeps its brackets)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class HttpSink(Sink):
    type = "http"
    queryable = False
    raw_events = True

    def __init__(self, cfg: HttpSinkConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        # Credentials in the URL become Basic auth, unless a bearer token is set.
        # A query in the URL (an API key, say) is sent with every request but
        # never shown: messages name the URL without it.
        target = urlsplit(_strip_userinfo(self.url))._replace(fragment="")
        self._target = target
        self._shown = urlunsplit(target._replace(path=target.path.rstrip("/"), query=""))
        parts = urlsplit(self.url)
        self._basic: str | None = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._basic = "Basic " + base64.b64encode(pair.encode()).decode()
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None

    async def open(self) -> None:
        if self._session is not None:
            return
        token = os.environ.get(self.cfg.token_env) if self.cfg.token_env else None
        self._token = token or None
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_seconds)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        session, self._session = self._session, None
        self._token = None
        if session is not None:
            await session.close()

    def _url(self, path: str) -> str:
        """Where to POST: the configured URL's path plus ``path``, its query kept."""
        t = self._target
        return urlunsplit(t._replace(path=t.path.rstrip("/") + path))

    def _redact(self, text: str) -> str:
        """``text`` without the token, the URL's credentials (as written, decoded
        and as the Basic header's base64) and its query."""
        if self._token:
            text = text.replace(self._token, "***")
        if self._basic:
            text = text.replace(self._basic.partition(" ")[2], "***")
        parts = urlsplit(self.url)
        hidden = [parts.password, parts.username]  # at any length
        if parts.query:
            hidden.append(parts.query)
            # A value that looks like a key (long, or under a credential's
            # name), not `format=json`, whose "json" is everywhere.
            for name, _, value in (q.partition("=") for q in parts.query.split("&")):
                if len(value) >= 8 or _CREDENTIAL.search(name):
                    hidden.append(value)
        for secret in sorted((h for h in hidden if h), key=len, reverse=True):
            for form in {secret, unquote(secret)}:
                if len(form) >= 8:
                    text = text.replace(form, "***")
                else:  # a short one only where it stands alone, not inside words
                    text = re.sub(rf"(?<![\w%.-]){re.escape(form)}(?![\w%.-])", "***", text)
        return text

    async def write_part(self, part: Doc) -> None:
        status, raw = await self._post("/sessions", part,
                                       {"Idempotency-Key": str(part["_id"])})
        stored = _stored_hash(raw) if status == 409 else None
        if stored is not None and stored != part.get("hash"):
            # The receiver holds another part under this _id (it said which).
            raise SinkConflict(f"http sink: POST {self._shown}/sessions: HTTP {status}:"
                               f" {part['_id']} is stored with another hash")

    async def write_security_events(self, events: list[Doc]) -> None:
        if not events:
            return
        await self._post("/security-events", {"events": events}, {})

    async def _post(self, path: str, body: Any, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST ``body``; the status and body of a success, else the sink error."""
        session = self._session
        if session is None:
            raise SinkUnavailable("http sink is not open")
        try:
            data = dumps(body).encode()
        except (TypeError, ValueError) as exc:
            raise SinkRejected(f"http sink: not JSON serialisable: {exc}") from None
        headers = {"Content-Type": "application/json; charset=utf-8", **headers}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        elif self._basic:
            headers["Authorization"] = self._basic
        where = f"POST {self._shown}{path}"
        try:
            async with session.post(
                self._url(path),
                data=data,
                headers=headers,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                location = resp.headers.get("Location")
                # Read the whole answer, so the connection can be reused.
                raw = await resp.read()
                text = raw[:200].decode("utf-8", "replace") if status >= 300 else ""
        except TimeoutError:
            raise SinkUnavailable(
                f"http sink: {where}: no answer within {self.cfg.timeout_seconds:g} s"
            ) from None
        except (aiohttp.ClientError, ValueError) as exc:
            msg = self._redact(f"http sink: {where}: {type(exc).__name__}: {exc}")
            raise SinkUnavailable(msg) from None
        err = self._classify(status, retry_after, text, where, location)
        if err is not None:
            raise err
        return status, raw

    def _classify(
        self,
        status: int,
        retry_after: str | None,
        text: str,
        where: str,
        location: str | None = None,
    ) -> SinkError | None:
        if 200 <= status < 300 or status == 409:
            return None
        detail = self._redact(" ".join(text.split()))
        msg = f"http sink: {where}: HTTP {status}" + (f": {detail}" if detail else "")
        if 300 <= status < 400:
            # Not about the part: the receiver moved or ``url`` is wrong.
            target = ""
            if location:
                loc = urlsplit(_strip_userinfo(location.strip()))
                target = " to " + self._redact(urlunsplit(loc._replace(query="", fragment="")))
            return SinkUnavailable(
                f"http sink: {where}: HTTP {status}: redirect{target} not followed; "
                "set [sink.http] url to the receiver's address"
            )
        wait = parse_retry_after(retry_after, self._clock())
        if status == 429 or (status == 503 and wait is not None):
            return SinkRateLimited(msg, retry_after=wait)
        if status >= 500:
            return SinkUnavailable(msg)
        if status == 422:
            return SinkConflict(msg)
        if status == 408:  # request timeout: may or may not have landed
            return SinkUnavailable(msg)
        return SinkRejected(msg)


def _stored_hash(raw: bytes) -> str | None:
    """The ``hash`` a receiver may send back with 409 for a duplicate ``_id``
    (of the part it holds); None if it sends none."""
    if not raw or len(raw) > 65536:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    value = body.get("hash") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None

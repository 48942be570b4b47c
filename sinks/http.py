"""The HTTP sink: POST each part as JSON to a receiver, idempotent by ``_id``.

* one part per ``POST {url}/sessions`` with ``Idempotency-Key: <_id>`` and the
  part as the JSON body;
* security events as ``POST {url}/security-events`` with ``{"events": [...]}``
  (each event carries its ``_id``);
* ``Authorization: Bearer <token>`` when the variable named by ``token_env``
  is set (read at :meth:`HttpSink.open`; never logged, never in a message).

Answers: 2xx and 409 (duplicate ``_id``) are success, as API.md fixes it
("A receiver answers a duplicate ``_id`` with 200 or 409, both success"),
except that a 409 to a batch of several security events does not say which
of them is the duplicate: those are then sent one at a time
(:meth:`HttpSink.write_security_events`).
A receiver must therefore store a part before it answers and must not use
409 for anything else: the IETF Idempotency-Key draft's 409 ("a request
with this key is still being processed") would be taken as stored. 422 is
the answer the draft gives for a key reused with a different body, so it is
:class:`~sinks.base.SinkConflict`. 429, and 503 with ``Retry-After``, are
:class:`~sinks.base.SinkRateLimited`; 503 without it, other 5xx, 408 and
425 (both "send it again" by their RFCs), connection errors and timeouts
are :class:`~sinks.base.SinkUnavailable`.
3xx is :class:`~sinks.base.SinkUnavailable` too: redirects are not followed,
and a redirect says nothing about the part (the receiver moved, or ``url``
is wrong), so nothing is dead-lettered while an operator fixes ``url``.
Other 4xx (401, 403 and 404 included) are :class:`~sinks.base.SinkRejected`;
a final 1xx (a 101 nobody asked for) or a status below 100 is unavailable.

An answer's body is read up to :data:`BODY_CAP` bytes, as sent (the sink
asks for ``Accept-Encoding: identity`` and does not let aiohttp unpack a
compressed one: a small gzip body can unpack to gigabytes); the status
decides whatever the body is. A longer body is left unread and its
connection closed. A 409 whose body is longer cannot name the stored hash,
so it is success unchecked, like a 409 without one.

The receiver cannot be queried through this sink (``queryable = False``).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
import zlib
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
    # OverflowError: a field past what a C long holds ("99999999999999999999:28:00").
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC per RFC 5322
        return None
    return max(0.0, when.timestamp() - now)


_CREDENTIAL = re.compile(r"key|token|secret|sig|pass|auth|cred", re.IGNORECASE)
# A credential as an Authorization header writes it, whoever's it is: a
# receiver or proxy echoing a request's headers shows ours that way.
_HEADER_CREDENTIAL = re.compile(r"\b(Bearer|Basic)\s+\S+", re.IGNORECASE)
# A query after a URL's (or a bare path's) path. aiohttp names the URL in
# some errors as it re-encoded it (``%2F`` as ``/``, ``é`` as ``%C3%A9``, a
# space as ``+``), which none of the configured query's forms match; so any
# query goes, up to the next space (a ``'`` may be in it, and stays there).
_URL_QUERY = re.compile(r"(/[^\s?'\"]*)\?\S+")

# The most of an answer's body that is read: a 409's stored hash is small,
# and an error's detail is cut much shorter. Also the most a compressed body
# is unpacked to.
BODY_CAP = 64 * 1024
# An error's body is decoded and redacted this far, then cut to
# _DETAIL_CHARS: a secret echoed across the cut must be whole to be found.
_DETAIL_BYTES = 4096
_DETAIL_CHARS = 200


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
        # Security events the receiver took one by one, of a batch not yet
        # all stored; and the events of the batch that needed one by one, to go
        # on so when it is sent again (write_security_events).
        self._taken: set[tuple[str, Any]] = set()
        self._one_by_one: set[tuple[str, Any]] = set()

    async def open(self) -> None:
        if self._session is not None:
            return
        self._token = self._read_token()
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_seconds)
        # Bodies as sent: see _read_body.
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)

    def _read_token(self) -> str | None:
        """The bearer token from the environment, without surrounding blanks.

        A token read from a secret file often ends with a newline, which as
        a header would fail every write (aiohttp refuses header injection)
        with an error naming neither the token nor its variable. A control
        character inside is refused here, once, with a message that says
        which variable (never the token); so is one that is not UTF-8
        (bytes of another encoding), which aiohttp would send without them."""
        env = self.cfg.token_env
        token = (os.environ.get(env) or "").strip() if env else ""
        if any(ord(c) < 32 or ord(c) == 127 for c in token):
            raise SinkUnavailable(f"http sink: the token in ${env} contains a control"
                                  " character (a line break?); it cannot be sent as a header")
        try:
            token.encode("utf-8")
        except UnicodeEncodeError:  # aiohttp would drop the bytes and send the rest
            raise SinkUnavailable(f"http sink: the token in ${env} is not UTF-8 text; it"
                                  " cannot be sent as it is") from None
        return token or None

    async def close(self) -> None:
        session, self._session = self._session, None
        self._token = None
        self._taken.clear()
        self._one_by_one.clear()
        if session is not None:
            await session.close()

    def _url(self, path: str) -> str:
        """Where to POST: the configured URL's path plus ``path``, its query kept."""
        t = self._target
        return urlunsplit(t._replace(path=t.path.rstrip("/") + path))

    def _redact(self, text: str) -> str:
        """``text`` without the token, the URL's credentials (as written, decoded
        and as the Basic header's base64), any ``Bearer``/``Basic`` credential,
        and the query of the URL (its values as written and decoded, and any
        query after a path, in whatever encoding)."""
        if self._token:
            text = text.replace(self._token, "***")
        if self._basic:
            text = text.replace(self._basic.partition(" ")[2], "***")
        text = _HEADER_CREDENTIAL.sub(r"\1 ***", text)
        text = _URL_QUERY.sub(r"\1?***", text)
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
        self._check_duplicate("/sessions", part, status, raw)

    async def write_security_events(self, events: list[Doc]) -> None:
        """Store ``events``, all of them, or raise a sink error.

        Only a 2xx stores a batch of several: a receiver may refuse a whole
        batch with 409 because one of its events is a duplicate, which says
        nothing about the others. Then each is sent alone, where 409 is an
        unambiguous duplicate (checked against the stored hash, like a
        part's). A rate limit or error on the way raises, and the flusher
        sends the batch again: this sink then goes on one by one, skipping
        the events the receiver took. Starting over with the batch would
        spend the receiver's rate limit on the same events each time, and
        might never get further. Only that batch's events go on one by one:
        more events sent after them (the batch grew meanwhile), or another
        batch, go as a batch first (they need not hold a duplicate).
        """
        if not events:
            return
        keys = {_event_key(e) for e in events}
        self._taken &= keys  # only this batch's progress is worth keeping
        self._one_by_one &= keys
        todo = [e for e in events if _event_key(e) not in self._taken]
        resumed = 0
        while resumed < len(todo) and _event_key(todo[resumed]) in self._one_by_one:
            resumed += 1
        for event in todo[:resumed]:
            await self._write_event(event)
        todo = todo[resumed:]
        if len(todo) > 1:
            status, _ = await self._post("/security-events", {"events": todo}, {})
            if status != 409:
                todo = []
            else:
                self._one_by_one = keys
        for event in todo:
            await self._write_event(event)
        self._one_by_one.clear()
        self._taken.clear()

    async def _write_event(self, event: Doc) -> None:
        """One security event, as a batch of one; remembered once taken."""
        status, raw = await self._post("/security-events", {"events": [event]}, {})
        self._check_duplicate("/security-events", event, status, raw)
        self._taken.add(_event_key(event))

    def _check_duplicate(self, path: str, doc: Doc, status: int, raw: bytes | None) -> None:
        """A 409 naming another hash than ``doc``'s: the receiver holds another
        document under this ``_id`` (it said which), a conflict, not a success."""
        stored = _stored_hash(raw) if status == 409 else None
        if stored is not None and stored != doc.get("hash"):
            raise SinkConflict(f"http sink: POST {self._shown}{path}: HTTP {status}:"
                               f" {doc['_id']} is stored with another hash")

    async def _post(
        self, path: str, body: Any, headers: dict[str, str]
    ) -> tuple[int, bytes | None]:
        """POST ``body``; the status and body of a success (``None`` for a body
        longer than ``BODY_CAP``), else the sink error."""
        session = self._session
        if session is None:
            raise SinkUnavailable("http sink is not open")
        try:
            data = dumps(body).encode()
        except (TypeError, ValueError) as exc:
            raise SinkRejected(f"http sink: not JSON serialisable: {exc}") from None
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Accept-Encoding": "identity",  # see _read_body
            **headers,
        }
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        elif self._basic:
            headers["Authorization"] = self._basic
        where = f"POST {self._shown}{path}"
        status: int | None = None
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
                raw, complete = await _read_body(resp)
        except TimeoutError:
            raise SinkUnavailable(self._timeout_message(where, status)) from None
        except (aiohttp.ClientError, ValueError) as exc:
            msg = self._redact(f"http sink: {where}: {type(exc).__name__}: {exc}")
            raise SinkUnavailable(msg) from None
        err = self._classify(status, retry_after, raw, where, location)
        if err is not None:
            raise err
        return status, raw if complete else None

    def _timeout_message(self, where: str, status: int | None) -> str:
        """Whether the receiver answered at all: an answer whose body stalls
        is another fault (a proxy, a receiver stuck mid-answer) than none."""
        within = f"{self.cfg.timeout_seconds:g} s"
        if status is None:
            return f"http sink: {where}: no answer within {within}"
        return (f"http sink: {where}: HTTP {status} answered, but its body did not"
                f" arrive within {within}")

    def _detail(self, raw: bytes) -> str:
        """The start of an error body for a message: redacted first, then cut,
        so that a secret echoed across the cut is not shown in part. A word
        cut by the decoding's own limit shows as ``…`` for the same reason."""
        text = raw[:_DETAIL_BYTES].decode("utf-8", "replace")
        if len(raw) > _DETAIL_BYTES:
            text = re.sub(r"\S+$", "…", text)
        return " ".join(self._redact(text).split())[:_DETAIL_CHARS]

    def _classify(
        self,
        status: int,
        retry_after: str | None,
        raw: bytes,
        where: str,
        location: str | None = None,
    ) -> SinkError | None:
        if 200 <= status < 300 or status == 409:
            return None
        detail = self._detail(raw)
        msg = f"http sink: {where}: HTTP {status}" + (f": {detail}" if detail else "")
        if 300 <= status < 400:
            # Not about the part: the receiver moved or ``url`` is wrong.
            target = ""
            if location:
                # Bytes that are not UTF-8 arrive as lone surrogates, which no
                # message may hold: the spool stores it as UTF-8 text.
                location = location.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                try:
                    loc = urlsplit(_strip_userinfo(location.strip()))
                except ValueError:  # "http://[::1": not a URL to name
                    target = " (to a Location that is not a URL)"
                else:
                    target = " to " + self._redact(
                        urlunsplit(loc._replace(query="", fragment="")))
            return SinkUnavailable(
                f"http sink: {where}: HTTP {status}: redirect{target} not followed; "
                "set [sink.http] url to the receiver's address"
            )
        wait = parse_retry_after(retry_after, self._clock())
        if status == 429 or (status == 503 and wait is not None):
            return SinkRateLimited(msg, retry_after=wait)
        if status >= 500 or status < 400:
            # 5xx; and a final 1xx (a 101 to a request that asked for no
            # upgrade) or a status below 100: nothing said about the part.
            return SinkUnavailable(msg)
        if status == 422:
            return SinkConflict(msg)
        if status in (408, 425):
            # Request timeout (RFC 9110) and Too Early (RFC 8470): the
            # request may be repeated, and it may or may not have landed.
            return SinkUnavailable(msg)
        return SinkRejected(msg)


async def _read_body(resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The answer's body, unpacked if compressed, and whether that is all of
    it: at most ``BODY_CAP`` bytes are read, and unpacked to.

    A receiver is not trusted with our memory: an endless body would be
    read for ever, a small gzip body can unpack to gigabytes. The status
    decides an answer, so the rest of a longer body is not needed: its
    connection is closed rather than drained for reuse.
    """
    chunks: list[bytes] = []
    size = 0
    while size <= BODY_CAP:  # one byte more than the cap tells a longer body
        chunk = await resp.content.read(BODY_CAP + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > BODY_CAP:
        resp.close()
    body = _unpacked(b"".join(chunks), resp.headers.get("Content-Encoding", ""))
    return body[:BODY_CAP], size <= BODY_CAP and len(body) <= BODY_CAP


def _unpacked(raw: bytes, encoding: str) -> bytes:
    """``raw`` unpacked to at most ``BODY_CAP + 1`` bytes, for a receiver that
    compresses although asked not to (a 409's stored hash must still count);
    an encoding we do not unpack gives ``b""``: no detail, no stored hash."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return b""
    # gzip or zlib, told by the header; "deflate" is sometimes sent raw.
    for wbits in (zlib.MAX_WBITS | 32, -zlib.MAX_WBITS):
        try:
            return zlib.decompressobj(wbits).decompress(raw, BODY_CAP + 1)
        except zlib.error:
            continue
    return b""


def _event_key(event: Doc) -> tuple[str, Any]:
    """A security event as the receiver may have taken it: ``_id`` and ``hash``."""
    return str(event["_id"]), event.get("hash")


def _stored_hash(raw: bytes | None) -> str | None:
    """The ``hash`` a receiver may send back with 409 for a duplicate ``_id``
    (of the part or security event it holds); None if it sends none, or if
    the body was longer than ``BODY_CAP`` (``raw`` is None: not all read)."""
    if not raw:
        return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's stack
        return None
    value = body.get("hash") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None

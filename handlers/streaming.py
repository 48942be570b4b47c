"""A JSON answer written while it is produced, for answers too long to hold.

The status and headers are decided before the first byte: a handler checks
everything it can, then has :meth:`StreamedJson.begin` produce the body up
to its first chunk (the whole body, for most answers, then sent with its
``Content-Length`` as a built answer) and returns it; what fails by then is
raised as it is, for the handler to answer with an error as API.md says
(and to record as a failure). aiohttp writes the rest after the middlewares
are done with the answer (they set ``X-Request-ID`` and the security
headers as on any answer), in chunks (``Transfer-Encoding: chunked``), each
awaited, so a slow client holds back the producer, not a growing buffer.

What a client sees when producing the body fails after its first chunk (a
sink that cannot be read any more): the connection is closed at once,
without the chunked body's last chunk, so an HTTP/1.1 client reports an
incomplete body; and the body written so far never holds the JSON
object's closing brace, the last byte written, so any JSON parser fails
on it, over HTTP/1.0 too. The failure is logged with the request id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

log = logging.getLogger("session_audit.http")

# Bytes gathered before a chunk is written.
CHUNK_BYTES = 64 * 1024


class StreamedJson(web.StreamResponse):
    """200 ``application/json; charset=utf-8``, its body the pieces of text
    ``pieces`` yields, which together must be one JSON value.

    An exception of the kinds ``expected`` that cuts the answer off is
    logged as a warning naming ``what``; any other with its traceback.
    ``on_sent``, if set, is called with the body's bytes handed over so far
    before each chunk is written, that chunk's included (the server's send
    deadline moves with them: a chunk as large as a part, written to a slow
    client, is given its transfer time as a built answer of its size is)."""

    def __init__(self, pieces: AsyncIterator[str], *, request_id: str,
                 what: str = "the answer",
                 expected: tuple[type[BaseException], ...] = ()) -> None:
        super().__init__(status=200)
        self.content_type = "application/json"
        self.charset = "utf-8"
        self.on_sent: Callable[[int], None] | None = None
        self._pieces = pieces
        self._request_id = request_id
        self._what = what
        self._expected = expected
        self._buf: list[str] = []  # produced by begin, not written yet
        self._size = 0
        self._body: bytes | None = None  # the whole body, when begin produced it all
        self._began = False
        self._whole = False
        # Cut short by a failure to produce it (not by the client going away),
        # after its status 200 and first chunk went out: counted apart in
        # /metrics, whose request count took it for a 200.
        self.cut = False

    async def begin(self) -> None:
        """Produce the body up to its first chunk, before anything is sent:
        an exception raised meanwhile is raised here as it is (the handler
        answers it with an error: no header is out yet). A body produced
        whole here gets its ``Content-Length``."""
        try:
            while self._size < CHUNK_BYTES:
                try:
                    piece = await anext(self._pieces)
                except StopAsyncIteration:
                    self._body = "".join(self._buf).encode("utf-8")
                    self._buf, self._size = [], 0
                    self.content_length = len(self._body)
                    return
                self._buf.append(piece)
                self._size += len(piece)
        except BaseException:
            await self._close_pieces()
            raise

    async def write_eof(self, data: bytes = b"") -> None:
        """Called once the headers are out (by the server's send, then again
        by aiohttp's): write the body and end it. If it cannot be had whole,
        raise ConnectionResetError, now and at every later call, which the
        send and aiohttp take for a client gone: no error answer is tried,
        no last chunk written, and aiohttp closes the connection."""
        if self._began:
            if not self._whole:
                raise ConnectionResetError("the answer was cut short")
            return
        self._began = True
        if self._body is not None:
            await super().write_eof(self._body + data)
            self._whole = True
            return
        buf, size = self._buf, self._size
        self._buf, self._size = [], 0
        sent = 0
        try:
            async for piece in self._pieces:
                buf.append(piece)
                size += len(piece)
                if size >= CHUNK_BYTES:
                    chunk = "".join(buf).encode("utf-8")
                    buf, size = [], 0
                    self._sending(sent + len(chunk))
                    await self.write(chunk)
                    sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away, or the send's deadline passed
        except Exception as exc:
            self.cut = True
            if isinstance(exc, self._expected):
                log.warning("%s cut short after %d bytes of the answer, left unfinished"
                            " (rid=%s): %s", self._what, sent, self._request_id, exc)
            else:
                log.exception("streamed answer failed rid=%s", self._request_id)
            raise ConnectionResetError("the answer was cut short") from exc
        finally:
            await self._close_pieces()
        last = "".join(buf).encode("utf-8") + data
        self._sending(sent + len(last))
        await super().write_eof(last)
        self._whole = True

    def _sending(self, total: int) -> None:
        if self.on_sent is not None:
            self.on_sent(total)

    async def _close_pieces(self) -> None:
        aclose = getattr(self._pieces, "aclose", None)
        if aclose is not None:
            await aclose()

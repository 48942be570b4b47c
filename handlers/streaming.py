"""A JSON answer written while it is produced, for answers too long to hold.

The status and headers are decided before the first byte: a handler checks
everything it can, then returns a :class:`StreamedJson` whose body aiohttp
writes after the middlewares are done with it (they set ``X-Request-ID``
and the security headers as on any answer). The body goes out in chunks
(``Transfer-Encoding: chunked``), each awaited, so a slow client holds back
the producer, not a growing buffer.

What a client sees when producing the body fails once it has begun (a
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


class StreamCut(Exception):
    """Producing the body failed after it began: logged by whoever raised
    it; the answer is cut off (see the module's docstring)."""


class StreamedJson(web.StreamResponse):
    """200 ``application/json; charset=utf-8``, its body the pieces of text
    ``pieces`` yields, which together must be one JSON value.

    ``on_sent``, if set, is called with the body's bytes written so far
    after each chunk (the server's send deadline moves with them)."""

    def __init__(self, pieces: AsyncIterator[str], *, request_id: str) -> None:
        super().__init__(status=200)
        self.content_type = "application/json"
        self.charset = "utf-8"
        self.on_sent: Callable[[int], None] | None = None
        self._pieces = pieces
        self._request_id = request_id
        self._began = False
        self._whole = False

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
        buf: list[str] = []
        size = sent = 0
        try:
            async for piece in self._pieces:
                buf.append(piece)
                size += len(piece)
                if size >= CHUNK_BYTES:
                    chunk = "".join(buf).encode("utf-8")
                    buf, size = [], 0
                    await self.write(chunk)
                    sent += len(chunk)
                    if self.on_sent is not None:
                        self.on_sent(sent)
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away, or the send's deadline passed
        except Exception as exc:
            if not isinstance(exc, StreamCut):
                log.exception("streamed answer failed rid=%s", self._request_id)
            raise ConnectionResetError("the answer was cut short") from exc
        finally:
            await self._close_pieces()
        await super().write_eof("".join(buf).encode("utf-8") + data)
        self._whole = True

    async def _close_pieces(self) -> None:
        aclose = getattr(self._pieces, "aclose", None)
        if aclose is not None:
            await aclose()

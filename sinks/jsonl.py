"""The JSONL sink: append-only daily files, fsynced, for shipping with other tools.

Layout: ``<dir>/audit-YYYY-MM-DD.jsonl`` (UTC date of *writing*, not of the
session), one JSON object per line, each line ending in ``\\n``:

* a session part (API.md "A part") with ``"type": "session_part"`` added;
* a security event with ``"type": "security_event"`` added.

What "stored" means: the line (or, for a batch of security events, all its
lines, written with one ``write``) has been appended and ``fsync``-ed before
``write_part``/``write_security_events`` returns. A new file's directory
entry is fsynced too.

What it promises about duplicates
---------------------------------
The sink never appends an ``_id`` twice. It keeps an index ``_id -> hash``
of every line in the directory; the index is rebuilt by scanning all files
at :meth:`JsonlSink.open`. Writing an ``_id`` that is already in the index
is a success without writing when the ``hash`` is equal, and
:class:`~sinks.base.SinkConflict` (nothing written) when it differs. So:

* a crash after the fsync but before the spool marks the part stored only
  means the flusher writes it again after the restart, and the rebuilt index
  turns that into a no-op;
* a crash in the middle of a write leaves at most one incomplete last line
  in the newest file. At open such a torn line is removed (the file is
  truncated after the last ``\\n``), so its ``_id`` is not in the index and
  the retried write appends it whole; a trailing line that is complete JSON
  but lacks only its ``\\n`` is kept and terminated;
* a failed write (``ENOSPC``, an ``fsync`` error) is truncated back to the
  previous size; if even that fails, the index is rebuilt from the files
  before the next write.

What it cannot promise: two processes writing the same directory at once
(the index is per process; run one server per directory), or files edited
by hand. A reader that wants to be safe anyway deduplicates by ``_id`` and
keeps the first line with each ``_id`` (equal ``_id`` implies equal content
unless the ``hash`` differs, which a verifier should report), e.g.::

    jq -c 'select(.type == "session_part")' audit-*.jsonl | \\
        jq -sc 'unique_by(._id)[]'

Lines are in the order they were written, which is the flusher's order
(security events first, then parts oldest first), not strictly by time.

Queries (admin API) scan every file on each call: correct, but slow for
large directories. Use the sqlite or mongodb sink where queries matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .base import (
    Doc,
    Sink,
    SinkConflict,
    SinkRejected,
    SinkUnavailable,
    decode_cursor,
    dumps,
    encode_cursor,
    summarize_parts,
)

log = logging.getLogger(__name__)

PART = "session_part"
SECURITY = "security_event"
_GLOB = "audit-*.jsonl"


def _line(doc: Doc, kind: str) -> bytes:
    body = dict(doc)
    body["type"] = kind
    return (dumps(body) + "\n").encode()


def _repair_tail(path: Path) -> None:
    """Make ``path`` end with a complete line: drop a torn last line."""
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        # Read back until the previous newline (lines are at most a few MiB).
        chunk = 65536
        pos = size
        tail = b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            if b"\n" in tail:
                break
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n") + 1  # 0 when the whole file is one torn line
        fragment = tail[cut:]
        try:
            obj = json.loads(fragment)
            complete = isinstance(obj, dict) and "_id" in obj
        except ValueError:
            complete = False
        if complete:
            log.warning("%s: last line lacked its newline; terminated it", path.name)
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            log.warning(
                "%s: removed a torn last line of %d bytes (crash during a write)",
                path.name,
                len(fragment),
            )
            f.truncate(pos + cut)
        f.flush()
        os.fsync(f.fileno())


def _iter_docs(directory: Path) -> list[Doc]:
    """Every complete line of every file, oldest file first."""
    out: list[Doc] = []
    for path in sorted(directory.glob(_GLOB)):
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    continue  # torn tail; repaired at open
                try:
                    doc = json.loads(raw)
                except ValueError:
                    log.warning("%s:%d: not JSON, ignored", path.name, lineno)
                    continue
                if isinstance(doc, dict) and "_id" in doc:
                    out.append(doc)
    return out


def _strip(doc: Doc) -> Doc:
    doc = dict(doc)
    doc.pop("type", None)
    return doc


class JsonlSink(Sink):
    """Append-only daily JSONL files; queryable by scanning (slow)."""

    type = "jsonl"
    queryable = True
    raw_events = True

    def __init__(self, dir: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(dir)
        self._clock = clock
        self._index: dict[str, str] | None = None  # _id -> hash
        self._lock = asyncio.Lock()
        self._file: IO[bytes] | None = None
        self._file_name: str | None = None
        self._rescan = False

    # -- lifecycle ---------------------------------------------------------

    def _scan(self) -> dict[str, str]:
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.dir.glob(_GLOB)):
            _repair_tail(path)
        index: dict[str, str] = {}
        for doc in _iter_docs(self.dir):
            index.setdefault(str(doc["_id"]), str(doc.get("hash")))
        return index

    async def open(self) -> None:
        async with self._lock:
            try:
                self._index = await asyncio.to_thread(self._scan)
            except OSError as exc:
                raise SinkUnavailable(f"jsonl sink: cannot open {self.dir.name}: {exc}") from exc
            self._rescan = False

    async def close(self) -> None:
        async with self._lock:
            self._index = None
            f, self._file, self._file_name = self._file, None, None
            if f is not None:
                await asyncio.to_thread(f.close)

    # -- writing -----------------------------------------------------------

    def _append(self, data: bytes) -> None:
        """Append ``data`` to today's file and fsync; undo on failure."""
        name = f"audit-{datetime.fromtimestamp(self._clock(), tz=UTC):%Y-%m-%d}.jsonl"
        if self._file_name != name:
            if self._file is not None:
                self._file.close()
                self._file = None
            path = self.dir / name
            new = not path.exists()
            # The owner's only: the audit trail is no one else's to read.
            self._file = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                                   "ab")
            self._file_name = name
            if new:
                dfd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        f = self._file
        assert f is not None
        start = f.seek(0, os.SEEK_END)
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            try:
                f.truncate(start)
                os.fsync(f.fileno())
            except (OSError, ValueError):
                self._rescan = True
            with contextlib.suppress(OSError):
                f.close()
            self._file, self._file_name = None, None
            raise

    async def _write(self, docs: list[Doc], kind: str) -> None:
        if self._index is None:
            raise SinkUnavailable("jsonl sink is not open")
        if self._rescan:
            try:
                self._index = await asyncio.to_thread(self._scan)
            except OSError as exc:
                raise SinkUnavailable(f"jsonl sink: {exc}") from exc
            self._rescan = False
        index = self._index
        new: dict[str, Doc] = {}
        for doc in docs:
            doc_id, h = str(doc["_id"]), str(doc["hash"])
            known = index.get(doc_id)
            if known is None and doc_id in new:
                known = str(new[doc_id]["hash"])
            if known is None:
                new[doc_id] = doc
            elif known != h:
                raise SinkConflict(f"{doc_id} is stored with a different hash")
        if not new:
            return
        try:
            data = b"".join(_line(d, kind) for d in new.values())
        except (TypeError, ValueError) as exc:
            raise SinkRejected(f"jsonl sink: not JSON serialisable: {exc}") from exc
        try:
            await asyncio.to_thread(self._append, data)
        except OSError as exc:
            raise SinkUnavailable(f"jsonl sink: write failed: {exc}") from exc
        for doc_id, doc in new.items():
            index[doc_id] = str(doc["hash"])

    async def write_part(self, part: Doc) -> None:
        async with self._lock:
            await self._write([part], PART)

    async def write_security_events(self, events: list[Doc]) -> None:
        if not events:
            return
        async with self._lock:
            await self._write(events, SECURITY)

    # -- queries (full scans) ----------------------------------------------

    async def _load(self, kind: str) -> list[Doc]:
        if self._index is None:
            raise SinkUnavailable("jsonl sink is not open")
        async with self._lock:
            try:
                docs = await asyncio.to_thread(_iter_docs, self.dir)
            except OSError as exc:
                raise SinkUnavailable(f"jsonl sink: {exc}") from exc
        seen: set[Any] = set()
        out = []
        for d in docs:
            if d.get("type") == kind and d["_id"] not in seen:
                seen.add(d["_id"])
                out.append(_strip(d))
        return out

    async def list_sessions(
        self,
        *,
        user: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Doc], str | None]:
        parts = await self._load(PART)
        by_session: dict[str, list[Doc]] = {}
        for p in parts:
            by_session.setdefault(p["session_id"], []).append(p)
        after: tuple[str, str] | None = None
        if cursor is not None:
            start, sid = decode_cursor(cursor)
            after = (start, sid)
        heads = []
        for sid, ps in by_session.items():
            # Listed by its lowest stored part, not part 0 (as the sqlite
            # sink): verify must see a session whose part 0 went missing.
            head = min(ps, key=lambda p: p["part"])
            start = head.get("session_start_time") or ""
            if user is not None and head.get("user") != user:
                continue
            if since is not None and start < since:
                continue
            if until is not None and start > until:
                continue
            if after is not None and (start, sid) >= after:
                continue
            heads.append((start, sid))
        heads.sort(reverse=True)
        page = heads[:limit]
        out = [summarize_parts(by_session[sid]) for _, sid in page]
        next_cursor = None
        if len(heads) > limit and out:
            last = out[-1]
            next_cursor = encode_cursor(last["session_start_time"], last["session_id"])
        return out, next_cursor

    async def get_session_parts(self, session_id: str) -> list[Doc]:
        parts = await self._load(PART)
        return sorted((p for p in parts if p["session_id"] == session_id), key=lambda p: p["part"])

    async def list_security_events(
        self,
        *,
        since: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Doc], str | None]:
        events = await self._load(SECURITY)
        after: tuple[str, str] | None = None
        if cursor is not None:
            ts, eid = decode_cursor(cursor)
            after = (ts, eid)
        keyed = []
        for ev in events:
            key = (ev["ts"], ev["_id"])
            if since is not None and ev["ts"] < since:
                continue
            if kind is not None and ev.get("action") != kind:
                continue
            if after is not None and key >= after:
                continue
            keyed.append((key, ev))
        keyed.sort(key=lambda kv: kv[0], reverse=True)
        docs = [ev for _, ev in keyed[:limit]]
        next_cursor = None
        if len(keyed) > limit and docs:
            next_cursor = encode_cursor(docs[-1]["ts"], docs[-1]["_id"])
        return docs, next_cursor

"""A spool older than its sink: restored alone from a backup (README: Backups).

The sink then holds security events the spool never saw, after the spool's
chain head. Appending from that head would give the chain a second branch
(two events continuing one), which ``verify`` reports as a break for good. At
start, before the server serves, the sink's newest security events are read
(a queryable sink, open by then); when some continue the spool's head, the
spool's chain goes on from the last of them, and the log says the spool is
older than the sink. Sessions open in the spool that went on in the sink are
not caught up: their next part conflicts with the sink's (a dead letter).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from sinks.base import Sink, SinkError

from .events import chain_hash, format_ts, genesis
from .spool import Spool
from .store import SECURITY_STREAM, Writer
from .verify import _security_body

log = logging.getLogger("session_audit.rollback")

# Security events read from the sink, newest first, looking for the spool's
# head (about 0.3 s for 20,000 on the sqlite sink). A head deeper than that
# in the sink is not found, and nothing is done. The head is nearly always
# among the first page's; past it, the rest are read in one query: on a
# sink other servers share, their events are the newest, and at each start
# this server's head is found deep in them, or not at all. (The jsonl sink
# scans its whole index for each page: 20 pages of 1,000 took 5 s there
# with 200,000 security events, before the server served.)
FIRST_PAGE = 50
MAX_EVENTS = 20_000


def _head(conn: sqlite3.Connection, key: bytes) -> tuple[str, str | None]:
    """The spool's security chain head, and its event's time when the spool
    still holds that event (else None)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'security_head'").fetchone()
    head = row[0] if row else genesis(key, SECURITY_STREAM)
    last = conn.execute(
        "SELECT ts, json FROM security_events ORDER BY id DESC LIMIT 1").fetchone()
    if last is not None and f'"hash":"{head}"' in last[1]:
        return head, format_ts(last[0])
    return head, None


def _follow(key: bytes, head: str, newer: list[dict[str, Any]]) -> tuple[str, int]:
    """The end of the run of ``newer`` (newest first) continuing ``head``,
    and its length. Events of equal times may come in any order: the pass
    is repeated while it finds more."""
    end, taken = head, 0
    rest = [(ev, _security_body(ev)) for ev in reversed(newer)]
    found = True
    while found and rest:
        found = False
        left = []
        for ev, body in rest:
            if body is not None and chain_hash(key, end, body) == ev.get("hash"):
                end, taken, found = ev["hash"], taken + 1, True
            else:
                left.append((ev, body))
        rest = left
    return end, taken


async def sink_ahead(sink: Sink, key: bytes, head: str,
                     since: str | None) -> tuple[str, int] | None:
    """Where the sink's chain after ``head`` ends and how many events it has
    there, if it holds ``head`` within its newest :data:`MAX_EVENTS` security
    events (from ``since`` when given); else None."""
    newer: list[dict[str, Any]] = []
    cursor: str | None = None
    found, head_ts, read = False, None, 0
    while True:
        # Past the first page, the rest in one query; once the head is found,
        # only what is left of its millisecond (a page at a time).
        limit = FIRST_PAGE if not read or found else MAX_EVENTS - FIRST_PAGE
        page, cursor = await sink.list_security_events(since=since, limit=limit, cursor=cursor)
        read += len(page)
        for ev in page:
            if not isinstance(ev, dict):
                continue
            if found:
                # Events of the head's millisecond are listed by their ids,
                # so the next of the chain may come after the head.
                if ev.get("ts") != head_ts:
                    return _follow(key, head, newer)
                if isinstance(ev.get("hash"), str):
                    newer.append(ev)
            elif ev.get("hash") == head:
                found, head_ts = True, ev.get("ts")
            elif isinstance(ev.get("hash"), str):
                newer.append(ev)
        if cursor is None or read >= MAX_EVENTS:
            break
    return _follow(key, head, newer) if found else None


async def catch_up_security_chain(spool: Spool, sink: Sink, key: bytes) -> int:
    """At start: continue the spool's security chain from the sink's when
    the sink went on past the spool's head (a spool restored from an older
    backup). Returns how many events of the sink's the chain went on past
    (0: none, or the sink cannot be read now: nothing is changed)."""
    if not sink.queryable:
        return 0
    head, since = await spool.read(lambda c: _head(c, key))
    if head == genesis(key, SECURITY_STREAM):
        return 0  # (several spools start their chains there: nothing tells them apart)
    try:
        ahead = await sink_ahead(sink, key, head, since)
    except SinkError as exc:
        log.warning("could not check that the %s sink is not ahead of the spool: %s",
                    sink.type, exc)
        return 0
    except Exception:  # a sink's bug, a document too odd to read: serve anyway, as before
        log.exception("could not check that the %s sink is not ahead of the spool", sink.type)
        return 0
    if ahead is None or not ahead[1]:
        return 0
    end, taken = ahead
    adopted = await spool.submit(lambda w: _adopt(w, head, end), needs_space=False)
    log.error(
        "the spool is older than the %s sink: the sink holds %d security event(s) of this"
        " server's chain after the spool's newest (spool.db restored from an older backup,"
        " or a copy of it served elsewhere). %s Sessions open in the spool that went on"
        " in the sink will have their next part refused as a conflict (a dead letter)."
        " README: Backups", sink.type, taken,
        "The security chain goes on from the sink's newest." if adopted else
        "Security events were appended meanwhile: the chain has forked.")
    return taken


def _adopt(w: Writer, head: str, end: str) -> bool:
    return w.adopt_security_head(head, end)

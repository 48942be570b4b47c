"""A sink shared with servers of another audit key.

Several servers may write to one sink (README: Several servers, one sink),
but only under one audit key: ``verify`` checks every stored chain with its
own key, and reports each session and security event of a server with
another one as changed. Each server makes its own ``<data_dir>/audit.key``
unless ``SESSION_AUDIT_AUDIT_KEY`` is set, so separate data directories give
separate keys unless the operator shares one. At start (a queryable sink,
open by then) the sink's newest sessions are looked at: part 0 of a session
begins from the genesis value of its id under the key that chained it,
which only the key makes. One that begins elsewhere is said in the log.
"""

from __future__ import annotations

import logging

from sinks.base import Sink, SinkError

from .events import genesis

log = logging.getLogger("session_audit.sharing")

# The sink's newest sessions looked at (one listing, then one query each).
SAMPLE = 20


async def other_key_sessions(sink: Sink, key: bytes) -> tuple[int, list[str]]:
    """Of the sink's :data:`SAMPLE` newest sessions: how many were looked at
    (those with a part 0 stored), and those whose part 0 does not begin from
    ``key``'s genesis value for them."""
    summaries, _ = await sink.list_sessions(limit=SAMPLE)
    looked, other = 0, []
    for summary in summaries:
        sid = summary.get("session_id")
        if not isinstance(sid, str):
            continue
        first = [p for p in await sink.session_part_heads(sid) if p.get("part") == 0]
        if not first:
            continue  # (a session split by a sink switch: its part 0 is elsewhere)
        looked += 1
        if first[0].get("prev_hash") != genesis(key, sid):
            other.append(sid)
    return looked, other


async def check_shared_key(sink: Sink, key: bytes) -> list[str]:
    """At start: say in the log when the sink holds sessions chained under
    another audit key. The ids of those found (none: nothing is said)."""
    if not sink.queryable:
        return []
    try:
        looked, other = await other_key_sessions(sink, key)
    except SinkError as exc:
        log.warning("could not check that the %s sink's sessions are chained under this"
                    " server's audit key: %s", sink.type, exc)
        return []
    except Exception:  # a document too odd to look at (another writer's): serve anyway
        log.exception("could not check that the %s sink's sessions are chained under this"
                      " server's audit key", sink.type)
        return []
    if other:
        log.error(
            "%d of the %s sink's %d newest sessions (%s) were not chained under this"
            " server's audit key: another server writes to this sink with another key, or"
            " they were changed. verify reports every session and security event of a"
            " server with another key as changed: servers sharing a sink must share one"
            " audit key (SESSION_AUDIT_AUDIT_KEY, or the same audit.key in each data_dir)."
            " README: Several servers, one sink", len(other), sink.type, looked,
            ", ".join(other[:3]) + (", ..." if len(other) > 3 else ""))
    elif looked:
        log.info("the %s sink's %d newest sessions are chained under this server's audit key",
                 sink.type, looked)
    return other

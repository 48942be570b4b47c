"""Sink writes per session: sessions of 5, 20, 50 and 500 events, and of 500 actions.

The server runs on the ``http`` sink against ``tests/receiver.py`` (no
faults, no rate limit), both as subprocesses. For each size, ``--repeat``
sessions are driven over HTTP, logged out, and the flusher is waited for
(``/metrics`` pending parts = 0); then the receiver's write requests and the
parts in its ``--store`` file are counted for exactly those sessions.

Events are counted as API.md counts them: ``session.start`` + ``token.issue``
+ actions (``GET /documents/{id}``) + ``session.end``. A session of N events
therefore has N - 3 actions. With ``part_max_events = 500`` a session of 500
events is one part, and a session of 500 *actions* (503 events) is two parts
(a ``checkpoint`` part of 500 events and a final part of 3): one write per
part, two writes.

    python bench/sink_writes_bench.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    Receiver,
    Server,
    add_users,
    free_port,
    http,
    save,
    workdir,
    write_config,
)

# (label, events in the session)
CASES = [("5 events", 5), ("20 events", 20), ("50 events", 50), ("500 events", 500),
         ("500 actions (503 events)", 503)]
PART_MAX_EVENTS = 500


def drive(srv: Server, user: str, doc_id: str, events: int) -> str:
    """One session of exactly ``events`` events; returns its session id."""
    login = srv.login(user)
    token, sid = login["access_token"], login["session_id"]
    for _ in range(events - 3):
        status, body = http("GET", f"{srv.base}/documents/{doc_id}", token=token)
        assert status == 200, (status, body)
    status, body = http("POST", srv.base + "/logout", token=token)
    assert status == 200 and body["event_count"] == events, (status, body)
    return str(sid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="sessions per size")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with workdir("sinkwrites") as wd, Receiver(wd) as rcv:
        port = free_port()
        # bcrypt_rounds only speeds up the logins; nothing here measures them.
        cfg = write_config(wd, port, sink="http", sink_url=rcv.url, bcrypt_rounds=4,
                           max_writes_per_second=50, burst=50)
        users = [f"writer{i}" for i in range(args.repeat)]
        add_users(cfg, users, rounds=4)
        with Server(cfg, port) as srv:
            docs = {}
            for u in users:  # a setup session per user: its document, flushed before
                login = srv.login(u)
                st, doc = http("POST", srv.base + "/documents",
                               {"title": "t", "content": "c" * 200},
                               token=login["access_token"])
                assert st == 201, doc
                docs[u] = doc["id"]
                http("POST", srv.base + "/logout", token=login["access_token"])
            srv.wait_flushed()
            for label, events in CASES:
                before = rcv.stats()
                with ThreadPoolExecutor(len(users)) as pool:
                    sids = list(pool.map(lambda u, e=events: drive(srv, u, docs[u], e), users))
                waited = srv.wait_flushed()
                after = rcv.stats()
                parts = [p for p in rcv.stored_parts() if p["session_id"] in set(sids)]
                per_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
                for p in parts:
                    per_session[p["session_id"]].append(p)
                writes = after.get("requests", 0) - before.get("requests", 0)
                expected_parts = -(-events // PART_MAX_EVENTS)
                stored_events = sorted(sum(p["event_count"] for p in v)
                                       for v in per_session.values())
                row = {
                    "case": label,
                    "events_per_session": events,
                    "sessions": len(sids),
                    "sink_writes": writes,
                    "sink_writes_per_session": writes / len(sids),
                    "parts_per_session": sorted(len(v) for v in per_session.values()),
                    "part_sizes": sorted({tuple(sorted(p["event_count"] for p in v))
                                          for v in per_session.values()}),
                    "events_stored_per_session": stored_events,
                    "expected_parts_per_session": expected_parts,
                    "writes_per_event": round(writes / (events * len(sids)), 5),
                    "flush_wait_s": round(waited, 2),
                    "ok": (writes == expected_parts * len(sids)
                           and all(len(v) == expected_parts for v in per_session.values())
                           and len(per_session) == len(sids)
                           and stored_events == [events] * len(sids)),
                }
                rows.append(row)
                print(f"{label:>26}: {row['sink_writes_per_session']:.2f} writes/session,"
                      f" parts {row['part_sizes']}, expected {expected_parts}:"
                      f" {'OK' if row['ok'] else 'MISS'}", flush=True)
            final = rcv.stats()
    save("sink_writes", {
        "config": {"sink": "http (tests/receiver.py, no faults)",
                   "part_max_events": PART_MAX_EVENTS, "repeat": args.repeat},
        "cases": rows,
        "receiver_stats": final,
        "all_ok": all(r["ok"] for r in rows),
    })
    print(json.dumps({r["case"]: r["sink_writes_per_session"] for r in rows}))


if __name__ == "__main__":
    main()

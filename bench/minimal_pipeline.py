"""The floor of the spool's design in Python: how fast can 256 producers go
if nothing but the unavoidable work is done?

Each producer builds a ``Draft`` and the event loop seals it at once
(canonical JSON + HMAC chain, ``audit.events.seal_event``: no session cache,
no savepoints, no jobs); one writer thread only inserts the sealed rows into
the spool's events layout and commits (WAL, ``synchronous = FULL``); each
producer waits for its commit, as a durable ``ack`` must.

    python bench/minimal_pipeline.py [--events 100000] [--producers 256] [--cap N]
                                     [--chunked] [--no-index] [--lazy N]

``--cap N`` commits at most N rows at a time (so that the writer commits one
part while the loop seals the next), ``--chunked`` inserts with one multi-row
INSERT per power-of-two chunk instead of ``executemany``, ``--no-index``
leaves out the ``(sk, seq)`` index (an append-only table: what a commit costs
when it does not touch a leaf per session), ``--lazy N`` leaves it out and
fills a ``(sk, seq) -> rowid`` keys table every N rows instead (the spool's
layout since: ``event_keys``). Prints events/s and
where each event's time went: insert, commit (the writer thread) and the rest
(the event loop: drafts, sealing, futures).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from audit.events import Draft, Source, genesis, new_id, seal_event

KEY = b"bench-audit-key-0123456789abcdef"
CHUNKS = (128, 64, 32, 16, 8, 4, 2, 1)
INSERT = "INSERT INTO events (sk, session_id, seq, ts, json) VALUES "


class Writer:
    def __init__(self, conn: sqlite3.Connection, chunked: bool, lazy: int = 0) -> None:
        self.conn = conn
        self.chunked = chunked
        self.lazy = lazy
        self.tail = 0
        self.mark = 0
        self.insert_s = self.commit_s = 0.0
        self.commits = 0

    def commit(self, rows: list[tuple[Any, ...]]) -> None:
        t0 = time.perf_counter()
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        if self.chunked:
            i, left = 0, len(rows)
            for n in CHUNKS:
                while left >= n:
                    c.execute(INSERT + ",".join(["(?,?,?,?,?)"] * n),
                              tuple(itertools.chain.from_iterable(rows[i : i + n])))
                    i, left = i + n, left - n
        else:
            c.executemany(INSERT + "(?,?,?,?,?)", rows)
        if self.lazy:
            self.tail += len(rows)
            if self.tail >= self.lazy:
                c.execute("INSERT INTO event_keys (sk, seq, rid) SELECT sk, seq, rowid"
                          " FROM events WHERE rowid > ? ORDER BY sk, seq", (self.mark,))
                self.mark = c.execute("SELECT max(rowid) FROM events").fetchone()[0]
                c.execute("UPDATE meta SET value = ? WHERE key = 'mark'", (self.mark,))
                self.tail = 0
        t1 = time.perf_counter()
        c.execute("COMMIT")
        self.insert_s += t1 - t0
        self.commit_s += time.perf_counter() - t1
        self.commits += 1


async def run(events: int, producers: int, cap: int, chunked: bool,
              index: bool = True, lazy: int = 0) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        conn = sqlite3.connect(os.path.join(d, "spool.db"), isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(
            "CREATE TABLE events (sk INTEGER NOT NULL, session_id TEXT NOT NULL,"
            " seq INTEGER NOT NULL, ts REAL NOT NULL, json TEXT NOT NULL);"
            + ("CREATE UNIQUE INDEX events_sk_seq ON events (sk, seq);" if index else "")
            + ("CREATE TABLE event_keys (sk INTEGER NOT NULL, seq INTEGER NOT NULL,"
               " rid INTEGER NOT NULL, PRIMARY KEY (sk, seq)) WITHOUT ROWID;"
               "CREATE TABLE meta (key TEXT PRIMARY KEY, value);"
               "INSERT INTO meta VALUES ('mark', 0);" if lazy else ""))
        writer = Writer(conn, chunked, lazy)
        pool = ThreadPoolExecutor(1)
        loop = asyncio.get_running_loop()
        src = Source(user="alice", role="user", ip="127.0.0.1", user_agent="curl/8.5.0")
        sids = [new_id() for _ in range(producers)]
        heads = {sid: [sk, 1, genesis(KEY, sid)] for sk, sid in enumerate(sids, 1)}
        pending: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        wake = asyncio.Event()

        def submit(sid: str, draft: Draft) -> asyncio.Future[None]:
            h = heads[sid]
            now = time.time()
            event, text = seal_event(KEY, h[2], draft, sid, h[1], now)
            fut: asyncio.Future[None] = loop.create_future()
            pending.append(((h[0], sid, h[1], now, text), fut))
            h[1] += 1
            h[2] = event["hash"]
            if len(pending) == 1:
                wake.set()
            return fut

        async def commits() -> None:
            nonlocal pending
            while True:
                if not pending:
                    wake.clear()
                    await wake.wait()
                    continue
                n = cap or len(pending)
                batch, pending = pending[:n], pending[n:]
                await loop.run_in_executor(pool, writer.commit, [r for r, _ in batch])
                for _, fut in batch:
                    fut.set_result(None)

        per = events // producers

        async def produce(sid: str) -> None:
            for i in range(per):
                await submit(sid, Draft("document.access", source=src,
                                        target={"type": "document", "id": f"doc-{i}"}))

        task = asyncio.create_task(commits())
        started = time.perf_counter()
        await asyncio.gather(*(produce(sid) for sid in sids))
        elapsed = time.perf_counter() - started
        task.cancel()
        pool.shutdown()
        conn.close()
    n = per * producers
    return {
        "events_per_second": round(n / elapsed),
        "us_per_event": round(1e6 * elapsed / n, 1),
        "insert_us": round(1e6 * writer.insert_s / n, 1),
        "commit_us": round(1e6 * writer.commit_s / n, 1),
        "loop_us": round(1e6 * (elapsed - writer.insert_s - writer.commit_s) / n, 1),
        "mean_batch": round(n / writer.commits, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--producers", type=int, default=256)
    ap.add_argument("--cap", type=int, default=0, help="at most N rows a commit (0: all)")
    ap.add_argument("--chunked", action="store_true")
    ap.add_argument("--no-index", action="store_true")
    ap.add_argument("--lazy", type=int, default=0,
                    help="no index on events: a (sk, seq) -> rowid keys table filled every N rows")
    args = ap.parse_args()
    print(uvloop.run(run(args.events, args.producers, args.cap, args.chunked,
                         index=not (args.no_index or args.lazy), lazy=args.lazy)))


if __name__ == "__main__":
    main()

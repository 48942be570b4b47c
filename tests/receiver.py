"""A real HTTP receiver for the ``http`` sink: for tests, end-to-end runs and benchmarks.

It implements the receiving side of API.md ("The HTTP sink ..."):

* ``POST /sessions``: one part, ``Idempotency-Key`` must equal its ``_id``;
  a new ``_id`` is stored (201), a duplicate with the same ``hash`` is
  success (409 by default, or 200 with ``dup_status=200``), a duplicate with
  another ``hash`` is 422 (as the IETF Idempotency-Key draft answers a key
  reused with another body);
* ``POST /security-events``: ``{"events": [...]}``, all or nothing, same rules
  per event (200 when the batch is stored or already was, 422 on a conflict);
  or, with ``batch_dup_status=409``, like a store with a unique index: a
  batch holding any stored ``_id`` is refused whole with 409 (the stored
  event's ``hash`` in the body when the batch is one event);
* ``GET /stats``: request and store counters as JSON.

Faults, to exercise the sender:

* a token-bucket rate limit (``rate`` per second, ``burst``) answered with
  429 and ``Retry-After`` in whole seconds;
* a share ``fail_share`` of the remaining requests fails, chosen by a seeded
  RNG, evenly among: 503 with ``Retry-After: 1``, 503 without it, and a
  "timeout" that *stores the write* and then answers only after
  ``hang_seconds`` (longer than the client's timeout, so the client gives up
  although the write landed: the idempotency case);
* :meth:`Receiver.script` queues exact answers for the next requests (a
  status with headers, a hang, a hang before storing), for unit tests.

Optionally everything stored is kept in a SQLite file (``--store``), so a
test can read it after the process exits, and reloaded at start, so a
restarted receiver still recognises duplicates.

Run it: ``python tests/receiver.py --port 8099 --rate 5 --fail-share 0.3
--store /tmp/recv.db --seed 1``. It prints ``listening on http://HOST:PORT``
(useful with ``--port 0``) and stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sqlite3
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

_SCHEMA = """
CREATE TABLE IF NOT EXISTS parts (id TEXT PRIMARY KEY, hash TEXT, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS security_events (id TEXT PRIMARY KEY, hash TEXT, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stats (key TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""


@dataclass
class Fault:
    """One scripted answer.

    ``status`` with ``headers``; or ``hang=True``: wait ``hang_seconds``
    (store first when ``apply``, the default), then answer normally.
    ``apply`` with a status also stores the write before answering it.
    """

    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    apply: bool = False
    body: dict[str, Any] | None = None


@dataclass
class ReceiverOptions:
    rate: float = 0.0  # writes per second; 0 = unlimited
    burst: int = 5
    fail_share: float = 0.0
    hang_seconds: float = 30.0
    seed: int = 0
    token: str | None = None  # expected bearer token; None = no check
    dup_status: int = 409
    # 422 (the IETF Idempotency-Key draft) or 409 (API.md's "duplicate" answer,
    # for both kinds of duplicate) with the stored part's hash in the body.
    conflict_status: int = 422
    # 200: a batch of security events is stored but for its duplicates;
    # 409: a batch with any stored _id (a duplicate or a conflict) is refused.
    batch_dup_status: int = 200
    store: Path | None = None


class Receiver:
    """The receiver's state and its aiohttp application."""

    def __init__(
        self, options: ReceiverOptions | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.options = options or ReceiverOptions()
        self.clock = clock
        self.rng = random.Random(self.options.seed)
        self.parts: dict[str, dict[str, Any]] = {}
        self.security_events: dict[str, dict[str, Any]] = {}
        self.stats: Counter[str] = Counter()
        # The last requests' headers (bounded: benchmarks send many).
        self.headers_seen: deque[dict[str, str]] = deque(maxlen=1000)
        self.urls_seen: deque[str] = deque(maxlen=1000)  # path and query
        self._script: deque[Fault] = deque()
        self._tokens = float(self.options.burst)
        self._refilled = clock()
        self._stopping = asyncio.Event()
        self._db: sqlite3.Connection | None = None
        if self.options.store is not None:
            self._db = sqlite3.connect(self.options.store, isolation_level=None)
            self._db.executescript(_SCHEMA)
            for table, target in (("parts", self.parts), ("security_events", self.security_events)):
                for doc_id, doc in self._db.execute(f"SELECT id, doc FROM {table}"):
                    target[doc_id] = json.loads(doc)
            self.stats.update(dict(self._db.execute("SELECT key, n FROM stats").fetchall()))

    # -- control -------------------------------------------------------------

    def script(self, *faults: Fault) -> None:
        """Answer the next requests with these faults, in order."""
        self._script.extend(faults)

    def close(self) -> None:
        self._stopping.set()
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/sessions", self._sessions)
        app.router.add_post("/security-events", self._security)
        app.router.add_get("/stats", self._stats)

        async def stop(_: web.Application) -> None:
            self._stopping.set()

        app.on_shutdown.append(stop)
        return app

    # -- bookkeeping ---------------------------------------------------------

    def _count(self, key: str) -> None:
        self.stats[key] += 1
        if self._db is not None:
            self._db.execute(
                "INSERT INTO stats (key, n) VALUES (?, 1)"
                " ON CONFLICT (key) DO UPDATE SET n = n + 1",
                (key,),
            )

    def _answer(
        self, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> web.Response:
        self._count(f"status_{status}")
        return web.json_response(body, status=status, headers=headers)

    def _take_token(self) -> float | None:
        """``None`` when a write may pass, else seconds until one may."""
        rate = self.options.rate
        if rate <= 0:
            return None
        now = self.clock()
        self._tokens = min(float(self.options.burst), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        return (1 - self._tokens) / rate

    def _pick_fault(self) -> Fault | None:
        if self._script:
            return self._script.popleft()
        share = self.options.fail_share
        if share <= 0 or self.rng.random() >= share:
            return None
        kind = self.rng.randrange(3)
        if kind == 0:
            return Fault(503, {"Retry-After": "1"})
        if kind == 1:
            return Fault(503)
        return Fault(hang=True, apply=True)

    async def _hang(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.options.hang_seconds)

    # -- storing -------------------------------------------------------------

    def _check(self, store: dict[str, dict[str, Any]], doc: dict[str, Any]) -> str:
        """``"new"``, ``"same"`` or ``"conflict"``."""
        known = store.get(str(doc["_id"]))
        if known is None:
            return "new"
        return "same" if known.get("hash") == doc.get("hash") else "conflict"

    def _store(self, table: str, docs: list[dict[str, Any]]) -> int:
        target = self.parts if table == "parts" else self.security_events
        new = [d for d in docs if str(d["_id"]) not in target]
        for d in new:
            target[str(d["_id"])] = d
        if self._db is not None and new:
            self._db.executemany(
                f"INSERT OR IGNORE INTO {table} (id, hash, doc) VALUES (?, ?, ?)",
                [(str(d["_id"]), d.get("hash"), json.dumps(d)) for d in new],
            )
        return len(new)

    # -- handlers ------------------------------------------------------------

    async def _guard(self, request: web.Request) -> tuple[Any, Fault | None] | web.Response:
        """Count, authenticate, parse, rate-limit and pick a fault."""
        self._count("requests")
        self.headers_seen.append(dict(request.headers))
        self.urls_seen.append(str(request.rel_url))
        token = self.options.token
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return self._answer(401, {"error": "unauthorized"})
        try:
            body = await request.json()
        except ValueError:
            return self._answer(400, {"error": "invalid_json"})
        wait = self._take_token()
        if wait is not None:
            retry = max(1, int(wait + 0.999))
            return self._answer(429, {"error": "rate_limited"}, {"Retry-After": str(retry)})
        return body, self._pick_fault()

    async def _finish(self, fault: Fault | None, apply: Callable[[], web.Response]) -> web.Response:
        if fault is None:
            return apply()
        if fault.hang:
            self._count("hangs")
            if fault.apply:
                response = apply()
                await self._hang()
                return response
            await self._hang()
            return apply()
        if fault.apply:
            apply()
        return self._answer(fault.status, fault.body or {"error": "injected"}, fault.headers)

    async def _sessions(self, request: web.Request) -> web.Response:
        guarded = await self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        part, fault = guarded
        if not isinstance(part, dict) or "_id" not in part or "hash" not in part:
            return self._answer(400, {"error": "a part needs _id and hash"})
        if request.headers.get("Idempotency-Key") != str(part["_id"]):
            return self._answer(400, {"error": "Idempotency-Key must equal _id"})

        def apply() -> web.Response:
            state = self._check(self.parts, part)
            if state == "conflict":
                if self.options.conflict_status == 409:
                    return self._answer(409, {"duplicate": True,
                                              "hash": self.parts[str(part["_id"])]["hash"]})
                return self._answer(422, {"error": "idempotency_conflict"})
            if state == "same":
                return self._answer(self.options.dup_status,
                                    {"duplicate": True, "hash": part["hash"]})
            self._store("parts", [part])
            return self._answer(201, {"stored": part["_id"]})

        return await self._finish(fault, apply)

    async def _security(self, request: web.Request) -> web.Response:
        guarded = await self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        body, fault = guarded
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not all(
            isinstance(e, dict) and "_id" in e and "hash" in e for e in events
        ):
            return self._answer(400, {"error": "expected {events: [...]} with _id and hash"})

        def apply() -> web.Response:
            states = [self._check(self.security_events, e) for e in events]
            if self.options.batch_dup_status == 409 and any(s != "new" for s in states):
                answer: dict[str, Any] = {"duplicate": True}
                if len(events) == 1:
                    answer["hash"] = self.security_events[str(events[0]["_id"])]["hash"]
                return self._answer(409, answer)
            if "conflict" in states:
                return self._answer(422, {"error": "idempotency_conflict"})
            stored = self._store("security_events", events)
            return self._answer(200, {"stored": stored, "duplicates": len(events) - stored})

        return await self._finish(fault, apply)

    async def _stats(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                **self.stats,
                "parts": len(self.parts),
                "security_events": len(self.security_events),
            }
        )


def sample_part(
    session_id: str,
    part: int = 0,
    *,
    user: str = "alice",
    start: str = "2026-11-26T14:00:00.000Z",
    final: bool = True,
    events: int = 2,
    salt: str = "",
) -> dict[str, Any]:
    """A part shaped like API.md's, for sink tests and benchmarks.

    ``hash`` is derived from the ids and ``salt``: another ``salt`` gives the
    same ``_id`` with a different ``hash`` (a conflict).
    """
    import hashlib

    first = part * events + 1
    evs = [
        {
            "event_id": f"{session_id}-e{seq}",
            "session_id": session_id,
            "seq": seq,
            "ts": start,
            "action": "document.access",
            "outcome": "success",
            "actor": {"user": user, "role": "user"},
            "target": {"type": "document", "id": "d1"},
            "source": {"ip": "127.0.0.1", "user_agent": "pytest"},
            "request_id": f"r{seq}",
            "details": {},
            "hash": hashlib.sha256(f"{session_id}:{seq}{salt}".encode()).hexdigest(),
        }
        for seq in range(first, first + events)
    ]
    return {
        "_id": f"{session_id}:{part}",
        "session_id": session_id,
        "part": part,
        "final": final,
        "user": user,
        "session_start_time": start,
        "session_end_time": "2026-11-26T15:00:00.000Z" if final else None,
        "session_duration_seconds": 3600.0 if final else None,
        "event_count": events,
        "seal_reason": "logout" if final else "checkpoint",
        "first_seq": first,
        "last_seq": first + events - 1,
        "prev_hash": "0" * 64,
        "hash": evs[-1]["hash"] if evs else hashlib.sha256(salt.encode()).hexdigest(),
        "events": evs,
    }


def sample_security_event(
    event_id: str,
    *,
    ts: str = "2026-11-26T14:00:00.000Z",
    action: str = "auth.login_failed",
    salt: str = "",
) -> dict[str, Any]:
    """A security event shaped like API.md's, with ``_id = event_id``."""
    import hashlib

    return {
        "_id": event_id,
        "event_id": event_id,
        "session_id": None,
        "seq": None,
        "ts": ts,
        "action": action,
        "outcome": "denied",
        "actor": {"user": "mallory", "role": None},
        "target": None,
        "source": {"ip": "127.0.0.1", "user_agent": "pytest"},
        "request_id": f"r-{event_id}",
        "details": {"reason": "bad_password"},
        "hash": hashlib.sha256(f"{event_id}{salt}".encode()).hexdigest(),
    }


async def serve(receiver: Receiver, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start ``receiver`` on ``host:port`` (0 = any free port); returns the bound port."""
    runner = web.AppRunner(receiver.app(), shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    bound: int = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, bound


async def _main(args: argparse.Namespace) -> None:
    options = ReceiverOptions(
        rate=args.rate,
        burst=args.burst,
        fail_share=args.fail_share,
        hang_seconds=args.hang_seconds,
        seed=args.seed,
        token=args.token,
        dup_status=args.dup_status,
        batch_dup_status=args.batch_dup_status,
        store=Path(args.store) if args.store else None,
    )
    receiver = Receiver(options)
    runner, port = await serve(receiver, args.host, args.port)
    print(f"listening on http://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        receiver.close()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def engine_behind(receiver: Receiver, engines: Any, config: Any,
                        monotonic: Any) -> AsyncIterator[Any]:
    """For tests: an engine (the ``engines`` fixture's) whose sink is the
    http one, ``receiver`` serving it on loopback; closed, and the receiver
    stopped, afterwards."""
    from audit.config import HttpSinkConfig  # (this file also runs on its own)
    from sinks.http import HttpSink

    runner, port = await serve(receiver, "127.0.0.1", 0)
    try:
        sink = HttpSink(HttpSinkConfig(url=f"http://127.0.0.1:{port}", token_env=""))
        engine = await engines.open(config, sink, monotonic=monotonic)
        yield engine
        await engines.close(engine)
    finally:
        receiver.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--rate", type=float, default=0.0, help="writes/s, 0 = unlimited")
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--fail-share", type=float, default=0.0)
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token", default=None, help="require this bearer token")
    parser.add_argument("--dup-status", type=int, choices=(200, 409), default=409)
    parser.add_argument("--batch-dup-status", type=int, choices=(200, 409), default=200,
                        help="409: refuse a security-event batch holding any stored _id")
    parser.add_argument("--store", default=None, help="SQLite file to keep what was received")
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()

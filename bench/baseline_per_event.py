"""Before/after: the seed's per-event writes vs session-audit, on the same receiver.

Both designs face ``tests/receiver.py`` (a separate process) rate limited to
``--rate`` (5) writes/s with burst 5 and ``--fail-share`` (30 %) of the
writes that pass failing (503 with Retry-After, 503 without, and a hang that
stores the write but answers after the client's timeout), seeded alike.

Workload (same seeded schedule for both): ``--users`` (20) users each log in
(``session.start``, ``token.issue``), open a document ``--opens`` (5) times
at random moments within ``--span`` (15) seconds, and log out
(``session.end``): 8 events per user, 160 in all, 100 of them document opens.

* **before** (the seed's design, as DESIGN.md describes it): every event is
  POSTed to the receiver the moment it happens, as its own write
  (``POST /security-events`` with one event: the receiver's per-event
  endpoint), with no retry: whatever failed or was rate limited is dropped.
  A write counts as *accepted* when the client saw a 2xx; *captured* is
  what the receiver actually stored (a hung write may land unseen).
* **after**: ``python server.py serve`` on the ``http`` sink (flush at
  5 writes/s, burst 5, backoff with jitter) driven over HTTP with the same
  schedule; after the last logout we wait until nothing is pending, then
  count what the receiver stored.

    python bench/baseline_per_event.py [--users 20] [--opens 5] [--span 15]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    USER_PASSWORD,
    Receiver,
    Server,
    add_users,
    free_port,
    save,
    workdir,
    write_config,
)

CLIENT_TIMEOUT = 10.0  # the sink's default timeout_seconds, for both designs


def schedule(users: int, opens: int, span: float, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    plan = []
    for u in range(users):
        login = rng.uniform(0, 2.0)
        times = sorted(rng.uniform(login + 0.2, span) for _ in range(opens))
        plan.append({"user": f"user{u:02d}", "login": login, "opens": times,
                     "logout": min(span + 0.5, times[-1] + rng.uniform(0.1, 1.0))})
    return plan


def _ts() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _event(user: str, sid: str, seq: int, action: str, doc: str | None) -> dict[str, Any]:
    eid = uuid.uuid4().hex
    return {"_id": eid, "event_id": eid, "session_id": sid, "seq": seq, "ts": _ts(),
            "action": action, "outcome": "success", "actor": {"user": user, "role": "user"},
            "target": {"type": "document", "id": doc} if doc else None,
            "source": {"ip": "127.0.0.1", "user_agent": "bench"}, "request_id": eid[:16],
            "details": {}, "hash": hashlib.sha256(eid.encode()).hexdigest()}


async def run_before(url: str, plan: list[dict[str, Any]]) -> dict[str, Any]:
    """One POST per event, at once, no retry (the seed's write path)."""
    seen: dict[str, int] = {}
    results = {"sent": 0, "accepted": 0, "rate_limited": 0, "failed": 0, "timeouts": 0}
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    t0 = time.monotonic()

    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def write(ev: dict[str, Any]) -> None:
            results["sent"] += 1
            try:
                async with http.post(url + "/security-events", json={"events": [ev]}) as r:
                    await r.read()
                    seen[str(r.status)] = seen.get(str(r.status), 0) + 1
                    if 200 <= r.status < 300:
                        results["accepted"] += 1
                    elif r.status == 429:
                        results["rate_limited"] += 1
                    else:
                        results["failed"] += 1
            except (TimeoutError, aiohttp.ClientError):
                results["timeouts"] += 1

        async def user(p: dict[str, Any]) -> None:
            sid = uuid.uuid4().hex
            doc = uuid.uuid4().hex[:12]
            seq = 0
            writes = []

            async def at(t: float, action: str, target: str | None = None) -> None:
                nonlocal seq
                await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
                seq += 1
                writes.append(asyncio.create_task(write(_event(p["user"], sid, seq, action,
                                                               target))))

            await at(p["login"], "session.start")
            await at(p["login"], "token.issue")
            for t in p["opens"]:
                await at(t, "document.access", doc)
            await at(p["logout"], "session.end")
            await asyncio.gather(*writes)

        await asyncio.gather(*(user(p) for p in plan))
    results["statuses"] = seen
    results["seconds"] = round(time.monotonic() - t0, 1)
    return results


async def setup_documents(srv: Server, plan: list[dict[str, Any]]) -> dict[str, str]:
    """Each user's document, created in a setup session that is flushed before the run."""
    docs = {}
    async with aiohttp.ClientSession() as http:
        for p in plan:
            async with http.post(srv.base + "/token", json={"username": p["user"],
                                                            "password": USER_PASSWORD}) as r:
                token = (await r.json())["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            async with http.post(srv.base + "/documents", headers=auth,
                                 json={"title": "report", "content": "quarterly numbers"}) as r:
                assert r.status == 201, await r.text()
                docs[p["user"]] = (await r.json())["id"]
            async with http.post(srv.base + "/logout", headers=auth) as r:
                assert r.status == 200, await r.text()
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--opens", type=int, default=5)
    ap.add_argument("--span", type=float, default=15.0)
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--fail-share", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    plan = schedule(args.users, args.opens, args.span, args.seed)
    n_events = args.users * (args.opens + 3)
    n_opens = args.users * args.opens

    # -- before -------------------------------------------------------------
    with workdir("baseline-before") as wd, Receiver(wd, rate=args.rate,
                                                   fail_share=args.fail_share,
                                                   seed=args.seed) as rcv:
        before = asyncio.run(run_before(rcv.url, plan))
        stored = rcv.stored_security_events()
        rstats = rcv.stats()
    ids = [e["_id"] for e in stored]
    before.update({
        "sink_requests": rstats.get("requests", 0),
        "events_captured": len(set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "doc_opens_captured": sum(e["action"] == "document.access" for e in stored),
        "receiver_stats": rstats,
    })
    print(f"before: {before['sink_requests']} writes, {before['events_captured']}/{n_events}"
          f" events captured ({before['doc_opens_captured']}/{n_opens} document opens),"
          f" client saw {before['accepted']} accepted", flush=True)

    # -- after --------------------------------------------------------------
    with workdir("baseline-after") as wd, Receiver(wd, rate=args.rate,
                                                  fail_share=args.fail_share,
                                                  seed=args.seed) as rcv:
        port = free_port()
        cfg = write_config(wd, port, sink="http", sink_url=rcv.url, bcrypt_rounds=4,
                           max_writes_per_second=args.rate, burst=5)
        add_users(cfg, [p["user"] for p in plan], rounds=4)
        with Server(cfg, port) as srv:
            after = asyncio.run(_after(srv, rcv, plan))
    print(f"after: {after['sink_requests']} writes ({after['sink_writes_ok']} ok),"
          f" {after['events_captured']}/{n_events} events captured"
          f" ({after['doc_opens_captured']}/{n_opens} document opens),"
          f" {after['duplicates']} duplicates, drained {after['drain_seconds']} s after the"
          f" last logout", flush=True)

    for r in (before, after):
        r["events_captured_pct"] = round(100 * r["events_captured"] / n_events, 1)
        r["doc_opens_captured_pct"] = round(100 * r["doc_opens_captured"] / n_opens, 1)
    save("baseline", {
        "workload": {"users": args.users, "opens_per_user": args.opens, "span_s": args.span,
                     "events": n_events, "doc_opens": n_opens, "receiver_rate": args.rate,
                     "receiver_fail_share": args.fail_share, "seed": args.seed,
                     "client_timeout_s": CLIENT_TIMEOUT},
        "baseline": before,
        "session_audit": after,
    })


async def _after(srv: Server, rcv: Receiver, plan: list[dict[str, Any]]) -> dict[str, Any]:
    docs = await setup_documents(srv, plan)
    await asyncio.to_thread(srv.wait_flushed, 300)  # the setup sessions are not counted
    setup = rcv.stats()
    ctx2 = await _run_users(srv, plan, docs)
    last_logout = time.monotonic()
    waited = await asyncio.to_thread(srv.wait_flushed, 300)
    stats = rcv.stats()
    sids = set(ctx2["sids"])
    parts = [p for p in rcv.stored_parts() if p["session_id"] in sids]
    events = [e for p in parts for e in p["events"]]
    ids = [e["event_id"] for e in events]
    return {
        "sink_requests": stats.get("requests", 0) - setup.get("requests", 0),
        "sink_writes_ok": sum(stats.get(k, 0) - setup.get(k, 0)
                              for k in ("status_201", "status_200", "status_409")),
        "rate_limited_answers": stats.get("status_429", 0) - setup.get("status_429", 0),
        "failed_answers": stats.get("status_503", 0) - setup.get("status_503", 0),
        "hangs": stats.get("hangs", 0) - setup.get("hangs", 0),
        "parts_stored": len(parts),
        "sessions": len(sids),
        "events_captured": len(set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "doc_opens_captured": sum(e["action"] == "document.access" for e in events),
        "drain_seconds": round(waited, 1),
        "run_seconds": round(last_logout - ctx2["t0"], 1),
        "http_statuses": ctx2["statuses"],
    }


async def _run_users(srv: Server, plan: list[dict[str, Any]],
                     docs: dict[str, str]) -> dict[str, Any]:
    sids: list[str] = []
    statuses: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        t0 = time.monotonic()

        async def call(method: str, path: str, token: str | None = None,
                       body: Any = None) -> Any:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.request(method, srv.base + path, json=body,
                                    headers=headers) as r:
                statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
                assert r.status < 300, (method, path, r.status, await r.text())
                return await r.json()

        async def user(p: dict[str, Any]) -> None:
            await asyncio.sleep(max(0.0, t0 + p["login"] - time.monotonic()))
            login = await call("POST", "/token", body={"username": p["user"],
                                                       "password": USER_PASSWORD})
            token = login["access_token"]
            sids.append(login["session_id"])
            for t in p["opens"]:
                await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
                await call("GET", f"/documents/{docs[p['user']]}", token)
            await asyncio.sleep(max(0.0, t0 + p["logout"] - time.monotonic()))
            await call("POST", "/logout", token)

        await asyncio.gather(*(user(p) for p in plan))
    return {"sids": sids, "statuses": statuses, "t0": t0}


if __name__ == "__main__":
    main()

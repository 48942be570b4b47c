"""Regressions of a hunt for what one logged-in user (or one client) can take
from everyone else: the spool's space, the writer, the event loop.

- ``spool_max_bytes`` was checked against the file as the last commit left
  it, so every job submitted while a commit ran was taken: one user sending
  ``POST /audit/events`` of 100 events of 4 KiB on 256 connections at once
  took a 64 MiB spool to 183 MB (on 64, to 87 MB), past the reserve that
  keeps ``GET /audit/status`` and ``POST /audit/flush`` answering, which
  then got 503 (21 of 24 polls). Now the jobs taken and not yet committed
  count too (a request of client events at its size).
- One user's many chats at once took every chat slot and the queue for them:
  a script on 200 connections against a provider taking 3 s had every other
  user's chat wait 30 s (10 times as long), at the edge of ai_busy. Now one
  user's chats hold or wait for at most ``server.CHAT_PER_USER`` slots at
  once; the others wait behind their own.
- A full spool refused a request of client events only once its body was
  read, parsed and checked (100 events of 4 KiB): the flood of one user on
  64 connections, refused by the spool it had filled, took the event loop
  from everyone (another user's ``GET /me``: 327 ms median, 68 ms now;
  ``GET /audit/status`` 1.3 s, 0.3 s now). Now it is refused first.
- A request body's deadline grew by a second for every 4 KiB that came,
  however fast: a body of 8 MB but its last byte, sent at once and then
  held back, was waited for 35 minutes (75 s + 2,000 s), its bytes in
  memory (one user, 200 connections: the server's RSS from 49 MB to 1.7
  GB). What came now counts for at most 75 s ahead: refused 75 s after
  the body stalled, as a trickle is.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from api_fixtures import MakeApi, make_api
from live_server import free_port
from openai_stub import OpenAIStub, stub
from waiting import wait_for

import server
from audit.store import Writer
from handlers import requests
from handlers.admin import operational_reserve

__all__ = ["make_api", "stub"]

EVENTS = 100
DETAILS = 4000  # bytes of details an event, about API.md's 4 KiB


async def test_requests_taken_while_a_commit_runs_stay_within_the_spools_limit(
    make_api: MakeApi,
) -> None:
    # The sink is a closed port: nothing leaves the spool meanwhile.
    api = await make_api(
        audit={"spool_max_bytes": 4 << 20},
        sink={"type": "http", "http": {"url": f"http://127.0.0.1:{free_port()}"}},
        flush_at_close=False,
    )
    spool = api.engine.spool
    alice, admin = await api.user("alice"), await api.admin()
    room = 2 << 20
    spool.max_bytes = spool.spool_bytes + room
    body = json.dumps([{"action": "client.big", "details": {"k": "x" * (DETAILS - 8)}}]
                      * EVENTS)
    request_bytes = EVENTS * (DETAILS + 200)  # what one request adds, at least
    n = 16  # (n * request_bytes is three times the room)

    entered, release = threading.Event(), threading.Event()

    def hold(w: Writer) -> None:  # the commit that runs while the requests come
        entered.set()
        assert release.wait(10)

    held = spool.submit_nowait(hold, needs_space=False)
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)

    async def post() -> int:
        resp = await api.client.post("/audit/events", data=body, headers={
            **alice.headers, "Content-Type": "application/json"})
        await resp.read()
        return resp.status

    posts = [asyncio.ensure_future(post()) for _ in range(n)]
    try:
        # Every request either queued behind the held commit or answered.
        await wait_for(lambda: len(spool._pending) + sum(p.done() for p in posts) == n,
                       message="every request queued or answered")
    finally:
        release.set()
    await held
    statuses = await asyncio.gather(*posts)
    taken = statuses.count(202)
    assert statuses.count(503) == n - taken
    # Taken while there was room, and at most one request past it.
    assert 0 < taken <= room // request_bytes + 1, statuses
    assert spool.spool_bytes < spool.max_bytes + operational_reserve(spool.max_bytes)
    # The way to see and clear a full spool still answers.
    resp = await api.client.get("/audit/status", headers=admin.headers)
    body_status: dict[str, Any] = await resp.json()
    assert resp.status == 200, body_status
    assert spool.full
    resp = await api.client.get("/readyz")
    assert resp.status == 503


async def test_one_users_many_chats_leave_slots_for_the_others(
    make_api: MakeApi, stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "CHAT_CONCURRENCY", server.CHAT_PER_USER + 2)
    api = await make_api(ai={"provider": "openai", "openai": {"base_url": stub.base_url}})
    alice, bob = await api.user("alice"), await api.user("bob")
    adoc = await api.create_doc(alice, title="A", content="Alice's notes.")
    bdoc = await api.create_doc(bob, title="B", content="Bob's notes.")
    stub.mode = "held"  # every chat stays at the provider until the gate opens

    def chat(who: Any, doc: dict[str, Any], message: str) -> asyncio.Future[Any]:
        return asyncio.ensure_future(api.client.post(
            f"/documents/{doc['id']}/chat", json={"message": message}, headers=who.headers))

    def asked(prefix: str) -> int:
        return sum(prefix in json.dumps(r["body"]) for r in stub.requests)

    # Her turns are hers, not a session's: her chats from a second session
    # count with the first's (a mutation review: keyed by session, they did not).
    alice2 = await api.login("alice")
    chats = [chat((alice, alice2)[i % 2], adoc, f"alice-{i}")
             for i in range(server.CHAT_CONCURRENCY + 4)]
    await wait_for(lambda: asked("alice-") >= server.CHAT_PER_USER,
                   message="alice's first chats at the provider")
    chats.append(chat(bob, bdoc, "bob-0"))
    try:
        # Bob's chat gets a slot while alice's others wait (past the wait
        # for a slot, 30 s, it would be ai_busy).
        await wait_for(lambda: asked("bob-") == 1, message="bob's chat at the provider")
        assert asked("alice-") == server.CHAT_PER_USER
    finally:
        stub.gate.set()
    assert [r.status for r in await asyncio.gather(*chats)] == [200] * len(chats)
    assert asked("alice-") == server.CHAT_CONCURRENCY + 4
    assert api.app[server.CHAT_TURNS]._users == {}  # nobody's turns kept


async def test_a_users_limit_of_chats_holds_after_one_of_them_ends(
    make_api: MakeApi, stub: OpenAIStub,
) -> None:
    """The limit is on the chats a user has at once, not on a first batch: once
    one of her chats ends, the one waiting takes its place and her later
    chats wait as before (a mutation review: a fresh turn of hers when one
    ended, and her next ones all went to the provider beside those held)."""
    limit = server.CHAT_PER_USER
    assert limit + 4 <= server.CHAT_CONCURRENCY  # her limit, not the server's, holds
    api = await make_api(ai={"provider": "openai", "openai": {"base_url": stub.base_url}})
    alice, bob = await api.user("alice"), await api.user("bob")
    adoc = await api.create_doc(alice, title="A", content="Alice's notes.")
    bdoc = await api.create_doc(bob, title="B", content="Bob's notes.")
    turns = api.app[server.CHAT_TURNS]
    stub.mode = "held"

    def chat(who: Any, doc: dict[str, Any], message: str) -> asyncio.Future[Any]:
        return asyncio.ensure_future(api.client.post(
            f"/documents/{doc['id']}/chat", json={"message": message}, headers=who.headers))

    def asked(name: str) -> int:
        return sum(name in json.dumps(r["body"]) for r in stub.requests)

    def hers() -> int:  # her chats holding or waiting for a turn
        return turns._users["alice"][1] if "alice" in turns._users else 0

    first, rest = stub.gate, asyncio.Event()
    done = chat(alice, adoc, "alice-first")  # held until ``first`` is set
    await wait_for(lambda: asked("alice-first") == 1, message="her first chat at the provider")
    stub.gate = rest  # (the held ones wait on the gate they found)
    chats = [chat(alice, adoc, f"alice-held-{c}") for c in "abc"]
    chats.append(chat(alice, adoc, "alice-next"))  # waits for a turn
    try:
        await wait_for(lambda: asked("alice-held-") == limit - 1 and hers() == limit + 1,
                       message="her limit at the provider and one waiting")
        first.set()
        assert (await done).status == 200
        await wait_for(lambda: asked("alice-next") == 1, message="her waiting chat's turn")
        chats += [chat(alice, adoc, f"alice-later-{c}") for c in "xy"]
        await wait_for(lambda: hers() == limit + 2, message="her later chats taken")
        chats.append(chat(bob, bdoc, "bob-0"))
        await wait_for(lambda: asked("bob-") == 1, message="bob's chat at the provider")
        assert asked("alice-later-") == 0  # still at her limit: they wait
    finally:
        rest.set()
    assert [r.status for r in await asyncio.gather(*chats)] == [200] * len(chats)
    assert asked("alice-later-") == 2
    assert turns._users == {}


async def test_a_full_spool_refuses_client_events_before_reading_their_body(
    make_api: MakeApi,
) -> None:
    api = await make_api()
    alice = await api.user("alice")
    spool = api.engine.spool
    spool.max_bytes = spool.spool_bytes  # full from now on
    assert spool.full
    sent, finish = asyncio.Event(), asyncio.Event()

    async def body() -> AsyncIterator[bytes]:  # half a request, the rest held back
        yield b'[{"action": "client.x", "details": {"k": "'
        sent.set()
        await finish.wait()
        yield b'y"}}]'

    try:
        # A guard against the wait for the body (10 s), not a timing.
        resp = await asyncio.wait_for(api.client.post(
            "/audit/events", data=body(),
            headers={**alice.headers, "Content-Type": "application/json"}), 5)
        assert sent.is_set()
        err = await resp.json()
        assert resp.status == 503, err
        assert err["error"]["code"] == "audit_unavailable"
    finally:
        finish.set()
    # Room again: the same request is taken.
    spool.max_bytes = 1 << 30
    resp = await api.client.post("/audit/events", json={"action": "client.x"},
                                 headers=alice.headers)
    assert resp.status == 202
    assert (await api.actions(alice.session_id))[-1] == "client.x"


async def test_a_body_sent_fast_then_stalled_is_refused_once_it_stalls(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(requests, "BODY_SECONDS", 0.5)  # short for the test
    api = await make_api()
    alice = await api.user("alice")
    doc = await api.create_doc(alice)
    sent = b'{"content": "' + b"y" * 400_000  # ~100 s more at 4 KiB/s, had it counted
    host, port = api.client.server.host, api.client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"PUT /documents/{doc['id']} HTTP/1.1\r\nHost: x\r\n"
                     f"X-Request-ID: stalled\r\nAuthorization: Bearer {alice.token}\r\n"
                     f"Content-Type: application/json\r\n"
                     f"Content-Length: {len(sent) + 10}\r\n\r\n".encode() + sent)
        await writer.drain()
        # A guard, not a timing: refused 0.5 s after it stalled.
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, text = raw.decode("latin-1").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400"), raw[:300]
    assert json.loads(text)["error"]["code"] == "invalid_request"
    (ev,) = [e for e in await api.events(alice.session_id) if e["request_id"] == "stalled"]
    assert (ev["action"], ev["outcome"], ev["details"]["reason"]) == (
        "document.update", "failure", "invalid_request")

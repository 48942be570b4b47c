"""POST /logout's body and its races: behaviour that mutation testing of
handlers/auth.py (logout, _logout_body) found unpinned."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from api_fixtures import Api, api, expect_error, make_api

__all__ = ["api", "make_api"]

JSON = {"Content-Type": "application/json"}


async def _nothing() -> AsyncIterator[bytes]:
    """A chunked body of no bytes: the request says it has one."""
    for chunk in ():
        yield chunk


@pytest.mark.parametrize(("kwargs"), [
    {"data": b" \r\n", "headers": JSON},
    {"data": b"null", "headers": JSON},
    {"data": b"{}", "headers": JSON},
    {"json": {"session_id": None}},
    {"data": _nothing, "headers": JSON},
], ids=["blank", "null", "empty-object", "session-id-null", "chunked-empty"])
async def test_a_logout_body_that_says_nothing_logs_out(api: Api, kwargs: dict[str, Any]) -> None:
    """API.md: the body of POST /logout is optional. One that is blank (or
    chunked with no bytes), null, {} or a null session_id is no body: the
    logout goes on (a mutant refusing a blank body as invalid_json survived)."""
    alice = await api.user("alice")
    kwargs = {**kwargs, "headers": {**alice.headers, **kwargs.get("headers", {})}}
    if callable(kwargs.get("data")):
        kwargs["data"] = kwargs["data"]()
    resp = await api.client.post("/logout", **kwargs)
    body = await resp.json()
    assert resp.status == 200, body
    assert body == {"message": "Successfully logged out", "session_id": alice.session_id,
                    "event_count": 3}
    assert await api.actions(alice.session_id) == ["session.start", "token.issue",
                                                   "session.end"]
    await expect_error(await api.client.get("/me", headers=alice.headers), 401,
                       "session_ended")


@pytest.mark.parametrize("body", [b"[]", b'"bye"', b"1", b"true", b'[{"session_id": null}]'])
async def test_a_logout_body_that_is_not_an_object_is_400_recorded_and_the_session_stays(
    api: Api, body: bytes,
) -> None:
    alice = await api.user("alice")
    resp = await api.client.post("/logout", data=body,
                                 headers={**alice.headers, **JSON, "X-Request-ID": "odd-bye"})
    await expect_error(resp, 400, "invalid_request")  # with its human message
    assert (await api.client.get("/me", headers=alice.headers)).status == 200
    (ev,) = [e for e in await api.events(alice.session_id) if e["request_id"] == "odd-bye"]
    assert (ev["action"], ev["outcome"], ev["details"]) == (
        "session.end", "failure", {"reason": "invalid_request"})


async def test_two_logouts_let_in_together_end_the_session_once(
    api: Api, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two logouts with one token, both past the token check before either
    ends the session: one ends it (200, one session.end), the other gets 401
    session_ended, recorded as a session that ended during the action; no
    second session.end, no error."""
    alice = await api.user("alice")
    engine = api.engine
    real = engine.end_session
    arrived: list[str] = []
    both, go = asyncio.Event(), asyncio.Event()

    async def held(session_id: str, *args: Any, **kwargs: Any) -> int:
        arrived.append(session_id)
        if len(arrived) == 2:
            both.set()
        await go.wait()
        return await real(session_id, *args, **kwargs)

    monkeypatch.setattr(engine, "end_session", held)
    pending = [asyncio.ensure_future(api.client.post(
        "/logout", headers={**alice.headers, "X-Request-ID": f"bye-{i}"})) for i in (1, 2)]
    await asyncio.wait_for(both.wait(), 10)
    go.set()
    answers = [await p for p in pending]
    assert sorted(r.status for r in answers) == [200, 401]
    ok = next(r for r in answers if r.status == 200)
    late = next(r for r in answers if r.status == 401)
    assert (await ok.json())["event_count"] == 3
    await expect_error(late, 401, "session_ended")
    events = await api.events(alice.session_id)
    assert [e["action"] for e in events] == ["session.start", "token.issue", "session.end"]
    assert events[-1]["request_id"] == ok.headers["X-Request-ID"]
    assert events[-1]["details"] == {"reason": "logout"}
    (ev,) = await api.wait_security("auth.session_ended")
    assert ev["request_id"] == late.headers["X-Request-ID"]
    assert ev["session_id"] == alice.session_id
    assert ev["actor"] == {"user": "alice", "role": "user"}
    assert ev["details"] == {"reason": "session_ended_during_action", "method": "POST",
                             "path": "/logout"}
    await expect_error(await api.client.get("/me", headers=alice.headers), 401,
                       "session_ended")

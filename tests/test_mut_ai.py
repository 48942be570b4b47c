"""A mutation review of handlers/ai.py and its use in handlers/chat.py:
an OpenAI-compatible provider played by a real server on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import MakeApi, api_config, expect_error, make_api
from openai_stub import OpenAIStub

import server

__all__ = ["make_api"]

DOC = "The reactor uses heavy water. Maintenance happens every spring."


@pytest.fixture
async def stub() -> AsyncIterator[OpenAIStub]:
    s = OpenAIStub()
    await s.start()
    yield s
    await s.stop()


async def _chat(make_api: MakeApi, base_url: str) -> tuple[Any, list[dict[str, Any]]]:
    """alice's chat through a provider at ``base_url``: the response and
    her ``ai.interaction`` events."""
    api = await make_api(ai={"provider": "openai", "openai": {
        "base_url": base_url, "api_key_env": "TEST_OPENAI_KEY", "timeout_seconds": 5.0}})
    alice = await api.user("alice")
    doc = await api.create_doc(alice, content=DOC)
    resp = await api.client.post(f"/documents/{doc['id']}/chat", json={"message": "hi"},
                                 headers=alice.headers)
    events = [e for e in await api.events(alice.session_id) if e["action"] == "ai.interaction"]
    return resp, events


async def test_serve_refuses_a_user_without_password_in_the_url_beside_an_api_key(
    make_api: MakeApi, stub: OpenAIStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway taking its token as the URL's user (``https://TOKEN@host``):
    aiohttp sends it as Basic auth as it does ``user:password@``, and with
    the API key's variable set refuses every request (both would be the
    Authorization header). serve checked only for a password: it started,
    and every chat got 502 with the reason "ValueError"."""
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-key-5678")
    base_url = stub.base_url.replace("http://", "http://gw-token-1234@")
    resp, (ev,) = await _chat(make_api, base_url)  # what serve let through
    await expect_error(resp, 502, "ai_unavailable")
    assert ev["details"]["error"] == "provider request failed: ValueError"
    assert stub.requests == []
    config = api_config(tmp_path, ai={"provider": "openai", "openai": {
        "base_url": base_url, "api_key_env": "TEST_OPENAI_KEY"}})
    with pytest.raises(server.StartupError) as exc:
        server.ai_credentials_single(config)
    assert "use one" in str(exc.value)
    assert "gw-token" not in str(exc.value) and "sk-key" not in str(exc.value)
    # Without the key (or with none set) the URL's user is the credential sent.
    monkeypatch.setenv("TEST_OPENAI_KEY", "")
    server.ai_credentials_single(config)
    resp, (ev,) = await _chat(make_api, base_url)
    assert resp.status == 200, await resp.text()
    (req,) = stub.requests
    assert req["headers"]["Authorization"].startswith("Basic ")
    assert "gw-token" not in json.dumps(ev)

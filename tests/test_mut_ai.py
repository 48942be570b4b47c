"""A mutation review of handlers/ai.py and its use in handlers/chat.py:
an OpenAI-compatible provider played by a real server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import MakeApi, api_config, expect_error, make_api
from openai_stub import OpenAIStub, stub

import server
from handlers.keys import AI

__all__ = ["make_api", "stub"]

DOC = "The reactor uses heavy water. Maintenance happens every spring."


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


async def test_extractive_quotes_the_most_relevant_passages_in_document_order(
    make_api: MakeApi,
) -> None:
    """API.md: the offline provider "quotes the most relevant passages": the
    three passages sharing most words with the question, no fewer-matching
    one, in the document's order (a mutation review: with every passage
    quoted, which were chosen was untested), each cut at 500 characters."""
    api = await make_api()
    alice = await api.user("alice")
    long = "The reactor core pumps run daily " + "x" * 600 + "."  # 4 words of the question
    passages = [long,
                "Nothing here is relevant.",                  # none
                "The pumps cool the reactor core at night.",  # 5
                "Reactor staff eat lunch.",                   # 1
                "Pumps cool the core.",                       # 4
                ]
    doc = await api.create_doc(alice, title="Plant", content=" ".join(passages))
    resp = await api.client.post(f"/documents/{doc['id']}/chat",
                                 json={"message": "Do the reactor core pumps cool?"},
                                 headers=alice.headers)
    body = await resp.json()
    assert resp.status == 200, body
    assert body["reply"] == ("From \u201cPlant\u201d:\n> " + long[:500] + "\n"
                             "> The pumps cool the reactor core at night.\n"
                             "> Pumps cool the core.")


async def test_extractive_with_no_matching_passage_says_so(make_api: MakeApi) -> None:
    """A question sharing no word with the document: 200 and a reply saying
    so, recorded (a mutation review: that branch was untested; a reply that
    is not text there was a 500)."""
    api = await make_api()
    alice = await api.user("alice")
    doc = await api.create_doc(alice, title="Plant", content=DOC)
    resp = await api.client.post(f"/documents/{doc['id']}/chat",
                                 json={"message": "zebra?"}, headers=alice.headers)
    body = await resp.json()
    assert resp.status == 200, body
    assert body["reply"] == "\u201cPlant\u201d has no passage matching the question."
    assert body["usage"] == {"prompt_tokens": 1 + len(DOC.split()), "completion_tokens": 7}
    (ev,) = [e for e in await api.events(alice.session_id) if e["action"] == "ai.interaction"]
    assert ev["outcome"] == "success"
    assert (ev["details"]["prompt_tokens"], ev["details"]["completion_tokens"]) == (
        1 + len(DOC.split()), 7)


def completion(prompt_tokens: Any = 3, completion_tokens: Any = 2, model: Any = "m",
               reply: Any = "fine") -> bytes:
    return json.dumps({"model": model, "choices": [{"message": {"content": reply}}],
                       "usage": {"prompt_tokens": prompt_tokens,
                                 "completion_tokens": completion_tokens}}).encode()


async def test_the_request_and_no_key_with_api_key_env_empty(
    make_api: MakeApi, stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: ``api_key_env = ""`` sends no key. The document goes as the
    system message, with its title; the question as the user's."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-to-be-sent")
    api = await make_api(ai={"provider": "openai", "openai": {
        "base_url": stub.base_url, "api_key_env": ""}})
    alice = await api.user("alice")
    doc = await api.create_doc(alice, title="Reactor notes", content=DOC)
    resp = await api.client.post(f"/documents/{doc['id']}/chat", json={"message": "hi"},
                                 headers=alice.headers)
    assert resp.status == 200, await resp.text()
    (req,) = stub.requests
    assert "Authorization" not in req["headers"]
    system, user = req["body"]["messages"]
    assert system["role"] == "system" and user == {"role": "user", "content": "hi"}
    assert system["content"].endswith("\n\nTitle: Reactor notes\n\n" + DOC)


async def test_a_key_with_a_del_character_is_refused_not_sent(
    make_api: MakeApi, stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DEL (0x7f) is a control character too: refused, naming the variable
    only (a mutation review: only characters below 0x20 were tested)."""
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test\x7fkey-1234")
    resp, (ev,) = await _chat(make_api, stub.base_url)
    body = await expect_error(resp, 502, "ai_unavailable")
    assert stub.requests == []
    assert ev["details"]["error"].startswith(
        "the API key in $TEST_OPENAI_KEY contains a control character")
    assert "key-1234" not in json.dumps([body, ev])


@pytest.mark.parametrize(("prompt", "completion_", "ok"), [
    (0, 0, True),  # an empty reply uses no token
    (2 ** 63 - 1, 5, True),  # the most any sink stores
    (2 ** 63, 5, False),
    (7, 2 ** 63, False),
])
async def test_token_counts_at_their_bounds(
    make_api: MakeApi, stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch,
    prompt: int, completion_: int, ok: bool,
) -> None:
    """README: token counts are whole numbers from 0 to 2^63 - 1; those are
    answered and recorded as the provider gave them, with the model it named
    (a mutation review: neither bound was tested)."""
    monkeypatch.setenv("TEST_OPENAI_KEY", "")
    stub.mode, stub.raw_body = "raw", completion(prompt, completion_, model="prov-model-2")
    resp, (ev,) = await _chat(make_api, stub.base_url)
    if not ok:
        await expect_error(resp, 502, "ai_unavailable")
        assert ev["details"]["error"] == "provider answered an unexpected body"
        return
    body = await resp.json()
    assert resp.status == 200, body
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion_}
    assert body["model"] == "prov-model-2"
    d = ev["details"]
    assert (d["prompt_tokens"], d["completion_tokens"], d["model"]) == (
        prompt, completion_, "prov-model-2")


async def test_an_answer_of_exactly_the_limit_with_its_length_is_fine(
    make_api: MakeApi, stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer of ANSWER_MAX_BYTES announced by its Content-Length is read
    (one byte more is refused): the tests had the limit only without one."""
    from handlers.ai import ANSWER_MAX_BYTES

    monkeypatch.setenv("TEST_OPENAI_KEY", "")
    reply = "y" * (ANSWER_MAX_BYTES - len(completion(reply="")))
    stub.mode, stub.raw_body = "raw", completion(reply=reply)
    assert len(stub.raw_body) == ANSWER_MAX_BYTES
    resp, _ = await _chat(make_api, stub.base_url)
    assert resp.status == 200 and (await resp.json())["reply"] == reply
    stub.raw_body = completion(reply=reply + "y")
    resp, (ev,) = await _chat(make_api, stub.base_url)
    await expect_error(resp, 502, "ai_unavailable")
    assert ev["details"]["error"] == "provider request failed: AnswerTooLarge"


KEY = "sk-test-secret-9876"
ECHO = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}",
                             "code": "invalid_api_key"}}).encode()


@pytest.mark.parametrize(("status", "body", "error"), [
    (300, b"", "provider answered HTTP 300: a redirect, not followed; set"
     " ai.openai.base_url to the provider's address"),
    (400, ECHO, "provider answered HTTP 400"),
    (401, ECHO, "provider answered HTTP 401"),
    (403, ECHO, "provider answered HTTP 403"),
    (404, b"not found", "provider answered HTTP 404"),
    (429, ECHO, "provider answered HTTP 429"),
    (503, b"", "provider answered HTTP 503"),
    (200, ECHO, "provider answered an unexpected body"),  # an error with a 200
    (200, b'{"choices": []}', "provider answered an unexpected body"),
    (200, b'{"choices": [{"message": {"content": ["a"]}}]}',
     "provider answered an unexpected body"),
    (200, b"{\"choices\": \"\xff\"}", "provider request failed: UnicodeDecodeError"),
    (200, b"<html>busy</html>", "provider request failed: JSONDecodeError"),
])
async def test_a_failing_answer_is_502_with_its_reason_and_never_the_key(
    make_api: MakeApi, stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, status: int, body: bytes, error: str,
) -> None:
    """Each is 502 ai_unavailable (never 500), recorded as a failure whose
    error says what the provider did, and the key the provider echoes in
    its error body is in neither the response, the record nor the log."""
    from handlers import chat as chat_module

    monkeypatch.setattr(chat_module, "_provider_warned", -chat_module.PROVIDER_WARN_SECONDS)
    monkeypatch.setenv("TEST_OPENAI_KEY", KEY)
    stub.mode, stub.raw_status, stub.raw_body = "raw", status, body
    resp, (ev,) = await _chat(make_api, stub.base_url)
    answer = await expect_error(resp, 502, "ai_unavailable")
    assert ev["outcome"] == "failure"
    assert (ev["details"]["reason"], ev["details"]["error"]) == ("ai_unavailable", error)
    assert ev["details"]["model"] == "gpt-4o-mini"  # the configured one: none answered
    (req,) = stub.requests
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert error in logged
    assert "secret-9876" not in json.dumps([answer, ev]) + logged


async def test_a_failing_provider_is_logged_once_a_minute_not_each_chat(
    make_api: MakeApi, stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """README: a failing provider "is logged at most once a minute"; each
    chat's failure is in its own record."""
    from handlers import chat as chat_module

    monkeypatch.setattr(chat_module, "_provider_warned", -chat_module.PROVIDER_WARN_SECONDS)
    monkeypatch.setenv("TEST_OPENAI_KEY", "")
    stub.mode = "error"
    api = await make_api(ai={"provider": "openai", "openai": {
        "base_url": stub.base_url, "api_key_env": "TEST_OPENAI_KEY"}})
    alice = await api.user("alice")
    doc = await api.create_doc(alice, content=DOC)
    for _ in range(3):
        resp = await api.client.post(f"/documents/{doc['id']}/chat", json={"message": "hi"},
                                     headers=alice.headers)
        await expect_error(resp, 502, "ai_unavailable")
    events = [e for e in await api.events(alice.session_id) if e["action"] == "ai.interaction"]
    assert [e["details"]["error"] for e in events] == ["provider answered HTTP 500"] * 3
    warned = [r for r in caplog.records if r.getMessage().startswith("AI provider unavailable")]
    assert len(warned) == 1


def _notes(api: Any) -> list[str]:
    """The spool's notes of chats under way (read as another process would)."""
    with contextlib.closing(sqlite3.connect(api.config.spool_path)) as spool:
        return [k for (k,) in spool.execute("SELECT key FROM meta WHERE key LIKE 'begun:%'")]


async def test_a_chat_is_noted_while_the_provider_has_it_and_its_record_ends_the_note(
    make_api: MakeApi, stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: the chat is noted in the spool before the document goes, and
    its record deletes the note, whatever the outcome. A note left behind
    is recorded again at the next start as "interrupted": a chat that
    succeeded, failed at the provider or hit a provider bug would have two
    records (a mutation review: only the shutdown's cut-off chat, in a
    subprocess test, checked the note was gone)."""
    monkeypatch.setenv("TEST_OPENAI_KEY", "")
    api = await make_api(ai={"provider": "openai", "openai": {
        "base_url": stub.base_url, "api_key_env": "TEST_OPENAI_KEY"}})
    alice = await api.user("alice")
    doc = await api.create_doc(alice, content=DOC)
    url = f"/documents/{doc['id']}/chat"
    stub.mode = "held"
    chat = asyncio.ensure_future(api.client.post(url, json={"message": "hi"},
                                                 headers=alice.headers))
    await asyncio.wait_for(stub.arrived.wait(), 10)
    assert len(_notes(api)) == 1  # while the provider has the document
    # What a crash now would record at the next start: alice's chat, in her
    # session, with what it sent (a mutation review: noted in no session, or
    # without its details, it passed).
    with contextlib.closing(sqlite3.connect(api.config.spool_path)) as spool:
        (value,) = spool.execute("SELECT value FROM meta WHERE key LIKE 'begun:%'").fetchone()
    note = json.loads(value)
    assert note["session_id"] == alice.session_id
    assert (note["draft"]["action"], note["draft"]["target"]) == (
        "ai.interaction", {"type": "document", "id": doc["id"]})
    assert note["draft"]["details"]["prompt"] == {
        "sha256": hashlib.sha256(b"hi").hexdigest(), "length": 2}
    assert note["draft"]["details"]["model"]
    stub.gate.set()
    assert (await chat).status == 200
    assert _notes(api) == []
    stub.mode = "error"
    await expect_error(await api.client.post(url, json={"message": "hi"},
                                             headers=alice.headers), 502, "ai_unavailable")
    assert _notes(api) == []

    async def broken(title: str, document: str, message: str) -> Any:
        raise RuntimeError("a provider bug")

    monkeypatch.setattr(api.app[AI], "answer", broken)
    await expect_error(await api.client.post(url, json={"message": "hi"},
                                             headers=alice.headers), 500, "internal_error")
    assert _notes(api) == []
    events = [e for e in await api.events(alice.session_id) if e["action"] == "ai.interaction"]
    assert [(e["outcome"], e["details"].get("reason")) for e in events] == [
        ("success", None), ("failure", "ai_unavailable"), ("failure", "internal_error")]


async def test_a_user_alone_in_the_url_echoed_by_the_provider_is_redacted(
    make_api: MakeApi, stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway's token as the URL's user (``https://TOKEN@host``, no key
    sent: the credential): a provider or proxy echoing it had it reach the
    client and the record, as a password is not (only the password and the
    Basic header's base64 were taken out)."""
    monkeypatch.setenv("TEST_OPENAI_KEY", "")
    token = "gw-token%2F1234"  # as written in the URL; gw-token/1234 decoded
    stub.mode = "raw"
    stub.raw_body = json.dumps({
        "model": "m-gw-token/1234",
        "choices": [{"message": {"role": "assistant",
                                 "content": f"you are gw-token/1234, as written {token}"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
    resp, (ev,) = await _chat(make_api, stub.base_url.replace("http://", f"http://{token}@"))
    body = await resp.json()
    assert resp.status == 200, body
    assert body["reply"] == "you are [redacted], as written [redacted]"
    assert body["model"] == "m-[redacted]"
    assert "gw-token" not in json.dumps(ev)

"""Configuration keys shown by their effect, through the real parts (the app
factory, real SQLite files, real loopback receivers), for keys whose other
tests show only that they parse."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import Api, MakeApi, make_api
from receiver import Receiver, ReceiverOptions, serve
from waiting import wait_for

__all__ = ["make_api"]


async def _stored_in_spool(api: Api, sid: str) -> bool:
    states = await api.engine.spool.read(lambda c: c.execute(
        "SELECT state FROM parts WHERE session_id = ?", (sid,)).fetchall())
    return bool(states) and all(s == "stored" for (s,) in states)


@pytest.mark.parametrize("keep", [0, 3600])
async def test_behind_the_http_sink_a_stored_session_is_found_while_kept(
    make_api: MakeApi, keep: int
) -> None:
    """API.md: behind the http sink, a stored session is found only while
    keep_stored_seconds keeps it locally; otherwise 404 not_found."""
    receiver = Receiver(ReceiverOptions())
    runner, port = await serve(receiver, "127.0.0.1", 0)
    try:
        api = await make_api(audit={"keep_stored_seconds": keep},
                             sink={"type": "http", "http": {"url": f"http://127.0.0.1:{port}"}})
        admin = await api.admin()
        alice = await api.user("alice")
        sid = alice.session_id
        assert (await api.client.post("/logout", headers=alice.headers)).status == 200
        await wait_for(lambda: f"{sid}:0" in receiver.parts, message="alice's part sent")
        if keep:
            await wait_for(lambda: _stored_in_spool(api, sid), message="part marked stored")
        else:
            async def gone() -> bool:
                rows = await api.engine.spool.read(lambda c: c.execute(
                    "SELECT COUNT(*) FROM parts WHERE session_id = ?", (sid,)).fetchone())
                return bool(rows[0] == 0)
            await wait_for(gone, message="part purged")
        resp = await api.client.get(f"/audit/sessions/{sid}", headers=admin.headers)
        body: dict[str, Any] = await resp.json()
        if not keep:
            assert resp.status == 404, body
            assert body["error"]["code"] == "not_found"
            return
        assert resp.status == 200, body
        assert body["state"] == "stored"
        assert [e["action"] for e in body["events"]] == [
            "session.start", "token.issue", "session.end"]
        assert body["events_complete"] is True
        listed = await api.client.get("/audit/sessions", params={"state": "stored"},
                                      headers=admin.headers)
        assert sid in {s["session_id"] for s in (await listed.json())["sessions"]}
    finally:
        await runner.cleanup()
        receiver.close()


# -- auth.bcrypt_rounds and SESSION_AUDIT_CONFIG --------------------------------


async def _hash_costs(api: Api) -> dict[str, int | None]:
    from handlers.auth import hash_rounds

    rows = await api.engine.spool.read(lambda c: c.execute(
        "SELECT username, password_hash FROM users").fetchall())
    return {name: hash_rounds(stored) for name, stored in rows}


async def test_bcrypt_rounds_is_the_cost_of_new_password_hashes(make_api: MakeApi) -> None:
    """The first admin (made at start) and a user added through the app are
    hashed at auth.bcrypt_rounds, and both log in."""
    api = await make_api(auth={"bcrypt_rounds": 5})
    await api.admin()
    await api.user("alice")
    assert await _hash_costs(api) == {"admin": 5, "alice": 5}


async def test_commands_read_session_audit_config_and_hash_at_its_rounds(tmp_path) -> None:
    """API.md: every command reads SESSION_AUDIT_CONFIG when no --config is
    given. adduser and passwd run from another directory, with only the
    variable, work on that configuration's data_dir and hash at its
    bcrypt_rounds."""
    import asyncio
    import subprocess
    import sys

    from live_server import SERVER, server_env, to_toml

    conf = tmp_path / "elsewhere.toml"
    data = tmp_path / "the-data"
    conf.write_text(to_toml({"server": {"data_dir": str(data)},
                             "auth": {"bcrypt_rounds": 5}}), encoding="utf-8")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**server_env(), "SESSION_AUDIT_CONFIG": str(conf)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(SERVER), *args], cwd=cwd, env=env,
                              input="a-password-for-bob\n", capture_output=True, text=True,
                              timeout=60)

    r = await asyncio.to_thread(run, "adduser", "bob", "--password-stdin")
    assert r.returncode == 0, r.stderr
    assert _bobs_rounds(data) == 5
    conf.write_text(to_toml({"server": {"data_dir": str(data)},
                             "auth": {"bcrypt_rounds": 6}}), encoding="utf-8")
    r = await asyncio.to_thread(run, "passwd", "bob", "--password-stdin")
    assert r.returncode == 0, r.stderr
    assert _bobs_rounds(data) == 6
    assert not (cwd / "data").exists()  # not ./config.toml's default data_dir


def _bobs_rounds(data: Path) -> int:
    import sqlite3

    from handlers.auth import hash_rounds

    with closing(sqlite3.connect(data / "spool.db")) as db, db:
        (stored,) = db.execute("SELECT password_hash FROM users WHERE username = 'bob'"
                               ).fetchone()
    return hash_rounds(stored)


# -- the default names of the secret variables -----------------------------------


async def test_the_http_sink_sends_session_audit_http_token_by_default(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sink.http.token_env defaults to SESSION_AUDIT_HTTP_TOKEN: set, its
    value goes as the bearer token (the receiver refuses any other)."""
    monkeypatch.setenv("SESSION_AUDIT_HTTP_TOKEN", "the-receivers-token")
    receiver = Receiver(ReceiverOptions(token="the-receivers-token"))
    runner, port = await serve(receiver, "127.0.0.1", 0)
    try:
        api = await make_api(sink={"type": "http", "http": {"url": f"http://127.0.0.1:{port}"}})
        alice = await api.user("alice")
        assert (await api.client.post("/logout", headers=alice.headers)).status == 200
        await wait_for(lambda: f"{alice.session_id}:0" in receiver.parts,
                       message="alice's part taken by the receiver")
        assert all(h.get("Authorization") == "Bearer the-receivers-token"
                   for h in receiver.headers_seen)
    finally:
        await runner.cleanup()
        receiver.close()


async def test_the_openai_provider_sends_openai_api_key_by_default(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ai.openai.api_key_env defaults to OPENAI_API_KEY."""
    from openai_stub import OpenAIStub

    monkeypatch.setenv("OPENAI_API_KEY", "sk-default-variable-key")
    stub = OpenAIStub(api_key="sk-default-variable-key")
    await stub.start()
    try:
        api = await make_api(ai={"provider": "openai", "openai": {"base_url": stub.base_url}})
        alice = await api.user("alice")
        doc = await api.create_doc(alice)
        resp = await api.client.post(f"/documents/{doc['id']}/chat",
                                     json={"message": "What sat?"}, headers=alice.headers)
        assert resp.status == 200, await resp.text()
        (req,) = stub.requests
        assert req["headers"]["Authorization"] == "Bearer sk-default-variable-key"
        assert req["body"]["model"] == "gpt-4o-mini"  # ai.openai.model's default
    finally:
        await stub.stop()


# -- sink.mongodb: database and collection names ---------------------------------


async def test_mongodb_sink_writes_to_the_configured_database_and_collections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sink.mongodb.database, sessions_collection and security_collection
    name where parts and security events go (a scripted MongoDB server)."""
    import asyncio

    from mockupdb import MockupDB
    from receiver import sample_part, sample_security_event

    from audit.config import parse_config
    from sinks import create_sink

    server = MockupDB(auto_ismaster={"ismaster": True, "minWireVersion": 0,
                                     "maxWireVersion": 21}, request_timeout=10)
    server.run()
    indexes: list[Any] = []

    def index(request: Any) -> bool:
        if next(iter(request.doc), "") != "createIndexes":
            return False
        indexes.append((request["$db"], request["createIndexes"]))
        return bool(request.ok())

    server.autoresponds(index)
    try:
        monkeypatch.setenv("SESSION_AUDIT_TEST_CFG_MONGODB_URI",
                           f"mongodb://127.0.0.1:{server.port}/")
        config = parse_config({"sink": {"type": "mongodb", "mongodb": {
            "uri_env": "SESSION_AUDIT_TEST_CFG_MONGODB_URI", "database": "trail",
            "sessions_collection": "parts_here", "security_collection": "alarms_here"}}})
        sink = create_sink(config)
        await sink.open()
        try:
            task = asyncio.ensure_future(sink.write_part(sample_part("s1")))
            request = await asyncio.to_thread(server.receives, timeout=10)
            assert (request["$db"], request["insert"]) == ("trail", "parts_here"), request
            request.replies({"ok": 1, "n": 1})
            await task
            task = asyncio.ensure_future(sink.write_security_events(
                [sample_security_event("e1")]))
            request = await asyncio.to_thread(server.receives, timeout=10)
            assert (request["$db"], request["insert"]) == ("trail", "alarms_here"), request
            request.replies({"ok": 1, "n": 1})
            await task
        finally:
            await sink.close()
        assert indexes and {db for db, _ in indexes} == {"trail"}
        assert {coll for _, coll in indexes} == {"parts_here", "alarms_here"}
    finally:
        server.stop()


async def test_session_audit_jwt_secret_is_the_token_key(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SESSION_AUDIT_JWT_SECRET, as its UTF-8 bytes, signs the tokens (HS256);
    no <data_dir>/jwt.key is made then."""
    import jwt

    secret = "a-jwt-secret-from-the-environment-ü-0123456789"
    monkeypatch.setenv("SESSION_AUDIT_JWT_SECRET", secret)
    api = await make_api()
    alice = await api.user("alice")
    claims = jwt.decode(alice.token, secret.encode("utf-8"), algorithms=["HS256"])
    assert claims["sid"] == alice.session_id and claims["sub"] == "alice"
    assert not (api.config.data_dir / "jwt.key").exists()
    # A token signed with it by anyone else is taken as the server's own.
    forged = jwt.encode({**claims, "jti": "x"}, secret.encode("utf-8"), algorithm="HS256")
    resp = await api.client.get("/me", headers={"Authorization": f"Bearer {forged}"})
    assert resp.status == 200



# -- audit.ack ---------------------------------------------------------------------


async def _hold_writer(spool: Any) -> tuple[Any, Any]:
    """The spool's writer held in a commit until the gate (a
    ``threading.Event``) is set; returns it and the holding job's future."""
    import threading

    gate, holding = threading.Event(), threading.Event()

    def hold(_: Any) -> None:
        holding.set()
        gate.wait(30)

    held = spool.submit_nowait(hold, needs_space=False)
    await wait_for(holding.is_set, message="the writer held in a commit")
    return gate, held


@pytest.mark.parametrize("ack", ["durable", "fast"])
async def test_client_events_are_answered_before_their_commit_under_ack_fast(
    make_api: MakeApi, ack: str
) -> None:
    """API.md: ack = "durable" answers after the event is committed, "fast"
    before (README: for event-only actions). POST /audit/events is one: with
    the spool's writer held in a commit, "fast" answers 202 at once and the
    events are committed when the writer goes on; "durable" answers only
    after the commit. (Client events waited for their commit whatever ack said.)"""
    import asyncio

    api = await make_api(audit={"ack": ack})
    alice = await api.user("alice")
    spool = api.engine.spool
    gate, held = await _hold_writer(spool)
    try:
        post = asyncio.ensure_future(api.client.post(
            "/audit/events", json=[{"action": "client.a"}, {"action": "client.b"}],
            headers=alice.headers))
        if ack == "fast":
            resp = await asyncio.wait_for(post, 10)
            assert resp.status == 202
            assert await resp.json() == {"accepted": 2}
        else:
            await wait_for(lambda: bool(spool._pending), message="the events queued")
            assert not post.done()
    finally:
        gate.set()
    await held
    resp = await post
    assert resp.status == 202
    await wait_for(lambda: not api.engine._inflight, message="the events committed")
    actions = await api.actions(alice.session_id)
    assert actions[-2:] == ["client.a", "client.b"]


async def test_under_ack_fast_events_whose_session_ended_before_their_commit_are_kept(
    make_api: MakeApi,
) -> None:
    """Under ack = "fast" a request answered 2xx before its commit, whose
    session ended between its token check and that commit (a logout queued
    ahead of it), was dropped with a log line: an action done, and its record
    lost. It goes to the security stream as ``auth.session_ended``, as a
    chat's record does."""
    import asyncio

    from audit.events import Draft

    api = await make_api(audit={"ack": "fast"})
    alice = await api.user("alice")
    spool = api.engine.spool
    gate, held = await _hold_writer(spool)
    try:
        logout = asyncio.ensure_future(api.client.post("/logout", headers=alice.headers))
        await wait_for(lambda: bool(spool._pending), message="the logout queued")
        resp = await asyncio.wait_for(api.client.post(
            "/audit/events", json=[{"action": "client.a"}, {"action": "client.b"}],
            headers=alice.headers), 10)
        assert resp.status == 202
        # A plain record (no app change), as the handlers make under "fast".
        assert await api.engine.record(alice.session_id, Draft("document.list")) is None
    finally:
        gate.set()
    await held
    assert (await logout).status == 200
    await wait_for(lambda: not api.engine._inflight, message="the records committed")
    ended = await api.security("auth.session_ended")
    assert sorted(e["details"]["action"] for e in ended) == [
        "client.a", "client.b", "document.list"]
    for e in ended:
        assert e["session_id"] == alice.session_id
        assert e["details"]["reason"] == "session_ended_during_action"
    assert "client.a" not in await api.actions(alice.session_id)

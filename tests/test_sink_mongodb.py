"""The mongodb sink through the real PyMongo driver against a scripted server.

MockupDB speaks the MongoDB wire protocol on 127.0.0.1 from its own threads;
each test starts a sink call as a task, receives the driver's command in a
worker thread and answers it exactly as a MongoDB, Atlas or Cosmos DB server
would (errors, write errors, hang-ups). The sink's query semantics are
covered by tests/test_sink_contract.py against a real server when
``SESSION_AUDIT_TEST_MONGODB_URI`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from live_server import free_port
from mockupdb import MockupDB, Request
from receiver import sample_part, sample_security_event

from audit.config import MongoSinkConfig
from audit.events import canonical_json
from sinks.base import (
    SinkConflict,
    SinkRateLimited,
    SinkRejected,
    SinkUnavailable,
    decode_cursor,
    encode_cursor,
)
from sinks.mongodb import MongoSink, retry_after_from

URI_ENV = "SESSION_AUDIT_TEST_MOCK_MONGODB_URI"
CFG = MongoSinkConfig(uri_env=URI_ENV, database="audit")
HELLO = {"ismaster": True, "minWireVersion": 0, "maxWireVersion": 21}
T = TypeVar("T")
# verify's listings take string ids only (an array holding one, or another
# type, would end a page of them): sinks.mongodb._a_string.
STRING_SESSION_ID = {"session_id": {"$type": "string", "$not": {"$type": "array"}}}


def start_server(**hello: Any) -> MockupDB:
    server = MockupDB(auto_ismaster={**HELLO, **hello}, request_timeout=10)
    server.run()
    return server


@pytest.fixture(scope="module")
def shared_server() -> Iterator[MockupDB]:
    # One server for the module: stopping one takes a second (its accept loop).
    s = start_server()
    answer_create_indexes(s)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def server(shared_server: MockupDB) -> Iterator[MockupDB]:
    yield shared_server
    # Each test answers every request it caused.
    assert not shared_server.got(timeout=0), "a request was left unanswered"


def uri(server: MockupDB, userinfo: str = "") -> str:
    return f"mongodb://{userinfo}127.0.0.1:{server.port}/"


def new_sink(**kwargs: Any) -> MongoSink:
    return MongoSink(CFG, server_selection_timeout_ms=2000, connect_timeout_ms=2000, **kwargs)


@pytest.fixture
async def sink(server: MockupDB, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MongoSink]:
    monkeypatch.setenv(URI_ENV, uri(server))
    s = new_sink()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def command_name(request: Request) -> str:
    return next(iter(request.doc), "")


def answer_create_indexes(server: MockupDB) -> None:
    server.autoresponds(lambda r: command_name(r) == "createIndexes" and r.ok())


async def receive(server: MockupDB, name: str) -> Request:
    """The next request that reached the queue; it must be command ``name``."""
    request: Request = await asyncio.to_thread(server.receives, timeout=10)
    assert command_name(request) == name, request
    return request


def start(coro: Awaitable[T]) -> asyncio.Task[T]:
    async def run() -> T:
        return await coro

    return asyncio.create_task(run())


def dup_key(index: int = 0, doc_id: str = "x") -> dict[str, Any]:
    return {
        "index": index,
        "code": 11000,
        "errmsg": f"E11000 duplicate key error collection: audit.x index: _id_ dup key: "
        f'{{ _id: "{doc_id}" }}',
    }


def cursor_reply(ns: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"cursor": {"id": 0, "ns": ns, "firstBatch": docs}, "ok": 1}


# -- single parts -------------------------------------------------------------


async def test_insert_sends_the_part_with_its_id(server: MockupDB, sink: MongoSink) -> None:
    part = sample_part("s1")
    task = start(sink.write_part(part))
    request = await receive(server, "insert")
    assert request["insert"] == "session_audit"
    assert request.docs[0]["documents"] == [part]
    request.replies({"ok": 1, "n": 1})
    await task


async def test_16500_with_retry_after_ms_is_rate_limited(server: MockupDB, sink: MongoSink) -> None:
    task = start(sink.write_part(sample_part("s1")))
    (await receive(server, "insert")).command_err(
        16500,
        "Error=16500, RetryAfterMs=123, Details='Response status code does not indicate "
        "success: TooManyRequests (429)'",
    )
    with pytest.raises(SinkRateLimited) as info:
        await task
    assert info.value.retry_after == pytest.approx(0.123)
    # The same as a write error inside the insert's reply.
    task = start(sink.write_part(sample_part("s1")))
    (await receive(server, "insert")).replies(
        {"ok": 1, "n": 0, "writeErrors": [{"index": 0, "code": 16500, "errmsg": "RetryAfterMs=7"}]}
    )
    with pytest.raises(SinkRateLimited) as info:
        await task
    assert info.value.retry_after == pytest.approx(0.007)
    # No RetryAfterMs: rate limited without a hint.
    task = start(sink.write_part(sample_part("s1")))
    (await receive(server, "insert")).command_err(429, "TooManyRequests")
    with pytest.raises(SinkRateLimited) as info:
        await task
    assert info.value.retry_after is None


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("Error=16500, RetryAfterMs=123, Details=''", 0.123),
        ("retryafterms=2000", 2.0),
        ("RetryAfterMs=0", 0.0),
        ("Request rate is large", None),
        ("RetryAfterMs=000000000000000000000000000000250", 0.25),
        ("RetryAfterMs=100000000000", 100_000_000.0),  # 12 digits: read as they are
        # Hundreds or thousands of digits (int() refuses more than 4,300, a
        # float holds about 308): a long hint, which the flusher caps.
        ("RetryAfterMs=" + "9" * 400, 999_999_999.999),
        ("RetryAfterMs=" + "1" * 5000 + ", Details=''", 999_999_999.999),
    ],
)
def test_retry_after_from(message: str, seconds: float | None) -> None:
    assert retry_after_from(message) == seconds


@pytest.mark.parametrize("stored_same", [True, False])
async def test_duplicate_key_checks_the_stored_hash(
    server: MockupDB, sink: MongoSink, stored_same: bool
) -> None:
    part = sample_part("s1")
    task = start(sink.write_part(part))
    (await receive(server, "insert")).replies(
        {"ok": 1, "n": 0, "writeErrors": [dup_key(0, "s1:0")]}
    )
    find = await receive(server, "find")
    assert find["find"] == "session_audit"
    assert find["filter"] == {"_id": {"$in": ["s1:0"]}}
    assert find["projection"] == {"hash": 1}  # not the whole stored part back
    stored_hash = part["hash"] if stored_same else "f" * 64
    find.replies(cursor_reply("audit.session_audit", [{"_id": "s1:0", "hash": stored_hash}]))
    if stored_same:
        await task
    else:
        with pytest.raises(SinkConflict, match="s1:0"):
            await task


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ({"ok": 0, "code": 50, "errmsg": "Request timed out."}, SinkUnavailable),
        # Cosmos DB's throttling in words, under a code of no meaning here.
        ({"ok": 0, "code": 1, "errmsg": "Response status code does not indicate success: "
          "TooManyRequests (429)"}, SinkRateLimited),
        (
            {"ok": 0, "code": 463, "errmsg": "too many ops", "errorLabels": ["RetryableError"]},
            SinkUnavailable,
        ),
        (
            {"ok": 0, "code": 1, "errmsg": "x", "errorLabels": ["RetryableWriteError"]},
            SinkUnavailable,
        ),
        ({"ok": 0, "code": 10107, "errmsg": "not writable primary"}, SinkUnavailable),
        ({"ok": 0, "code": 11602, "errmsg": "interrupted"}, SinkUnavailable),
        ({"ok": 0, "code": 18, "errmsg": "Authentication failed."}, SinkUnavailable),
        # The deployment cannot do w: "majority": configuration, not the part.
        ({"ok": 0, "code": 79, "errmsg": "no write concern mode majority"}, SinkUnavailable),
        ({"ok": 0, "code": 100, "errmsg": "Not enough data-bearing nodes"}, SinkUnavailable),
        ({"ok": 1, "n": 0, "writeConcernError": {"code": 64, "errmsg": "wt"}}, SinkUnavailable),
        ({"ok": 1, "n": 0, "writeErrors": [{"index": 0, "code": 2, "errmsg": "b"}]}, SinkRejected),
        # A document error quoting the document, which holds the throttling
        # words: still the document (retried for good before).
        ({"ok": 1, "n": 0, "writeErrors": [{
            "index": 0, "code": 17280,
            "errmsg": "key too large to index: {user: \"TooManyRequests\"}"}]}, SinkRejected),
        ({"ok": 1, "n": 0, "writeErrors": [{
            "index": 0, "code": 57, "errmsg": "bad field 'Request rate is large.x'"}]},
         SinkRejected),
        (
            {"ok": 1, "n": 0, "writeErrors": [{"index": 0, "code": 121, "errmsg": "v"}]},
            SinkRejected,
        ),
        # As a command error (ok: 0) a document code is about the request or
        # the deployment, not one document: retried, never the whole backlog
        # dead-lettered. The size codes stay about the document.
        ({"ok": 0, "code": 2, "errmsg": "BadValue"}, SinkUnavailable),
        ({"ok": 0, "code": 14, "errmsg": "TypeMismatch"}, SinkUnavailable),
        ({"ok": 0, "code": 10334, "errmsg": "BSONObjectTooLarge"}, SinkRejected),
        # ... unless the server labels it retryable: then it passes.
        ({"ok": 0, "code": 10334, "errmsg": "BSONObjectTooLarge",
          "errorLabels": ["RetryableWriteError"]}, SinkUnavailable),
        ({"ok": 1, "n": 0, "writeErrors": [{"index": 0, "code": 2, "errmsg": "b",
                                            "errorLabels": ["RetryableError"]}]},
         SinkUnavailable),
        # Nested deeper than MongoDB's 100 levels: the document itself.
        ({"ok": 1, "n": 0, "writeErrors": [{"index": 0, "code": 15, "errmsg": "depth"}]},
         SinkRejected),
        # Codes not known to be about the document pass: retried, never a dead
        # letter (a shard electing a primary, lock timeouts, an interrupted op).
        ({"ok": 0, "code": 133, "errmsg": "FailedToSatisfyReadPreference"}, SinkUnavailable),
        ({"ok": 0, "code": 202, "errmsg": "NetworkInterfaceExceededTimeLimit"},
         SinkUnavailable),
        ({"ok": 0, "code": 11601, "errmsg": "Interrupted"}, SinkUnavailable),
        ({"ok": 1, "n": 0, "writeErrors": [{"index": 0, "code": 24, "errmsg": "lock"}]},
         SinkUnavailable),
    ],
)
async def test_error_mapping(
    server: MockupDB, sink: MongoSink, reply: dict[str, Any], error: type[Exception]
) -> None:
    task = start(sink.write_part(sample_part("s1")))
    (await receive(server, "insert")).replies(reply)
    with pytest.raises(error) as info:
        await task
    assert type(info.value) is error
    # The server's code and message, not the driver's dump of its whole reply.
    answer = reply
    if "writeErrors" in reply:
        answer = reply["writeErrors"][0]
    elif "writeConcernError" in reply:
        answer = reply["writeConcernError"]
    assert str(info.value).startswith("mongodb sink: insert s1:0: ")
    assert str(info.value).endswith(f": {answer['errmsg']}"), info.value
    # (A not-primary answer is the driver's NotPrimaryError, without a code.)
    assert f"(code {answer['code']})" in str(info.value) or "NotPrimaryError" in str(info.value)


COSMOS_RETRYABLE_WRITES = (
    "Retryable writes are not supported. Please disable retryable writes by specifying"
    ' "retrywrites=false" in the connection string or an equivalent driver specific config.'
)


async def test_cosmos_retryable_writes_answer_is_retried_with_a_hint(
    server: MockupDB, sink: MongoSink
) -> None:
    # Cosmos DB answers every write so while the URI lacks retryWrites=false:
    # a configuration to fix, not a part (nor a batch) to dead-letter.
    task = start(sink.write_part(sample_part("s1")))
    (await receive(server, "insert")).command_err(2, COSMOS_RETRYABLE_WRITES)
    with pytest.raises(SinkUnavailable) as info:
        await task
    assert str(info.value) == (
        f"mongodb sink: insert s1:0: OperationFailure (code 2): {COSMOS_RETRYABLE_WRITES}"
        " (add retryWrites=false to the URI)")
    task = start(sink.write_security_events([sample_security_event("e1")]))
    (await receive(server, "insert")).command_err(2, COSMOS_RETRYABLE_WRITES)
    with pytest.raises(SinkUnavailable, match=r"^mongodb sink: insert_many: OperationFailure "
                                              r"\(code 2\): .*add retryWrites=false"):
        await task


async def test_uri_timeout_ms_cannot_hold_a_write_for_minutes(
    server: MockupDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    # timeoutMS in the URI would replace the socket timeout (CSOT): a silent
    # server would hold the flusher for ten minutes.
    monkeypatch.setenv(URI_ENV, uri(server) + "?timeoutMS=600000")
    sink = new_sink(socket_timeout_ms=500)
    await sink.open()
    try:
        task = start(sink.write_part(sample_part("s1")))
        request = await receive(server, "insert")  # and never answered
        with pytest.raises(SinkUnavailable, match="timed out"):
            async with asyncio.timeout(20):  # a hang guard, not a timing
                await task
        with contextlib.suppress(OSError):  # the driver may have closed it already
            request.hangup()
    finally:
        await sink.close()


async def test_unreadable_tls_file_in_the_uri_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv(URI_ENV, f"mongodb://127.0.0.1:1/?tls=true&tlsCAFile={tmp_path}/no.pem")
    sink = new_sink()
    with pytest.raises(SinkUnavailable, match="not usable"):
        await sink.open()
    await sink.close()


async def test_dropped_connection_is_unavailable(server: MockupDB, sink: MongoSink) -> None:
    task = start(sink.write_part(sample_part("s1")))
    (await receive(server, "insert")).hangup()
    with pytest.raises(SinkUnavailable, match="AutoReconnect"):
        await task
    # The driver reconnects: the retried write goes through.
    task = start(sink.write_part(sample_part("s1")))
    (await receive(server, "insert")).replies({"ok": 1, "n": 1})
    await task


async def test_document_too_large_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_server(maxBsonObjectSize=4096)
    answer_create_indexes(server)
    try:
        monkeypatch.setenv(URI_ENV, uri(server))
        sink = new_sink()
        await sink.open()
        try:
            with pytest.raises(SinkRejected, match="DocumentTooLarge"):
                await sink.write_part(sample_part("big", events=200))
        finally:
            await sink.close()
    finally:
        server.stop()


async def test_a_document_bson_cannot_carry_is_rejected_without_a_request(
    server: MockupDB, sink: MongoSink
) -> None:
    """An integer past 64 bits (a client's details may hold one) cannot be
    encoded: that document can never be stored, so the part, or the batch
    (which the flusher then sends an event at a time), is rejected, not
    retried for ever. Nothing reaches the server (the fixture checks)."""
    part = sample_part("s1")
    part["events"][0]["details"] = {"n": 2**64}
    with pytest.raises(SinkRejected, match=r"^mongodb sink: insert s1:0: OverflowError: "):
        await sink.write_part(part)
    event = sample_security_event("e1")
    event["details"] = {"n": 2**64}
    with pytest.raises(SinkRejected, match=r"^mongodb sink: insert_many: OverflowError: "):
        await sink.write_security_events([sample_security_event("e0"), event])


# -- durability: write concern and read preference are the sink's, not the URI's


@pytest.fixture(scope="module")
def mongos_server() -> Iterator[MockupDB]:
    # A mongos passes the read preference on ($readPreference); a directly
    # connected standalone never gets one, whatever the URI says.
    s = start_server(msg="isdbgrid")
    answer_create_indexes(s)
    try:
        yield s
    finally:
        s.stop()


async def open_with(server: MockupDB, monkeypatch: pytest.MonkeyPatch, query: str) -> MongoSink:
    monkeypatch.setenv(URI_ENV, uri(server) + query)
    s = new_sink()
    await s.open()
    return s


def majority_write(request: Request) -> None:
    concern = dict(request["writeConcern"])
    assert concern.get("w") == "majority", concern
    # Acknowledged by a majority, never journal-less: no j: false, no w: 0.
    assert concern.get("j", True) is True, concern
    assert concern.get("wtimeout") == 10_000, concern  # no hanging on a lost majority


def primary_majority_read(request: Request) -> None:
    pref = request.doc.get("$readPreference")
    assert pref is None or dict(pref).get("mode") == "primary", pref
    assert dict(request.doc.get("readConcern") or {}).get("level") == "majority", request


@pytest.mark.parametrize("query", ["?w=0", "?w=1", "?w=1&journal=false", "?w=0&retryWrites=false"])
async def test_writes_use_majority_whatever_the_uri_says(
    server: MockupDB, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    sink = await open_with(server, monkeypatch, query)
    try:
        task = start(sink.write_part(sample_part("wc")))
        request = await receive(server, "insert")
        majority_write(request)
        request.replies({"ok": 1, "n": 1})
        await task
        events = [sample_security_event("wc-e")]
        task = start(sink.write_security_events(events))
        request = await receive(server, "insert")
        assert request["insert"] == "security_audit"
        majority_write(request)
        request.replies({"ok": 1, "n": 1})
        await task
    finally:
        await sink.close()


@pytest.mark.parametrize("mode", ["secondary", "secondaryPreferred", "nearest"])
async def test_duplicate_check_reads_the_primary_whatever_the_uri_says(
    mongos_server: MockupDB, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    server = mongos_server
    sink = await open_with(server, monkeypatch, f"?readPreference={mode}&w=1")
    try:
        part = sample_part("rp")
        task = start(sink.write_part(part))
        insert = await receive(server, "insert")
        majority_write(insert)
        insert.replies({"ok": 1, "n": 0, "writeErrors": [dup_key(0, "rp:0")]})
        find = await receive(server, "find")
        assert find["filter"] == {"_id": {"$in": ["rp:0"]}}
        primary_majority_read(find)
        find.replies(cursor_reply("audit.session_audit", [{"_id": "rp:0", "hash": part["hash"]}]))
        await task
        # The same for a security event batch.
        events = [sample_security_event("rp-e0"), sample_security_event("rp-e1")]
        task = start(sink.write_security_events(events))
        insert = await receive(server, "insert")
        majority_write(insert)
        insert.replies({"ok": 1, "n": 1, "writeErrors": [dup_key(1, "rp-e1")]})
        find = await receive(server, "find")
        assert find["find"] == "security_audit"
        primary_majority_read(find)
        find.replies(
            cursor_reply("audit.security_audit", [{"_id": "rp-e1", "hash": events[1]["hash"]}])
        )
        await task
        # The URI's read preference still serves the admin queries.
        query = start(sink.list_security_events(limit=1))
        find = await receive(server, "find")
        assert dict(find.doc["$readPreference"])["mode"] == mode
        find.replies(cursor_reply("audit.security_audit", []))
        await query
    finally:
        await sink.close()
    assert not server.got(timeout=0), "a request was left unanswered"


async def test_duplicate_without_a_committed_document_is_retried_not_dead_lettered(
    server: MockupDB, sink: MongoSink
) -> None:
    """11000 but the majority read finds nothing (the earlier write is not
    majority-committed yet, or was rolled back): retry, never a conflict."""
    task = start(sink.write_part(sample_part("nc")))
    (await receive(server, "insert")).replies(
        {"ok": 1, "n": 0, "writeErrors": [dup_key(0, "nc:0")]}
    )
    (await receive(server, "find")).replies(cursor_reply("audit.session_audit", []))
    with pytest.raises(SinkUnavailable, match="nc:0 but no majority-committed document with"
                       " that _id yet") as info:
        await task
    assert type(info.value) is SinkUnavailable
    events = [sample_security_event("nc-e")]
    task = start(sink.write_security_events(events))
    (await receive(server, "insert")).replies(
        {"ok": 1, "n": 0, "writeErrors": [dup_key(0, "nc-e")]}
    )
    (await receive(server, "find")).replies(cursor_reply("audit.security_audit", []))
    with pytest.raises(SinkUnavailable, match="nc-e") as info:
        await task
    assert type(info.value) is SinkUnavailable
    # A server without majority read concern (148): configuration, retry.
    task = start(sink.write_part(sample_part("nc")))
    (await receive(server, "insert")).replies(
        {"ok": 1, "n": 0, "writeErrors": [dup_key(0, "nc:0")]}
    )
    (await receive(server, "find")).command_err(148, "majority read concern not enabled")
    with pytest.raises(SinkUnavailable,
                       match=r"reading stored hashes: OperationFailure \(code 148\)") as info:
        await task
    assert type(info.value) is SinkUnavailable


async def test_unacknowledged_write_is_not_stored(
    server: MockupDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were the write concern ever w: 0, the driver returns at once with
    ``acknowledged=False``: that is no confirmation, so not a success."""
    from pymongo.write_concern import WriteConcern

    sink = await open_with(server, monkeypatch, "")
    w0 = WriteConcern(w=0)
    assert sink._sessions is not None and sink._security is not None
    sink._sessions_w = sink._sessions.with_options(write_concern=w0)
    sink._security_w = sink._security.with_options(write_concern=w0)
    try:
        with pytest.raises(SinkUnavailable, match="not acknowledged"):
            await sink.write_part(sample_part("w0"))
        assert (await receive(server, "insert"))["writeConcern"] == {"w": 0}
        with pytest.raises(SinkUnavailable,
                           match=r"^mongodb sink: insert_many: write not acknowledged$"):
            await sink.write_security_events([sample_security_event("w0-e")])
        assert (await receive(server, "insert"))["writeConcern"] == {"w": 0}
    finally:
        await sink.close()


# -- security events ----------------------------------------------------------


async def test_security_events_unordered_bulk(server: MockupDB, sink: MongoSink) -> None:
    events = [sample_security_event(f"e{i}") for i in range(3)]
    task = start(sink.write_security_events(events))
    request = await receive(server, "insert")
    assert request["insert"] == "security_audit" and request["ordered"] is False
    assert request.docs[0]["documents"] == events
    request.replies({"ok": 1, "n": 3})
    await task


async def test_partly_applied_bulk_retried_is_success(server: MockupDB, sink: MongoSink) -> None:
    events = [sample_security_event(f"e{i}") for i in range(3)]
    # First try: e0 and e2 land, e1 times out (Cosmos 50): retry the whole batch.
    task = start(sink.write_security_events(events))
    (await receive(server, "insert")).replies(
        {
            "ok": 1,
            "n": 2,
            "writeErrors": [{"index": 1, "code": 50, "errmsg": "Request timed out."}],
        }
    )
    with pytest.raises(SinkUnavailable, match="code 50"):
        await task
    # The retry: e0 and e2 are duplicates, e1 lands now.
    task = start(sink.write_security_events(events))
    (await receive(server, "insert")).replies(
        {"ok": 1, "n": 1, "writeErrors": [dup_key(0, "e0"), dup_key(2, "e2")]}
    )
    find = await receive(server, "find")
    assert find["find"] == "security_audit"
    assert find["filter"] == {"_id": {"$in": ["e0", "e2"]}}
    find.replies(
        cursor_reply(
            "audit.security_audit",
            [{"_id": e["_id"], "hash": e["hash"]} for e in (events[0], events[2])],
        )
    )
    await task


async def test_bulk_duplicate_with_other_hash_is_conflict(
    server: MockupDB, sink: MongoSink
) -> None:
    events = [sample_security_event(f"e{i}") for i in range(2)]
    task = start(sink.write_security_events(events))
    (await receive(server, "insert")).replies({"ok": 1, "n": 1, "writeErrors": [dup_key(1, "e1")]})
    (await receive(server, "find")).replies(
        cursor_reply("audit.security_audit", [{"_id": "e1", "hash": "0" * 64}])
    )
    with pytest.raises(SinkConflict, match="e1"):
        await task


def _limited(index: int, errmsg: str) -> dict[str, Any]:
    return {"index": index, "code": 16500, "errmsg": errmsg}


@pytest.mark.parametrize(
    ("write_errors", "extra", "error", "retry_after", "text"),
    [
        # Rate limited wins over the rest, with the longest hint (the message
        # is that write error's).
        (
            [
                _limited(0, "RetryAfterMs=20"),
                _limited(1, "RetryAfterMs=250"),
                {"index": 2, "code": 2, "errmsg": "bad"},
            ],
            {},
            SinkRateLimited,
            0.25,
            "write error (code 16500) at index 1: RetryAfterMs=250",
        ),
        # The longest hint whatever the order, a write error without one
        # (None, read as 0) never replacing it, and the first of equal ones.
        ([_limited(0, "RetryAfterMs=250"), _limited(1, "RetryAfterMs=20")], {},
         SinkRateLimited, 0.25, "at index 0"),
        ([_limited(0, "RetryAfterMs=250"), _limited(1, "Request rate is large")], {},
         SinkRateLimited, 0.25, "at index 0"),
        ([_limited(0, "Request rate is large"), _limited(1, "RetryAfterMs=500")], {},
         SinkRateLimited, 0.5, "at index 1"),
        ([_limited(0, "RetryAfterMs=30"), _limited(1, "RetryAfterMs=30")], {},
         SinkRateLimited, 0.03, "at index 0"),
        (
            [
                {"index": 0, "code": 2, "errmsg": "bad"},
                {"index": 1, "code": 463, "errmsg": "busy", "errorLabels": ["RetryableError"]},
            ],
            {},
            SinkUnavailable,
            None,
            "write error (code 463) at index 1: busy",
        ),
        ([{"index": 2, "code": 2, "errmsg": "bad"}], {}, SinkRejected, None,
         "write error (code 2) at index 2: bad"),
        # A document code the server labels retryable is not about the document.
        (
            [{"index": 0, "code": 2, "errmsg": "bad", "errorLabels": ["RetryableWriteError"]}],
            {},
            SinkUnavailable,
            None,
            "code 2",
        ),
        # A document error whose message quotes throttling words: rejected.
        ([{"index": 1, "code": 17280, "errmsg": "key {user: 'TooManyRequests'} too large"}], {},
         SinkRejected, None, "code 17280"),
        # Cosmos DB's throttling words under another code: as in a single insert.
        ([{"index": 0, "code": 1, "errmsg": "Request rate is large. RetryAfterMs=40"}], {},
         SinkRateLimited, 0.04, "code 1"),
        (
            [],
            {"writeConcernError": {"code": 64, "errmsg": "waiting for replication"}},
            SinkUnavailable,
            None,
            "code 64",
        ),
        # A write concern error beside a rejected document: the batch is
        # retried (the others may not be majority-committed), not split up.
        (
            [{"index": 0, "code": 2, "errmsg": "bad"}],
            {"writeConcernError": {"code": 64, "errmsg": "waiting for replication"}},
            SinkUnavailable,
            None,
            "write concern error (code 64): waiting for replication",
        ),
    ],
)
async def test_bulk_error_priority(
    server: MockupDB,
    sink: MongoSink,
    write_errors: list[dict[str, Any]],
    extra: dict[str, Any],
    error: type[Exception],
    retry_after: float | None,
    text: str,
) -> None:
    events = [sample_security_event(f"e{i}") for i in range(3)]
    task = start(sink.write_security_events(events))
    (await receive(server, "insert")).replies(
        {"ok": 1, "n": 3 - len(write_errors), "writeErrors": write_errors, **extra}
    )
    with pytest.raises(error) as info:
        await task
    assert type(info.value) is error
    assert str(info.value).startswith("mongodb sink: insert_many: ")
    assert text in str(info.value)
    if isinstance(info.value, SinkRateLimited):
        assert info.value.retry_after == pytest.approx(retry_after)


async def test_bulk_duplicates_with_a_write_concern_error_are_retried(
    server: MockupDB, sink: MongoSink
) -> None:
    """A retried batch whose other events were inserted now but not
    acknowledged by a majority (a write concern error beside the duplicate
    key errors): not a success, though every duplicate is stored with its
    hash. The inserted events may be rolled back; the batch goes again."""
    events = [sample_security_event(f"e{i}") for i in range(2)]
    task = start(sink.write_security_events(events))
    (await receive(server, "insert")).replies({
        "ok": 1, "n": 1, "writeErrors": [dup_key(0, "e0")],
        "writeConcernError": {"code": 64, "errmsg": "waiting for replication timed out"},
    })
    with pytest.raises(SinkUnavailable, match="write concern error") as info:
        await task
    assert type(info.value) is SinkUnavailable


# -- queries (the commands sent; semantics in the contract suite) ---------------


async def test_security_event_query_and_cursor(server: MockupDB, sink: MongoSink) -> None:
    cursor = encode_cursor("2026-11-26T14:00:05.000Z", "e5")
    task = start(
        sink.list_security_events(
            since="2026-11-26T00:00:00.000Z", kind="access.denied", limit=2, cursor=cursor
        )
    )
    find = await receive(server, "find")
    assert find["filter"] == {
        "ts": {"$gte": "2026-11-26T00:00:00.000Z"},
        "action": "access.denied",
        "$or": [
            {"ts": {"$lt": "2026-11-26T14:00:05.000Z"}},
            {"ts": "2026-11-26T14:00:05.000Z", "_id": {"$lt": "e5"}},
        ],
    }
    assert list(find["sort"].items()) == [("ts", -1), ("_id", -1)]
    assert find["limit"] == 3
    docs = [sample_security_event(f"e{i}", ts=f"2026-11-26T14:00:0{i}.000Z") for i in (4, 3, 2)]
    find.replies(cursor_reply("audit.security_audit", docs))
    page, next_cursor = await task
    assert page == docs[:2]
    assert next_cursor is not None
    assert decode_cursor(next_cursor) == ["2026-11-26T14:00:03.000Z", "e3"]


async def test_security_events_page_exactly_full_has_no_cursor(
    server: MockupDB, sink: MongoSink
) -> None:
    task = start(sink.list_security_events(limit=2))
    find = await receive(server, "find")
    assert find["filter"] == {} and find["limit"] == 3
    docs = [sample_security_event(f"e{i}", ts=f"2026-11-26T14:00:0{i}.000Z") for i in (4, 3)]
    find.replies(cursor_reply("audit.security_audit", docs))
    assert await task == (docs, None)


def _dbref_shaped(event_id: str) -> dict[str, Any]:
    """A security event whose details a client shaped as a MongoDB reference."""
    event = sample_security_event(event_id)
    event["details"] = {
        "query": {"$ref": "orders", "$id": "1", "$db": "shop", "extra": [1, {"$ref": "a",
                                                                             "$id": 2}]},
        "plain": {"$ref": "alone"},
    }
    return event


async def test_references_come_back_as_the_objects_stored(
    server: MockupDB, sink: MongoSink
) -> None:
    # PyMongo reads {"$ref": ..., "$id": ...} back as a DBRef: the admin API
    # could not answer it (a 500) and verify saw a changed event.
    event = _dbref_shaped("e1")
    part = sample_part("s1")
    part["events"][0]["details"] = event["details"]
    task = start(sink.list_security_events(limit=5))
    (await receive(server, "find")).replies(cursor_reply("audit.security_audit", [event]))
    page, _ = await task
    assert page == [event] and canonical_json(page[0]) == canonical_json(event)
    task = start(sink.get_session_parts("s1"))
    (await receive(server, "find")).replies(cursor_reply("audit.session_audit", [part]))
    assert canonical_json(await task) == canonical_json([part])

    async def oldest_first() -> list[dict[str, Any]]:
        return [e async for e in sink.security_events_oldest_first()]

    task = start(oldest_first())
    (await receive(server, "find")).replies(cursor_reply("audit.security_audit", [event]))
    assert await task == [event]


async def test_list_sessions_queries(server: MockupDB, sink: MongoSink) -> None:
    task = start(sink.list_sessions(user="alice", limit=1))
    heads = await receive(server, "find")
    assert heads["filter"] == {"part": 0, **STRING_SESSION_ID, "user": "alice"}
    assert list(heads["sort"].items()) == [("session_start_time", -1), ("session_id", -1)]
    assert heads["limit"] == 2
    assert heads["projection"] == {"session_id": 1, "session_start_time": 1}
    heads.replies(cursor_reply("audit.session_audit", [
        {"session_id": "b", "session_start_time": "2026-11-26T14:00:00.000Z"},
        {"session_id": "a", "session_start_time": "2026-11-26T13:00:00.000Z"}]))
    parts = await receive(server, "find")
    assert parts["filter"] == {"session_id": {"$in": ["b"], "$not": {"$type": "array"}}}
    assert parts["projection"] == {"events": 0}
    p0 = sample_part("b", 0, final=False, start="2026-11-26T14:00:00.000Z")
    p1 = sample_part("b", 1, final=True, start="2026-11-26T14:00:00.000Z")
    p0.pop("events")
    p1.pop("events")
    parts.replies(cursor_reply("audit.session_audit", [p1, p0]))
    sessions, next_cursor = await task
    assert [s["session_id"] for s in sessions] == ["b"]
    assert sessions[0]["parts"] == 2 and sessions[0]["state"] == "stored"
    assert next_cursor is not None
    assert decode_cursor(next_cursor) == ["2026-11-26T14:00:00.000Z", "b"]


async def test_list_sessions_bounds_and_cursor(server: MockupDB, sink: MongoSink) -> None:
    """since and until bound the start inclusively (as the sqlite sink's
    >= and <=), and a cursor continues strictly after (start, id), newest
    first; a page that is exactly full has no next cursor."""
    cursor = encode_cursor("2026-11-26T14:00:05.000Z", "s5")
    task = start(sink.list_sessions(since="2026-11-26T00:00:00.000Z",
                                    until="2026-11-26T23:59:59.999Z", limit=2, cursor=cursor))
    heads = await receive(server, "find")
    assert heads["filter"] == {
        "part": 0, **STRING_SESSION_ID,
        "session_start_time": {"$gte": "2026-11-26T00:00:00.000Z",
                               "$lte": "2026-11-26T23:59:59.999Z"},
        "$or": [
            {"session_start_time": {"$lt": "2026-11-26T14:00:05.000Z"}},
            {"session_start_time": "2026-11-26T14:00:05.000Z", "session_id": {"$lt": "s5"}},
        ],
    }
    assert heads["limit"] == 3
    starts = {"s4": "2026-11-26T14:00:05.000Z", "s3": "2026-11-26T14:00:04.000Z"}
    heads.replies(cursor_reply("audit.session_audit", [
        {"session_id": sid, "session_start_time": st} for sid, st in starts.items()]))
    parts = await receive(server, "find")
    assert parts["filter"] == {"session_id": {"$in": ["s4", "s3"], "$not": {"$type": "array"}}}
    found = []
    for sid, st in starts.items():
        p0 = sample_part(sid, 0, start=st)
        p0.pop("events")
        found.append(p0)
    parts.replies(cursor_reply("audit.session_audit", found))
    sessions, next_cursor = await task
    assert [s["session_id"] for s in sessions] == ["s4", "s3"]
    assert next_cursor is None
    # Nothing found: one read, no cursor.
    task = start(sink.list_sessions())
    heads = await receive(server, "find")
    assert heads["filter"] == {"part": 0, **STRING_SESSION_ID} and heads["limit"] == 51
    heads.replies(cursor_reply("audit.session_audit", []))
    assert await task == ([], None)


async def test_a_listed_session_whose_parts_are_gone_is_left_out_not_a_500(
    server: MockupDB, sink: MongoSink
) -> None:
    """The listing reads its page's part 0s, then their sessions' parts: two
    reads. A session removed in between (a DBA's erasure), or the second
    read answered by a secondary behind the first (the URI's read
    preference holds for admin queries), has no parts: summarize_parts([])
    was an IndexError, a 500 for the listing. The session is left out, and
    the page still ends where its first read did."""
    task = start(sink.list_sessions(limit=2))
    heads = await receive(server, "find")
    heads.replies(cursor_reply("audit.session_audit", [
        {"session_id": "c", "session_start_time": "2026-11-26T14:00:03.000Z"},
        {"session_id": "b", "session_start_time": "2026-11-26T14:00:02.000Z"},
        {"session_id": "a", "session_start_time": "2026-11-26T14:00:01.000Z"}]))
    parts = await receive(server, "find")
    assert parts["filter"] == {"session_id": {"$in": ["c", "b"], "$not": {"$type": "array"}}}
    p0 = sample_part("c", 0, start="2026-11-26T14:00:03.000Z")
    p0.pop("events")
    parts.replies(cursor_reply("audit.session_audit", [p0]))
    sessions, next_cursor = await task
    assert [s["session_id"] for s in sessions] == ["c"]
    assert next_cursor is not None
    assert decode_cursor(next_cursor) == ["2026-11-26T14:00:02.000Z", "b"]


async def test_a_part_matched_only_by_collation_is_not_a_500(
    server: MockupDB, sink: MongoSink
) -> None:
    """A sessions collection with a case-insensitive default collation (a
    DBA's choice) answers the listing's ``$in`` with parts of a session
    whose id differs in case from the page's: they are not this page's and
    are left out (was a KeyError, a 500 for GET /audit/sessions)."""
    task = start(sink.list_sessions(limit=5))
    heads = await receive(server, "find")
    heads.replies(cursor_reply("audit.session_audit", [
        {"session_id": "ab", "session_start_time": "2026-11-26T14:00:03.000Z"}]))
    parts = await receive(server, "find")
    mine = sample_part("ab", 0, start="2026-11-26T14:00:03.000Z")
    other = sample_part("AB", 0, start="2026-11-26T14:00:01.000Z")
    for p in (mine, other):
        p.pop("events")
    parts.replies(cursor_reply("audit.session_audit", [mine, other]))
    sessions, next_cursor = await task
    assert [s["session_id"] for s in sessions] == ["ab"]
    assert sessions[0]["session_start_time"] == "2026-11-26T14:00:03.000Z"
    assert next_cursor is None


async def test_verify_sees_a_session_whose_part_0_is_missing(
    server: MockupDB, sink: MongoSink
) -> None:
    """The session listing starts from part 0; verify pages through every
    part's session id instead, so a session that lost its part 0 is checked
    (and reported), not skipped."""
    from audit.verify import verify_sink

    task = start(verify_sink(sink, b"k" * 32))
    ids = await receive(server, "find")
    assert ids["find"] == "session_audit" and ids["filter"] == STRING_SESSION_ID
    assert ids["projection"] == {"session_id": 1, "_id": 0}
    ids.replies(cursor_reply("audit.session_audit", [{"session_id": "headless"}]))
    parts = await receive(server, "find")
    assert parts["filter"] == {"session_id": "headless"}
    parts.replies(cursor_reply("audit.session_audit", [sample_part("headless", 1)]))
    for coll in ("session_audit", "security_audit"):  # the documents it cannot place
        (await receive(server, "find")).replies(cursor_reply(f"audit.{coll}", []))
    security = await receive(server, "find")  # then the security events' chains
    assert security["find"] == "security_audit"
    security.replies(cursor_reply("audit.security_audit", []))
    report = await task
    assert report.sessions == 1 and report.security_events == 0
    assert any(p.kind == "missing_part" and "part 0" in p.detail for p in report.problems)


async def test_documents_verify_cannot_place_are_reported(
    server: MockupDB, sink: MongoSink
) -> None:
    """A part whose session_id is not a string was listed by session_ids
    under its text, where no part is found: checked as an empty session, it
    passed verify. A security event whose ts is not a string is not in the
    oldest-first paging (only string times compare with string times).
    Both are verify's unchecked records now. (The filters are MongoDB's to
    apply: here the scripted server answers as a real one would.)"""
    task = start(sink.unchecked_records())
    parts = await receive(server, "find")
    assert parts["find"] == "session_audit"
    assert parts["filter"] == {"$or": [{"session_id": {"$not": {"$type": "string"}}},
                                       {"session_id": {"$type": "array"}}]}
    parts.replies(cursor_reply("audit.session_audit", [{"_id": "5:0"}]))
    events = await receive(server, "find")
    assert events["find"] == "security_audit"
    assert events["filter"] == {"$or": [{"ts": {"$not": {"$type": "string"}}},
                                        {"ts": {"$type": "array"}}]}
    events.replies(cursor_reply("audit.security_audit", [{"_id": "e9"}]))
    found = await task
    assert found == ["a session part with _id '5:0' and no string session_id",
                     "a security event with _id 'e9' and no string ts"]

    # verify reports them (and is not OK).
    from audit.verify import verify_sink

    task = start(verify_sink(sink, b"k" * 32))
    (await receive(server, "find")).replies(cursor_reply("audit.session_audit", []))  # ids
    (await receive(server, "find")).replies(cursor_reply("audit.session_audit",
                                                         [{"_id": "5:0"}]))
    (await receive(server, "find")).replies(cursor_reply("audit.security_audit", []))
    (await receive(server, "find")).replies(cursor_reply("audit.security_audit", []))  # chain
    report = await task
    assert [p.kind for p in report.problems] == ["changed"], report.problems
    assert "5:0" in report.problems[0].detail


async def _all(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


QUERY_COMMANDS: list[tuple[str, Callable[[MongoSink], Awaitable[Any]], dict[str, Any], str]] = [
    ("list_sessions", lambda s: s.list_sessions(limit=5),
     {"session_start_time": -1, "session_id": -1}, "list sessions"),
    ("list_security_events", lambda s: s.list_security_events(limit=5),
     {"ts": -1, "_id": -1}, "list security events"),
    ("get_session_parts", lambda s: s.get_session_parts("s1"), {"part": 1},
     "get session parts"),
    ("session_part_heads", lambda s: s.session_part_heads("s1"), {"part": 1},
     "get session part heads"),
    ("session_part", lambda s: s.session_part("s1", 1), {"_id": 1}, "get session part"),
    ("session_ids", lambda s: _all(s.session_ids()), {"session_id": 1, "part": 1},
     "list session ids"),
    ("security_events_oldest_first", lambda s: _all(s.security_events_oldest_first()),
     {"ts": 1, "_id": 1}, "list security events"),
    ("unchecked_records", lambda s: s.unchecked_records(), {"_id": 1},
     "list a session parts without a string session_id"),
]


@pytest.mark.parametrize(("name", "query", "sort", "what"), QUERY_COMMANDS,
                         ids=[q[0] for q in QUERY_COMMANDS])
async def test_query_errors_are_classified_and_say_which_query(
    server: MockupDB, sink: MongoSink, name: str,
    query: Callable[[MongoSink], Awaitable[Any]], sort: dict[str, int], what: str,
) -> None:
    """Each admin and verify query sends its sort (the index's order), and
    an error answering it is the classified sink error naming the query: a
    rate limit with its hint (the admin API's 429 or verify's retry), not a
    bare unavailable."""
    task = start(query(sink))
    find = await receive(server, "find")
    assert find["sort"] == sort
    find.replies({"ok": 0, "code": 16500, "errmsg": "Request rate is large, RetryAfterMs=8"})
    with pytest.raises(SinkRateLimited) as info:
        await task
    assert info.value.retry_after == pytest.approx(0.008)
    assert str(info.value).startswith(f"mongodb sink: {what}: OperationFailure (code 16500)")


async def test_unchecked_records_reads_ids_only_and_says_when_there_are_more(
    server: MockupDB, sink: MongoSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sinks import mongodb

    monkeypatch.setattr(mongodb, "ID_PAGE", 1)
    task = start(sink.unchecked_records())
    parts = await receive(server, "find")
    assert parts["projection"] == {"_id": 1} and parts["limit"] == 1
    parts.replies(cursor_reply("audit.session_audit", [{"_id": 5}]))
    events = await receive(server, "find")
    assert events["projection"] == {"_id": 1} and events["sort"] == {"_id": 1}
    events.replies({"ok": 0, "code": 13, "errmsg": "not authorized on audit"})
    with pytest.raises(SinkUnavailable) as info:
        await task
    assert type(info.value) is SinkUnavailable
    assert str(info.value).startswith(
        "mongodb sink: list a security events without a string ts: OperationFailure (code 13)")
    task = start(sink.unchecked_records())
    (await receive(server, "find")).replies(cursor_reply("audit.session_audit", [{"_id": 5}]))
    (await receive(server, "find")).replies(cursor_reply("audit.security_audit", []))
    assert await task == ["a session part with _id 5 and no string session_id",
                          "(the first 1 such; there may be more)"]


async def test_session_ids_and_security_events_come_in_pages(
    server: MockupDB, sink: MongoSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify walks them page by page (each page yielded before the next is
    asked for): no cursor idles while each session is checked, and memory
    does not hold every security event."""
    from sinks import mongodb

    monkeypatch.setattr(mongodb, "ID_PAGE", 3)
    ids = sink.session_ids()
    task = start(ids.__anext__())
    first = await receive(server, "find")
    assert first["filter"] == STRING_SESSION_ID and first["limit"] == 3
    first.replies(cursor_reply("audit.session_audit",
                               [{"session_id": "a"}, {"session_id": "a"}, {"session_id": "b"}]))
    assert await task == "a"
    assert await ids.__anext__() == "b"  # no request: the page is held
    task = start(ids.__anext__())
    second = await receive(server, "find")
    # Past the page's last session (its other parts, if any, are skipped).
    assert second["filter"] == {"$and": [STRING_SESSION_ID, {"session_id": {"$gt": "b"}}]}
    second.replies(cursor_reply("audit.session_audit", [{"session_id": "c"}]))
    assert await task == "c"
    with pytest.raises(StopAsyncIteration):
        await ids.__anext__()

    events = sink.security_events_oldest_first()
    task = start(events.__anext__())
    page = await receive(server, "find")
    assert page["find"] == "security_audit" and page["sort"] == {"ts": 1, "_id": 1}
    # Only a string ts, not an array holding one, on every page: after a
    # page ending in a number (forged), "$gt" that number matched no string,
    # and every later event went unread.
    assert page["filter"] == {"ts": {"$type": "string", "$not": {"$type": "array"}}}
    page.replies(cursor_reply("audit.security_audit", [
        {"_id": "e1", "ts": "2026-11-26T14:00:00.000Z"},
        {"_id": "e2", "ts": "2026-11-26T14:00:01.000Z"},
        {"_id": "e3", "ts": "2026-11-26T14:00:02.000Z"}]))
    assert (await task)["_id"] == "e1"
    assert [(await events.__anext__())["_id"] for _ in range(2)] == ["e2", "e3"]  # held
    task = start(events.__anext__())
    nxt = await receive(server, "find")
    assert nxt["filter"] == {"$and": [
        {"ts": {"$type": "string", "$not": {"$type": "array"}}},
        {"$or": [{"ts": {"$gt": "2026-11-26T14:00:02.000Z"}},
                 {"ts": "2026-11-26T14:00:02.000Z", "_id": {"$gt": "e3"}}]}]}
    nxt.replies(cursor_reply("audit.security_audit", []))
    with pytest.raises(StopAsyncIteration):
        await task


# -- opening ------------------------------------------------------------------


async def test_open_without_the_variable_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(URI_ENV, raising=False)
    sink = new_sink()
    with pytest.raises(SinkUnavailable, match=URI_ENV):
        await sink.open()
    await sink.close()


async def test_open_creates_indexes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server()
    try:
        monkeypatch.setenv(URI_ENV, uri(server))
        sink = new_sink()
        task = start(sink.open())
        # The first try fails (the login refused): unavailable, tried again.
        (await receive(server, "createIndexes")).command_err(18, "Authentication failed.")
        with pytest.raises(SinkUnavailable, match="code 18"):
            await task
        # So does one answered by a time limit (262, no retry label): it
        # passes, and a warning would have left the indexes unbuilt for good.
        task = start(sink.open())
        (await receive(server, "createIndexes")).command_err(262, "ExceededTimeLimit")
        with pytest.raises(SinkUnavailable, match=r"mongodb sink: open: "
                                                   r"OperationFailure \(code 262\)"):
            await task
        task = start(sink.open())
        indexes: dict[str, list[dict[str, Any]]] = {}
        for i in range(5):
            request = await receive(server, "createIndexes")
            indexes.setdefault(request["createIndexes"], []).extend(request["indexes"])
            if i == 1:  # a DBA's index on the same keys under another name
                request.command_err(85, "Index already exists with a different name: by_user")
            elif i == 3:  # a role without createIndex
                request.command_err(13, "not authorized on audit to execute command")
            else:
                request.replies({"ok": 1})
        await task  # open: the writes do not need the indexes
        keys = {coll: [list(ix["key"].items()) for ix in ixs] for coll, ixs in indexes.items()}
        assert keys == {
            "session_audit": [
                [("session_start_time", -1), ("session_id", -1)],
                [("user", 1), ("session_start_time", -1), ("session_id", -1)],
                [("session_id", 1), ("part", 1)],
            ],
            "security_audit": [[("ts", -1), ("_id", -1)],
                               [("action", 1), ("ts", -1), ("_id", -1)]],
        }
        warned = [r.getMessage() for r in caplog.records if "without that index" in r.getMessage()]
        assert len(warned) == 2 and "code 85" in warned[0] and "code 13" in warned[1], warned
        task = start(sink.write_part(sample_part("s1")))
        (await receive(server, "insert")).replies({"ok": 1, "n": 1})
        await task
        await sink.close()
        await sink.close()
    finally:
        server.stop()


def _closed_port() -> int:
    return free_port()  # (held for the test: nothing listens there)


async def test_unreachable_server_is_unavailable_quickly_and_hides_the_uri(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = "Sup3r-S3cret-pw"
    secret_uri = f"mongodb://auditor:{password}@127.0.0.1:{_closed_port()}/audit?authSource=admin"
    monkeypatch.setenv(URI_ENV, secret_uri)
    sink = MongoSink(CFG, server_selection_timeout_ms=300, connect_timeout_ms=300)
    with pytest.raises(SinkUnavailable) as info:
        # A guard, not a timing: the driver's default selection timeout is 30 s.
        async with asyncio.timeout(20):
            await sink.open()
    text = "".join(traceback.format_exception(info.value)) + repr(info.value)
    assert "ServerSelectionTimeoutError" in text
    for secret in (secret_uri, password, "auditor"):
        assert secret not in text
    await sink.close()


async def test_bad_uri_is_unavailable_without_the_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    secret_uri = "mongodb://auditor:Pa55w0rd-xyz@127.0.0.1:99999/audit"
    monkeypatch.setenv(URI_ENV, secret_uri)
    sink = new_sink()
    with pytest.raises(SinkUnavailable, match=URI_ENV) as info:
        await sink.open()
    text = "".join(traceback.format_exception(info.value))
    assert "Pa55w0rd-xyz" not in text and secret_uri not in text
    await sink.close()


async def test_error_messages_never_contain_the_uri(
    server: MockupDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that echoes the connection string back in its error message.
    secret_uri = uri(server) + "?appname=Echo-Me-4242"
    monkeypatch.setenv(URI_ENV, secret_uri)
    sink = new_sink()
    await sink.open()
    try:
        task = start(sink.write_part(sample_part("s1")))
        (await receive(server, "insert")).command_err(2, f"cannot use {secret_uri} here")
        with pytest.raises(SinkUnavailable) as info:
            await task
        text = "".join(traceback.format_exception(info.value))
        assert secret_uri not in text and "***" in text
    finally:
        await sink.close()


@pytest.mark.parametrize(("uri_text", "pieces"), [
    # The user name and password, as written and decoded, the URI itself
    # first (longest first: replaced before its pieces); hosts, database and
    # options are no secret.
    ("mongodb://auditor:p%40ss%2Fw0rd@h1:27017,h2/audit?authSource=admin",
     ["p%40ss%2Fw0rd", "p@ss/w0rd", "auditor"]),
    ("mongodb+srv://only-user@cluster0.example.net/", ["only-user"]),
    ("mongodb://:passw0rd@h1/?appname=a@b", ["passw0rd"]),
    ("mongodb://a%3Ab:c%3A%3Ad@h1?replicaSet=rs0", ["c%3A%3Ad", "a%3Ab", "c::d", "a:b"]),
    # No credentials; and pieces shorter than 3 characters (replacing them
    # would garble every message) are left.
    ("mongodb://127.0.0.1:27017/?appname=x", []),
    ("mongodb://ab:cd@h1/", []),
    # "://" again in an option's value (an OIDC TOKEN_RESOURCE, an appname):
    # the credentials are still those after the scheme.
    ("mongodb://auditor:s3cr3tpw9@h1/?appname=svc://audit", ["s3cr3tpw9", "auditor"]),
    ("mongodb+srv://auditor:s3cr3t%2Bpw@c0.example.net/?appname=a://b",
     ["s3cr3t%2Bpw", "s3cr3t+pw", "auditor"]),
])
def test_uri_secrets(uri_text: str, pieces: list[str]) -> None:
    from sinks.mongodb import _uri_secrets

    assert _uri_secrets(uri_text) == [uri_text, *pieces]


async def test_long_messages_are_shortened_after_redaction(
    server: MockupDB, sink: MongoSink
) -> None:
    task = start(sink.write_part(sample_part("s1")))
    (await receive(server, "insert")).command_err(2, "x" * 400)
    with pytest.raises(SinkUnavailable) as info:
        await task
    head = "mongodb sink: insert s1:0: OperationFailure (code 2): "
    assert str(info.value) == head + "x" * (300 - len(head)) + "..."


NOT_OPEN_QUERIES: list[Callable[[MongoSink], Awaitable[Any]]] = [
    q for _, q, _, _ in QUERY_COMMANDS]


async def test_not_open_is_unavailable() -> None:
    sink = new_sink()
    with pytest.raises(SinkUnavailable):
        await sink.write_part(sample_part("x"))
    with pytest.raises(SinkUnavailable):
        await sink.write_security_events([sample_security_event("e")])
    for query in NOT_OPEN_QUERIES:  # the admin API's 503, not an AttributeError's 500
        with pytest.raises(SinkUnavailable, match="not open"):
            await query(sink)


async def test_closed_twice_then_opened_again(server: MockupDB, sink: MongoSink) -> None:
    """close is safe twice; a closed sink takes nothing and answers nothing
    (the 503), and opening it again really reconnects (a stale client kept
    would make open a no-op and every write fail)."""
    await sink.close()
    await sink.close()
    with pytest.raises(SinkUnavailable, match="not open"):
        await sink.write_part(sample_part("s1"))
    for query in NOT_OPEN_QUERIES:
        with pytest.raises(SinkUnavailable, match="not open"):
            await query(sink)
    await sink.open()
    task = start(sink.write_part(sample_part("s1")))
    (await receive(server, "insert")).replies({"ok": 1, "n": 1})
    await task
    task = start(sink.list_security_events(limit=1))
    (await receive(server, "find")).replies(cursor_reply("audit.security_audit", []))
    assert await task == ([], None)

"""The mongodb sink's admin queries against what another writer may leave in
the collections, found by a bug hunt. Through the real PyMongo driver against
the scripted wire-protocol server of tests/test_sink_mongodb.py (mockupdb):
each test checks the command the driver sends and answers it as a MongoDB
holding such documents would."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import bson
import bson.int64
import mockupdb
import pytest
from api_fixtures import MakeApi, make_api
from bson import Decimal128, ObjectId
from bson.raw_bson import RawBSONDocument
from mockupdb import MockupDB
from receiver import sample_part, sample_security_event
from test_sink_mongodb import (
    URI_ENV,
    answer_create_indexes,
    cursor_reply,
    new_sink,
    receive,
    start,
    start_server,
    uri,
)

from sinks.base import SinkUnreadable
from sinks.mongodb import MongoSink

__all__ = ["make_api"]


@pytest.fixture(scope="module")
def mongo() -> Iterator[MockupDB]:
    server = start_server()
    answer_create_indexes(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(mongo: MockupDB) -> Iterator[MockupDB]:
    yield mongo
    assert not mongo.got(timeout=0), "a request was left unanswered"


@pytest.fixture
async def sink(server: MockupDB, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MongoSink]:
    monkeypatch.setenv(URI_ENV, uri(server))
    s = new_sink()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


SESSIONS, SECURITY = "audit.session_audit", "audit.security_audit"
# The projection of the session listing's first read (its page's part 0s).
HEADS = {"session_id": 1, "session_start_time": 1}
Query = Callable[[MongoSink], Awaitable[Any]]


def _head(part: dict[str, Any]) -> dict[str, Any]:
    return {"_id": part["_id"], "session_id": part["session_id"],
            "session_start_time": part["session_start_time"]}


def _without_events(part: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in part.items() if k != "events"}


async def _answer(server: MockupDB, query: Query, sink: MongoSink,
                  doc: Any, ns: str) -> Any:
    """Run ``query``; its find (after the session listing's heads) is
    answered with ``doc``."""
    task = start(query(sink))
    find = await receive(server, "find")
    if find["find"] == "session_audit" and find.doc.get("projection") == HEADS:
        find.replies(cursor_reply(ns, [_head(sample_part("s1"))]))
        find = await receive(server, "find")
    find.replies(cursor_reply(ns, [doc]))
    return await task


QUERIES: list[tuple[str, Query, str]] = [
    ("list_security_events", lambda s: s.list_security_events(limit=5), SECURITY),
    ("list_sessions", lambda s: s.list_sessions(limit=5), SESSIONS),
    ("get_session_parts", lambda s: s.get_session_parts("s1"), SESSIONS),
    ("session_part_heads", lambda s: s.session_part_heads("s1"), SESSIONS),
    ("session_part", lambda s: s.session_part("s1", 1), SESSIONS),
]


# What each query's errors name.
WHAT = {"list_security_events": "list security events", "list_sessions": "list sessions",
        "get_session_parts": "get session parts", "session_part_heads": "get session part heads",
        "session_part": "get session part"}


def _sample(ns: str) -> dict[str, Any]:
    if ns == SECURITY:
        return sample_security_event("e1")
    return _without_events(sample_part("s1", 0, final=True))


@pytest.mark.parametrize("name,query,ns", QUERIES, ids=[q[0] for q in QUERIES])
@pytest.mark.parametrize("field,value", [
    ("ts", datetime.datetime(2026, 11, 26, 14, 0)),  # mongosh's new Date()
    ("session_start_time", datetime.datetime(2026, 11, 26, 14, 0)),
    ("_id", ObjectId("65a1b2c3d4e5f60718293a4b")),  # inserted without an _id
    ("details", {"amount": Decimal128("1.5")}),
])
async def test_a_value_json_cannot_carry_is_unreadable_not_a_500(
    server: MockupDB, sink: MongoSink, name: str, query: Query, ns: str,
    field: str, value: Any,
) -> None:
    """A document holding a BSON date, an ObjectId or a Decimal128 (what
    another writer puts into MongoDB without thinking) came back from the
    admin queries as it was decoded, and the admin API's JSON encoding of
    its answer raised TypeError: a 500 for every listing holding it (a date
    ``ts`` sorts before every string, so on every first page). It is the
    documented SinkUnreadable: 503 ``sink_unavailable``, verify's finding."""
    doc = {**_sample(ns), field: value}
    with pytest.raises(SinkUnreadable, match=f"^mongodb sink: {WHAT[name]}: .*JSON cannot carry"):
        await _answer(server, query, sink, doc, ns)


@pytest.mark.parametrize("name,query,ns", QUERIES, ids=[q[0] for q in QUERIES])
async def test_a_string_that_is_not_utf8_is_unreadable_not_a_500(
    server: MockupDB, sink: MongoSink, monkeypatch: pytest.MonkeyPatch,
    name: str, query: Query, ns: str,
) -> None:
    """A stored string that is not UTF-8 (a writer that does not check, as
    the server does not) makes the driver raise InvalidBSON, a BSONError and
    no PyMongoError: it escaped the sink, a 500. SinkUnreadable says what
    it is (sinks.base: "text that is not UTF-8")."""
    monkeypatch.setattr(mockupdb, "docs_repr", lambda *docs: "<docs>")  # (its log decodes)
    doc = _sample(ns)
    doc["user"] = "alice-user"
    raw = bson.encode(doc).replace(b"alice-user", b"alice\xffuser")
    with pytest.raises(SinkUnreadable, match=f"^mongodb sink: {WHAT[name]}: InvalidBSON"):
        await _answer(server, query, sink, RawBSONDocument(raw), ns)


STRING_ID = {"$type": "string", "$not": {"$type": "array"}}


async def test_a_part_0_without_a_string_session_id_is_not_listed(
    server: MockupDB, sink: MongoSink
) -> None:
    """The listing starts from each session's part 0 and summarizes the
    parts found by its ``session_id``. A part 0 without one (another
    writer's) was a KeyError, one with a number had no part found by its
    text (an IndexError), and an array holding a listed id matched that
    id's ``$in`` and was no key: each a 500 for every listing reaching it.
    MongoDB compares by type: the filters now take only a string id, as
    verify's listings do (which report the others as unchecked records)."""
    task = start(sink.list_sessions(since="2026-11-26T00:00:00.000Z", limit=1))
    heads = await receive(server, "find")
    assert heads["filter"] == {"part": 0, "session_id": STRING_ID,
                               "session_start_time": {"$gte": "2026-11-26T00:00:00.000Z"}}
    # What MongoDB answers to that filter: only parts with a string id.
    b0 = sample_part("b", 0, final=True, start="2026-11-26T14:00:00.000Z")
    a0 = sample_part("a", 0, final=True, start="2026-11-26T14:00:00.000Z")
    heads.replies(cursor_reply(SESSIONS, [_head(b0), _head(a0)]))
    parts = await receive(server, "find")
    assert parts["filter"] == {"session_id": {"$in": ["b"], "$not": {"$type": "array"}}}
    parts.replies(cursor_reply(SESSIONS, [_without_events(b0)]))
    page, next_cursor = await task
    assert [s["session_id"] for s in page] == ["b"] and next_cursor is not None


PART_QUERIES = QUERIES[1:]


@pytest.mark.parametrize("name,query,ns", PART_QUERIES, ids=[q[0] for q in PART_QUERIES])
@pytest.mark.parametrize("change", [
    {"part": None}, {"part": "1"}, {"events": "x"}, {"events": [{"seq": "1"}]},
    {"events": [["seq", 1]]},
], ids=["null part", "text part", "events text", "seq text", "event no object"])
async def test_a_part_without_a_number_or_seqs_is_unreadable_not_a_500(
    server: MockupDB, sink: MongoSink, name: str, query: Query, ns: str,
    change: dict[str, Any],
) -> None:
    """The session summary orders a session's parts by ``part``, and the
    admin API's session merges their events by ``seq``: a part another
    writer left with no number (or null, or text, beside the others' int)
    was a KeyError or TypeError, and events that are not objects with an
    integer ``seq`` likewise, a 500 for the listing or the session."""
    p0 = sample_part("s1", 0, final=False)
    p1 = {**sample_part("s1", 1, final=True), **change}
    task = start(query(sink))
    find = await receive(server, "find")
    if find.doc.get("projection") == HEADS:
        find.replies(cursor_reply(ns, [_head(p0)]))
        find = await receive(server, "find")
    find.replies(cursor_reply(ns, [p0, p1]))
    with pytest.raises(SinkUnreadable,
                       match=f"^mongodb sink: {WHAT[name]}: .*no number or events without a seq"):
        await task


async def test_a_part_as_mongosh_rewrites_it_is_read(server: MockupDB, sink: MongoSink) -> None:
    """A number mongosh writes is a double, and a large one is a BSON int64
    (the driver's Int64): both are still the part's number and seq."""
    p0 = sample_part("s1", 0, final=False)
    p1 = sample_part("s1", 1, final=True)
    p1["part"] = 1.0
    p1["events"][0]["seq"] = bson.int64.Int64(p1["events"][0]["seq"])
    task = start(sink.get_session_parts("s1"))
    (await receive(server, "find")).replies(cursor_reply(SESSIONS, [p0, p1]))
    assert [p["part"] for p in await task] == [0, 1]


async def test_a_page_of_security_events_ending_at_one_without_ts(
    server: MockupDB, sink: MongoSink
) -> None:
    """MongoDB sorts a missing ``ts`` as null, below every string: an event
    another writer left without one ends the newest-first listing, and a
    page ending at it took its cursor from ``docs[-1]["ts"]``: a KeyError,
    a 500 whenever the listing had one more event."""
    e2 = sample_security_event("e2", ts="2026-11-26T14:00:02.000Z")
    e1 = sample_security_event("e1")
    e1.pop("ts")
    e0 = sample_security_event("e0")
    e0.pop("ts")
    task = start(sink.list_security_events(limit=2))
    find = await receive(server, "find")
    assert list(find["sort"].items()) == [("ts", -1), ("_id", -1)] and find["limit"] == 3
    find.replies(cursor_reply(SECURITY, [e2, e1, e0]))
    page, next_cursor = await task
    assert page == [e2, e1] and next_cursor is not None


async def test_a_session_is_read_a_part_at_a_time(server: MockupDB, sink: MongoSink) -> None:
    """The admin API streams a session: the parts' heads come without their
    events (a projection, on the server), then each part alone by number."""
    p0 = sample_part("s1", 0, final=False)
    p1 = sample_part("s1", 1, final=True)
    task = start(sink.session_part_heads("s1"))
    find = await receive(server, "find")
    assert find["filter"] == {"session_id": "s1"} and find["projection"] == {"events": 0}
    assert list(find["sort"].items()) == [("part", 1)]
    find.replies(cursor_reply(SESSIONS, [_without_events(p0), _without_events(p1)]))
    assert await task == [_without_events(p0), _without_events(p1)]
    task = start(sink.session_part("s1", 1))
    find = await receive(server, "find")
    assert find["filter"] == {"session_id": "s1", "part": 1} and "projection" not in find.doc
    find.replies(cursor_reply(SESSIONS, [p1]))
    assert await task == [p1]


# BSON's order of the types an _id may have here, descending: an object
# sorts after a string, a number before one (sort by ts, then _id, newest first).
def _bson_rank(value: Any) -> int:
    return 2 if isinstance(value, dict) else 1 if isinstance(value, str) else 0


def _before(value: Any, bound: Any) -> bool:
    """MongoDB's ``{"$lt": bound}``: values of the bound's type only."""
    return type(value) is type(bound) and value < bound


async def test_security_events_with_an_id_that_is_no_string_are_listed_and_paged(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MongoDB takes an ``_id`` of any type but an array: another writer's
    security event may have an object there (or a number). The admin API
    merges the sink's events with the spool's by ``_id``, as dict keys: an
    object was no key, a TypeError, and every /audit/security-events whose
    page reached it answered 500. Through the real app and driver, against a
    scripted server that answers the listing's queries as MongoDB would: it
    is listed, and paging one at a time ends, each event at most once (a
    cursor's ``_id`` is a string, and MongoDB's ``$lt`` compares strings
    only: a page past them passes over the others, as before)."""
    ts = "2026-11-26T14:00:0{}.000Z".format
    stored = sorted([
        sample_security_event("e3", ts=ts(3)),
        {**sample_security_event("x", ts=ts(2)), "_id": {"day": 1}},
        sample_security_event("e2", ts=ts(2)),
        {**sample_security_event("y", ts=ts(2)), "_id": 7},
        sample_security_event("e1", ts=ts(1)),
    ], key=lambda e: (e["ts"], _bson_rank(e["_id"]), str(e["_id"])), reverse=True)

    def answer(request: Any) -> bool:
        name = next(iter(request.doc), "")
        if name.lower() in ("ismaster", "hello"):
            return False
        if name == "find" and request["find"] == "security_audit":
            docs = stored
            if "$or" in request["filter"]:
                older, same = request["filter"]["$or"]
                docs = [e for e in stored if _before(e["ts"], older["ts"]["$lt"]) or (
                    e["ts"] == same["ts"] and _before(e["_id"], same["_id"]["$lt"]))]
            return bool(request.replies(cursor_reply(SECURITY, docs[:request["limit"]])))
        if name == "find":
            return bool(request.replies(cursor_reply(SESSIONS, [])))
        if name == "insert":
            return bool(request.replies({"ok": 1, "n": len(request.docs)}))
        return bool(request.ok())

    server = mockupdb.MockupDB(auto_ismaster={"ismaster": True, "minWireVersion": 0,
                                              "maxWireVersion": 21}, request_timeout=10)
    server.run()
    server.autoresponds(answer)
    try:
        monkeypatch.setenv(URI_ENV, uri(server))
        api = await make_api(sink={"type": "mongodb",
                                   "mongodb": {"uri_env": URI_ENV, "database": "audit"}})
        admin = await api.admin()
        async with api.client.get("/audit/security-events", headers=admin.headers) as r:
            assert r.status == 200, await r.text()
            listed = [e["_id"] for e in (await r.json())["events"]]
        assert [i for i in listed if i not in ("e3", "e2", "e1")] in ([{"day": 1}, 7],
                                                                       [7, {"day": 1}])
        paged: list[Any] = []
        cursor, pages = "", 0
        while cursor is not None and pages < 20:
            async with api.client.get(
                    f"/audit/security-events?limit=1{cursor and '&cursor=' + cursor}",
                    headers=admin.headers) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            paged += [e["_id"] for e in body["events"]]
            cursor, pages = body["next_cursor"], pages + 1
        assert cursor is None
        assert [i for i in paged if i in ("e3", "e2", "e1")] == ["e3", "e2", "e1"]
        assert all(paged.count(i) == 1 for i in paged), paged
    finally:
        server.stop()

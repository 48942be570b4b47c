"""Event records: canonical JSON, times, ids and the hash chain."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit import events
from audit.events import (
    EVENT_KEYS,
    Draft,
    Source,
    canonical_json,
    chain_hash,
    event_hash,
    format_ts,
    genesis,
    new_id,
    parse_ts,
    seal_event,
    seal_text,
)

KEY = b"k" * 32


def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": [1, {"d": None, "c": "é"}]}) == (
        '{"a":[1,{"c":"é","d":null}],"b":1}'
    )
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


@pytest.mark.parametrize(
    ("epoch", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1_795_000_267.1234, "2026-11-18T11:11:07.123Z"),
        (1.9996, "1970-01-01T00:00:02.000Z"),  # rounding carries into the second
        (59.9995, "1970-01-01T00:01:00.000Z"),
    ],
)
def test_format_ts(epoch, text):
    assert format_ts(epoch) == text
    assert parse_ts(text) == pytest.approx(epoch, abs=0.0006)


def test_parse_ts_accepts_offsets(monkeypatch):
    assert parse_ts("1970-01-01T01:00:00.000+01:00") == 0.0
    assert parse_ts("1970-01-01T00:00:02.5z") == 2.5  # RFC 3339 allows a lower-case z
    # A time without an offset is UTC, whatever the server's own time zone.
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_ts("1970-01-01T00:00:01") == 1.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("target", [
    {"id": "d1", "type": "document", "title": "x"},  # more than id and type
    {"type": "document", "id": "d1"},
    {"id": 7, "type": "document"},
    {"id": "d1", "type": None},
    {"id": "d1", "kind": "document"},
    {"id": "d1"},
    {},
    ["document", "d1"],
    "d1",
], ids=["three_keys", "reordered", "int_id", "null_type", "other_key", "one_key", "empty",
        "a_list_of_two", "a_string_of_two"])
def test_a_target_of_any_shape_is_sealed_whole(target):
    """The sealed text is the canonical JSON of the whole target, whatever
    its keys: a shortcut for {"id", "type"} strings must not drop or mangle
    the others (the hash covers the text)."""
    draft = Draft("document.access", target=target)
    event, text = seal_event(KEY, genesis(KEY, "s"), draft, "s", 1, 0.0)
    assert event["target"] == target
    assert json.loads(text)["target"] == target
    assert text == canonical_json(event)
    assert seal_text(KEY, genesis(KEY, "s"), draft, "s", 1, 0.0) == (event["hash"], text)
    assert event["hash"] == event_hash(KEY, genesis(KEY, "s"), event)


def test_new_id_is_128_random_bits():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_genesis_depends_on_key_and_stream():
    assert genesis(KEY, "s1") == genesis(KEY, "s1")
    assert genesis(KEY, "s1") != genesis(KEY, "s2")
    assert genesis(KEY, "s1") != genesis(b"x" * 32, "s1")
    assert genesis(KEY, "s1") == hmac.new(KEY, b"genesis:s1", hashlib.sha256).hexdigest()


def test_sealed_event_has_every_key_and_chains():
    src = Source(user="alice", role="user", ip="1.2.3.4", user_agent="ua", request_id="r1")
    d1 = Draft("document.access", target={"type": "document", "id": "d"}, source=src)
    d2 = Draft("document.list", source=src)
    head = genesis(KEY, "sid")
    e1, text1 = seal_event(KEY, head, d1, "sid", 1, 0.5)
    e2, _ = seal_event(KEY, e1["hash"], d2, "sid", 2, 1.0)
    assert tuple(sorted(e1)) == tuple(sorted(EVENT_KEYS))
    assert json.loads(text1) == e1 and text1 == canonical_json(e1)
    assert e1["actor"] == {"user": "alice", "role": "user"}
    assert e1["source"] == {"ip": "1.2.3.4", "user_agent": "ua"}
    assert e1["request_id"] == "r1" and e1["details"] == {} and e1["ts"].endswith(".500Z")
    assert e2["target"] is None
    # hash = HMAC(key, prev hash + canonical JSON without hash)
    body = {k: v for k, v in e1.items() if k != "hash"}
    assert e1["hash"] == chain_hash(KEY, head, canonical_json(body))
    assert event_hash(KEY, head, e1) == e1["hash"]
    assert event_hash(KEY, e1["hash"], e2) == e2["hash"]
    # Any change breaks it.
    assert event_hash(KEY, head, {**e1, "outcome": "failure"}) != e1["hash"]
    assert event_hash(KEY, e1["hash"], e1) != e1["hash"]


def test_security_event_shape():
    e, _ = seal_event(KEY, genesis(KEY, "security"), Draft("auth.login_failed", "denied"), None,
                      None, 0)
    assert e["session_id"] is None and e["seq"] is None and e["outcome"] == "denied"


@pytest.mark.parametrize("key", [b"", b"k", b"k" * 32, b"k" * 63, b"k" * 64, b"k" * 65,
                                 bytes(range(200))])
def test_chain_hash_is_hmac_sha256(key, monkeypatch):
    # The key pads are computed here, not taken from an earlier test's cache
    # (mutation testing: each step of computing them could be changed unseen).
    monkeypatch.setattr(events, "_key_pads", {})
    body = canonical_json({"a": "é", "b": [1, 2.5, None]})
    expected = hmac.new(key, b"f" * 64 + body.encode(), hashlib.sha256).hexdigest()
    assert chain_hash(key, "f" * 64, body) == expected
    assert chain_hash(key, "f" * 64, body) == expected  # and from the cache
    assert chain_hash(key, "e" * 64, body) == hmac.new(
        key, b"e" * 64 + body.encode(), hashlib.sha256).hexdigest()


JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
JSON = st.recursive(
    JSON_LEAF,
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(
    action=st.text(min_size=1, max_size=30),
    outcome=st.sampled_from(["success", "failure", "denied"]),
    target=st.none() | st.dictionaries(st.sampled_from(["type", "id"]), st.text(max_size=10)),
    details=st.dictionaries(st.text(max_size=10), JSON, max_size=5),
    user=st.none() | st.text(max_size=10),
    other=st.lists(st.none() | st.text(max_size=12), min_size=4, max_size=4),
    session_id=st.none() | st.text(max_size=40),
    seq=st.none() | st.integers(1, 10**9),
    ts=st.floats(0, 4e9),
)
def test_sealed_text_is_the_canonical_json_of_the_event(
    action, outcome, target, details, user, other, session_id, seq, ts
):
    """seal_event's assembled encoding gives exactly canonical_json's bytes and hash."""
    role, ip, agent, request_id = other
    draft = Draft(action, outcome, target=target, details=details,
                  source=Source(user=user, role=role, ip=ip, user_agent=agent,
                                request_id=request_id))
    prev = genesis(KEY, "x")
    event, text = seal_event(KEY, prev, draft, session_id, seq, ts)
    text.encode("utf-8")  # always storable
    assert json.loads(text) == event
    assert text == canonical_json(event)
    assert seal_text(KEY, prev, draft, session_id, seq, ts) == (event["hash"], text)
    assert event["hash"] == event_hash(KEY, prev, event)
    assert list(event) == list(EVENT_KEYS)


def test_lone_surrogates_are_scrubbed_and_the_event_kept():
    draft = Draft("document.access", details={"path": "/a\udcff", "tags": ["ok", "b\udc80"]},
                  source=Source(user_agent="x\ud800"))
    event, text = seal_event(KEY, genesis(KEY, "s"), draft, "s", 7, 0.0)
    assert seal_text(KEY, genesis(KEY, "s"), draft, "s", 7, 0.0) == (event["hash"], text)
    text.encode("utf-8")
    assert event["details"] == {"path": "/a?", "tags": ["ok", "b?"]}
    assert event["source"]["user_agent"] == "x?"
    # Only the odd strings change: the record keeps its session, seq and the
    # rest, and the text stored is that record's canonical JSON.
    assert (event["session_id"], event["seq"], event["action"]) == ("s", 7, "document.access")
    assert text == canonical_json(event) and json.loads(text) == event
    assert event["hash"] == event_hash(KEY, genesis(KEY, "s"), event)


def test_format_ts_keeps_the_last_millisecond_right():
    """The last millisecond's text is reused only for that millisecond."""
    def plain(epoch: float) -> str:
        sec, ms = divmod(round(epoch * 1000), 1000)
        return f"{datetime.fromtimestamp(sec, tz=UTC):%Y-%m-%dT%H:%M:%S}.{ms:03d}Z"

    times = [1764253867.1234, 1764253867.1236, 1764253867.1241, 1764253867.1241,
             1764253868.1241, 1764253867.1234, 0.0, 0.0004, 0.0006, 1764253867.9996]
    for t in times:
        assert format_ts(t) == plain(t), t


@pytest.mark.parametrize("field", [
    "user", "role", "details", "action", "outcome", "request_id", "session_id", "ip",
    "user_agent", "target",
])
def test_a_lone_surrogate_in_any_one_field_is_scrubbed(field):
    """One odd string (in the half of the record before ``hash`` or after it,
    the rest plain ASCII) is still caught: the stored text is valid UTF-8 and
    byte for byte the canonical JSON of the record whose hash it carries."""
    odd = "x\udc80y"
    src = Source(user="alice", role="user", ip="1.2.3.4", user_agent="ua", request_id="r1")
    draft = Draft("document.access", "success", target={"type": "document", "id": "d"},
                  details={"k": "v"}, source=src)
    session_id = "s"
    if field in ("user", "role", "ip", "user_agent", "request_id"):
        setattr(src, field, odd)
    elif field == "details":
        draft.details = {"k": odd}
    elif field == "target":
        draft.target = {"type": "document", "id": odd}
    elif field == "session_id":
        session_id = odd
    else:
        setattr(draft, field, odd)
    prev = genesis(KEY, "s")
    event, text = seal_event(KEY, prev, draft, session_id, 3, 0.0)
    assert "x?y" in text and "\udc80" not in text
    text.encode("utf-8")
    assert text == canonical_json(event) and json.loads(text) == event
    assert event["hash"] == event_hash(KEY, prev, event)
    assert seal_text(KEY, prev, draft, session_id, 3, 0.0) == (event["hash"], text)


def test_format_ts_is_utc_whatever_the_servers_time_zone(monkeypatch):
    """The documented record time is UTC ("…Z"): a server in another time
    zone must not write its local time (found by mutation testing: the
    tests ran only in UTC)."""
    monkeypatch.setattr(events, "_PREFIXES", {})
    monkeypatch.setattr(events, "_last_ts", (-1, ""))
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert format_ts(1_795_000_267.1234) == "2026-11-18T11:11:07.123Z"
        assert format_ts(0.5) == "1970-01-01T00:00:00.500Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_format_ts_cache_stays_bounded():
    """A long-running server formats a new second every second: the cache of
    formatted seconds must not grow with them."""
    most = 0
    for sec in range(events._PREFIXES_MAX + 50):
        assert format_ts(2_000_000_000 + sec + 0.5).endswith(".500Z")
        most = max(most, len(events._PREFIXES))
    assert most <= events._PREFIXES_MAX


@pytest.mark.parametrize("value", [7, 1.5, True, None, ["a", 1], {"k": "v"}, "", []],
                         ids=["int", "float", "bool", "none", "list", "dict", "empty_string",
                              "empty_list"])
def test_any_json_value_in_any_field_is_sealed_as_its_canonical_json(value):
    """The sealed text is the record's canonical JSON whatever a field holds:
    the shortcuts for strings (and an int seq, empty details) must hand any
    other value to the encoder whole
    (found by mutation testing: a non-string became null, or raised)."""
    prev = genesis(KEY, "s")
    for field in ("action", "outcome", "event_id", "details", "user", "role", "ip",
                  "user_agent", "request_id", "session_id", "seq"):
        src = Source(user="alice", role="user", ip="1.2.3.4", user_agent="ua",
                     request_id="r1")
        draft = Draft("document.access", source=src)
        session_id: Any = "s"
        seq: Any = 3
        if field in ("action", "outcome", "event_id", "details"):
            setattr(draft, field, value)
        elif field == "session_id":
            session_id = value
        elif field == "seq":
            seq = value
        else:
            setattr(src, field, value)
        event, text = seal_event(KEY, prev, draft, session_id, seq, 0.0)
        assert text == canonical_json(event) and json.loads(text) == event, field
        where = {"user": event["actor"], "role": event["actor"], "ip": event["source"],
                 "user_agent": event["source"]}.get(field, event)
        assert where[field] == value and type(where[field]) is type(value), field
        assert event["hash"] == event_hash(KEY, prev, event)
        assert seal_text(KEY, prev, draft, session_id, seq, 0.0) == (event["hash"], text)

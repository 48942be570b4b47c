"""sinks/base.py's helpers and default methods, pinned where a mutation
review found nothing that would notice them change: what a stored part
counts, how a session is summarised, which documents the admin API cannot
hand out, cursors, and the defaults a queryable sink gets for free."""

from __future__ import annotations

import re
from typing import Any

import pytest

from sinks.base import (
    Doc,
    Sink,
    decode_cursor,
    encode_cursor,
    event_count,
    lone_surrogate,
    odd_part,
    summarize_parts,
)


@pytest.mark.parametrize(("part", "expected"), [
    ({"event_count": 7}, 7),
    ({}, 0),  # none said: none counted
    ({"event_count": "x"}, 0),
    ({"event_count": None}, 0),
    ({"event_count": float("inf")}, 0),
    ({"event_count": (1 << 63) - 1}, (1 << 63) - 1),
    ({"event_count": 1 << 63}, 0),  # past 64 bits: no count
])
def test_event_count(part: Doc, expected: int) -> None:
    assert event_count(part) == expected


@pytest.mark.parametrize(("text", "doc", "expected"), [
    ('"\\ud800"', "\ud800", True),
    ('{"a": ["\\udfff"]}', {"a": ["\udfff"]}, True),
    ('"\\ud83d\\ude00"', "\U0001f600", False),  # a pair: one character
    ('"a"', "a", False),
])
def test_lone_surrogate(text: str, doc: Any, expected: bool) -> None:
    assert lone_surrogate(text, doc) is expected


@pytest.mark.parametrize(("part", "events", "odd"), [
    ({"session_id": "s", "part": 0, "events": [{"seq": 1}]}, True, False),
    ({"session_id": "s", "part": 0}, True, False),  # no events: none to merge
    ({"session_id": "s", "part": 0, "events": {}}, True, True),  # not a list
    ({"session_id": "s", "part": 0, "events": {}}, False, False),  # not looked at
    ({"session_id": "s", "part": 0, "events": [{"seq": True}]}, True, True),
    ({"session_id": "s", "part": True, "events": []}, True, True),
    ({"session_id": 5, "part": 0}, True, True),
    (["s", 0], True, True),
])
def test_odd_part(part: Any, events: bool, odd: bool) -> None:
    assert odd_part(part, events=events) is odd


def _part(n: int, *, final: bool | None, **fields: Any) -> Doc:
    doc: Doc = {"session_id": "s1", "part": n, "event_count": 2,
                "session_end_time": f"end{n}", "session_duration_seconds": n * 10,
                "seal_reason": f"reason{n}", **fields}
    if final is not None:
        doc["final"] = final
    return doc


def test_summarize_parts_takes_the_start_from_the_first_and_the_end_from_the_final() -> None:
    parts = [_part(1, final=True), _part(0, final=False, user="alice",
                                          session_start_time="start0")]
    assert summarize_parts(parts) == {
        "session_id": "s1", "user": "alice", "state": "stored",
        "session_start_time": "start0", "session_end_time": "end1",
        "session_duration_seconds": 10, "event_count": 4, "seal_reason": "reason1",
        "parts": 2,
    }


@pytest.mark.parametrize("final", [False, None])
def test_summarize_parts_without_the_final_part_is_pending(final: bool | None) -> None:
    """A checkpoint's end, duration and seal reason are not the session's."""
    summary = summarize_parts([_part(0, final=final, user="bob")])
    assert summary["state"] == "pending" and summary["user"] == "bob"
    assert summary["session_end_time"] is None
    assert summary["session_duration_seconds"] is None
    assert summary["seal_reason"] is None


@pytest.mark.parametrize("values", [
    ("2026-11-26T14:00:00.000Z", "s1"), (1, "a"), ("é", None), ("x" * 5,), (),
])
def test_a_cursor_round_trips_and_needs_no_escaping_in_a_query(values: tuple[Any, ...]) -> None:
    cursor = encode_cursor(*values)
    assert re.fullmatch(r"[A-Za-z0-9_-]*", cursor), cursor  # no padding, URL-safe
    assert decode_cursor(cursor) == list(values)


@pytest.mark.parametrize("cursor", ["!!!", "eyJh", "e30"])  # not base64; not JSON; {}
def test_a_malformed_cursor_is_a_value_error(cursor: str) -> None:
    with pytest.raises(ValueError, match=r"^malformed cursor$"):
        decode_cursor(cursor)


class ListedSink(Sink):
    """A sink that only lists and reads (pages of ``limit``, the cursor an
    index): what the base class builds its defaults on."""

    type = "listed"
    queryable = True

    def __init__(self, sessions: int, events: int) -> None:
        self.ids = [f"s{i:03}" for i in range(sessions)]
        self.events = [{"_id": f"e{i:04}", "ts": i} for i in range(events)]  # oldest first
        self.limits: list[int] = []

    async def write_part(self, part: Doc) -> None:
        raise NotImplementedError

    async def write_security_events(self, events: list[Doc]) -> None:
        raise NotImplementedError

    def _page(
        self, docs: list[Any], limit: int, cursor: str | None
    ) -> tuple[list[Any], str | None]:
        self.limits.append(limit)
        start = int(cursor) if cursor is not None else 0
        end = start + limit
        return docs[start:end], str(end) if end < len(docs) else None

    async def list_sessions(self, *, user: str | None = None, since: str | None = None,
                            until: str | None = None, limit: int = 50,
                            cursor: str | None = None) -> tuple[list[Doc], str | None]:
        return self._page([{"session_id": s} for s in self.ids], limit, cursor)

    async def get_session_parts(self, session_id: str) -> list[Doc]:
        return [{"_id": f"{session_id}:{n}", "session_id": session_id, "part": n,
                 "events": [{"seq": n}]} for n in range(3)]

    async def list_security_events(self, *, since: str | None = None, kind: str | None = None,
                                   limit: int = 50,
                                   cursor: str | None = None) -> tuple[list[Doc], str | None]:
        return self._page(self.events[::-1], limit, cursor)  # newest first


async def test_the_default_session_ids_page_through_every_session() -> None:
    sink = ListedSink(sessions=450, events=0)
    assert [s async for s in sink.session_ids()] == sink.ids
    assert sink.limits == [200, 200, 200]


async def test_the_default_security_events_oldest_first_page_through_all() -> None:
    sink = ListedSink(sessions=0, events=2500)
    assert [e async for e in sink.security_events_oldest_first()] == sink.events
    assert sink.limits == [1000, 1000, 1000]


async def test_the_default_part_heads_and_one_part_come_from_the_parts() -> None:
    sink = ListedSink(sessions=1, events=0)
    heads = await sink.session_part_heads("s1")
    assert heads == [{"_id": f"s1:{n}", "session_id": "s1", "part": n} for n in range(3)]
    assert await sink.session_part("s1", 1) == [
        {"_id": "s1:1", "session_id": "s1", "part": 1, "events": [{"seq": 1}]}]
    assert await sink.session_part("s1", 7) == []

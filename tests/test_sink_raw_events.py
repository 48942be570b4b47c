"""Parts handed to JSON sinks as stored event text (RawJSON), not re-encoded."""

from __future__ import annotations

import json

from audit import queries
from audit.events import Draft, Source
from audit.verify import verify_sink
from sinks.base import RawJSON, dumps
from sinks.jsonl import JsonlSink
from sinks.sqlite import SqliteSink


def test_dumps_splices_raw_events_as_they_are() -> None:
    events = [{"seq": 1, "action": "a", "details": {"é": "ü"}}, {"seq": 2, "action": "b"}]
    parsed = {"_id": "s:0", "part": 0, "events": events}
    raw = {"_id": "s:0", "part": 0,
           "events": [RawJSON(json.dumps(e, ensure_ascii=False)) for e in events]}
    assert json.loads(dumps(raw)) == parsed
    assert json.loads(dumps(parsed)) == parsed
    assert json.loads(dumps({"events": [RawJSON("{}")]})) == {"events": [{}]}
    assert dumps({"events": []}) == '{"events":[]}'


async def test_a_flushed_part_is_the_same_document_either_way(
    make_config, engines, tmp_path
) -> None:
    config = make_config()
    jsonl = JsonlSink(tmp_path / "jsonl")
    engine = await engines.open(config, SqliteSink(config.sqlite_sink_path))
    src = Source(user="alice", role="user", ip="127.0.0.1", user_agent="t\u00e9st")
    s = await engine.start_session("alice", "user", src, 3600)
    for i in range(5):
        await engine.record(s.session_id, Draft("document.access", source=src,
                                                 target={"type": "document", "id": str(i)},
                                                 details={"note": "\u202e\u00fc"}))
    await engine.end_session(s.session_id, src)
    parsed = await engine.spool.read(lambda c: queries.load_part(c, raw=False))
    raw = await engine.spool.read(lambda c: queries.load_part(c, raw=True))
    assert parsed is not None and raw is not None
    assert all(type(e) is RawJSON for e in raw["events"])
    assert json.loads(dumps(raw)) == parsed

    await jsonl.open()
    try:
        await jsonl.write_part(raw)
        (stored_jsonl,) = await jsonl.get_session_parts(s.session_id)
    finally:
        await jsonl.close()
    assert stored_jsonl == parsed

    await engines.drain(engine)  # the sqlite sink gets RawJSON events from the flusher
    (stored,) = await engine.sink.get_session_parts(s.session_id)
    assert stored == parsed
    report = await verify_sink(engine.sink, engines.key)
    assert report.ok and report.events == 8

"""Findings of an OWASP ASVS 4.0.3 walk (V2, V3, V4, V7, V8, V13, V14), each
proved through the real app."""

from __future__ import annotations

import json
from typing import Any

from api_fixtures import MakeApi, api, make_api
from waiting import wait_for

__all__ = ["api", "make_api"]


# -- V7.3.1: the JSONL sink's lines are lines to every reader ------------------------

# What JSON leaves raw inside a string but str.splitlines() (and JavaScript
# before ES2019) takes for a line break; an 8-bit terminal escape (CSI) and a
# bidirectional override, which make a line shown read as something else.
LINE_BREAKS = "\x85\u2028\u2029"
SHOWN_ODDLY = "\x9b\u202e\u2066"


async def test_a_jsonl_line_holds_no_line_break_any_reader_splits_on(
    make_api: MakeApi,
) -> None:
    """A client's text with U+0085, U+2028 or U+2029 (a client event's details,
    a username tried at login) was written raw into the JSONL sink's line:
    a reader splitting the file with ``str.splitlines()`` (this project's
    own test oracles did) got the record in pieces that are not JSON, so one
    such character hid a whole session part, every action in it, or a
    security event from that reader. The line now escapes them; the values
    read back are the same."""
    api = await make_api(sink={"type": "jsonl"})
    alice = await api.user("alice")
    text = f"a{LINE_BREAKS}{SHOWN_ODDLY}b"
    resp = await api.client.post("/audit/events", headers=alice.headers,
                                 json={"action": "client.note", "details": {"text": text}})
    assert resp.status == 202, await resp.text()
    resp = await api.client.post("/token", json={"username": text, "password": "wrong-pass"})
    assert resp.status == 401
    resp = await api.client.post("/logout", headers=alice.headers)
    assert resp.status == 200

    def records() -> list[dict[str, Any]]:
        return [json.loads(line) for path in sorted(api.config.jsonl_dir.glob("audit-*.jsonl"))
                for line in path.read_text(encoding="utf-8").splitlines()]

    async def both() -> list[dict[str, Any]] | None:
        raw = b"".join(p.read_bytes() for p in api.config.jsonl_dir.glob("audit-*.jsonl"))
        kinds = {json.loads(line)["type"] for line in raw.split(b"\n") if line}
        return records() if kinds == {"session_part", "security_event"} else None

    docs = await wait_for(both, message="a part and a security event in the JSONL sink")
    raw = "".join(p.read_text(encoding="utf-8") for p in api.config.jsonl_dir.iterdir()
                  if p.suffix == ".jsonl")
    assert not set(LINE_BREAKS + SHOWN_ODDLY) & set(raw)
    part = next(d for d in docs if d["type"] == "session_part")
    (note,) = [e for e in part["events"] if e["action"] == "client.note"]
    assert note["details"] == {"text": text}
    (failed,) = [d for d in docs if d["type"] == "security_event"]
    assert failed["details"]["username"] == text

"""Several servers, each with its own data directory, flushing to one sink
(DESIGN.md: Scaling past one machine), with one audit key as a fleet behind a
load balancer has it: every spool's security chain starts from the same
genesis value, and the others' events are the sink's newest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from audit.events import canonical_json, chain_hash, format_ts, genesis, new_id
from audit.rollback import FIRST_PAGE, sink_ahead
from audit.store import SECURITY_STREAM
from sinks.base import Doc
from sinks.sqlite import SqliteSink

KEY = b"one-audit-key-for-the-whole-fleet-0123"


def _chain(n: int, t0: float, prev: str | None = None, step: float = 0.001) -> list[Doc]:
    """``n`` security events of one server's chain (after ``prev``, else from
    genesis), their times from ``t0`` on."""
    prev = prev or genesis(KEY, SECURITY_STREAM)
    out = []
    for i in range(n):
        eid = new_id()
        ev: dict[str, Any] = {
            "event_id": eid, "session_id": None, "seq": None, "ts": format_ts(t0 + i * step),
            "action": "auth.invalid_token", "outcome": "denied", "actor": None,
            "target": None, "source": {"ip": "127.0.0.1", "user_agent": None},
            "request_id": eid, "details": {"reason": "malformed"}}
        ev["hash"] = prev = chain_hash(KEY, prev, canonical_json(ev))
        ev["_id"] = eid
        out.append(ev)
    return out


class CountingSink(SqliteSink):
    """The sqlite sink, counting the queries of its newest security events."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.listings = 0

    async def list_security_events(self, **kw: Any) -> tuple[list[Doc], str | None]:
        self.listings += 1
        return await super().list_security_events(**kw)


async def _sink(tmp_path: Path, *chains: list[Doc]) -> CountingSink:
    sink = CountingSink(tmp_path / "audit.db")
    await sink.open()
    for events in chains:
        for i in range(0, len(events), 500):
            await sink.write_security_events(events[i:i + 500])
    return sink


async def test_the_start_check_reads_other_servers_newer_security_events_in_two_queries(
        tmp_path: Path) -> None:
    # Server A's last security event, then 2,100 of server B's (a flood of bad
    # tokens at B): at each of A's starts the check looked for A's head a
    # page of 1,000 at a time; up to 20 queries, each a scan of the whole
    # index on the jsonl sink (5 s with 200,000 events, before serving).
    a = _chain(1, 1_000_000.0)
    b = _chain(2_100, 1_000_001.0)
    sink = await _sink(tmp_path, a, b)
    try:
        # Found, and nothing of B's taken for a continuation of A's chain
        # (both chains start from the one genesis value of the shared key).
        assert await sink_ahead(sink, KEY, a[-1]["hash"], None) == (a[-1]["hash"], 0)
        assert sink.listings == 2
        sink.listings = 0
        assert await sink_ahead(sink, KEY, "0" * 64, None) is None  # (not there)
        assert sink.listings == 2
    finally:
        await sink.close()


async def test_the_start_check_follows_its_chain_through_other_servers_events(
        tmp_path: Path) -> None:
    # A spool restored from an older backup, on a shared sink: after its head
    # come its own later events, interleaved with B's (which started from the
    # same genesis), deeper than the first page. Only A's are followed.
    head = _chain(1, 2_000_000.0)
    later = _chain(300, 2_000_001.0, prev=head[-1]["hash"], step=0.01)
    b = _chain(3_000, 2_000_001.005, step=0.001)
    sink = await _sink(tmp_path, head, b, later)
    try:
        assert len(later) + len(b) > FIRST_PAGE
        assert await sink_ahead(sink, KEY, head[-1]["hash"], None) == (later[-1]["hash"], 300)
    finally:
        await sink.close()

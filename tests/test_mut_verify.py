"""verify's findings for parts and events a tamperer left odd, and the chain
recipe's exact inputs (found by mutation testing of audit/events.py and
audit/verify.py: each of these checks could be changed with the suite
passing). Sessions are sealed here as the spool seals them, no server."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from audit.events import Draft, Source, genesis, seal_event
from audit.store import SECURITY_STREAM, part_document
from audit.verify import SpoolAnchor, check_session, verify_sink
from sinks.sqlite import SqliteSink

KEY = b"mut-verify-audit-key-0123456789!"
SID = "0123456789abcdef0123456789abcdef"
T0 = 1_700_000_000.0  # (2023: in the past, for the overdue check)


def _session(sizes: tuple[int, ...] = (3, 3, 2), key: bytes = KEY,
             sid: str = SID) -> list[dict[str, Any]]:
    """One session of ``sum(sizes)`` events (session.start first, a logout's
    session.end last) cut into parts of ``sizes``, as the server stores it."""
    n = sum(sizes)
    src = Source(user="alice", role="user", ip="127.0.0.1")
    head, events = genesis(key, sid), []
    for seq in range(1, n + 1):
        if seq == 1:
            draft = Draft("session.start", source=src)
        elif seq == n:
            draft = Draft("session.end", details={"reason": "logout"}, source=src)
        else:
            draft = Draft("document.access", target={"type": "document", "id": f"d{seq}"},
                          source=src)
        ev, _ = seal_event(key, head, draft, sid, seq, T0 + seq)
        events.append(ev)
        head = ev["hash"]
    parts, first = [], 1
    for number, size in enumerate(sizes):
        mine = events[first - 1:first - 1 + size]
        final = number == len(sizes) - 1
        meta = {"session_id": sid, "part": number, "final": final,
                "end_ts": T0 + n if final else None, "user": "alice", "start_ts": T0 + 1,
                "first_seq": first, "last_seq": first + size - 1,
                "seal_reason": "logout" if final else "checkpoint",
                "prev_hash": events[first - 2]["hash"] if first > 1 else genesis(key, sid),
                "hash": mine[-1]["hash"]}
        parts.append(part_document(meta, mine))
        first += size
    assert check_session(key, sid, parts) == []
    return parts


def _findings(parts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(p.kind, p.detail) for p in check_session(KEY, SID, parts)]


def test_findings_come_in_part_order_whatever_order_the_sink_gives():
    """Parts are checked sorted by number, a bad-numbered one first."""
    parts = _session()
    parts[0]["approved_by"] = "x"
    parts[1]["event_count"] = 9
    parts[2]["note"] = "y"
    bad = {**copy.deepcopy(parts[1]), "part": "1"}
    expected = [
        ("bad_part", f"a part numbered '1' ('{SID}:1')"),
        ("bad_part", "part 0: fields outside the record: approved_by"),
        ("bad_part", "part 2: fields outside the record: note"),
        ("bad_part", "part 1: event_count 9 != 3"),
    ]
    for order in ([*parts, bad], [bad, *reversed(parts)], [parts[2], bad, parts[0], parts[1]]):
        assert _findings(order) == expected, order


def test_several_unknown_fields_and_several_runs_of_removed_seqs_are_listed():
    parts = _session((3, 5, 2))
    parts[0].update(zeta=1, alpha=2)
    del parts[1]["events"][3]  # seq 7
    del parts[1]["events"][1]  # seq 5
    parts[1]["event_count"] = 3
    found = _findings(parts)
    assert ("bad_part", "part 0: fields outside the record: alpha, zeta") in found
    assert ("removed", "part 1: seq [5, 7] missing") in found


def test_a_session_with_only_a_bad_numbered_part_is_that_finding():
    """No part numbered from 0 at all: the bad number is reported, and the
    check does not fail (nor invent missing parts)."""
    parts = _session((3,))
    parts[0]["part"] = None
    assert _findings(parts) == [("bad_part", f"a part numbered None ('{SID}:0')")]


def test_a_part_without_first_seq_is_named_and_its_events_still_checked():
    parts = _session()
    del parts[0]["first_seq"]
    assert _findings(parts) == [("bad_part", "part 0: first_seq None != 1")]


def test_a_part_without_last_seq_is_found_and_the_next_part_checked():
    parts = _session()
    del parts[0]["last_seq"]
    assert _findings(parts) == [("bad_part", "part 0: last_seq None is not a number")]


def test_a_part_without_its_hash_is_one_finding():
    """The next part is checked from its own prev_hash (its events verify)."""
    parts = _session()
    del parts[1]["hash"]
    assert _findings(parts) == [("bad_part", "part 1: hash is not the last event's")]


def test_a_part_without_its_hash_before_one_without_prev_hash():
    parts = _session()
    del parts[1]["hash"]
    del parts[2]["prev_hash"]
    assert _findings(parts) == [("bad_part", "part 1: hash is not the last event's"),
                                ("changed", "seq 7: hash does not verify")]


def test_a_part_without_prev_hash_after_a_missing_part_is_still_checked():
    parts = _session((3, 3, 2, 2))
    del parts[1]
    del parts[1]["prev_hash"]
    assert _findings(parts) == [
        ("missing_part", "part 1 is not stored"),
        ("changed", "seq 7: hash does not verify"),
    ]


def test_a_part_without_first_seq_after_a_missing_part_is_named_and_still_checked():
    """Where the seqs cannot be followed across a gap, a missing first_seq is
    a bad part of its own, and the part's events are checked from their own
    first seq."""
    parts = _session((3, 3, 2, 2))
    del parts[1]
    parts[1]["first_seq"] = "7"
    assert _findings(parts) == [
        ("missing_part", "part 1 is not stored"),
        ("bad_part", "part 2: first_seq '7' is not a number"),
    ]


@pytest.mark.parametrize("number", [0, 1])
def test_a_removed_first_event_is_found_when_first_seq_is_gone_too(number):
    """Without its first_seq a part's seqs are held to where the previous
    part ended, not to its own first event: that event removed is still a
    removal."""
    parts = _session()
    del parts[number]["first_seq"]
    first = parts[number]["events"].pop(0)["seq"]
    assert ("removed", f"part {number}: seq [{first}] missing") in _findings(parts)


def test_an_event_without_a_hash_breaks_the_chain_at_it_and_the_next():
    parts = _session()
    del parts[1]["events"][0]["hash"]
    assert _findings(parts) == [
        ("changed", "seq 4: hash does not verify"),
        ("changed", "seq 5: hash does not verify"),
    ]


def test_a_part_whose_last_event_has_no_hash_is_found():
    parts = _session()
    del parts[1]["events"][-1]["hash"]
    parts[1]["hash"] = ""
    assert _findings(parts) == [("changed", "seq 6: hash does not verify")]


async def _report(tmp_path: Any, parts: list[dict[str, Any]], anchor: SpoolAnchor | None,
                  sink_class: type[SqliteSink] = SqliteSink, **kwargs: Any) -> Any:
    sink = sink_class(tmp_path / "sink.db")
    await sink.open()
    try:
        for part in parts:
            await sink.write_part(part)
        return await verify_sink(sink, KEY, anchor, **kwargs)
    finally:
        await sink.close()


async def _verified(tmp_path: Any, parts: list[dict[str, Any]], anchor: SpoolAnchor | None,
                    **kwargs: Any) -> list[tuple[str, str, str]]:
    report = await _report(tmp_path, parts, anchor, **kwargs)
    return [(p.session_id, p.kind, p.detail) for p in report.problems]


async def test_a_session_without_its_final_part_is_overdue_only_past_the_limit(tmp_path):
    """Its start and the limit given, "now" is verify's own clock unless
    told: the CLI passes none (found by mutation testing: with the clock
    never read, the check failed and said only "cannot be checked")."""
    import time

    parts = _session()[:2]  # the final part removed
    anchor = SpoolAnchor(genesis(KEY, SECURITY_STREAM), None)
    start = T0 + 1
    day = 86400.0
    assert await _verified(tmp_path, parts, anchor, overdue_after=day, now=start + day) == []
    late = await _verified(tmp_path, parts, anchor, overdue_after=day, now=start + day + 1)
    assert late == [(SID, "missing_part", "no final part, and the session started 86401 s"
                     " ago, longer than any session lasts (86400 s with the margin): its"
                     " final part was removed, or waits in another server's spool")]
    ((sid, kind, detail),) = await _verified(tmp_path, parts, anchor, overdue_after=day)
    assert (sid, kind) == (SID, "missing_part") and detail.startswith("no final part")
    ago = int(detail.split("started ")[1].split(" s ago")[0])
    assert abs(time.time() - start - ago) < 3600
    # Stored whole in this sink by this server's spool: removed, whatever the time.
    stored = SpoolAnchor(anchor.head, None, stored=frozenset({SID}))
    assert await _verified(tmp_path, parts, stored, overdue_after=day, now=start) == [
        (SID, "missing_part",
         "no final part, which this server's spool stored in this sink: it was removed")]


async def test_sessions_chained_under_another_key_are_counted_apart(tmp_path):
    """verify's "chained under another key" count: a session whose part 0
    does not begin from this key's genesis value, and not one of this key
    with a changed event in a later part (the count was never tested)."""
    other = "f" * 32
    ours = _session()
    ours[1]["events"][1]["details"] = {"note": "edited"}
    theirs = _session(key=b"another-servers-audit-key-012345", sid=other)
    report = await _report(tmp_path, [*ours, *theirs], None)
    assert report.other_key_sessions == 1
    found = {(p.session_id, p.kind, p.detail) for p in report.problems}
    assert (SID, "changed", "seq 5: hash does not verify") in found
    assert (other, "bad_part", "part 0: prev_hash does not continue the chain") in found


def _odd(parts: list[dict[str, Any]], where: str, value: Any) -> None:
    """Set ``where`` (``"1.first_seq"`` or ``"0.events.1.hash"``) to ``value``."""
    keys: list[Any] = [int(k) if k.isdigit() else k for k in where.split(".")]
    doc: Any = parts
    for k in keys[:-1]:
        doc = doc[k]
    doc[keys[-1]] = value


@pytest.mark.parametrize(("where", "value", "found"), [
    ("1.first_seq", "4", [("bad_part", "part 1: first_seq '4' != 4")]),
    ("1.first_seq", 4.0, [("bad_part", "part 1: first_seq 4.0 != 4")]),
    ("1.first_seq", True, [("bad_part", "part 1: first_seq True != 4")]),
    ("1.last_seq", "6", [("bad_part", "part 1: last_seq '6' is not a number")]),
    ("1.last_seq", [6], [("bad_part", "part 1: last_seq [6] is not a number")]),
    ("1.prev_hash", 5, [("bad_part", "part 1: prev_hash does not continue the chain")]),
    ("0.hash", 5, [("bad_part", "part 0: hash is not the last event's")]),
    ("0.events.1.hash", 5, [("changed", "seq 2: hash does not verify"),
                            ("changed", "seq 3: hash does not verify")]),
    ("1.event_count", "3", [("bad_part", "part 1: event_count '3' != 3")]),
    ("1.events", {"seq": 4}, [("bad_part", "part 1: events is not a list"),
                              ("bad_part", "part 1: holds no events"),
                              ("removed", "part 1: seq [4-6] missing"),
                              ("bad_part", "part 1: event_count 3 != 0")]),
    ("2.events.0", "x" * 100, [
        ("changed", "part 2: an event that is not an object: '" + "x" * 56 + "..."),
        ("removed", "part 2: seq [7] missing"),
        ("changed", "seq None: session_id changed"),
        ("changed", "seq None: hash does not verify"),
        ("changed", "seq 8: hash does not verify")]),
])
def test_a_field_of_the_wrong_type_is_its_own_finding(where, value, found):
    """Any JSON value may stand in a tampered document's field: each is named
    and the rest of the session still checked (a string first_seq, a number
    for a hash or a prev_hash raised TypeError, and the session's only
    finding was "cannot be checked")."""
    parts = _session()
    _odd(parts, where, value)
    assert _findings(parts) == found


async def test_a_session_too_odd_to_follow_is_one_finding_and_the_rest_checked(tmp_path):
    """A plug-in sink handing out a part that is not a document makes
    check_session raise: that session's finding, by name; the next session
    is still checked."""
    other = "f" * 32
    fine = _session(sid=other)
    fine[0]["events"][1]["outcome"] = "failure"

    class OddSink(SqliteSink):
        async def get_session_parts(self, session_id: str) -> list[dict[str, Any]]:
            if session_id == SID:
                return ["not a part"]  # type: ignore[list-item]
            return await super().get_session_parts(session_id)

    report = await _report(tmp_path, [*_session(), *fine], None, sink_class=OddSink)
    assert [(p.session_id, p.kind, p.detail) for p in report.problems] == [
        (SID, "bad_part", "the session's parts cannot be checked (AttributeError)"),
        (other, "changed", "seq 2: hash does not verify")]


async def test_a_part_the_sink_cannot_hand_out_is_that_sessions_finding(tmp_path):
    """A stored event that is not an object: the sink refuses the document
    (SinkUnreadable), and verify names the session and why."""
    odd = _session()
    odd[1]["events"][1] = "not an event"
    assert await _verified(tmp_path, odd, None) == [
        (SID, "bad_part", "the session's parts cannot be checked (SinkUnreadable)")]


def test_every_stored_value_a_finding_quotes_is_cut():
    """A tampered field may hold a megabyte: each finding quotes at most 60
    characters of it, whichever field it is."""
    big = "x" * 100_000
    parts = _session()
    parts[0]["part"] = big
    parts[1]["session_id"] = big
    quoted = "'" + "x" * 56 + "..."
    found = _findings(parts)
    assert found[0] == ("bad_part", f"a part numbered {quoted} ({SID + ':0'!r})")
    assert ("bad_part", f"part 1 ({SID + ':1'!r}) names session {quoted}") in found
    assert all(len(d) < 300 for _, d in found), found


async def test_a_sink_failing_while_a_session_is_read_fails_verify(tmp_path):
    """The sink going down (timeout, 5xx) while verify reads a session's
    parts ends verify with the sink's error: it is not a finding against
    that session ("cannot be checked"), which an operator would take for
    tampering, with every later session unread (found by mutation testing:
    a SinkError there was taken for an odd document)."""
    from sinks.base import SinkUnavailable

    class Failing(SqliteSink):
        async def get_session_parts(self, session_id: str) -> list[dict[str, Any]]:
            raise SinkUnavailable("the sink went down")

    sink = Failing(tmp_path / "s.db")
    await sink.open()
    try:
        for part in _session():
            await sink.write_part(part)
        with pytest.raises(SinkUnavailable):
            await verify_sink(sink, KEY)
    finally:
        await sink.close()


async def test_a_session_the_sink_did_not_list_to_the_end_is_not_called_removed(tmp_path):
    """Sessions the spool stored whole are held to be in the sink only when
    the sink listed all its sessions: one the listing broke off before is
    not reported removed (the broken listing is the finding)."""
    other = "f" * 32

    class BreaksOff(SqliteSink):
        async def session_ids(self):  # type: ignore[override]
            async for sid in super().session_ids():
                yield sid
                raise ValueError("a row the sink cannot list")

    parts = [*_session(), *_session(sid=other)]
    anchor = SpoolAnchor(genesis(KEY, SECURITY_STREAM), None, stored=frozenset({SID, other}))
    report = await _report(tmp_path, parts, anchor, sink_class=BreaksOff)
    assert [(p.session_id, p.kind, p.detail) for p in report.problems] == [
        ("", "bad_part", "the sink's sessions cannot be listed to the end (ValueError)")]


def test_a_changed_user_or_seal_reason_is_quoted_beside_the_sessions_own():
    parts = _session()
    parts[1]["user"] = "mallory"
    parts[2]["seal_reason"] = "idle_timeout"
    assert _findings(parts) == [
        ("bad_part", "part 1: user 'mallory' is not the session's ('alice')"),
        ("bad_part", "part 2: seal_reason 'idle_timeout' is not session.end's"),
    ]


async def test_only_sessions_begun_under_another_key_are_counted_as_such(tmp_path):
    """The count behind verify's "chained under another audit key" warning:
    one per such session, and a session of this key with a problem is not
    among them (found by mutation testing: counted "= 1", or counting this
    key's sessions in place of the others, passed)."""
    ours = _session()
    ours[0]["events"][1]["details"] = {"note": "edited"}  # a problem in part 0
    other_key = b"another-servers-audit-key-012345"
    theirs = [*_session(key=other_key, sid="e" * 32), *_session(key=other_key, sid="f" * 32)]
    report = await _report(tmp_path, [*ours, *theirs], None)
    assert report.other_key_sessions == 2
    assert (SID, "changed", "seq 2: hash does not verify") in {
        (p.session_id, p.kind, p.detail) for p in report.problems}
    only_ours = await _report(tmp_path / "ours", ours, None)
    assert only_ours.other_key_sessions == 0 and not only_ours.ok

"""Review findings on the writer's cache of session heads (audit/store.py)."""

from __future__ import annotations

import sqlite3

import pytest

from audit.events import Draft
from audit.store import SCHEMA, Append, Limits, Writer


class Boom(BaseException):
    """Stands for a COMMIT that fails (disk full): the whole batch rolls back."""


def _writer(tmp_path, audit_key) -> Writer:
    conn = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    conn.executescript(SCHEMA)
    return Writer(conn, audit_key, Limits(500, 1 << 20), clock=lambda: 1_800_000_000.0)


def test_failed_batch_restores_heads_after_a_failed_job(tmp_path, audit_key):
    """A job that fails after touching a session puts back its snapshot; the
    batch's own undo must not be that same (live) object, or a later job of
    the batch advances it and a failed COMMIT "restores" a head with a
    ``seq`` and chain hash that were never committed (a gap in the session
    and a broken chain for every later event)."""
    w = _writer(tmp_path, audit_key)
    w.run_batch([lambda w: w.start_session("u", "user", 1e12, [], session_id="s1")])
    before = w.sessions["s1"].copy()

    def fails_after_append(w: Writer) -> None:
        w.append("s1", Draft("document.list"))
        raise RuntimeError("a job that fails after its append")

    def commit_fails(w: Writer) -> None:
        raise Boom()

    with pytest.raises(Boom):
        w.run_batch([fails_after_append, Append("s1", Draft("document.list")), commit_fails])
    after = w.sessions["s1"]
    assert (after.next_seq, after.head, after.uncut_count) == (
        before.next_seq, before.head, before.uncut_count)
    assert w.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
    # The next event continues the committed chain.
    [(ok, event)] = w.run_batch([Append("s1", Draft("document.list"))])
    assert ok and event["seq"] == 1

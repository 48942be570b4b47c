"""A sink switch together with an upgrade from a release that noted no
stretches of the security chain (or, for about ten minutes of history, noted
``security_taken`` as a bare hash), engine level, real SQLite and JSONL sinks.

Found by upgrading real data directories of earlier commits: after such an
upgrade with a switch to another sink (even with everything drained first,
as README says), verify on the new sink reported the chain's first event
there as "does not continue a security chain", and verify with the old
configuration said the old sink "lacks this server's newest security
events": exit 1 on both, for good, on data nobody touched.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3

import pytest
from test_sink_stretches import FLUSH, _failed_logins, _verify

from audit.config import Config
from audit.events import Draft, Source
from sinks.jsonl import JsonlSink
from sinks.sqlite import SqliteSink


def _as_earlier_release(config: Config, form: str) -> None:
    """Make the spool look as an earlier release left it after flushing.

    ``pre_stretch``: no sink_stretches table, no security_taken or
    security_stretch (releases before them); ``pre_where``: besides, a
    sink_status without ``where`` (releases before the sink-switch warning);
    ``bare_hash``: security_taken as the last hash taken (one build's form).
    """
    # What the server saved last (at shutdown, and every reaper round).
    status = {"type": "sqlite", "healthy": True, "last_error": None}
    if form != "pre_where":
        status["where"] = str(config.sqlite_sink_path)
    with contextlib.closing(sqlite3.connect(config.spool_path)) as c, c:
        c.execute("INSERT INTO meta (key, value) VALUES ('sink_status', ?)"
                  " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                  (json.dumps(status),))
        taken = json.loads(c.execute(
            "SELECT value FROM meta WHERE key = 'security_taken'").fetchone()[0])
        if form == "bare_hash":
            c.execute("UPDATE meta SET value = ? WHERE key = 'security_taken'", (taken[1],))
            return
        c.execute("DELETE FROM meta WHERE key IN ('security_taken', 'security_stretch')")
        c.execute("DROP TABLE sink_stretches")


@pytest.mark.parametrize("form", ["pre_stretch", "pre_where", "bare_hash"])
async def test_verify_is_clean_on_both_sinks_after_an_upgrade_with_a_switch(
    make_config, engines, audit_key, form
):
    a = make_config(flush=FLUSH)
    b = make_config(flush=FLUSH, sink={"type": "jsonl"})
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await _failed_logins(engines, engine, ["a0", "a1", "a2"])
    await engines.close(engine)
    _as_earlier_release(a, form)

    engine = await engines.open(b, JsonlSink(b.jsonl_dir))  # the upgrade, and a switch
    await _failed_logins(engines, engine, ["b0", "b1"])
    report = await _verify(engine, b, audit_key)
    assert report.ok, report.problems  # the new sink: b0 goes on from a2
    await engines.close(engine)

    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await engines.drain(engine)  # (the flusher opens the sink)
    report = await _verify(engine, a, audit_key)
    if form != "pre_where":  # (which sqlite file it was is not known then)
        assert report.ok, report.problems  # the old sink: its stretch is whole
    # Still held to its end, as far as the spool knows it: a2 removed is found.
    with contextlib.closing(sqlite3.connect(a.sqlite_sink_path)) as c, c:
        c.execute("DELETE FROM security_events WHERE rowid = 3")
    assert not (await _verify(engine, a, audit_key)).ok


async def test_unsent_events_at_the_upgrade_leave_the_start_unknown(
    make_config, engines, audit_key
):
    """With security events still unsent, where the old sink stopped is not
    known: no stretch is invented (the new sink's start stays unaccepted)."""
    a = make_config(flush=FLUSH)
    b = make_config(flush=FLUSH, sink={"type": "jsonl"})
    engine = await engines.open(a, SqliteSink(a.sqlite_sink_path))
    await _failed_logins(engines, engine, ["a0", "a1"])
    await engine.record_security(
        Draft("auth.login_failed", outcome="denied", source=Source(ip="10.0.0.1"),
              details={"username": "a2"}), happened=True)  # not drained
    await engines.close(engine)
    _as_earlier_release(a, "pre_stretch")
    with contextlib.closing(sqlite3.connect(a.spool_path)) as c:
        assert c.execute("SELECT COUNT(*) FROM security_events"
                         " WHERE state = 'pending'").fetchone()[0] == 1

    engine = await engines.open(b, JsonlSink(b.jsonl_dir))
    await _failed_logins(engines, engine, ["b0"])
    with contextlib.closing(sqlite3.connect(a.spool_path)) as c:
        assert c.execute("SELECT took_from FROM sink_stretches").fetchall() == [("",)]

"""The throttled log lines of a failing pass or commit: another cause of a
failure (a disk full, then a disk that cannot be opened: SQLite's codes) is
said at once, not taken for the one logged before."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from audit.logthrottle import FailingPass, LogThrottle
from audit.spool import SpoolUnavailable, resource_failure

log = logging.getLogger("session_audit.test_logthrottle")


def disk_full() -> SpoolUnavailable:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("PRAGMA max_page_count = 2")
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.Error as exc:
        failure = resource_failure(exc)
        assert failure is not None
        return failure
    finally:
        conn.close()
    raise AssertionError("no SQLITE_FULL")


def cannot_open(tmp_path: object) -> SpoolUnavailable:
    try:
        sqlite3.connect(f"{tmp_path}/gone/spool.db").execute("SELECT 1")
    except sqlite3.Error as exc:
        failure = resource_failure(exc)
        assert failure is not None
        return failure
    raise AssertionError("no SQLITE_CANTOPEN")


def test_a_pass_failing_of_another_cause_says_it_at_once_with_its_words(
        tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    """Both failures are SpoolUnavailable: keyed by the type alone, the
    second cause was left out for the minute, then said as "failed again:
    SpoolUnavailable, as logged before": its words never in the log while
    the pass kept failing."""
    now = [1000.0]
    said = FailingPass(log, "the pass", LogThrottle(clock=lambda: now[0]))
    full, gone = disk_full(), cannot_open(tmp_path)
    assert type(full) is type(gone)
    with caplog.at_level(logging.WARNING, logger=log.name):
        said.failed(full)
        now[0] += 1
        said.failed(full)  # the same cause: left out
        now[0] += 1
        said.failed(gone)  # another: said at once, with its traceback
        now[0] += 1
        said.failed(gone)
        said.failed(full)
    lines = [r for r in caplog.records if r.name == log.name]
    assert [r.getMessage() for r in lines] == ["the pass failed"] * 2
    assert [str(r.exc_info[1]) for r in lines if r.exc_info] == [str(full), str(gone)]
    assert "unable to open" in str(gone)
    now[0] += 60  # a minute later: each cause's repeats are counted on their own
    with caplog.at_level(logging.WARNING, logger=log.name):
        said.failed(gone)
    assert lines[-1] is not caplog.records[-1]
    assert caplog.records[-1].getMessage().startswith(
        "the pass failed again, 6 times in a row: SpoolUnavailable (SQLITE_CANTOPEN),"
        " as logged before (1 more like it")


def test_a_failing_pass_says_each_run_in_full_its_end_and_its_counts(
        caplog: pytest.LogCaptureFixture) -> None:
    """A run's first failure with its traceback (again after a run that was
    said ended), its end only if it was said, the counts of the run."""
    now = [1000.0]
    said = FailingPass(log, "the pass", LogThrottle(clock=lambda: now[0]))
    boom = RuntimeError("boom")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(3):
            said.failed(boom)
        said.succeeded()
        now[0] += 1  # a run within the minute: left out, and its end too
        said.failed(boom)
        said.succeeded()
        now[0] += 60  # a run a minute later: in full again, counted from one
        said.failed(boom)
        said.failed(boom)
        now[0] += 61
        said.failed(boom)
        said.succeeded()
    lines = [r for r in caplog.records if r.name == log.name]
    assert [(r.getMessage(), r.exc_info is not None) for r in lines] == [
        ("the pass failed", True),
        ("the pass succeeds again, after 3 failed passes", False),
        ("the pass failed", True),
        ("the pass failed again, 3 times in a row: RuntimeError, as logged before"
         " (1 more like it since the last such line)", False),
        ("the pass succeeds again, after 3 failed passes", False),
    ]


def test_due_is_the_time_left_of_the_minute_and_never_below_nothing() -> None:
    """The spool waits ``due`` before it says a failure left out, and says
    it only once ``due`` is nothing: a time past the minute is 0.0."""
    now = [1000.0]
    throttle = LogThrottle(clock=lambda: now[0])
    assert throttle.due("k") == 0.0  # never said
    assert throttle.allow("k") == 0
    now[0] += 10
    assert throttle.due("k") == 50.0
    now[0] += 100
    assert throttle.due("k") == 0.0

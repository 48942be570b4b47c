"""SQLite connections a test opens by hand, closed at the test's end by
conftest's autouse fixture: Python 3.13 warns (ResourceWarning) of a
connection left to the garbage collector, in whichever test collects it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

_OPENED: list[sqlite3.Connection] = []


def connect(path: str | Path) -> sqlite3.Connection:
    """``sqlite3.connect(path, isolation_level=None)``, closed after the test."""
    conn = sqlite3.connect(path, isolation_level=None)
    _OPENED.append(conn)
    return conn


def close_all() -> None:
    while _OPENED:
        _OPENED.pop().close()

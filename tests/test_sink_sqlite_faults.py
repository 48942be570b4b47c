"""The sqlite sink's answers when the file, not the document, is at fault."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from receiver import sample_part

from sinks.base import SinkRejected, SinkUnavailable
from sinks.sqlite import SqliteSink


async def test_a_corrupt_sink_file_is_unavailable_not_a_dead_letter_per_write(
    tmp_path: Path,
) -> None:
    """SQLITE_CORRUPT is a plain sqlite3.DatabaseError, which the sink took
    for a refusal of the document: the flusher dead-lettered every part and
    security event, one after another, until an operator repaired the file."""
    path = tmp_path / "audit.db"
    sink = SqliteSink(path)
    await sink.open()
    for i in range(300):  # pages enough that one in the middle is a table's
        await sink.write_part(sample_part(f"s{i}"))
    await sink.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = 4096
    with path.open("r+b") as f:
        f.seek(3 * page)
        f.write(b"\xff" * page)
    sink = SqliteSink(path)
    await sink.open()
    try:
        with pytest.raises(SinkUnavailable, match="malformed"):
            await sink.write_part(sample_part("new"))
    finally:
        await sink.close()


async def test_what_is_wrong_with_the_document_is_still_rejected(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "audit.db")
    await sink.open()
    try:
        part = sample_part("s1")
        part["session_id"] = None  # NOT NULL: IntegrityError
        with pytest.raises(SinkRejected):
            await sink.write_part(part)
        part = sample_part("s2")
        part["user"] = {"not": "bindable"}  # ProgrammingError
        with pytest.raises(SinkRejected):
            await sink.write_part(part)
    finally:
        await sink.close()

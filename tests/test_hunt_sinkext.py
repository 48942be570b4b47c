"""The sinks while something outside the server interferes with them (found
by a hunt that ran the server beside other processes touching its sink):
a sink file whose tables another program made or someone changed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from receiver import sample_part, sample_security_event

from sinks.base import SinkUnavailable
from sinks.sqlite import SqliteSink

_COLUMNS = ("id TEXT PRIMARY KEY, session_id TEXT, part INTEGER, user TEXT,"
            " session_start_time TEXT, final INTEGER, hash TEXT, doc TEXT")


@pytest.mark.parametrize(("schema", "said"), [
    # Another program's table of that name: a column the sink does not fill.
    (f"CREATE TABLE parts ({_COLUMNS}, tenant TEXT NOT NULL)", "tenant must be filled"),
    (f"CREATE TABLE parts ({_COLUMNS.replace('doc TEXT', 'body TEXT')})", "lacks the column"),
    # Constraints the sink never made: each fails every row alike.
    (f"CREATE TABLE parts ({_COLUMNS.replace('id TEXT', 'id INTEGER')})", "datatype mismatch"),
    (f"CREATE TABLE parts ({_COLUMNS}, CHECK (part > 5))", "CHECK constraint failed"),
    (f"CREATE TABLE parts ({_COLUMNS}); CREATE TRIGGER no_insert BEFORE INSERT ON parts"
     " BEGIN SELECT RAISE(ABORT, 'an archive: read only'); END", "an archive: read only"),
    (f"CREATE TABLE parts ({_COLUMNS}); CREATE UNIQUE INDEX one_a_user ON parts (user)",
     "UNIQUE constraint failed"),
])
async def test_a_sink_table_that_is_not_the_sinks_own_is_unavailable_not_a_dead_letter(
    tmp_path: Path, schema: str, said: str,
) -> None:
    """Every row such a table refused was an IntegrityError, which the sink
    took for the verdict on the document: the flusher dead-lettered every
    part in turn (``NOT NULL constraint failed: parts.tenant``), each one
    needing ``retry-dead`` once the file was mended. It is the file's
    trouble: unavailable, retried, nothing dead-lettered; a table that
    cannot take the sink's rows at all is named at open."""
    path = tmp_path / "audit.db"
    with sqlite3.connect(path) as db:
        db.executescript(schema)
    sink = SqliteSink(path)
    try:
        with pytest.raises(SinkUnavailable, match=said):
            await sink.open()
            await sink.write_part(sample_part("s1"))  # stored once, the second refused
            await sink.write_part(sample_part("s2"))
    finally:
        await sink.close()
    with sqlite3.connect(path) as db:  # mended: the same file takes the parts
        db.executescript("DROP TABLE parts")
    sink = SqliteSink(path)
    await sink.open()
    try:
        await sink.write_part(sample_part("s2"))
        assert [p["_id"] for p in await sink.get_session_parts("s2")] == ["s2:0"]
    finally:
        await sink.close()


async def test_a_security_events_table_of_another_shape_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE security_events (id TEXT PRIMARY KEY, ts TEXT, action TEXT,"
                   " hash TEXT, doc TEXT, source TEXT NOT NULL)")
    sink = SqliteSink(path)
    try:
        with pytest.raises(SinkUnavailable, match="source must be filled"):
            await sink.open()
    finally:
        await sink.close()


async def test_a_table_with_a_column_of_its_own_that_may_be_left_empty_takes_the_rows(
    tmp_path: Path,
) -> None:
    """An operator's own column (nullable, or with a default) is no reason to stop."""
    path = tmp_path / "audit.db"
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE parts ({_COLUMNS}, note TEXT,"
                   " checked INTEGER NOT NULL DEFAULT 0)")
    sink = SqliteSink(path)
    await sink.open()
    try:
        await sink.write_part(sample_part("s1"))
        await sink.write_security_events([sample_security_event("e1")])
        assert [p["_id"] for p in await sink.get_session_parts("s1")] == ["s1:0"]
    finally:
        await sink.close()

"""Review findings: the data files hold password hashes, documents and the
audit trail; they are the owner's only, even in a data_dir that existed
before with a looser mode."""

from __future__ import annotations

import os
import stat

from audit.events import Source
from sinks.jsonl import JsonlSink


def _private(path) -> bool:
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


async def test_spool_and_sink_files_are_private(make_config, engines, tmp_path):
    config = make_config()
    config.data_dir.mkdir(mode=0o755, parents=True)
    os.chmod(config.data_dir, 0o755)
    old = os.umask(0o022)
    try:
        engine = await engines.open(config)
        src = Source(user="alice", role="user")
        s = await engine.start_session("alice", "user", src, 3600)
        await engine.end_session(s.session_id, src)
        await engines.drain(engine)
        jsonl = JsonlSink(config.jsonl_dir)
        await jsonl.open()
        await jsonl.write_security_events([{"_id": "e1", "hash": "h", "ts": "t"}])
        await jsonl.close()
    finally:
        os.umask(old)
    assert _private(config.spool_path)
    assert _private(str(config.spool_path) + "-wal")
    assert _private(config.sqlite_sink_path)
    files = list(config.jsonl_dir.glob("audit-*.jsonl"))
    assert files and all(_private(p) for p in files)


async def test_directories_made_under_umask_000_are_the_owners_only(make_config, engines,
                                                                  tmp_path):
    """Under ``umask 000``, ``mkdir(parents=True)`` makes 0777 directories: any
    local user could then swap the day files, or plant a data directory with
    its own jwt.key. Every level the server creates is 0700."""
    config = make_config(server={"data_dir": str(tmp_path / "a" / "b" / "data")},
                         sink={"sqlite": {"path": str(tmp_path / "s1" / "s2" / "audit.db")}})
    old = os.umask(0)
    try:
        engine = await engines.open(config)
        await engines.drain(engine)
        jsonl = JsonlSink(tmp_path / "j1" / "j2" / "jsonl")
        await jsonl.open()
        await jsonl.write_security_events([{"_id": "e1", "hash": "h", "ts": "t"}])
        await jsonl.close()
    finally:
        os.umask(old)
    for d in ("a", "a/b", "a/b/data", "s1", "s1/s2", "j1", "j1/j2", "j1/j2/jsonl"):
        assert stat.S_IMODE(os.stat(tmp_path / d).st_mode) == 0o700, d


async def test_a_sink_directory_others_may_write_is_refused(tmp_path):
    import pytest

    from sinks.base import SinkUnavailable
    from sinks.sqlite import SqliteSink

    for d in ("jsonl", "sqlite"):
        (tmp_path / d).mkdir()
        os.chmod(tmp_path / d, 0o777)
    with pytest.raises(SinkUnavailable, match="writable by every user"):
        await JsonlSink(tmp_path / "jsonl").open()
    with pytest.raises(SinkUnavailable, match="writable by every user"):
        await SqliteSink(tmp_path / "sqlite" / "audit.db").open()
    assert list((tmp_path / "jsonl").iterdir()) == []
    assert list((tmp_path / "sqlite").iterdir()) == []
    # The mode as ls would show it: a sticky /tmp-like directory's too.
    (tmp_path / "sticky").mkdir()
    os.chmod(tmp_path / "sticky", 0o1777)
    with pytest.raises(SinkUnavailable, match=r"\(mode 1777\)"):
        await JsonlSink(tmp_path / "sticky").open()
    # Group write (a umask of 002 made it so) is a warning, not a refusal.
    (tmp_path / "group").mkdir()
    os.chmod(tmp_path / "group", 0o770)
    sink = JsonlSink(tmp_path / "group")
    await sink.open()
    await sink.close()


async def test_a_jsonl_day_file_replaced_by_a_symlink_is_not_followed(tmp_path):
    from sinks.base import SinkUnavailable

    jsonl = JsonlSink(tmp_path / "jsonl", clock=lambda: 1_795_000_000.0)
    await jsonl.open()
    await jsonl.write_security_events([{"_id": "e1", "hash": "h", "ts": "t"}])
    await jsonl.close()
    (day,) = (tmp_path / "jsonl").glob("audit-*.jsonl")
    victim = tmp_path / "victim"
    victim.write_text("")
    day.rename(tmp_path / "jsonl" / "moved")
    day.symlink_to(victim)
    again = JsonlSink(tmp_path / "jsonl", clock=lambda: 1_795_000_000.0)
    try:
        await again.open()
        await again.write_security_events([{"_id": "e2", "hash": "h2", "ts": "t"}])
    except (SinkUnavailable, OSError):
        pass  # refused: what matters is where nothing was written
    finally:
        await again.close()
    assert victim.read_text() == ""

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

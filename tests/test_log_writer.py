"""A stalled reader of stderr does not stop the server (real pipes, a real
server subprocess): its log lines are written by a thread of their own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import aiohttp
import pytest
from live_server import SERVER, Live, server_env

from audit import logwriter
from audit.logwriter import BackgroundStderr
from server import JsonFormatter

pytestmark = pytest.mark.timeout(120)


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("session_audit", logging.INFO, __file__, 0, msg, None, None)


def _read_all(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 65536):
        into += chunk


def test_lines_past_the_queue_of_a_stalled_reader_are_dropped_and_counted() -> None:
    r, w = os.pipe()
    stream = os.fdopen(w, "w", encoding="utf-8")
    handler = BackgroundStderr(stream, max_lines=50)
    handler.setFormatter(JsonFormatter())
    try:
        # Nobody reads: the pipe (64 KiB) fills, then the queue; emit never blocks.
        # (780 KB of lines: some are dropped, counted in a line of their own.)
        for i in range(3000):
            handler.emit(_record(f"line {i} " + "x" * 200))
        got = bytearray()
        reader = threading.Thread(target=_read_all, args=(r, got))
        reader.start()
        handler.emit(_record("after"))
        handler.close()
        stream.close()
        reader.join(10)
    finally:
        with contextlib.suppress(OSError):
            os.close(r)
    lines = [json.loads(line) for line in got.decode().splitlines()]
    written = [x["msg"] for x in lines if x["msg"].startswith("line ")]
    notes = [x for x in lines if "log lines dropped" in x["msg"]]
    assert notes and all(x["level"] == "warning" for x in notes)
    # Every line is written or counted, in order; none twice.
    assert len(written) + sum(int(x["msg"].split()[0]) for x in notes) == 3000 + (
        lines[-1]["msg"] != "after")
    numbers = [int(m.split()[1]) for m in written]
    assert numbers == sorted(set(numbers))


def test_close_writes_what_is_queued() -> None:
    r, w = os.pipe()
    stream = os.fdopen(w, "w", encoding="utf-8")
    handler = BackgroundStderr(stream)
    handler.setFormatter(JsonFormatter())
    got = bytearray()
    reader = threading.Thread(target=_read_all, args=(r, got))
    reader.start()
    for i in range(100):
        handler.emit(_record(f"line {i}"))
    handler.close()
    assert not handler._thread.is_alive()  # (it ended: close did not wait out its time)
    stream.close()
    reader.join(10)
    os.close(r)
    assert [json.loads(x)["msg"] for x in got.decode().splitlines()] == [
        f"line {i}" for i in range(100)]


def test_flush_returns_once_the_lines_queued_are_written_and_lines_go_on(
        tmp_path: Path) -> None:
    # A command's last line, flushed before it exits; and the lines after a
    # flush are written as before (a flush is not the end).
    with open(tmp_path / "stderr", "w", encoding="utf-8") as stream:
        handler = BackgroundStderr(stream)
        handler.setFormatter(JsonFormatter())
        for i in range(10):
            handler.emit(_record(f"line {i}"))
        handler.flush()
        lines = (tmp_path / "stderr").read_text().splitlines()
        assert [json.loads(x)["msg"] for x in lines] == [f"line {i}" for i in range(10)]
        handler.emit(_record("after the flush"))
        handler.close()
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert [json.loads(x)["msg"] for x in lines][10:] == ["after the flush"]


def _exit_time(handler: BackgroundStderr) -> float:
    """How long an exit's logging.shutdown takes with it: a flush, then close."""
    started = time.monotonic()
    handler.flush()
    handler.close()
    return time.monotonic() - started


def _unblock(handler: BackgroundStderr, r: int, stream: IO[str]) -> None:
    """The stalled reader goes: the writer's blocked write fails, and it
    ends (at the end mark, which close no longer waited for)."""
    os.close(r)
    handler._lines.put(None)
    handler._thread.join(10)
    with contextlib.suppress(OSError):
        stream.close()


def test_exit_waits_once_for_a_reader_that_never_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    # logging.shutdown at exit flushes, then closes (which flushed again, and
    # joined the thread): each waited FLUSH_SECONDS for the same stalled
    # reader, a server's exit 6 s where README says 2.
    monkeypatch.setattr(logwriter, "FLUSH_SECONDS", 1.0)
    r, w = os.pipe()
    stream = os.fdopen(w, "w", encoding="utf-8")
    handler = BackgroundStderr(stream)
    handler.setFormatter(JsonFormatter())
    try:
        for i in range(100):  # 200 KB: the pipe is full, the writer blocked
            handler.emit(_record(f"line {i} " + "x" * 2000))
        waited = _exit_time(handler)
    finally:
        _unblock(handler, r, stream)
    assert waited < 2 * logwriter.FLUSH_SECONDS, waited


@pytest.mark.timeout(20)
def test_exit_waits_once_with_the_queue_of_a_stalled_reader_full(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As above, with the queue full too (the reader stalled long ago): the
    # flush cannot queue its mark, waits FLUSH_SECONDS for room, and no
    # later flush or close waits again.
    monkeypatch.setattr(logwriter, "FLUSH_SECONDS", 1.0)
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:  # the pipe full: the writer's first write blocks
            os.write(w, b"x" * 65536)
    os.set_blocking(w, True)
    stream = os.fdopen(w, "w", encoding="utf-8")
    handler = BackgroundStderr(stream, max_lines=10)
    handler.setFormatter(JsonFormatter())
    try:
        for i in range(5000):  # (a line every ms: the queue fills once the writer blocked)
            handler.emit(_record(f"line {i}"))
            if handler.dropped:
                break
            time.sleep(0.001)
        assert handler.dropped
        waited = _exit_time(handler)
    finally:
        _unblock(handler, r, stream)
    assert waited < 2 * logwriter.FLUSH_SECONDS, waited


def _serve_with_stderr_piped(live: Live) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(SERVER), "serve", "--config", str(live.config_path)],
        cwd=live.workdir, env={**server_env(), "SESSION_AUDIT_LOG_LEVEL": "info"},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_a_server_whose_stderr_nobody_reads_goes_on_serving(tmp_path: Path) -> None:
    """`serve 2>&1 | sleep 600`, a stalled log shipper: the access log's line
    a request filled the pipe after some 400 requests, and every request,
    /healthz included, then hung on the event loop's blocked write."""
    live = Live(tmp_path)
    proc = live.proc = _serve_with_stderr_piped(live)
    try:
        await live.wait_healthy()
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(3000):  # ≈ 150 bytes of access log each: 450 KB
                async with http.get(live.base + "/healthz") as resp:
                    assert resp.status == 200
        # The reader comes back: every line is there, and the server stops cleanly.
        proc.send_signal(15)
        assert proc.stderr is not None
        err = await asyncio.to_thread(proc.stderr.read)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        live.close()
        if proc.stderr is not None:
            proc.stderr.close()
    lines = [json.loads(line) for line in err.decode().splitlines()]
    assert sum('"GET /healthz"' in x["msg"] for x in lines) >= 3000, err[-3000:]
    assert not any("log lines dropped" in x["msg"] for x in lines)

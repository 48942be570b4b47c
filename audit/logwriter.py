"""``serve``'s log lines, written to stderr by a thread of their own.

A write to stderr blocks once its reader stops reading: a pipe to a log
shipper that stalls, ``docker logs``' driver or journald under load, a
``serve | sleep`` in a script. Written from the event loop (one access-log
line a request), that stopped the whole server after some 64 KiB: every
request, the flusher, ``/healthz``. The loop now only formats a line and
queues it; a thread writes what is queued, a batch at a time. Past
``max_lines`` waiting (the reader stalled), lines are dropped and counted,
and the first line written once the reader reads again says how many.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import IO

# Lines that may wait for a stalled stderr (some 2 to 3 MB of them).
MAX_LINES = 10_000
# After a line comes, the writer waits this long for more, to write them
# together (one wake-up of its thread per batch, not per line under load).
BATCH_SECONDS = 0.005
# At exit (logging.shutdown): how long the lines still queued may take.
FLUSH_SECONDS = 2.0

_Item = str | threading.Event | None


class BackgroundStderr(logging.Handler):
    def __init__(self, stream: IO[str], max_lines: int = MAX_LINES) -> None:
        super().__init__()
        self.stream = stream
        self._lines: queue.Queue[_Item] = queue.Queue(max_lines)
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        self._gave_up = False  # a flush waited for a stalled reader in vain
        self._thread = threading.Thread(target=self._run, name="session-audit-log",
                                        daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            with self._dropped_lock:
                self._dropped += 1

    @property
    def dropped(self) -> int:
        """Lines dropped and not yet reported."""
        with self._dropped_lock:
            return self._dropped

    def _take_dropped(self) -> int:
        with self._dropped_lock:
            n, self._dropped = self._dropped, 0
            return n

    def _dropped_line(self, n: int) -> str:
        record = logging.LogRecord(
            "session_audit", logging.WARNING, __file__, 0,
            "%d log lines dropped: stderr was not read (its reader stalled) while %d"
            " waited", (n, self._lines.maxsize), None)
        return self.format(record)

    def _run(self) -> None:
        while True:
            item = self._lines.get()
            if isinstance(item, str):
                time.sleep(BATCH_SECONDS)
            batch: list[str] = []
            done: list[threading.Event] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    done.append(item)
                else:
                    batch.append(item)
                try:
                    item = self._lines.get_nowait()
                except queue.Empty:
                    break
            dropped = self._take_dropped()
            if dropped:
                batch.insert(0, self._dropped_line(dropped))
            if batch:
                self._write("\n".join(batch) + "\n")
            for event in done:
                event.set()
            if stop:
                return

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or gone: as a failed log line, nothing is raised

    def flush(self) -> None:
        """Wait (up to :data:`FLUSH_SECONDS`) for the lines queued so far.
        Once such a wait ran out (the reader stalled), no later one waits:
        at exit, a command's last line, ``logging.shutdown``'s flush and its
        close each waited again for the same stalled reader (6 s, not 2)."""
        if not self._thread.is_alive() or self._gave_up:
            return
        deadline = time.monotonic() + FLUSH_SECONDS
        written = threading.Event()
        try:
            self._lines.put(written, timeout=FLUSH_SECONDS)
        except queue.Full:
            self._gave_up = True
            return
        if not written.wait(max(0.0, deadline - time.monotonic())):
            self._gave_up = True

    def close(self) -> None:
        self.flush()
        if not self._gave_up:
            try:
                self._lines.put_nowait(None)
            except queue.Full:
                pass
            else:
                self._thread.join(FLUSH_SECONDS)
        super().close()

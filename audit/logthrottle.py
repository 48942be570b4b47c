"""Log lines that would repeat on every request, commit or write while one
cause lasts (a full disk, a rate-limited sink): the first one goes out, then
at most one a :attr:`LogThrottle.every` seconds per key, saying how many were
left out meanwhile."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable

LOG_EVERY_SECONDS = 60.0


class LogThrottle:
    def __init__(self, every: float = LOG_EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to leave this line out; else how many of ``key`` were left
        out since the last one logged (the caller says so in the line)."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._left_out.pop(key, 0)

    def due(self, key: str) -> float:
        """Seconds before a line of ``key`` may go out (0.0: now)."""
        last = self._last.get(key)
        return 0.0 if last is None else max(0.0, last + self.every - self.clock())

    def reset(self, key: str | None = None) -> None:
        """Forget ``key`` (every key if None): its next line goes out at once
        (the cause ended; its own "succeed again" line says so)."""
        for k in list(self._last) if key is None else [key]:
            self._last.pop(k, None)
            self._left_out.pop(k, None)


def more(n: int) -> str:
    """`` (N more like it in the last minute)`` for a count left out, else ``""``."""
    return f" ({n} more like it since the last such line)" if n else ""


def failure_kind(exc: BaseException) -> str:
    """``exc``'s type, and for a SQLite error (``exc`` or its cause) its
    code: ``SpoolUnavailable (SQLITE_FULL)``. A disk full and then a disk
    failing are two causes, each logged at once (keyed by the type alone,
    the second was left out as the first one's repeat). A bounded set."""
    kind = type(exc).__name__
    for e in (exc, exc.__cause__):  # (the cause: SpoolUnavailable, TransactionLost)
        code = getattr(e, "sqlite_errorname", None) if isinstance(e, sqlite3.Error) else None
        if code:
            return f"{kind} ({code})"
    return kind


class FailingPass:
    """A pass that runs again on a timer (the reaper's hooks, the check for
    revoked sessions) and fails on each while one cause lasts (a damaged
    spool): its first failure of a kind is logged with its traceback, the
    repeats at most once a :attr:`LogThrottle.every` seconds in one line
    that counts them, and a line says when a pass succeeds again after
    failures that were logged. Logged in full every second, the same
    traceback filled an operator's log. (A pass failing and succeeding by
    turns logs no more: its "succeeds again" started the minute over, and
    each turn logged a traceback and that line.)"""

    def __init__(self, logger: logging.Logger, what: str,
                 throttle: LogThrottle | None = None) -> None:
        self.logger = logger
        self.what = what
        self.throttle = throttle or LogThrottle()
        self.failures = 0  # in a row
        self._told: set[str] = set()  # kinds logged with their traceback this time
        self._said = False  # a failure of this run was logged: its end is too

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        kind = failure_kind(exc)  # (a bounded set of keys)
        left_out = self.throttle.allow(kind)
        if left_out is None:
            return
        self._said = True
        if kind not in self._told:
            self._told.add(kind)
            self.logger.error("%s failed", self.what, exc_info=exc)
        else:  # (not its words: the first line had them, and a damaged text's may be in them)
            self.logger.error("%s failed again, %d times in a row: %s, as logged before%s",
                              self.what, self.failures, kind, more(left_out))

    def succeeded(self) -> None:
        if not self.failures:
            return
        if self._said:  # (the throttle's minute is not started over)
            self.logger.warning("%s succeeds again, after %d failed passes", self.what,
                                self.failures)
            self._told.clear()
        self.failures = 0
        self._said = False

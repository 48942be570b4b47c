"""Log lines that would repeat on every request, commit or write while one
cause lasts (a full disk, a rate-limited sink): the first one goes out, then
at most one a :attr:`LogThrottle.every` seconds per key, saying how many were
left out meanwhile."""

from __future__ import annotations

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

    def reset(self, key: str | None = None) -> None:
        """Forget ``key`` (every key if None): its next line goes out at once
        (the cause ended; its own "succeed again" line says so)."""
        for k in list(self._last) if key is None else [key]:
            self._last.pop(k, None)
            self._left_out.pop(k, None)


def more(n: int) -> str:
    """`` (N more like it in the last minute)`` for a count left out, else ``""``."""
    return f" ({n} more like it since the last such line)" if n else ""

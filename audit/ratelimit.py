"""Pure rate-limit arithmetic with an injectable clock: token bucket and backoff."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

# Refill arithmetic on float clocks can leave 0.9999999999 of a token and ask
# for a wait below the clock's resolution; such a token counts as whole.
_EPSILON = 1e-9


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now

    def delay(self) -> float:
        """Seconds until one token is available (0 when one is there now)."""
        self._refill()
        if self.tokens >= 1.0 - _EPSILON:
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def try_take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0 - _EPSILON:
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False


def backoff_delay(
    attempt: int,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with full jitter, kept within ``[base, cap]``.

    ``attempt`` counts consecutive failures from 1. The ceiling doubles from
    ``base`` up to ``cap``, and the delay is drawn uniformly below it (full
    jitter, so many servers recovering together do not retry in step); it
    never drops below ``base``.
    """
    if attempt < 1:
        return 0.0
    ceiling = min(cap, base * (2.0 ** min(attempt - 1, 60)))
    return max(base, ceiling * rand())


MAX_HINT = 300.0


class Backoff:
    """Consecutive-failure state shared by every kind of sink write.

    A rate-limit answer pauses *all* sending until ``until``: the larger of
    the sink's hint and the jittered backoff.
    """

    def __init__(
        self,
        base: float,
        cap: float,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.base = base
        self.cap = cap
        self.clock = clock
        self.rand = rand
        self.attempt = 0
        self.until = 0.0

    def failed(self, hint: float | None = None) -> float:
        """Record a failure; returns the pause in seconds."""
        self.attempt += 1
        pause = backoff_delay(self.attempt, self.base, self.cap, self.rand)
        if hint is not None and hint > pause:
            # A hint is honoured up to MAX_HINT (or the backoff cap if larger):
            # a receiver asking for a day's silence must not stall the trail.
            pause = min(hint, max(self.cap, MAX_HINT))
        self.until = max(self.until, self.clock() + pause)
        return pause

    def succeeded(self) -> None:
        self.attempt = 0

    def remaining(self) -> float:
        return max(0.0, self.until - self.clock())

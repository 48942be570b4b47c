"""Pure rate-limit arithmetic with an injectable clock: token bucket, backoff,
and the flood guard on security events."""

from __future__ import annotations

import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

# Refill arithmetic on float clocks can leave 0.9999999999 of a token and ask
# for a wait below the clock's resolution; such a token counts as whole.
_EPSILON = 1e-9


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full (or
    goes on from another process's level: :meth:`resume`)."""

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

    def level(self) -> float:
        """The tokens there now (what :meth:`resume` goes on from)."""
        self._refill()
        return self.tokens

    def resume(self, tokens: float, elapsed: float, in_flight: bool = True) -> None:
        """Go on from the level another process (an earlier run) saw
        ``elapsed`` seconds ago, ``tokens``, refilled since. With
        ``in_flight``, one token more counts as taken, just now: a write that
        run may have sent after it saved, whose outcome it never saved (killed
        between the two), at a moment not known. A negative ``elapsed`` (the
        wall clock stepped back) refills nothing. The level never rises above
        what the bucket holds, nor falls below empty: the first write waits
        ``1 / rate`` at most."""
        level = min(self.burst, max(0.0, tokens) + max(0.0, elapsed) * self.rate)
        if in_flight:
            level -= 1.0
        self._refill()
        self.tokens = min(self.tokens, max(0.0, level))


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


def client_key(ip: str | None) -> str:
    """The key a client address is budgeted under: IPv4 as it is, IPv6 by
    its /64 (one host is usually given a whole /64: a budget per address
    would give it as many budgets as it likes)."""
    if not ip:
        return "-"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return ip


class FloodGuard:
    """How many security events a client IP may have recorded one by one.

    Every client IP (an IPv6 one by its /64, :func:`client_key`) has a
    token bucket (``rate`` a second, ``burst`` saved up) and all of them
    share one more, ten times as large: an event within
    both budgets is recorded as it comes; past them it is counted instead,
    per (IP, action), with up to ``MAX_USERS`` of the usernames and session
    ids it named (and whether there were more), and a count per
    ``details.reason``; :meth:`take_summaries` hands the counts out, to be
    recorded as one summary event each. A flood of bad tokens or failed
    logins cannot fill the spool and the sink one event a request, and what
    it did is still on the record, counted.

    Memory is bounded: at most ``MAX_KEYS`` buckets and ``MAX_KEYS`` counts
    (past that, counts go under the IP ``"*"``). A client quiet for
    ``burst / rate`` seconds has its whole budget back, the bucket a new
    client gets: such buckets are forgotten at every event (they are the
    least recently seen, at the front), so the table holds the clients of
    the last few seconds, not every address ever seen up to ``MAX_KEYS``;
    past ``MAX_KEYS`` the least recently seen go.
    """

    MAX_KEYS = 10_000
    MAX_USERS = 20
    MANY = "*"

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._all = TokenBucket(10 * rate, 10 * burst, clock)
        self._counts: dict[tuple[str, str], Counted] = {}
        self.suppressed = 0

    def admit(
        self, ip: str | None, action: str, wall: float,
        user: str | None = None, session_id: str | None = None, reason: str | None = None,
    ) -> bool:
        """True: record this event now; False: it has been counted."""
        key = ip or "-"
        budget = client_key(ip)
        self._forget_refilled()
        bucket = self._buckets.get(budget)
        if bucket is None:
            bucket = self._buckets[budget] = TokenBucket(self.rate, self.burst, self.clock)
            while len(self._buckets) > self.MAX_KEYS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(budget)
        if bucket.try_take():
            if self._all.try_take():
                return True
            bucket.tokens = min(bucket.burst, bucket.tokens + 1.0)  # not spent after all
        entry = self._entry(budget, key, action, wall)
        entry.add(wall, user, session_id, self.MAX_USERS, reason, key)
        self.suppressed += 1
        return False

    def _forget_refilled(self) -> None:
        """Drop the buckets untouched for ``burst / rate`` seconds: full again.
        Each event moves its bucket to the end and refills it (``updated`` is
        then its time), so the oldest are at the front."""
        buckets = self._buckets
        cutoff = self.clock() - self.burst / self.rate
        while buckets:
            if next(iter(buckets.values())).updated > cutoff:
                return
            buckets.popitem(last=False)

    def _entry(self, budget: str, ip: str, action: str, wall: float) -> Counted:
        """The count of (``budget``, action), ``ip`` the first address counted
        under it; past ``MAX_KEYS`` counts, of ("*", action). Counted by the
        budget's key, as the buckets are: one host's /64 is one count, not one
        an address (which would fill the table, and every other client's
        counts would go under "*")."""
        key = (budget, action)
        if key not in self._counts and len(self._counts) >= self.MAX_KEYS:
            key = (self.MANY, action)
            ip = self.MANY
        entry = self._counts.get(key)
        if entry is None:
            entry = self._counts[key] = Counted(ip, action, 0, wall, wall, budget=key[0])
        return entry

    def take_summaries(self) -> list[Counted]:
        """What was counted since the last call, one per (IP, action), oldest
        first; the counts start again from zero."""
        counts, self._counts = self._counts, {}
        return sorted(counts.values(), key=lambda c: c.first)

    def restore(self, summaries: list[Counted]) -> None:
        """Put back summaries that could not be recorded (the spool refused)."""
        for old in summaries:
            entry = self._entry(old.budget, old.ip, old.action, old.first)
            entry.merge(old, self.MAX_USERS)


@dataclass
class Counted:
    """Security events of one client IP (an IPv6 one by its /64) and action
    counted, not recorded. ``ip`` is the first address counted, ``budget``
    the key they were counted under (the /64, or the address itself)."""

    ip: str
    action: str
    count: int
    first: float
    last: float
    budget: str = ""
    # The client addresses counted (up to ``most``): the many of one /64.
    addresses: set[str] = field(default_factory=set)
    more_addresses: bool = False
    users: set[str] = field(default_factory=set)
    more_users: bool = False
    sessions: set[str] = field(default_factory=set)
    more_sessions: bool = False
    # details.reason -> count: what the events were (a right password of a
    # disabled account, a token of another algorithm), which the summary's
    # own reason ("over_budget") would otherwise hide. Reasons are the
    # server's own words, a handful; past ``most`` of them, under "other".
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, wall: float, user: str | None, session_id: str | None, most: int,
            reason: str | None = None, ip: str | None = None) -> None:
        self.count += 1
        if ip is not None and ip != "-" and _left_out(self.addresses, {ip}, most):
            self.more_addresses = True
        self.first = min(self.first, wall)
        self.last = max(self.last, wall)
        if user is not None and _left_out(self.users, {user}, most):
            self.more_users = True
        if session_id is not None and _left_out(self.sessions, {session_id}, most):
            self.more_sessions = True
        self._reason(reason or "-", 1, most)

    def _reason(self, reason: str, n: int, most: int) -> None:
        if reason not in self.reasons and len(self.reasons) >= most:
            reason = "other"
        self.reasons[reason] = self.reasons.get(reason, 0) + n

    def merge(self, other: Counted, most: int) -> None:
        if self is other:
            return
        self.count += other.count
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        if _left_out(self.users, other.users, most) or other.more_users:
            self.more_users = True
        if _left_out(self.sessions, other.sessions, most) or other.more_sessions:
            self.more_sessions = True
        if _left_out(self.addresses, other.addresses, most) or other.more_addresses:
            self.more_addresses = True
        for reason, n in other.reasons.items():
            self._reason(reason, n, most)


def _left_out(kept: set[str], new: set[str], most: int) -> bool:
    """Add to ``kept`` those of ``new`` it has room for (up to ``most``, the
    first in sort order); True if any of them was left out."""
    extra = sorted(new - kept)
    room = max(0, most - len(kept))
    kept.update(extra[:room])
    return len(extra) > room

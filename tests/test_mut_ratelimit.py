"""Rate-limit gaps a mutation run found: the budget key of a client address
(IPv4-mapped IPv6, the /64 boundary) and the reasons of counted events past
their bound, also when a summary is put back."""

from __future__ import annotations

import pytest

from audit.ratelimit import Counted, FloodGuard, TokenBucket, backoff_delay, client_key


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),  # a dual-stack socket's IPv4 client
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        # The 64th bit is the prefix's last, the 65th the interface's first.
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:8000::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        (None, "-"),
        ("", "-"),
        ("not an address", "not an address"),
    ],
)
def test_client_key(ip, key):
    assert client_key(ip) == key


def test_an_ipv4_client_seen_as_mapped_ipv6_shares_its_budget():
    guard = FloodGuard(rate=1.0, burst=2, clock=Clock())
    assert guard.admit("192.0.2.1", "auth.invalid_token", 1.0)
    assert guard.admit("::ffff:192.0.2.1", "auth.invalid_token", 2.0)
    assert not guard.admit("::ffff:192.0.2.1", "auth.invalid_token", 3.0)
    assert not guard.admit("192.0.2.1", "auth.invalid_token", 4.0)
    (c,) = guard.take_summaries()
    assert (c.count, c.addresses) == (2, {"::ffff:192.0.2.1", "192.0.2.1"})


def test_reasons_past_the_bound_are_counted_as_other_and_known_ones_still_count(
        monkeypatch):
    monkeypatch.setattr(FloodGuard, "MAX_USERS", 2)
    guard = FloodGuard(rate=1.0, burst=1, clock=Clock())
    assert guard.admit("ip", "a", 0.0)
    for i, reason in enumerate(["r1", "r2", "r3", "r1", "r4", "r2"]):
        assert not guard.admit("ip", "a", float(i), reason=reason)
    (c,) = guard.take_summaries()
    assert c.reasons == {"r1": 2, "r2": 2, "other": 2}
    # Put back (a refused commit) into a count that has its own reasons.
    assert not guard.admit("ip", "a", 9.0, reason="r9")
    guard.restore([c])
    (m,) = guard.take_summaries()
    assert m.count == 7
    assert m.reasons == {"r9": 1, "r1": 2, "other": 4}


def test_session_ids_past_the_bound_are_marked_left_out(monkeypatch):
    monkeypatch.setattr(FloodGuard, "MAX_USERS", 2)
    guard = FloodGuard(rate=1.0, burst=1, clock=Clock())
    assert guard.admit("ip", "a", 0.0)
    for s in ("s1", "s2", "s1"):
        assert not guard.admit("ip", "a", 1.0, session_id=s)
    (c,) = guard.take_summaries()
    assert c.sessions == {"s1", "s2"} and not c.more_sessions
    for s in ("s1", "s2", "s3"):
        assert not guard.admit("ip", "a", 2.0, session_id=s)
    (c,) = guard.take_summaries()
    assert c.sessions == {"s1", "s2"} and c.more_sessions and not c.more_users


def test_counted_merge_keeps_every_reason():
    a = Counted("ip", "a", 1, 1.0, 1.0, reasons={"x": 1})
    b = Counted("ip", "a", 3, 0.5, 2.0, reasons={"x": 2, "y": 1})
    a.merge(b, 20)
    assert (a.count, a.first, a.last, a.reasons) == (4, 0.5, 2.0, {"x": 3, "y": 1})


def test_backoff_stays_within_base_and_cap_at_any_attempt():
    """Full jitter is drawn below the ceiling; never below base, never past
    cap, for any attempt count (no overflow at a very long outage)."""
    for attempt in (1, 2, 10, 61, 62, 10**6):
        for r in (0.0, 0.25, 0.999999):
            d = backoff_delay(attempt, 0.5, 60.0, lambda r=r: r)
            ceiling = min(60.0, 0.5 * 2 ** min(attempt - 1, 60))
            assert d == max(0.5, ceiling * r)
            assert 0.5 <= d <= 60.0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1.0, 1), (1.0, 0)])
def test_bucket_refuses_what_could_never_refill_and_says_so(rate, burst):
    with pytest.raises(ValueError) as info:
        TokenBucket(rate, burst)
    assert str(info.value) == "rate must be positive and burst at least 1"


def test_a_flooding_client_under_a_rate_below_one_gets_no_budget_back_early():
    """A client's bucket is forgotten (its budget whole again) only after
    burst / rate seconds quiet, not burst * rate: at 0.5 a second and 4
    saved up, 3 s after spending it a client has 1.5 tokens back, so one
    more event is recorded, not a new burst of 4."""
    clock = Clock()
    guard = FloodGuard(rate=0.5, burst=4, clock=clock)
    k = "192.0.2.1"
    assert [guard.admit(k, "auth.login_failed", 1.0) for _ in range(5)] == [
        True, True, True, True, False]
    clock.t += 3.0
    assert [guard.admit(k, "auth.login_failed", 2.0) for _ in range(3)] == [True, False, False]
    clock.t += 8.0  # quiet for burst / rate: the whole budget is back
    assert [guard.admit(k, "auth.login_failed", 3.0) for _ in range(5)] == [
        True, True, True, True, False]

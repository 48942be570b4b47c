"""State that must not grow without bound in a long-running server."""

from __future__ import annotations

from conftest import FakeClock

from handlers.auth import LoginThrottle


def test_login_throttle_forgets_pairs_whose_failures_left_the_window() -> None:
    """Each failed login keeps a key for its (username, client IP) and one for
    its IP. Keys out of the window were dropped only when the same pair came
    back, or past MAX_KEYS (100,000): a soak of failed logins from 50,000
    addresses left 100,000 keys and 120 MB of RSS, for good."""
    clock = FakeClock(1000.0)
    throttle = LoginThrottle(5, 300.0, clock=clock)
    for i in range(2000):
        throttle.failed(f"nobody-{i}", f"10.0.{i // 250}.{i % 250}")
    assert len(throttle._fails) == 4000
    clock.advance(200)
    throttle.failed("alice", "10.9.9.9")  # within the window of the others: all kept
    assert len(throttle._fails) == 4002
    clock.advance(101)  # the first 2000 failures are out of the window now
    assert throttle.retry_after("bob", "10.8.8.8") is None  # any attempt prunes
    assert len(throttle._fails) == 2
    # What is in the window still counts.
    for _ in range(4):
        throttle.failed("alice", "10.9.9.9")
    assert throttle.retry_after("alice", "10.9.9.9") is not None
    clock.advance(301)
    throttle.failed("carol", "10.7.7.7")
    assert set(throttle._fails) == {("carol", "10.7.7.7"), ("", "10.7.7.7")}

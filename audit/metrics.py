"""Accounting: every outcome is counted, for ``/audit/status`` and ``/metrics``.

All counters are written from the event loop thread only.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            out.append((repr(float(bound)), float(running)))
        out.append(("+Inf", float(self.n)))
        return out


@dataclass
class Stats:
    commits: int = 0
    commit_failures: int = 0
    events_recorded: int = 0
    security_events_recorded: int = 0
    writes_ok: int = 0
    writes_failed: int = 0
    rate_limited: int = 0
    dead_lettered: int = 0
    parts_written: int = 0
    security_written: int = 0
    batch_sizes: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    commit_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))

    def observe_commit(self, batch: int, seconds: float) -> None:
        self.commits += 1
        self.batch_sizes.observe(batch)
        self.commit_seconds.observe(seconds)

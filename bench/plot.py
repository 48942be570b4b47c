"""Plot the benchmark results in bench/results/*.json into bench/results/*.png.

    python bench/plot.py

``bench/results/benchmarks.png``: HTTP throughput and latency (``/me`` vs
audited ``/documents/{id}``, login), the spool's throughput when
``bench/results/spool.json`` exists, and the before/after comparison of the
per-event baseline with session-audit when ``baseline.json`` exists.
Panels whose results are missing are left out.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError):
        return None


def _label_bars(ax: Axes, bars: Any, fmt: str = "{:.0f}") -> None:
    for b in bars:
        h = b.get_height()
        ax.annotate(fmt.format(h), (b.get_x() + b.get_width() / 2, h),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                    textcoords="offset points")


def panel_throughput(ax: Axes, http: dict[str, Any]) -> None:
    s = http["summary"]
    names = ["GET /me", "GET /documents/{id}\n(audited)"]
    vals = [s["me_rps"], s["documents_rps"]]
    bars = ax.bar(names, vals, color=["#9e9e9e", "#1f77b4"])
    _label_bars(ax, bars)
    # per-round points, to show the spread
    for i, key in enumerate(("me", "documents")):
        pts = [r[key]["rps"] for r in http["rounds"]]
        ax.scatter([i] * len(pts), pts, color="black", s=10, zorder=3)
    title = f"HTTP throughput, wrk -c{http['config']['connections']}"
    title += f"\nratio {s['ratio_median']:.2f} (target ≥ 0.75)"
    if s.get("login_rps") is not None:
        title += f"; login {s['login_rps']:.1f}/s (bcrypt 12)"
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("requests/s (median of rounds)")


def panel_latency(ax: Axes, http: dict[str, Any]) -> None:
    s = http["summary"]
    x = [0, 1]
    w = 0.35
    p50 = [s["me_p50_ms"], s["documents_p50_ms"]]
    p99 = [s["me_p99_ms"], s["documents_p99_ms"]]
    b1 = ax.bar([i - w / 2 for i in x], p50, w, label="p50", color="#2ca02c")
    b2 = ax.bar([i + w / 2 for i in x], p99, w, label="p99", color="#d62728")
    _label_bars(ax, b1, "{:.1f}")
    _label_bars(ax, b2, "{:.1f}")
    ax.set_xticks(x, ["GET /me", "GET /documents/{id}"])
    ax.set_ylabel("latency, ms")
    ax.set_title(f"Latency under load (c{http['config']['connections']})", fontsize=9)
    ax.legend(fontsize=8)


def _spool_points(data: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(label, events/s) pairs found anywhere in spool.json."""
    out: list[tuple[str, float]] = []
    if isinstance(data, dict):
        label = data.get("name") or data.get("label") or data.get("case")
        for k, v in data.items():
            key = f"{prefix}{label or ''} {k}".strip() if label else f"{prefix}{k}"
            if isinstance(v, (int, float)) and not isinstance(v, bool) and re.search(
                    r"(events?_per_s|eps|throughput)", k):
                out.append((key, float(v)))
            elif isinstance(v, (dict, list)) and k not in ("machine",):
                out.extend(_spool_points(v, f"{prefix}{k}." if not label else f"{label} "))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            out.extend(_spool_points(item, f"{prefix}{i}."))
    return out


def _spool_known(spool: dict[str, Any]) -> list[tuple[str, float]]:
    """The shape bench/spool_bench.py --json prints, if that is what we have."""
    prods = spool.get("producers")
    if not isinstance(prods, dict):
        return []
    out = []
    if isinstance(spool.get("raw_events_per_second"), (int, float)):
        out.append(("raw sqlite3\nexecutemany",
                    float(spool["raw_events_per_second"])))
    for n, v in sorted(prods.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        if isinstance(v, dict) and isinstance(v.get("events_per_second"), (int, float)):
            extra = f"\np99 {v['p99_ms']:.1f} ms" if isinstance(v.get("p99_ms"), (int, float)) \
                else ""
            out.append((f"engine, {n} producers{extra}", float(v["events_per_second"])))
    return out


def panel_spool(ax: Axes, spool: dict[str, Any]) -> bool:
    points = _spool_known(spool) or _spool_points(spool)[:8]
    if not points:
        return False
    labels = [p[0][-40:] for p in points]
    vals = [p[1] for p in points]
    bars = ax.barh(labels, vals, color="#ff7f0e")
    for b in bars:
        ax.annotate(f"{b.get_width():,.0f}", (b.get_width(), b.get_y() + b.get_height() / 2),
                    va="center", fontsize=7, xytext=(2, 0), textcoords="offset points")
    ax.axvline(50_000, color="red", ls="--", lw=1, label="target 50,000 events/s")
    ax.set_xlabel("events/s")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
    ax.set_title("Spool throughput (bench/results/spool.json)", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7)
    return True


def panel_baseline(ax: Axes, base: dict[str, Any]) -> None:
    b, s = base["baseline"], base["session_audit"]
    groups = ["sink write\nrequests", "events\ncaptured (%)", "document opens\ncaptured (%)"]
    x = range(len(groups))
    w = 0.38
    bv = [b["sink_requests"], b["events_captured_pct"], b["doc_opens_captured_pct"]]
    sv = [s["sink_requests"], s["events_captured_pct"], s["doc_opens_captured_pct"]]
    b1 = ax.bar([i - w / 2 for i in x], bv, w, label="before: one write per event",
                color="#8c564b")
    b2 = ax.bar([i + w / 2 for i in x], sv, w, label="session-audit: one write per session",
                color="#1f77b4")
    _label_bars(ax, b1)
    _label_bars(ax, b2)
    ax.set_xticks(list(x), groups, fontsize=8)
    wl = base["workload"]
    ax.set_title(f"Receiver at {wl['receiver_rate']:g} writes/s, "
                 f"{wl['receiver_fail_share']:.0%} failing; "
                 f"{wl['users']} users x {wl['opens_per_user']} opens", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_ylim(0, max(bv + sv) * 1.25)


def panel_sink_writes(ax: Axes, sw: dict[str, Any]) -> None:
    cases = sw["cases"]
    labels = [c["case"].replace(" (", "\n(") for c in cases]
    writes = [c["sink_writes_per_session"] for c in cases]
    expected = [c["expected_parts_per_session"] for c in cases]
    bars = ax.bar(labels, writes, color=["#1f77b4" if c["ok"] else "#d62728" for c in cases])
    ax.scatter(labels, expected, marker="_", s=600, color="black", zorder=3,
               label="parts (target: one write each)")
    _label_bars(ax, bars, "{:g}")
    ax.set_ylabel("sink writes per session")
    ax.set_ylim(0, max(writes + expected) + 1)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"Sink writes per session (http sink, part_max_events="
                 f"{sw['config']['part_max_events']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def panel_startup(ax: Axes, st: dict[str, Any]) -> None:
    s = st["summary"]
    t = s["targets"]
    labels = [f"start to /readyz 200\n{s['ready_seconds_median']:.2f} s"
              f" of {t['ready_seconds']:g} s",
              f"RSS (peak)\n{s['rss_peak_hwm_mb_max']:.0f} MB of {t['rss_mb']:g} MB"]
    used = [100 * s["ready_seconds_median"] / t["ready_seconds"],
            100 * s["rss_peak_hwm_mb_max"] / t["rss_mb"]]
    bars = ax.bar(labels, used, color=["#2ca02c" if u <= 100 else "#d62728" for u in used])
    _label_bars(ax, bars, "{:.0f} %")
    ax.axhline(100, color="red", ls="--", lw=1, label="target")
    ax.set_ylim(0, max(120, *used) * 1.1)
    ax.set_ylabel("% of the target budget")
    ax.set_title(f"{s['events_pending']:,} events pending, sink down (median of starts)",
                 fontsize=9)
    ax.legend(fontsize=7)


def main() -> int:
    http = _load("http")
    spool = _load("spool")
    base = _load("baseline")
    sw = _load("sink_writes")
    st = _load("startup")
    panels = []
    if http:
        panels += [lambda ax: panel_throughput(ax, http), lambda ax: panel_latency(ax, http)]
    if spool and (_spool_known(spool) or _spool_points(spool)):
        panels.append(lambda ax: panel_spool(ax, spool))
    if base:
        panels.append(lambda ax: panel_baseline(ax, base))
    if sw:
        panels.append(lambda ax: panel_sink_writes(ax, sw))
    if st:
        panels.append(lambda ax: panel_startup(ax, st))
    if not panels:
        print("no results to plot in bench/results/", file=sys.stderr)
        return 1
    cols = 2
    rows = (len(panels) + 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 4.2 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax, draw in zip(flat, panels, strict=False):
        draw(ax)
    for ax in flat[len(panels):]:
        ax.axis("off")
    fig.suptitle("session-audit benchmarks (2 cores, noisy; medians of rounds)", fontsize=11)
    fig.tight_layout()
    out = RESULTS / "benchmarks.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

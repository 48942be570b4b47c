"""Run every benchmark in sequence, then the plot (``make bench``).

Each benchmark is its own process and writes ``bench/results/<name>.json``;
the plot goes to ``bench/results/benchmarks.png``. A benchmark that fails is
reported and the others still run; the exit status is non-zero if any failed.

    python bench/run_all.py            # the full run, about 8-10 minutes on 2 cores
    python bench/run_all.py --quick    # shorter runs and a 100,000-event backlog
    python bench/run_all.py --only http sink_writes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# Benchmarks that print their JSON on stdout instead of writing results/NAME.json.
CAPTURE = {"spool", "engine_cpu"}

# name -> (script, full args, quick args); scripts that do not exist are skipped
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "spool": ("spool_bench.py", ["--json"], ["--json", "--repeats", "1"]),
    "engine_cpu": ("engine_cpu_bench.py", [], ["--rounds", "1", "--events", "10000"]),
    "backlog": ("backlog_bench.py", [], []),
    "http": ("http_bench.py", [], ["--duration", "4", "--rounds", "1"]),
    "sink_writes": ("sink_writes_bench.py", [], ["--repeat", "1"]),
    "baseline": ("baseline_per_event.py", [], ["--users", "10", "--span", "8"]),
    "startup": ("startup_bench.py", [], ["--sessions", "200", "--starts", "1", "--watch", "3"]),
    "session_detail": ("session_detail_bench.py", [], ["--events", "20000"]),
}


def _run_captured(cmd: list[str], name: str) -> int:
    """Run, pass stdout through, and keep its last JSON object as results/NAME.json."""
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode == 0:
        for line in reversed(proc.stdout.strip().splitlines()):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict):
                out = BENCH / "results" / f"{name}.json"
                out.parent.mkdir(exist_ok=True)
                out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
                print(f"wrote {out.relative_to(ROOT)}")
                break
        else:
            try:  # one multi-line JSON document
                data = json.loads(proc.stdout)
                out = BENCH / "results" / f"{name}.json"
                out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            except ValueError:
                print(f"{name}: no JSON on stdout", file=sys.stderr)
    return proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS))
    args = ap.parse_args()
    failed: list[str] = []
    for name, (script, full, quick) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        path = BENCH / script
        if not path.exists():
            print(f"== {name}: {script} not present, skipped", flush=True)
            continue
        cmd = [sys.executable, str(path), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        rc = _run_captured(cmd, name) if name in CAPTURE else subprocess.call(cmd, cwd=ROOT)
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in"
              f" {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    rc = subprocess.call([sys.executable, str(BENCH / "plot.py")], cwd=ROOT)
    if rc != 0:
        failed.append("plot")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

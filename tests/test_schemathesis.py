"""Schemathesis against the live server: no 500s, every response as openapi.yaml says.

The server runs as a subprocess (``python server.py serve --config <tmp>``) on a
free port; the ``schemathesis run`` CLI loads the schema from the server's own
``GET /openapi.yaml`` and runs all its phases (examples, coverage, fuzzing,
stateful, with the document's links) under ``--checks all``, with a fixed seed
and bounded examples. Hooks and auth are in ``tests/schemathesis_hooks.py``.

Two runs, because failed logins throttle the client IP (API.md): the first
covers every operation but ``POST /token`` (its logins must not be throttled);
the second fuzzes ``POST /token`` alone, where the throttle's 429 with
``Retry-After`` is checked against the document too. Each has a server of its
own, so their order does not matter.

Bounded to about a minute in all; ``SA_SCHEMATHESIS_EXAMPLES`` and
``SA_SCHEMATHESIS_SEED`` change the size and the seed (e.g. for a longer local
run with a random seed: ``SA_SCHEMATHESIS_SEED=random``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import free_port

ROOT = Path(__file__).resolve().parent.parent
ADMIN_PASSWORD = "schemathesis-admin-" + secrets.token_hex(8)
EXAMPLES = int(os.environ.get("SA_SCHEMATHESIS_EXAMPLES", "50"))
SEED = os.environ.get("SA_SCHEMATHESIS_SEED", "20261126")

# Every check of ``--checks all`` runs; one is configured:
# negative_data_rejection accepts 400/401/403/404/405/406/409/415/422/428/429 and
# 5xx by default. API.md answers a chat message over 16 KiB or content over 1 MiB
# with 413 ``too_large`` ("beyond them 413 too_large or 400 invalid_request"),
# which is a rejection too, so 413 joins the accepted statuses. 5xx leaves them:
# schema-violating input must be refused with a 4xx, never answered with a 5xx.
NEGATIVE_EXPECTED = "400,401,403,404,405,406,409,413,415,422,428,429"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not become healthy")


# A server for each test, not one for the module: the login run throttles
# the client IP (429 at /token), and the other run, after it, could not log
# in (run in another order: pytest-randomly, pytest-reverse, or the two
# named in that order on the command line).
@pytest.fixture
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    port = free_port()  # (held until the test ends: served by then)
    config = tmp / "config.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
data_dir = "{tmp / 'data'}"

[auth]
bcrypt_rounds = 4

[audit]
synchronous = "normal"

[flush]
max_writes_per_second = 1000.0
burst = 1000
""",
        encoding="utf-8",
    )
    env = {**os.environ, "SESSION_AUDIT_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "SESSION_AUDIT_LOG_LEVEL": "WARNING"}
    env.pop("SESSION_AUDIT_JWT_SECRET", None)
    env.pop("SESSION_AUDIT_AUDIT_KEY", None)
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "server.py"), "serve", "--config", str(config)],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, tmp / "server.log"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _schemathesis() -> str:
    exe = Path(sys.executable).parent / "schemathesis"
    found = str(exe) if exe.exists() else shutil.which("schemathesis")
    # A dev dependency: missing means a broken install, which must fail, not skip.
    assert found is not None, "schemathesis is not installed (pip install -e '.[dev]')"
    return found


def _server_errors(log: Path) -> list[str]:
    """Error records in the server's JSON log: unhandled exceptions (500s) above all.

    aiohttp's HTTP parser logs requests it cannot parse at all (schemathesis
    probes whether a NUL byte in a header gets through) and answers them 400
    itself, before any handler or middleware; those are not the API's errors.
    """
    out = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            out.append(line)  # not our JSON log format: something wrote to stderr
            continue
        if record.get("level") not in ("error", "critical"):
            continue
        if record.get("logger") == "aiohttp.server" and "BadHttpMessage" in record.get("exc", ""):
            continue
        out.append(line)
    return out


def _run(url: str, log: Path, tmp: Path, *filters: str) -> None:
    cfg = tmp / "schemathesis.toml"
    expected = ", ".join(f'"{s}"' for s in NEGATIVE_EXPECTED.split(","))
    cfg.write_text(f"[checks.negative_data_rejection]\nexpected-statuses = [{expected}]\n",
                   encoding="utf-8")
    args = [
        _schemathesis(), "--config-file", str(cfg), "run", f"{url}/openapi.yaml",
        "--checks", "all",
        "--max-examples", str(EXAMPLES),
        "--seed", str(secrets.randbelow(2**32) if SEED == "random" else SEED),
        "--generation-database", "none",
        "--request-timeout", "20",
        "--workers", "1",
        "--no-color",
        "--report", "junit", "--report-dir", str(tmp),
        *filters,
    ]
    env = {
        **os.environ,
        "SA_BASE_URL": url,
        "SA_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"),
                                                    os.environ.get("PYTHONPATH")])),
    }
    started = time.monotonic()
    proc = subprocess.run(
        args,
        cwd=tmp, env=env, capture_output=True, text=True, timeout=240,
    )
    took = time.monotonic() - started
    print(proc.stdout[-20000:])
    errors = _server_errors(log)
    assert not errors, "\n".join(errors)[-5000:]
    assert proc.returncode == 0, (
        f"schemathesis failed after {took:.1f}s:\n{proc.stdout[-20000:]}\n{proc.stderr[-3000:]}"
    )


def _statuses(url: str) -> dict[str, set[int]]:
    """Statuses the server answered, per route name, from its own /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, set[int]] = {}
    for m in re.finditer(r'^session_audit_http_requests_total\{method="[A-Z]+",'
                         r'route="([a-z_]+)",status="(\d+)"\} ([0-9.e+]+)$', text, re.M):
        if float(m[3]) > 0:
            out.setdefault(m[1], set()).add(int(m[2]))
    return out


# What the first run must have reached, so that a passing run means something
# (not, say, every case stopped by a 401 or 403 before the handler): each
# operation answered 2xx at least once, and those that read input refused some.
REACHED_2XX = {
    "logout", "me", "document_create", "document_list", "document_get", "document_update",
    "document_delete", "document_chat", "client_events", "admin_sessions", "admin_session",
    "admin_security", "admin_status", "admin_flush", "healthz", "readyz", "metrics", "openapi",
}
REACHED_400 = {"document_create", "document_update", "document_chat",
               "client_events", "admin_sessions", "admin_security"}


def test_schemathesis_all_but_login(live_server: tuple[str, Path], tmp_path: Path) -> None:
    url, log = live_server
    _run(url, log, tmp_path, "--exclude-path", "/token")
    seen = _statuses(url)
    assert {r for r in REACHED_2XX if not any(200 <= s < 300 for s in seen.get(r, ()))} \
        == set(), repr(seen)
    # Which bad inputs reach which handler varies with the seed (a case can stop
    # at a 403 for its X-Audit-Session-ID first); one route may miss out.
    assert len({r for r in REACHED_400 if 400 not in seen.get(r, ())}) <= 1, repr(seen)
    assert all({401, 403} <= seen[r] for r in REACHED_2XX - {"healthz", "readyz", "metrics",
                                                           "openapi"}), seen


def test_schemathesis_login(live_server: tuple[str, Path], tmp_path: Path) -> None:
    url, log = live_server
    # No stateful phase: /token has no links to follow (its token is not an input
    # of any operation in the document), so schemathesis would report an error.
    _run(url, log, tmp_path, "--include-path", "/token",
         "--phases", "examples,coverage,fuzzing")
    # Random credentials: 401 until the client IP is throttled, then 429 (with
    # Retry-After, checked against the document); bad bodies 400.
    assert {400, 401, 429} <= _statuses(url)["token"]

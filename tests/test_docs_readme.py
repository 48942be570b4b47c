"""Findings of following README.md step by step on a fresh clone: what the
command line, ``/metrics`` and ``/audit/status`` offer is what the docs name,
each a test that fails without its fix.
"""

from __future__ import annotations

import pytest

import server


def test_drain_help_names_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    # README: drain exits 0, 1, 130 on Ctrl-C and 143 on SIGTERM; its --help
    # named all but the last.
    with pytest.raises(SystemExit) as exc:
        server.main(["drain", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for code in ("0 when all is written", "1 with dead letters", "130 on Ctrl-C",
                 "143 on SIGTERM"):
        assert code in text, code

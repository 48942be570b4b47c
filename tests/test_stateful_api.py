"""The state machine of tests/stateful_api.py against a real server, briefly.

Several users' sessions interleave logins, document changes with fresh and
stale versions, deletes, chats, client events, logouts, ended tokens and the
admin API; every answer is held against a model and openapi.yaml, and each
run's audit trail in the sink against what the model expects. Bounded to
about 20 s, derandomized; ``python tests/stateful_api.py --examples N``
runs a longer campaign locally.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import stateful_api
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[stateful_api.World]:
    w = stateful_api.start_world(tmp_path)
    # Wait for the sink to hold what the model expects, not a further second
    # for /metrics to say nothing is pending: the campaign does that.
    w.strict_drain = False
    try:
        yield w
    finally:
        stateful_api.stop_world()


def test_state_machine_against_a_live_server(world: stateful_api.World) -> None:
    run_state_machine_as_test(stateful_api.ApiMachine, settings=settings(
        max_examples=30, stateful_step_count=30, deadline=None, database=None,
        derandomize=True, phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    ))
    stateful_api.verify(world)
    assert world.requests > 600
    assert not stateful_api.server_errors(world)

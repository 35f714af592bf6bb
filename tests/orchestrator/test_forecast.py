"""Unit tests of orchestrator.forecast.Forecaster: how often queue positions are published."""

from __future__ import annotations

import pytest

from mesh.settings import OrchestratorSettings
from orchestrator.admission import AdmissionQueue
from orchestrator.forecast import Forecaster
from orchestrator.placement import PoolView
from orchestrator.tasks import Sampling, Task, TaskSpec

POOL = PoolView("n", "p", "m", ready=True, reachable=True, slots_total=1, in_flight=1, n_ctx=4096)
INTERVAL_S = 0.05


class SteppingClock:
    """Each reading ``step_s`` later than the one before: work between two readings (a
    publication) seems to take ``step_s``."""

    def __init__(self, step_s: float) -> None:
        self.now = 0.0
        self.step_s = step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


@pytest.mark.parametrize(
    ("cost_s", "published"),
    [(0.0, True), (0.02, False)],
    ids=["cheap publication: the interval", "costly publication: spaced out"],
)
async def test_the_next_publication_waits_for_what_the_last_one_cost(
    cost_s: float, published: bool
) -> None:
    # A publication replays the whole queue: at 10,000 tasks it took as long as the interval,
    # and publishing alone kept the event loop busy (bench/load.py).
    queue = AdmissionQueue(100)
    forecaster = Forecaster(
        OrchestratorSettings(catalog="fake", position_interval_s=INTERVAL_S),
        queue,
        SteppingClock(cost_s),
        lambda: [POOL],
        tuple,
    )
    tasks = []
    for i in range(3):
        spec = TaskSpec("m", "hi", Sampling(3, 0.0, 1.0, 0, 0))
        task = Task(f"t{i}", spec, correlation_id="c", created=0.0, deadline=None)
        queue.push(task, 0.0)
        tasks.append(task)
    forecaster.schedule_positions(0.0)  # the first publication goes out at once
    assert [t.queue_position for t in tasks] == [0, 1, 2]
    queue.take(tasks[0])
    # Past the interval, but within ten times what the costly publication took (PUBLISH_SHARE).
    forecaster.schedule_positions(2 * INTERVAL_S)
    try:
        assert [t.queue_position for t in tasks[1:]] == ([0, 1] if published else [1, 2])
    finally:
        forecaster.stop()

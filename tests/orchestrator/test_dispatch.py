"""The dispatcher's pass over a deep queue, in the real Orchestrator on a fake pool manager."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.admission import AdmissionQueue
from orchestrator.tasks import Sampling, Task, TaskSpec, TaskState
from tests.orchestrator.fakes import FakeCatalog, FakePoolManager, Plan, orchestrator_on

pytestmark = pytest.mark.timeout(30)

QUEUED = 1000


class CountingQueue(AdmissionQueue):
    """The real queue, counting the queued tasks that passes read from it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.read = 0

    def window(self, start: int, stop: int, model_id: str | None = None) -> list[Task]:
        tasks = super().window(start, stop, model_id)
        self.read += len(tasks)
        return tasks


async def test_a_pass_that_fills_an_idle_swappable_pool_reads_no_further(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An idle pool that may load any model makes every queued task placeable; once the pass
    # has given it work nothing else can start, and the pass used to read on through the whole
    # queue: with 10,000 queued, most of the orchestrator's time (bench/load.py).
    monkeypatch.setattr("orchestrator.service.AdmissionQueue", CountingQueue)
    node = FakePoolManager("n1")
    node.add_pool("p", "m", slots=1, can_load=True)
    first_gate, second_gate = asyncio.Event(), asyncio.Event()
    node.plan("p", Plan(gate=first_gate), Plan(gate=second_gate))
    orch = orchestrator_on(FakeCatalog("m"), node, queue_capacity=QUEUED + 10)
    await orch.start()
    try:
        spec = TaskSpec("m", "hi", Sampling(3, 0.0, 1.0, 0, 0))
        tasks = [await orch.submit(spec, correlation_id="c", timeout_s=None)]
        results = await orch.submit_many([spec] * QUEUED, correlation_id="c")
        tasks += [t for t in results if isinstance(t, Task)]
        assert tasks[0].state is TaskState.RUNNING and len(tasks) == QUEUED + 1
        queue = orch._queue  # the CountingQueue
        assert isinstance(queue, CountingQueue)
        queue.read = 0
        first_gate.set()  # the pool goes idle; the pass that follows places the next task
        async with asyncio.timeout(10):
            while tasks[1].state is not TaskState.RUNNING:  # noqa: ASYNC110  # fakes' state
                await asyncio.sleep(0.005)
        assert tasks[2].state is TaskState.QUEUED
        assert queue.read < QUEUED / 4, f"{queue.read} queued tasks read to place one"
    finally:
        second_gate.set()
        await orch.stop()

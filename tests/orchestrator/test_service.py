"""The real Orchestrator against in-process fake pool managers (tests/orchestrator/fakes.py):
dispatch, relay failover, on-demand swaps and journal recovery, without worker processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from catalog.client import ModelInfo
from mesh.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    UnavailableError,
)
from orchestrator.journal import Journal
from orchestrator.service import Orchestrator
from orchestrator.tasks import Finished, Sampling, Task, TaskSpec, TaskState
from tests.orchestrator.fakes import (
    LOADING,
    READY,
    FakeCatalog,
    FakePoolManager,
    Plan,
    orchestrator_on,
)

pytestmark = pytest.mark.timeout(30)


def spec(model_id: str = "m", max_tokens: int = 3, prompt: str = "hi") -> TaskSpec:
    return TaskSpec(model_id, prompt, Sampling(max_tokens, 0.0, 1.0, 0, 0))


async def ended(task: Task) -> Task:
    """Waits until the task ends (reading its event stream, as a client would)."""
    async for _ in task.follow():
        pass
    return task


async def until(condition: Callable[[], bool]) -> None:
    """Waits for a state the orchestrator reaches by itself (the fakes' streams are async)."""
    while not condition():  # noqa: ASYNC110  # the fakes' state has no event to await
        await asyncio.sleep(0.005)


Start = Callable[..., Awaitable[Orchestrator]]
"""``orchestrator_on``'s arguments; the orchestrator, started."""


@pytest.fixture
async def started() -> AsyncIterator[Start]:
    """Starts orchestrators and stops them after the test."""
    running: list[Orchestrator] = []

    async def start(*args: Any, **kwargs: Any) -> Orchestrator:
        orch = orchestrator_on(*args, **kwargs)
        await orch.start()
        running.append(orch)
        return orch

    yield start
    for orch in running:
        await orch.stop()


async def test_a_task_waits_for_the_busy_slot_then_runs_there(started: Start) -> None:
    node = FakePoolManager("n1")
    node.add_pool("p", "m", slots=1)
    gate = asyncio.Event()
    node.plan("p", Plan(tokens=2, gate=gate))
    orch = await started(FakeCatalog("m"), node)
    first = await orch.submit(spec(), correlation_id="c", timeout_s=None)
    second = await orch.submit(spec(), correlation_id="c", timeout_s=None)
    assert first.state is TaskState.RUNNING and (first.node_id, first.pool_id) == ("n1", "p")
    assert second.state is TaskState.QUEUED and orch.get(second.task_id).queue_position == 0
    assert second.wait_reason == "every pool serving the model is busy"
    gate.set()
    await ended(second)
    assert first.state is TaskState.SUCCEEDED and first.tokens_out == 2
    assert second.state is TaskState.SUCCEEDED and second.tokens_out == 3
    assert [e.request.task_id for e in node.executed] == [first.task_id, second.task_id]


async def test_the_least_loaded_pool_takes_the_next_task(started: Start) -> None:
    a, b = FakePoolManager("a"), FakePoolManager("b")
    a.add_pool("p", "m", slots=2)
    b.add_pool("p", "m", slots=2)
    gate = asyncio.Event()
    a.plan("p", Plan(gate=gate), Plan(gate=gate))
    b.plan("p", Plan(gate=gate), Plan(gate=gate))
    orch = await started(FakeCatalog("m"), a, b)
    tasks = [await orch.submit(spec(), correlation_id="c", timeout_s=None) for _ in range(4)]
    assert sorted(t.node_id for t in tasks) == ["a", "a", "b", "b"]
    gate.set()
    for task in tasks:
        assert (await ended(task)).state is TaskState.SUCCEEDED


async def test_a_crash_before_the_first_token_fails_over_to_another_pool(started: Start) -> None:
    a, b = FakePoolManager("a"), FakePoolManager("b")
    a.add_pool("p", "m")
    b.add_pool("p", "m")
    crash = UnavailableError("worker crashed", reason="WORKER_CRASHED", retry_delay_s=1.0)
    a.plan("p", Plan(error=crash, error_after=0))
    b.plan("p", Plan(error=crash, error_after=0))
    orch = await started(FakeCatalog("m"), a, b, max_attempts=3)
    task = await ended(await orch.submit(spec(), correlation_id="c", timeout_s=None))
    # Both pools crashed once; the third placement ran it to the end.
    assert task.state is TaskState.SUCCEEDED and task.tokens_out == 3
    assert len(a.executed) + len(b.executed) == 3


async def test_a_pool_that_refused_as_not_ready_gets_no_work_until_it_reports_again(
    started: Start,
) -> None:
    """Its last report said ready, its pool manager says otherwise: placing there again would
    cost the task another attempt (the chaos soak saw it after worker kills)."""
    a, b = FakePoolManager("a"), FakePoolManager("b")
    a.add_pool("p", "m")
    b.add_pool("p", "m", state=LOADING)
    refusal = UnavailableError("pool p is loading", reason="POOL_NOT_READY", retry_delay_s=1.0)
    a.plan("p", Plan(error=refusal, error_after=0))
    orch = await started(FakeCatalog("m"), a, b, max_attempts=3)
    task = await orch.submit(spec(), correlation_id="c", timeout_s=None)
    await until(lambda: task.state is TaskState.QUEUED and len(a.executed) == 1)
    await asyncio.sleep(0.1)
    assert len(a.executed) == 1 and task.state is TaskState.QUEUED  # held, not tried again
    b.set_state("p", READY)
    await ended(task)
    assert task.state is TaskState.SUCCEEDED and task.node_id == "b"
    assert len(a.executed) == 1


@pytest.mark.parametrize("release", ["report", "time"])
async def test_a_held_pool_is_released_by_its_next_report_or_after_lost_s(
    started: Start, release: str
) -> None:
    node = FakePoolManager("a")
    node.add_pool("p", "m")
    refusal = UnavailableError("pool p is loading", reason="POOL_NOT_READY", retry_delay_s=1.0)
    node.plan("p", Plan(error=refusal, error_after=0))
    orch = await started(FakeCatalog("m"), node, max_attempts=3)  # lost_s 0.5 s
    loop = asyncio.get_running_loop()
    task = await orch.submit(spec(), correlation_id="c", timeout_s=None)
    await until(lambda: len(node.executed) == 1)
    refused_at = loop.time()
    if release == "report":
        node.set_state("p", LOADING)  # the pool manager tells what it is doing, then that it
        await asyncio.sleep(0.1)
        node.set_state("p", READY)  # is ready again
    await ended(task)
    waited_s = loop.time() - refused_at
    assert task.state is TaskState.SUCCEEDED and len(node.executed) == 2
    assert (waited_s < 0.4) if release == "report" else (waited_s >= 0.45), waited_s


async def test_failover_stops_at_max_attempts_with_the_pools_error(started: Start) -> None:
    node = FakePoolManager("n1")
    node.add_pool("p", "m")
    crash = UnavailableError("worker crashed", reason="WORKER_CRASHED", retry_delay_s=1.0)
    node.plan("p", *(Plan(error=crash) for _ in range(5)))
    orch = await started(FakeCatalog("m"), node, max_attempts=2)
    task = await ended(await orch.submit(spec(), correlation_id="c", timeout_s=None))
    assert task.state is TaskState.FAILED and task.error is not None
    assert task.error.reason == "WORKER_CRASHED" and task.error.retriable
    assert len(node.executed) == 2


async def test_a_failure_after_a_token_is_not_retried(started: Start) -> None:
    node = FakePoolManager("n1")
    node.add_pool("p", "m")
    crash = UnavailableError("worker crashed", reason="WORKER_CRASHED", retry_delay_s=1.0)
    node.plan("p", Plan(tokens=3, error=crash, error_after=2))
    orch = await started(FakeCatalog("m"), node, max_attempts=3)
    task = await ended(await orch.submit(spec(), correlation_id="c", timeout_s=None))
    # Repeating the stream elsewhere would repeat the two tokens already sent.
    assert task.state is TaskState.FAILED and task.tokens_out == 2
    assert len(node.executed) == 1


async def test_a_lost_node_fails_its_running_task_over(started: Start) -> None:
    a, b = FakePoolManager("a"), FakePoolManager("b")
    a.add_pool("p", "m")
    b.add_pool("p", "m", state=LOADING)
    never = asyncio.Event()
    a.plan("p", Plan(gate=never))
    orch = await started(FakeCatalog("m"), a, b, max_attempts=3)
    task = await orch.submit(spec(), correlation_id="c", timeout_s=None)
    assert task.node_id == "a"
    b.set_state("p", READY)
    a.lose()
    await ended(task)
    assert task.state is TaskState.SUCCEEDED and task.node_id == "b"
    assert a.executed[0].cancelled  # the lost node's call was given up
    assert not orch.registry.reachable("a")


async def test_a_task_for_another_model_swaps_an_idle_pool(started: Start) -> None:
    node = FakePoolManager("n1")
    node.add_pool("p", "m", can_load=True)
    orch = await started(FakeCatalog("m", "other"), node)
    task = await ended(await orch.submit(spec("other"), correlation_id="c", timeout_s=None))
    assert task.state is TaskState.SUCCEEDED and task.pool_id == "p"
    assert [(r.pool_id, r.model_id) for r in node.reloads] == [("p", "other")]
    assert node.pools["p"].model_id == "other"


async def test_a_busy_pool_is_not_swapped(started: Start) -> None:
    node = FakePoolManager("n1")
    node.add_pool("p", "m", can_load=True)
    gate = asyncio.Event()
    node.plan("p", Plan(gate=gate))
    orch = await started(FakeCatalog("m", "other"), node)
    busy = await orch.submit(spec("m"), correlation_id="c", timeout_s=None)
    other = await orch.submit(spec("other"), correlation_id="c", timeout_s=None)
    assert other.state is TaskState.QUEUED and not node.reloads
    assert "never evicted" in other.excluded["n1/p"]
    gate.set()
    await ended(other)
    assert busy.state is TaskState.SUCCEEDED and other.state is TaskState.SUCCEEDED
    assert [r.model_id for r in node.reloads] == ["other"]


async def test_a_model_that_cannot_load_ends_its_tasks_and_is_not_tried_again(
    started: Start,
) -> None:
    node = FakePoolManager("n1")
    node.add_pool("p", "m", can_load=True)
    node.reload_error = FailedPreconditionError("does not fit in VRAM", reason="VRAM_INSUFFICIENT")
    orch = await started(FakeCatalog("m", "big"), node)
    task = await ended(await orch.submit(spec("big"), correlation_id="c", timeout_s=None))
    assert task.state is TaskState.FAILED and task.error is not None
    assert task.error.reason == "MODEL_LOAD_FAILED"
    assert "does not fit in VRAM" in task.error.message
    # Within the cooldown the pool is not asked again: the next task is refused at once.
    again = await ended(await orch.submit(spec("big"), correlation_id="c", timeout_s=None))
    assert again.error is not None and again.error.reason == "MODEL_LOAD_FAILED"
    assert len(node.reloads) == 1
    await until(lambda: node.pools["p"].state == READY and orch.pool_views()[0].ready)
    assert (await ended(await orch.submit(spec("m"), correlation_id="c", timeout_s=None))).finished


async def test_queued_tasks_survive_a_restart_in_their_order(
    started: Start,
    tmp_path: Path,
) -> None:
    node = FakePoolManager("n1")
    node.add_pool("p", "m", state=LOADING)
    catalog = FakeCatalog("m")
    first = orchestrator_on(catalog, node, journal=Journal(tmp_path / "journal.db"))
    await first.start()
    prompts = ["one", "two", "three"]
    ids = [
        (
            await first.submit(spec(prompt=p), correlation_id="c", timeout_s=None, durable=True)
        ).task_id
        for p in prompts
    ]
    await first.stop()
    node.set_state("p", READY)
    second = await started(catalog, node, journal=Journal(tmp_path / "journal.db"))
    tasks = [second.get(task_id) for task_id in ids]
    for task in tasks:
        await ended(task)
    assert all(t.state is TaskState.SUCCEEDED for t in tasks)
    assert [e.request.prompt for e in node.executed] == prompts
    assert isinstance(tasks[0].finished, Finished)


async def test_a_restart_requeues_every_accepted_task_even_past_the_queue_capacity(
    started: Start,
    tmp_path: Path,
) -> None:
    # One task runs without a token yet and two wait, filling the queue (capacity 2). After a
    # restart the running one queues again too: three accepted tasks, and all of them run
    # (found by bench/chaos.py: the third used to fail QUEUE_FULL at recovery).
    node = FakePoolManager("n1")
    node.add_pool("p", "m", slots=1)
    node.plan("p", Plan(gate=asyncio.Event()))  # never opened: no token before the restart
    catalog = FakeCatalog("m")
    first = orchestrator_on(
        catalog, node, journal=Journal(tmp_path / "journal.db"), queue_capacity=2
    )
    await first.start()
    running = await first.submit(spec(prompt="one"), correlation_id="c", timeout_s=None)
    await until(lambda: running.state is TaskState.RUNNING)
    waiting = [
        await first.submit(spec(prompt=p), correlation_id="c", timeout_s=None, durable=True)
        for p in ("two", "three")
    ]
    await first.stop()
    second = await started(
        catalog, node, journal=Journal(tmp_path / "journal.db"), queue_capacity=2
    )
    tasks = [second.get(t.task_id) for t in (running, *waiting)]
    for task in tasks:
        await ended(task)
    assert [t.state for t in tasks] == [TaskState.SUCCEEDED] * 3, [t.error for t in tasks]
    assert [e.request.prompt for e in node.executed[1:]] == ["one", "two", "three"]


class _BuggyCatalog(FakeCatalog):
    """A catalog client with a bug for one model: the exception no caller expects."""

    async def model_info(self, model_id: str) -> ModelInfo:
        if model_id == "boom":
            raise RuntimeError("a bug")
        return await super().model_info(model_id)


async def test_a_bug_admitting_one_entry_of_a_batch_leaves_the_others_admitted(
    started: Start,
) -> None:
    node = FakePoolManager("n1")
    node.add_pool("p", "m", slots=4)
    orch = await started(_BuggyCatalog("m"), node)
    results = await orch.submit_many(
        [spec(), spec("boom"), spec(), InvalidArgumentError("prompt", "bad")], correlation_id="c"
    )
    first, bug, third, bad = results
    assert isinstance(first, Task) and isinstance(third, Task)
    assert isinstance(bug, InternalError) and "log" in str(bug)
    assert isinstance(bad, InvalidArgumentError)
    for task in (first, third):
        assert (await ended(task)).state is TaskState.SUCCEEDED


SYSTEM = "You are the assistant of the river and the mountain. " * 20  # ~1 KB: 4 blocks


async def _holding_the_system_prompt(
    started: Start, can_load: bool = False, **settings: object
) -> tuple[Any, Any]:
    from mesh.prefix import prefix_block_hashes

    node = FakePoolManager("n1")
    node.add_pool("a", "m", slots=1, can_load=can_load)
    node.add_pool("b", "m", slots=1, can_load=can_load)
    node.pools["a"].prefix_cache.block_hashes.extend(prefix_block_hashes(SYSTEM))
    gate = asyncio.Event()
    node.plan("a", Plan(tokens=1, gate=gate))
    orch = await started(FakeCatalog("m"), node, **settings)
    busy = await orch.submit(spec(prompt=SYSTEM + " first"), correlation_id="c", timeout_s=None)
    assert busy.pool_id == "a" and busy.state is TaskState.RUNNING  # affinity, on a free fleet
    return orch, gate


async def test_a_task_waits_for_the_busy_pool_holding_its_prompt_and_others_pass_it(
    started: Start,
) -> None:
    orch, gate = await _holding_the_system_prompt(started, prefix_wait_s=30.0)
    follow = await orch.submit(spec(prompt=SYSTEM + " again"), correlation_id="c", timeout_s=None)
    other = await orch.submit(spec(prompt="unrelated"), correlation_id="c", timeout_s=None)
    assert follow.state is TaskState.QUEUED and "holds its prompt's start" in follow.wait_reason
    assert other.state is TaskState.RUNNING and other.pool_id == "b"  # it went past
    gate.set()
    await ended(follow)
    assert follow.pool_id == "a" and follow.prefix_hit_blocks == 4


@pytest.mark.parametrize("can_load", [False, True], ids=["fixed", "swappable"])
async def test_the_wait_for_a_prefix_is_bounded(started: Start, can_load: bool) -> None:
    # Swappable pools: an idle one could load any model, so admission decides the task alone
    # rather than in a pass; the wait's timer must be armed all the same.
    orch, gate = await _holding_the_system_prompt(started, can_load, prefix_wait_s=0.2)
    await asyncio.sleep(0.3)  # the node's state has settled: only a timer wakes a pass now
    follow = await orch.submit(spec(prompt=SYSTEM + " again"), correlation_id="c", timeout_s=None)
    assert follow.state is TaskState.QUEUED
    async with asyncio.timeout(2):
        await ended(follow)  # a stays busy: after 0.2 s it takes b
    assert follow.pool_id == "b" and follow.prefix_hit_blocks == 0
    gate.set()


def test_the_forecaster_learns_a_models_bytes_per_token() -> None:
    from mesh.prefix import BYTES_PER_TOKEN
    from mesh.settings import OrchestratorSettings
    from orchestrator.admission import AdmissionQueue
    from orchestrator.forecast import Forecaster
    from orchestrator.placement import pool_key

    forecaster = Forecaster(
        OrchestratorSettings(catalog="fake"), AdmissionQueue(10), lambda: 0.0, tuple, tuple
    )
    assert forecaster.bytes_per_token("m") == BYTES_PER_TOKEN
    task = spec(prompt="x" * 1270)
    for _ in range(30):
        forecaster.finished(pool_key("n", "p"), task, 100.0, 3, 10.0, tokens_in=1000)
    assert abs(forecaster.bytes_per_token("m") - 1.27) < 0.01
    assert forecaster.bytes_per_token("other") == BYTES_PER_TOKEN

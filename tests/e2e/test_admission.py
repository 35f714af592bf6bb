"""Admission end to end: priorities, tenants, the full-queue policies, aging, placement reasons.

One CPU pool with one slot; a long generation (the "hog") keeps the slot busy while tasks queue
behind it, then is cancelled so the queue drains in the order under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2

from tests.conftest import Mesh, start_mesh, stop_mesh
from tests.e2e.helpers import error_details, generate_request

LONG = 30_000  # tokens: the hog decodes for many seconds on the 32k tiny model
TENANT = "x-llorch-tenant"


async def _hog(mesh: Mesh) -> grpc.aio.UnaryStreamCall:
    """Starts a long generation and returns once it holds the pool's only slot."""
    call = mesh.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True))
    async for response in call:
        if response.event.WhichOneof("kind") == "token":
            return call
    raise AssertionError("the hog ended before its first token")


async def _submit(
    mesh: Mesh, name: str, priority: int = common_pb2.PRIORITY_INTERACTIVE, tenant: str = ""
) -> orchestrator_pb2.SubmitTaskResponse:
    metadata = ((TENANT, tenant),) if tenant else ()
    response: orchestrator_pb2.SubmitTaskResponse = await mesh.stub.SubmitTask(
        orchestrator_pb2.SubmitTaskRequest(
            model_id="tiny-llama",
            prompt=f"task {name}",
            priority=priority,
            sampling=common_pb2.SamplingParams(max_tokens=4),
        ),
        metadata=metadata,
    )
    return response


async def _start_order(mesh: Mesh, names: dict[str, str]) -> list[str]:
    """Follows every task to its end; returns task names in the order they started.

    The order comes from the orchestrator's own start times: the order in which Started events
    reach this client over separate streams is not the start order (a short task can start,
    finish and be replayed after the next one's live Started arrived)."""

    async def follow(task_id: str) -> None:
        stream = mesh.stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=task_id))
        async for response in stream:
            assert response.event.WhichOneof("kind") != "failed"

    await asyncio.gather(*(follow(t) for t in names.values()))
    started_at = {n: mesh.orchestrator.orchestrator.get(t).started_at for n, t in names.items()}
    assert all(at is not None for at in started_at.values()), started_at
    return sorted(names, key=lambda n: started_at[n] or 0.0)


# The queue's order shows when one task runs at a time: a pool of one slot.
ONE_SLOT: dict[str, object] = {"slots": 1}


@pytest.fixture
async def one_slot(tmp_path: Path, long_model: Path) -> AsyncIterator[Mesh]:
    mesh = await start_mesh(tmp_path, long_model, pool=ONE_SLOT)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


async def test_interactive_overtakes_queued_batch(one_slot: Mesh) -> None:
    hog = await _hog(one_slot)
    b0 = await _submit(one_slot, "b0", common_pb2.PRIORITY_BATCH)
    b1 = await _submit(one_slot, "b1", common_pb2.PRIORITY_BATCH)
    i0 = await _submit(one_slot, "i0")
    assert (b0.queue_position, b1.queue_position, i0.queue_position) == (0, 1, 0)
    hog.cancel()
    order = await _start_order(one_slot, {"b0": b0.task_id, "b1": b1.task_id, "i0": i0.task_id})
    assert order == ["i0", "b0", "b1"]


async def test_a_flooding_tenant_does_not_starve_another(one_slot: Mesh) -> None:
    hog = await _hog(one_slot)
    flood = {f"f{i}": (await _submit(one_slot, f"f{i}", tenant="flood")).task_id for i in range(8)}
    quiet = await _submit(one_slot, "quiet", tenant="quiet")
    # Eight tasks of another tenant wait, yet only the first of them stays ahead (same virtual
    # start, earlier arrival).
    assert quiet.queue_position == 1
    task = await one_slot.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=quiet.task_id))
    assert task.task.tenant == "quiet"
    hog.cancel()
    order = await _start_order(one_slot, {**flood, "quiet": quiet.task_id})
    assert order == ["f0", "quiet", *(f"f{i}" for i in range(1, 8))]


async def test_a_bad_tenant_header_is_invalid_argument(one_slot: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _submit(one_slot, "x", tenant="Not A Name/..")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(raised.value)["fields"] == [TENANT]


async def test_drop_oldest_batch_ends_the_dropped_task_with_a_reason(
    tmp_path: Path, long_model: Path
) -> None:
    mesh = await start_mesh(
        tmp_path,
        long_model,
        pool=ONE_SLOT,
        queue_capacity=2,
        queue_full_policy="drop-oldest-batch",
    )
    try:
        hog = await _hog(mesh)
        b0 = await _submit(mesh, "b0", common_pb2.PRIORITY_BATCH)
        i0 = await _submit(mesh, "i0")
        i1 = await _submit(mesh, "i1")  # full: b0 makes room
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in mesh.stub.StreamTask(
                orchestrator_pb2.StreamTaskRequest(task_id=b0.task_id)
            ):
                pass
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(raised.value)
        assert details["reason"] == "QUEUE_DROPPED"
        assert details["retriable"] is True
        assert details["retry_delay_ms"] > 0
        got = await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=b0.task_id))
        assert got.task.state == orchestrator_pb2.TASK_STATE_FAILED
        assert got.task.error.reason == "QUEUE_DROPPED"
        # No batch task left to drop: the next one is refused, and nothing accepted is lost.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _submit(mesh, "i2")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_details(refused.value)["reason"] == "QUEUE_FULL"
        hog.cancel()
        assert await _start_order(mesh, {"i0": i0.task_id, "i1": i1.task_id}) == ["i0", "i1"]
    finally:
        await stop_mesh(mesh)


async def test_a_batch_task_past_the_starvation_bound_goes_first(
    tmp_path: Path, long_model: Path
) -> None:
    mesh = await start_mesh(tmp_path, long_model, pool=ONE_SLOT, batch_max_wait_s=0.3)
    try:
        hog = await _hog(mesh)
        b0 = await _submit(mesh, "b0", common_pb2.PRIORITY_BATCH)
        i0 = await _submit(mesh, "i0")
        got = await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=b0.task_id))
        assert (got.task.queue_position, i0.queue_position) == (1, 0)
        await asyncio.sleep(0.5)  # time passing is what this test is about
        i1 = await _submit(mesh, "i1")
        assert i1.queue_position == 2  # behind the aged batch task and i0
        got = await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=b0.task_id))
        assert got.task.queue_position == 0
        hog.cancel()
        order = await _start_order(mesh, {"b0": b0.task_id, "i0": i0.task_id, "i1": i1.task_id})
        assert order == ["b0", "i0", "i1"]
    finally:
        await stop_mesh(mesh)


async def test_get_task_says_why_a_task_waits(one_slot: Mesh) -> None:
    hog = await _hog(one_slot)
    queued = await _submit(one_slot, "q")
    got = (
        await one_slot.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=queued.task_id))
    ).task
    assert got.state == orchestrator_pb2.TASK_STATE_QUEUED
    assert got.wait_reason == "every pool serving the model is busy"
    assert [(e.pool.split("/")[1], e.reason) for e in got.excluded_pools] == [
        ("cpu-0", "no free slot")
    ]
    hog.cancel()
    await _start_order(one_slot, {"q": queued.task_id})
    got = (
        await one_slot.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=queued.task_id))
    ).task
    assert got.state == orchestrator_pb2.TASK_STATE_SUCCEEDED
    assert got.wait_reason == ""
    assert got.node_id != ""

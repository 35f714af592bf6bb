"""Cancel, deadlines and a worker killed mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llorch.orchestrator.v1 import orchestrator_pb2

from tests.conftest import LINKS, Mesh, start_mesh, stop_mesh
from tests.e2e.helpers import collect, error_details, generate_request

LONG = 30_000  # tokens; several seconds of decoding on the 32k tiny model


async def _first_token(call: object) -> tuple[str, int]:
    """Reads a stream until its first token; returns the task id and tokens seen."""
    async for response in call:  # type: ignore[attr-defined]
        event = response.event
        if event.WhichOneof("kind") == "token":
            return event.task_id, len(event.token.token_ids)
    raise AssertionError("stream ended before the first token")


async def _time_to_first_token(mesh: Mesh) -> float:
    started = time.monotonic()
    call = mesh.stub.Generate(generate_request(max_tokens=5, seed=1), timeout=30)
    await _first_token(call)
    elapsed = time.monotonic() - started
    await collect(call)
    return elapsed


async def test_cancel_task_stops_tokens_and_frees_the_pool(long_mesh: Mesh) -> None:
    mesh = long_mesh
    submitted = await mesh.stub.SubmitTask(
        orchestrator_pb2.SubmitTaskRequest(
            model_id="tiny-llama",
            prompt="A long story",
            sampling=generate_request(max_tokens=LONG, ignore_eos=True).sampling,
        )
    )
    stream = mesh.stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=submitted.task_id))
    await _first_token(stream)
    cancelled = await mesh.stub.CancelTask(
        orchestrator_pb2.CancelTaskRequest(task_id=submitted.task_id)
    )
    assert cancelled.state == orchestrator_pb2.TASK_STATE_CANCELLED
    at_cancel = (
        await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=submitted.task_id))
    ).task
    assert at_cancel.state == orchestrator_pb2.TASK_STATE_CANCELLED
    assert at_cancel.error.code == "CANCELLED"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        received = 0
        async for response in stream:
            if response.event.WhichOneof("kind") == "token":
                t = response.event.token
                received = t.index + len(t.token_ids)
        assert received <= at_cancel.tokens_out
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    # Nothing is appended after the acknowledgement.
    await asyncio.sleep(0.3)
    later = (
        await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=submitted.task_id))
    ).task
    assert later.tokens_out == at_cancel.tokens_out < LONG
    # The worker stopped decoding: the next task starts at once, not after ~30k tokens.
    assert await _time_to_first_token(mesh) < 2.0


async def test_client_cancelling_generate_cancels_the_task(long_mesh: Mesh) -> None:
    mesh = long_mesh
    call = mesh.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True))
    task_id, _ = await _first_token(call)
    call.cancel()
    deadline = time.monotonic() + 5
    while True:
        task = (await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=task_id))).task
        if task.state == orchestrator_pb2.TASK_STATE_CANCELLED or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert task.state == orchestrator_pb2.TASK_STATE_CANCELLED
    assert await _time_to_first_token(mesh) < 2.0


async def test_deadline_ends_a_running_generation(long_mesh: Mesh) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(
            long_mesh.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True), timeout=0.5)
        )
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    assert await _time_to_first_token(long_mesh) < 2.0


@pytest.fixture(params=LINKS)
async def one_slot_mesh(
    request: pytest.FixtureRequest, tmp_path: Path, long_model: Path
) -> AsyncIterator[Mesh]:
    """The long-context mesh with a pool of one slot: a second task waits for the first."""
    mesh = await start_mesh(tmp_path, long_model, request.param, pool={"slots": 1})
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


async def test_queued_task_past_its_deadline_never_runs(one_slot_mesh: Mesh) -> None:
    mesh = one_slot_mesh
    hog = mesh.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True))
    await _first_token(hog)
    waiting = mesh.stub.Generate(generate_request(max_tokens=5), timeout=0.5)
    task_id = ""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for response in waiting:
            task_id = response.event.task_id
            assert response.event.WhichOneof("kind") == "queued"
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    hog.cancel()
    await asyncio.sleep(0.2)
    task = (await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=task_id))).task
    assert task.state in (orchestrator_pb2.TASK_STATE_FAILED, orchestrator_pb2.TASK_STATE_CANCELLED)
    assert task.tokens_out == 0


async def test_worker_killed_mid_stream_ends_retriable_and_pool_recovers(
    long_mesh: Mesh,
) -> None:
    mesh = long_mesh
    call = mesh.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True))
    await _first_token(call)
    os.kill(mesh.worker_pid(), signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(call)
    assert time.monotonic() - killed_at < 3.0
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    details = error_details(raised.value)
    assert details["reason"] == "WORKER_CRASHED"
    assert details["retriable"] is True
    assert "retry_delay_ms" in details
    # The supervisor restarts the worker; the pool serves again.
    assert await mesh.pool_manager.manager.wait_ready(30)
    got = await collect(
        mesh.stub.Generate(generate_request(max_tokens=8, ignore_eos=True), timeout=30)
    )
    assert len(got.token_ids) == 8


async def test_cancel_in_the_turn_a_task_is_placed_frees_its_slot(mesh: Mesh) -> None:
    # submit() places the task and creates its relay; cancelling before the relay's first step
    # (no await in between) used to leave the pool's slot counted as taken forever.
    from orchestrator.tasks import Sampling, TaskSpec

    orch = mesh.orchestrator.orchestrator
    spec = TaskSpec("tiny-llama", "hi", Sampling(8, 0.0, 1.0, 0, 1, ignore_eos=True))
    for _ in range(3):
        task = await orch.submit(spec, correlation_id="c", timeout_s=None)
        orch.cancel(task.task_id)
    await asyncio.sleep(0.05)
    views = mesh.orchestrator.orchestrator.registry.views()
    assert [v.in_flight for v in views] == [0]
    got = await collect(
        mesh.stub.Generate(generate_request(max_tokens=4, ignore_eos=True), timeout=10)
    )
    assert len(got.token_ids) == 4


async def test_full_queue_is_resource_exhausted_with_retry_info(
    tmp_path: Path, long_model: Path
) -> None:
    mesh = await start_mesh(tmp_path, long_model, pool={"slots": 1}, queue_capacity=1)
    try:
        hog = mesh.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True))
        await _first_token(hog)  # the only slot is busy
        waiting = await mesh.stub.SubmitTask(
            orchestrator_pb2.SubmitTaskRequest(model_id="tiny-llama", prompt="next")
        )
        assert waiting.queue_position == 0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await mesh.stub.SubmitTask(
                orchestrator_pb2.SubmitTaskRequest(model_id="tiny-llama", prompt="one more")
            )
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(raised.value)
        assert details["reason"] == "QUEUE_FULL"
        assert details["retriable"] is True
        assert details["retry_delay_ms"] > 0
        hog.cancel()
        # The queued task runs once the slot frees: nothing accepted was lost.
        done = await collect(
            mesh.stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=waiting.task_id))
        )
        assert done.kinds[-1] == "finished"
    finally:
        await stop_mesh(mesh)

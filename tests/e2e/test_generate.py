"""Tokens streamed end to end: client → orchestrator → pool manager → llama.cpp worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from llorch.orchestrator.v1 import orchestrator_pb2

from tests.conftest import Mesh
from tests.e2e.helpers import Collected, collect, generate_request


async def test_generate_streams_queued_started_tokens_finished(mesh: Mesh) -> None:
    call = mesh.stub.Generate(generate_request(max_tokens=24, seed=7, ignore_eos=True))
    got = await collect(call)
    assert got.kinds[0] == "queued"
    assert got.kinds[1] == "started"
    assert got.kinds[-2:] == ["metrics", "finished"]
    assert set(got.kinds[2:-2]) == {"token"}
    got.assert_contiguous()
    assert len(got.token_ids) == 24
    finished = got.finished
    assert finished.tokens_out == 24
    assert finished.tokens_in > 0
    started = got.events[1].started
    assert started.pool_id == "cpu-0"
    assert started.model_id == "tiny-llama"
    assert started.engine_version.startswith("llama-cpp-python/")


async def test_same_seed_and_prompt_give_the_same_tokens(mesh: Mesh) -> None:
    request = generate_request("Once upon a time", max_tokens=40, seed=1234, ignore_eos=True)
    first = await collect(mesh.stub.Generate(request))
    second = await collect(mesh.stub.Generate(request))
    assert first.token_ids == second.token_ids
    assert first.text == second.text
    other = await collect(
        mesh.stub.Generate(
            generate_request("Once upon a time", max_tokens=40, seed=99, ignore_eos=True)
        )
    )
    assert other.token_ids != first.token_ids


async def test_correlation_id_is_echoed_or_generated(mesh: Mesh) -> None:
    call = mesh.stub.Generate(
        generate_request(max_tokens=2), metadata=(("x-correlation-id", "client-abc-1"),)
    )
    assert ("x-correlation-id", "client-abc-1") in tuple(await call.initial_metadata())
    await collect(call)
    call = mesh.stub.Generate(generate_request(max_tokens=2))
    generated = dict(tuple(await call.initial_metadata()))["x-correlation-id"]
    assert len(generated) == 32
    await collect(call)


async def test_submit_then_stream_and_reattach_from_index(mesh: Mesh) -> None:
    submitted = await mesh.stub.SubmitTask(
        orchestrator_pb2.SubmitTaskRequest(
            model_id="tiny-llama",
            prompt="Resume me",
            sampling=generate_request(max_tokens=30, seed=5, ignore_eos=True).sampling,
        )
    )
    assert submitted.task_id
    full = await collect(
        mesh.stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=submitted.task_id))
    )
    full.assert_contiguous()
    assert len(full.token_ids) == 30
    # Re-attach after the task ended: tokens from index 10 onwards, then Finished.
    resumed = await collect(
        mesh.stub.StreamTask(
            orchestrator_pb2.StreamTaskRequest(task_id=submitted.task_id, from_index=10)
        )
    )
    assert resumed.kinds[-1] == "finished"
    first_index = resumed.indexes[0][0]
    assert first_index <= 10
    resumed.assert_contiguous(first_index)
    assert resumed.token_ids == full.token_ids[first_index:]
    task = await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=submitted.task_id))
    assert task.task.state == orchestrator_pb2.TASK_STATE_SUCCEEDED
    assert task.task.tokens_out == 30


async def test_submit_is_idempotent_on_request_id(mesh: Mesh) -> None:
    request = orchestrator_pb2.SubmitTaskRequest(
        model_id="tiny-llama",
        prompt="once",
        request_id="req-1",
        sampling=generate_request(max_tokens=3).sampling,
    )
    first = await mesh.stub.SubmitTask(request)
    second = await mesh.stub.SubmitTask(request)
    assert first.task_id == second.task_id


async def test_two_concurrent_clients_both_complete(mesh: Mesh) -> None:
    async def one(seed: int) -> Collected:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            from llorch.orchestrator.v1 import orchestrator_pb2_grpc

            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            return await collect(
                stub.Generate(generate_request(max_tokens=50, seed=seed, ignore_eos=True))
            )

    a, b = await asyncio.gather(one(1), one(2))
    for got in (a, b):
        got.assert_contiguous()
        assert len(got.token_ids) == 50
        assert got.kinds[-1] == "finished"


async def test_stop_sequence_ends_generation_without_the_sequence(mesh: Mesh) -> None:
    free = await collect(
        mesh.stub.Generate(generate_request("Tell", max_tokens=60, seed=3, ignore_eos=True))
    )
    assert len(free.text) > 8
    stop = free.text[5:8]
    stopped = await collect(
        mesh.stub.Generate(
            generate_request("Tell", max_tokens=60, seed=3, ignore_eos=True, stop=[stop])
        )
    )
    assert stopped.finished.finish_reason == 2  # FINISH_REASON_STOP_SEQUENCE
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)
    stopped.assert_contiguous()


async def test_defaulted_max_tokens_shrinks_to_fit_a_long_prompt(
    tmp_path: Path, tiny_model: Path
) -> None:
    from tests.conftest import start_mesh, stop_mesh

    # max_tokens left unset takes default_max_tokens (1000 here); the ~1600-token prompt leaves
    # less room than that in the 2048-token context, so the pool generates to the end of it.
    mesh = await start_mesh(tmp_path, tiny_model, default_max_tokens=1000)
    try:
        request = generate_request("zz " * 800, ignore_eos=True)
        request.sampling.ClearField("max_tokens")
        got = await collect(mesh.stub.Generate(request, timeout=60))
        finished = got.finished
        assert 1000 > finished.tokens_out == 2048 - finished.tokens_in
        got.assert_contiguous()
    finally:
        await stop_mesh(mesh)

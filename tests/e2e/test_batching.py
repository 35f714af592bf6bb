"""Continuous batching end to end: several tasks decode at once on one pool's worker process.

Through the orchestrator and a real pool manager and worker: concurrent tasks run together and
the pool state shows them; batched greedy output equals each task's output alone; a worker
SIGKILLed with four streams in flight ends all four retriably; a KV cache made smaller than
slots x n_ctx ends only the youngest sequence; start predictions count every slot.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc, orchestrator_pb2
from llorch.poolmanager.v1 import poolmanager_pb2

from tests.conftest import LINKS, Mesh, start_mesh, stop_mesh
from tests.e2e.helpers import collect, error_details, generate_request
from tests.greedy import MARGIN, smallest_margin

LONG = 30_000  # tokens; seconds of decoding on the 32k tiny model


@pytest.fixture(params=LINKS)
async def four_slots(
    request: pytest.FixtureRequest, tmp_path: Path, long_model: Path
) -> AsyncIterator[Mesh]:
    mesh = await start_mesh(tmp_path, long_model, request.param, pool={"slots": 4})
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


async def _until_token(call: grpc.aio.UnaryStreamCall) -> str:
    """Reads a stream until its first token; returns its task id."""
    async for response in call:
        if response.event.WhichOneof("kind") == "token":
            return str(response.event.task_id)
    raise AssertionError("the stream ended before its first token")


async def test_tasks_run_at_once_on_one_pool_and_its_state_shows_them(four_slots: Mesh) -> None:
    mesh = four_slots
    calls = [mesh.stub.Generate(generate_request(f"stream {i}", max_tokens=LONG)) for i in range(4)]
    await asyncio.gather(*(_until_token(c) for c in calls))  # all four stream together
    ops = control_pb2_grpc.ControlServiceStub(mesh.channel)
    pool = (await ops.ListPools(control_pb2.ListPoolsRequest())).pools[0]
    assert (pool.slots_total, pool.slots_busy) == (4, 4)
    node = mesh.pool_manager.servicer
    state = await node.GetNode(poolmanager_pb2.GetNodeRequest(), None)
    assert (state.node.pools[0].slots_total, state.node.pools[0].slots_free) == (4, 0)
    # A fifth waits for a slot, and says so.
    fifth = await mesh.stub.SubmitTask(
        orchestrator_pb2.SubmitTaskRequest(
            model_id="tiny-llama", prompt="fifth", sampling=generate_request().sampling
        )
    )
    await asyncio.sleep(0.1)
    task = (await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=fifth.task_id))).task
    assert task.state == orchestrator_pb2.TASK_STATE_QUEUED
    assert [(x.pool, x.reason) for x in task.excluded_pools] == [("local/cpu-0", "no free slot")]
    calls[0].cancel()  # a slot frees: the fifth starts while the other three go on
    done = await collect(
        mesh.stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=fifth.task_id))
    )
    assert done.kinds[-1] == "finished"
    for call in calls[1:]:
        call.cancel()


async def test_concurrent_greedy_output_equals_each_alone(
    four_slots: Mesh, long_model: Path
) -> None:
    mesh = four_slots
    prompts = ["The pool", "A stream of", "Hello there friend", "one two three four five"]
    requests = [
        generate_request(p, max_tokens=48 + 8 * i, temperature=0.0) for i, p in enumerate(prompts)
    ]
    for r in requests:  # batch shape moves the logits a little: no near-tie may decide
        assert smallest_margin(long_model, r.prompt, r.sampling.max_tokens) > MARGIN, r.prompt
    alone = [(await collect(mesh.stub.Generate(r))).token_ids for r in requests]
    together = await asyncio.gather(*(collect(mesh.stub.Generate(r)) for r in requests))
    assert [c.token_ids for c in together] == alone
    for c in together:
        c.assert_contiguous()
        assert c.kinds[-1] == "finished"


async def test_a_worker_killed_with_four_streams_ends_all_four_retriable_within_a_second(
    four_slots: Mesh,
) -> None:
    mesh = four_slots
    calls = [mesh.stub.Generate(generate_request(f"s{i}", max_tokens=LONG)) for i in range(4)]
    await asyncio.gather(*(_until_token(c) for c in calls))
    os.kill(mesh.worker_pid(), signal.SIGKILL)
    killed_at = time.monotonic()

    async def failure(call: grpc.aio.UnaryStreamCall) -> tuple[grpc.aio.AioRpcError, float]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect(call)
        return raised.value, time.monotonic() - killed_at

    ended = await asyncio.gather(*(failure(c) for c in calls))
    for err, after_s in ended:
        assert after_s < 1.0
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        details = error_details(err)
        assert details["reason"] == "WORKER_CRASHED" and details["retriable"] is True
    assert await mesh.pool_manager.manager.wait_ready(30)


async def test_a_full_kv_cache_ends_only_the_youngest_retriably(
    tmp_path: Path, long_model: Path
) -> None:
    # 1,024 cells for four sequences of up to 2,048 tokens (the pool's kv_cache_tokens): three
    # streams of 600 tokens outgrow it together.
    mesh = await start_mesh(
        tmp_path, long_model, pool={"slots": 4, "n_ctx": 1024, "kv_cache_tokens": 1024}
    )
    try:
        calls = [mesh.stub.Generate(generate_request(f"s{i}", max_tokens=600)) for i in range(3)]

        async def outcome(call: grpc.aio.UnaryStreamCall) -> object:
            try:
                return await collect(call)
            except grpc.aio.AioRpcError as err:
                return err

        results = await asyncio.gather(*(outcome(c) for c in calls))
        finished = [r for r in results if not isinstance(r, grpc.aio.AioRpcError)]
        failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert finished and failed
        for got in finished:
            assert len(got.token_ids) == 600  # type: ignore[attr-defined]
        for err in failed:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            details = error_details(err)
            assert details["reason"] == "CONTEXT_FULL" and details["retriable"] is True
        # The pool serves on.
        got = await collect(mesh.stub.Generate(generate_request(max_tokens=8), timeout=30))
        assert len(got.token_ids) == 8
    finally:
        await stop_mesh(mesh)


async def test_start_predictions_count_every_slot(tmp_path: Path, long_model: Path) -> None:
    mesh = await start_mesh(tmp_path, long_model, pool={"slots": 2})
    try:
        for _ in range(2):  # the orchestrator learns the pool's service time
            await collect(mesh.stub.Generate(generate_request(max_tokens=400)))
        hogs = [mesh.stub.Generate(generate_request(f"h{i}", max_tokens=LONG)) for i in range(2)]
        await asyncio.gather(*(_until_token(c) for c in hogs))
        predicted = []
        for i in range(3):
            submitted = await mesh.stub.SubmitTask(
                orchestrator_pb2.SubmitTaskRequest(
                    model_id="tiny-llama",
                    prompt=f"q{i}",
                    sampling=generate_request(max_tokens=LONG).sampling,
                )
            )
            predicted.append(submitted.predicted_start_ms)
        # Two slots free at about the same time (both hogs started together): the first two
        # queued tasks start then; the third waits for one of them as well.
        first, second, third = predicted
        assert first > 0
        assert abs(second - first) < 0.25 * first
        assert third > first + 0.5 * first
        for hog in hogs:
            hog.cancel()
    finally:
        await stop_mesh(mesh)

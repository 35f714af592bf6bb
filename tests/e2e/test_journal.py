"""The task journal end to end: restarts of the orchestrator lose no accepted task.

One test restarts the orchestrator in-process (stop, then a new one on the same journal and
pool manager); the other SIGKILLs a whole `llorch up` and starts it again on the same data dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from tests.conftest import restart_orchestrator, start_mesh
from tests.e2e.helpers import collect, error_details, generate_request, start_llorch

LONG = 30_000


async def _first_token(call: grpc.aio.UnaryStreamCall) -> str:
    async for response in call:
        if response.event.WhichOneof("kind") == "token":
            return str(response.event.task_id)
    raise AssertionError("stream ended before its first token")


def _submit_request(name: str) -> orchestrator_pb2.SubmitTaskRequest:
    return orchestrator_pb2.SubmitTaskRequest(
        model_id="tiny-llama",
        prompt=f"queued {name}",
        sampling=common_pb2.SamplingParams(max_tokens=6, seed=11),
    )


async def test_restart_requeues_queued_replays_finished_and_fails_running(
    tmp_path: Path, long_model: Path
) -> None:
    # One slot: the hog holds it, so the three tasks submitted after it stay queued.
    mesh = await start_mesh(tmp_path, long_model, pool={"slots": 1})
    new_app = None
    channel = None
    try:
        live = await collect(mesh.stub.Generate(generate_request(max_tokens=24, seed=5)))
        finished_id = live.events[0].task_id
        hog = mesh.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True))
        hog_id = await _first_token(hog)
        queued = [(await mesh.stub.SubmitTask(_submit_request(str(i)))).task_id for i in range(3)]

        await mesh.orchestrator.stop()  # the pool manager and catalog keep running
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in hog:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE

        new_app = await restart_orchestrator(mesh, tmp_path)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{new_app.port}")
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

        # Queued tasks run after the restart.
        for task_id in queued:
            done = await collect(
                stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=task_id))
            )
            assert done.kinds[0] == "queued"
            assert done.kinds[-1] == "finished"
            done.assert_contiguous()
        # A finished task replays exactly the tokens its live stream had.
        replay = await collect(
            stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=finished_id))
        )
        assert replay.token_ids == live.token_ids
        assert replay.text == live.text
        assert replay.kinds[-1] == "finished"
        # The task that was running ended retriable, with how far it got.
        hog_task = (await stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=hog_id))).task
        assert hog_task.state == orchestrator_pb2.TASK_STATE_FAILED
        assert hog_task.error.reason == "ORCHESTRATOR_RESTARTED"
        assert hog_task.error.retriable
        assert hog_task.tokens_out > 0
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await collect(stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=hog_id)))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(failed.value)["reason"] == "ORCHESTRATOR_RESTARTED"
    finally:
        if channel is not None:
            await channel.close()
        if new_app is not None:
            await new_app.stop()
        await mesh.channel.close()
        await mesh.pool_manager.stop()
        await mesh.catalog.stop()


def _up(data_dir: Path, model: Path) -> tuple[subprocess.Popen[str], str]:
    return start_llorch(
        ["up"],
        {
            "LLORCH_DATA_DIR": str(data_dir),
            "LLORCH_LISTEN": "127.0.0.1:0",
            "LLORCH_GATEWAY_LISTEN": "",  # no REST edge: this test is about the journal
            "LLORCH_MODELS": json.dumps({"long": str(model)}),
            # One slot: the hog holds it, so the tasks submitted after it wait in the queue.
            "LLORCH_POOL_MANAGER__POOLS": json.dumps(
                [{"pool_id": "cpu-0", "model_id": "long", "slots": 1}]
            ),
        },
    )


async def test_sigkilled_home_profile_runs_its_queued_tasks_after_restart(
    tmp_path: Path, long_model: Path
) -> None:
    data_dir = tmp_path / "data"
    proc, address = _up(data_dir, long_model)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            hog = stub.Generate(generate_request("hold", "long", max_tokens=LONG, ignore_eos=True))
            hog_id = await _first_token(hog)
            queued = []
            for i in range(3):
                request = _submit_request(str(i))
                request.model_id = "long"
                queued.append((await stub.SubmitTask(request)).task_id)
            os.kill(proc.pid, signal.SIGKILL)  # no goodbye: only the journal remembers
            proc.wait()
            hog.cancel()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc, address = _up(data_dir, long_model)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            results = await asyncio.gather(
                *(
                    collect(stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=t)))
                    for t in queued
                )
            )
            for done in results:
                assert done.kinds[-1] == "finished"
                assert done.finished.tokens_out == 6
            hog_task = (await stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=hog_id))).task
            assert hog_task.error.reason == "ORCHESTRATOR_RESTARTED"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)

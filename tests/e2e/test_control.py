"""ControlService and the operator commands: list, drain, resume, capabilities."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest
from llorch.orchestrator.v1 import (
    control_pb2,
    control_pb2_grpc,
    orchestrator_pb2,
)

from tests.conftest import Mesh
from tests.e2e.helpers import collect, error_details, generate_request

LONG = 30_000


def control(mesh: Mesh) -> control_pb2_grpc.ControlServiceStub:
    return control_pb2_grpc.ControlServiceStub(mesh.channel)


async def test_list_get_and_capabilities(mesh: Mesh) -> None:
    node = mesh.pool_manager.manager.node_id
    pools = (await control(mesh).ListPools(control_pb2.ListPoolsRequest())).pools
    assert [(p.node_id, p.pool_id, p.model_id, p.state) for p in pools] == [
        (node, "cpu-0", "tiny-llama", "ready")
    ]
    assert pools[0].reachable and not pools[0].drained
    assert pools[0].slots_total == 1 and list(pools[0].devices) == ["cpu"]
    got = await control(mesh).GetPool(control_pb2.GetPoolRequest(node_id=node, pool_id="cpu-0"))
    assert got.pool == pools[0]
    caps = (await control(mesh).GetCapabilities(control_pb2.GetCapabilitiesRequest())).models
    assert [(c.model_id, c.pools, c.pools_ready) for c in caps] == [("tiny-llama", 1, 1)]
    assert caps[0].max_context_tokens == pools[0].n_ctx > 0
    assert list(caps[0].engine_versions) == [pools[0].engine_version]


async def test_bad_pool_references(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await control(mesh).GetPool(control_pb2.GetPoolRequest(node_id="nope", pool_id="cpu-0"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(missing.value)["reason"] == "POOL_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await control(mesh).DrainPool(control_pb2.DrainPoolRequest(pool_id="cpu-0"))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(empty.value)["fields"] == ["node_id"]
    node = mesh.pool_manager.manager.node_id
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await control(mesh).DrainPool(
            control_pb2.DrainPoolRequest(node_id=node, pool_id="cpu-0", deadline_ms=10**9)
        )
    assert error_details(too_long.value)["fields"] == ["deadline_ms"]


async def test_drain_ends_running_work_at_the_deadline_and_resume_serves_the_queue(
    long_mesh: Mesh,
) -> None:
    mesh = long_mesh
    node = mesh.pool_manager.manager.node_id
    hog = mesh.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True))
    async for response in hog:
        if response.event.WhichOneof("kind") == "token":
            break
    drained = await control(mesh).DrainPool(
        control_pb2.DrainPoolRequest(node_id=node, pool_id="cpu-0", deadline_ms=300)
    )
    assert drained.pool.drained
    # New work waits; the drained pool is named as the reason.
    waiting = await mesh.stub.SubmitTask(
        orchestrator_pb2.SubmitTaskRequest(
            model_id="tiny-llama", prompt="after", sampling=generate_request(max_tokens=3).sampling
        )
    )
    # The running task is cancelled at the deadline, retriable.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for _ in hog:
            pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(ended.value)["reason"] == "POOL_DRAINED"
    await asyncio.sleep(0.2)
    task = (await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=waiting.task_id))).task
    assert task.state == orchestrator_pb2.TASK_STATE_QUEUED
    assert [e.reason for e in task.excluded_pools] == ["draining"]
    resumed = await control(mesh).ResumePool(
        control_pb2.ResumePoolRequest(node_id=node, pool_id="cpu-0")
    )
    assert not resumed.pool.drained
    done = await collect(
        mesh.stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=waiting.task_id))
    )
    assert done.kinds[-1] == "finished"


def _llorch(*args: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args, "--orchestrator", address],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
        check=False,
    )


async def test_operator_commands(mesh: Mesh) -> None:
    node = mesh.pool_manager.manager.node_id
    listed = await asyncio.to_thread(_llorch, "pools", "list", address=mesh.address)
    assert listed.returncode == 0, listed.stderr
    assert f"{node}/cpu-0" in listed.stdout and "tiny-llama" in listed.stdout
    drained = await asyncio.to_thread(
        _llorch, "pools", "drain", f"{node}/cpu-0", "--deadline", "1", address=mesh.address
    )
    assert drained.returncode == 0, drained.stderr
    assert "drained" in drained.stdout
    resumed = await asyncio.to_thread(
        _llorch, "pools", "resume", f"{node}/cpu-0", address=mesh.address
    )
    assert resumed.returncode == 0 and "drained" not in resumed.stdout
    missing = await asyncio.to_thread(_llorch, "pools", "drain", "x/y", address=mesh.address)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    done = await collect(mesh.stub.Generate(generate_request(max_tokens=2)))
    task = await asyncio.to_thread(
        _llorch, "tasks", "get", done.events[0].task_id, address=mesh.address
    )
    assert task.returncode == 0, task.stderr
    assert '"state": "TASK_STATE_SUCCEEDED"' in task.stdout

"""WatchNode: the pool manager pushes its state on change and on heartbeat; the orchestrator
notices a lost pool manager by the stream breaking or falling silent."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
from llorch.orchestrator.v1 import orchestrator_pb2
from llorch.poolmanager.v1 import poolmanager_pb2, poolmanager_pb2_grpc

from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from tests.conftest import Mesh, start_mesh, stop_mesh
from tests.e2e.helpers import register_model


async def test_state_is_pushed_on_change_and_repeated_on_heartbeat(mesh: Mesh) -> None:
    await mesh.settle()
    async with grpc.aio.insecure_channel(mesh.pool_manager.address) as channel:
        stub = poolmanager_pb2_grpc.PoolManagerServiceStub(channel)
        call = stub.WatchNode(poolmanager_pb2.WatchNodeRequest(heartbeat_ms=200))
        stream = aiter(call)
        first = await anext(stream)
        assert first.node.node_id == mesh.pool_manager.manager.node_id
        assert first.node.pools[0].state == poolmanager_pb2.POOL_STATE_READY
        # Idle: the same state again after about one heartbeat.
        started = time.monotonic()
        beat = await anext(stream)
        assert beat.version == first.version
        assert 0.1 < time.monotonic() - started < 1.0
        # A change comes at once, not on the next heartbeat.
        os.kill(mesh.worker_pid(), signal.SIGKILL)
        seen = []
        async with asyncio.timeout(10):
            async for response in stream:
                seen.append(response.node.pools[0].state)
                if (
                    response.version > first.version
                    and seen[-1] == poolmanager_pb2.POOL_STATE_READY
                ):
                    break
        assert poolmanager_pb2.POOL_STATE_LOADING in seen
        call.cancel()


async def test_a_heartbeat_below_the_floor_is_raised(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.pool_manager.address) as channel:
        stub = poolmanager_pb2_grpc.PoolManagerServiceStub(channel)
        call = stub.WatchNode(poolmanager_pb2.WatchNodeRequest(heartbeat_ms=1))
        stream = aiter(call)
        version = (await anext(stream)).version
        started = time.monotonic()
        async with asyncio.timeout(10):
            while True:  # a change (a spare worker becoming ready) may come first
                response = await anext(stream)
                if response.version == version:  # a heartbeat
                    break
                version, started = response.version, time.monotonic()
        assert time.monotonic() - started >= 0.09  # 100 ms floor, not 1 ms
        call.cancel()


async def test_the_orchestrator_marks_a_lost_pool_manager_unreachable(
    tmp_path: Path, tiny_model: Path
) -> None:
    # Over gRPC only: an in-process pool manager cannot be lost without the orchestrator.
    mesh = await start_mesh(tmp_path, tiny_model, "grpc")
    try:
        registry = mesh.orchestrator.orchestrator.registry
        assert all(v.reachable for v in registry.views())
        await mesh.pool_manager.server.stop(grace_s=0)
        started = time.monotonic()
        async with asyncio.timeout(10):
            while any(v.reachable for v in registry.views()):  # noqa: ASYNC110 - no event to await
                await asyncio.sleep(0.05)
        # The broken stream shows at once; silence would show within node_lost_s (3 s).
        assert time.monotonic() - started < 3.5
        # New work waits for the node instead of failing.
        task = await mesh.stub.SubmitTask(
            orchestrator_pb2.SubmitTaskRequest(model_id="tiny-llama", prompt="later")
        )
        got = await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=task.task_id))
        assert got.task.state == orchestrator_pb2.TASK_STATE_QUEUED
        assert "unreachable" in got.task.excluded_pools[0].reason
    finally:
        await stop_mesh(mesh)


async def test_the_models_a_node_stores_reach_placement(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.settle()
    assert mesh.pool_manager.manager.stored_models == {"tiny-llama"}  # read at start
    await register_model(
        mesh, "other-llama", write_tiny_model(tmp_path / "other.gguf", TinyModelSpec(seed=9))
    )
    async with grpc.aio.insecure_channel(mesh.pool_manager.address) as channel:
        stub = poolmanager_pb2_grpc.PoolManagerServiceStub(channel)
        call = stub.WatchNode(poolmanager_pb2.WatchNodeRequest(heartbeat_ms=5000))
        stream = aiter(call)
        first = await anext(stream)
        assert list(first.node.stored_models) == ["tiny-llama"]
        await mesh.pool_manager.refresh_store()  # as its 30 s timer would
        async with asyncio.timeout(2):  # pushed at once, well before the heartbeat
            pushed = await anext(stream)
        assert list(pushed.node.stored_models) == ["other-llama", "tiny-llama"]
        call.cancel()
    registry = mesh.orchestrator.orchestrator.registry
    for _ in range(100):  # the orchestrator's own watch stream brings it within a heartbeat
        if registry.views()[0].disk_models == {"other-llama", "tiny-llama"}:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"placement never saw it: {registry.views()[0].disk_models}")

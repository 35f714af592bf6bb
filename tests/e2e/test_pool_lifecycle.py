"""PoolManagerService lifecycle RPCs on a running mesh: reload (the orchestrator follows the new
model through WatchNode), rollback, drain and preload, staging, and bad input."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from llorch.poolmanager.v1 import poolmanager_pb2, poolmanager_pb2_grpc

from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from tests.conftest import Mesh
from tests.e2e.helpers import collect, error_details, generate_request, register_model


def _stub(mesh: Mesh) -> tuple[grpc.aio.Channel, poolmanager_pb2_grpc.PoolManagerServiceStub]:
    channel = grpc.aio.insecure_channel(mesh.pool_manager.address)
    return channel, poolmanager_pb2_grpc.PoolManagerServiceStub(channel)


async def test_reload_moves_the_pool_and_the_orchestrator_follows(
    mesh: Mesh, tmp_path: Path
) -> None:
    await register_model(
        mesh, "other-llama", write_tiny_model(tmp_path / "o.gguf", TinyModelSpec(seed=9))
    )
    channel, pm = _stub(mesh)
    try:
        reloaded = await pm.ReloadPool(
            poolmanager_pb2.ReloadPoolRequest(pool_id="cpu-0", model_id="other-llama")
        )
        assert reloaded.pool.state == poolmanager_pb2.POOL_STATE_READY
        assert (reloaded.pool.model_id, reloaded.pool.cpu_only) == ("other-llama", True)
        assert reloaded.pool.loaded_from == "disk" and reloaded.pool.load_ms > 0
        got = await collect(
            mesh.stub.Generate(generate_request(model_id="other-llama", max_tokens=4))
        )
        got.assert_contiguous()
        assert got.finished.tokens_out == 4

        with pytest.raises(grpc.aio.AioRpcError) as rolled_back:
            await pm.ReloadPool(
                poolmanager_pb2.ReloadPoolRequest(pool_id="cpu-0", model_id="not-registered")
            )
        assert rolled_back.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(rolled_back.value)["reason"] == "RELOAD_ROLLED_BACK"
        node = (await pm.GetNode(poolmanager_pb2.GetNodeRequest())).node
        assert node.pools[0].model_id == "other-llama"
        assert "rolled back to other-llama" in node.pools[0].last_error
        assert node.gpu_status  # no NVML here, and the node says so
    finally:
        await channel.close()


async def test_drain_preload_and_staging(mesh: Mesh) -> None:
    channel, pm = _stub(mesh)
    try:
        drained = await pm.DrainPool(
            poolmanager_pb2.DrainPoolRequest(pool_id="cpu-0", deadline_ms=0)
        )
        assert drained.pool.state == poolmanager_pb2.POOL_STATE_UNLOADED
        assert (drained.finished, drained.cancelled) == (0, 0)
        staged = await pm.StageModel(poolmanager_pb2.StageModelRequest(model_id="tiny-llama"))
        assert [m.model_id for m in staged.staging.models] == ["tiny-llama"]
        assert not staged.staging.models[0].in_use
        loaded = await pm.PreloadPool(poolmanager_pb2.PreloadPoolRequest(pool_id="cpu-0"))
        assert loaded.pool.state == poolmanager_pb2.POOL_STATE_READY
        assert loaded.pool.loaded_from == "staging"
        with pytest.raises(grpc.aio.AioRpcError) as in_use:
            await pm.UnstageModel(poolmanager_pb2.UnstageModelRequest(model_id="tiny-llama"))
        assert in_use.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(in_use.value)["reason"] == "MODEL_IN_USE"
        node = (await pm.GetNode(poolmanager_pb2.GetNodeRequest())).node
        assert node.staging.hits == 1 and node.staging.models[0].in_use
        got = await collect(mesh.stub.Generate(generate_request(max_tokens=3)))
        assert got.finished.tokens_out == 3
    finally:
        await channel.close()


async def test_bad_lifecycle_requests_name_the_field(mesh: Mesh) -> None:
    channel, pm = _stub(mesh)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await pm.ReloadPool(poolmanager_pb2.ReloadPoolRequest(pool_id="cpu-0"))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(empty.value)["fields"] == ["model_id"]
        with pytest.raises(grpc.aio.AioRpcError) as bad_name:
            await pm.StageModel(poolmanager_pb2.StageModelRequest(model_id="../etc/passwd"))
        assert error_details(bad_name.value)["fields"] == ["model_id"]
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await pm.DrainPool(poolmanager_pb2.DrainPoolRequest(pool_id="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await pm.PreloadPool(
                poolmanager_pb2.PreloadPoolRequest(pool_id="cpu-0", model_id="other-llama")
            )
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(busy.value)["reason"] == "POOL_BUSY"
    finally:
        await channel.close()

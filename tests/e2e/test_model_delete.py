"""Deleting a model through ControlService: refused while in use, or draining it first; the
catalog forgets it and the node's garbage collection removes its file."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc

from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from tests.conftest import Mesh, start_mesh, stop_mesh
from tests.e2e.helpers import (
    collect,
    error_details,
    generate_request,
    register_model,
    run_llorch,
)


def control(mesh: Mesh) -> control_pb2_grpc.ControlServiceStub:
    return control_pb2_grpc.ControlServiceStub(mesh.channel)


async def _exists(mesh: Mesh, model_id: str) -> bool:
    async with grpc.aio.insecure_channel(mesh.catalog.address) as channel:
        try:
            await catalog_pb2_grpc.CatalogServiceStub(channel).GetModel(
                catalog_pb2.GetModelRequest(model_id=model_id)
            )
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            return False
    return True


async def test_a_model_in_use_is_refused_unless_drained(long_mesh: Mesh, tmp_path: Path) -> None:
    mesh = long_mesh
    node = mesh.pool_manager.manager.node_id
    await register_model(mesh, "idle", write_tiny_model(tmp_path / "idle.gguf", TinyModelSpec(3)))
    idle = await control(mesh).DeleteModel(control_pb2.DeleteModelRequest(model_id="idle"))
    assert list(idle.drained_pools) == [] and idle.tasks_ended == 0
    assert [f.split(":", 1)[0] for f in idle.files] == [node]
    assert not await _exists(mesh, "idle")

    running = mesh.stub.Generate(generate_request(max_tokens=20_000))
    async for response in running:
        if response.event.WhichOneof("kind") == "token":
            break
    with pytest.raises(grpc.aio.AioRpcError) as in_use:
        await control(mesh).DeleteModel(control_pb2.DeleteModelRequest(model_id="tiny-llama"))
    assert in_use.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(in_use.value)["reason"] == "MODEL_IN_USE"
    assert f"{node}/cpu-0" in (in_use.value.details() or "")

    drained = await control(mesh).DeleteModel(
        control_pb2.DeleteModelRequest(model_id="tiny-llama", drain=True)
    )
    assert list(drained.drained_pools) == [f"{node}/cpu-0"] and drained.tasks_ended == 1
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await collect(running)
    assert error_details(ended.value)["reason"] == "MODEL_DELETED"
    assert mesh.pool_manager.manager.pools["cpu-0"].worker is None  # unloaded
    assert not await _exists(mesh, "tiny-llama")
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await collect(mesh.stub.Generate(generate_request(max_tokens=2)))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_delete_requests(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await control(mesh).DeleteModel(control_pb2.DeleteModelRequest())
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(empty.value)["fields"] == ["model_id"]
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await control(mesh).DeleteModel(control_pb2.DeleteModelRequest(model_id="no-such"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_file_goes_with_the_next_collection(tmp_path: Path, tiny_model: Path) -> None:
    store = tmp_path / "store"
    mesh = await start_mesh(
        tmp_path / "mesh",
        tiny_model,
        pool_manager={"model_store": store, "gc_interval_s": 0, "spare_workers": False},
    )
    try:
        store.mkdir(exist_ok=True)
        old = write_tiny_model(store / "old.gguf", TinyModelSpec(8))
        await register_model(mesh, "old", old)
        hour_ago = time.time() - 3600  # past the store's grace period for unknown files
        os.utime(old, (hour_ago, hour_ago))
        removed = await asyncio.to_thread(
            run_llorch, "models", "rm", "old", "--orchestrator", mesh.address
        )
        assert removed.returncode == 0, removed.stderr
        assert "old: deleted" in removed.stdout and f"forgot local:{old}" in removed.stdout
        assert not old.exists()
    finally:
        await stop_mesh(mesh)

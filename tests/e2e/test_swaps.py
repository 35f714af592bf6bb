"""Models loaded on demand. A task for a registered model that no pool holds makes the
orchestrator load it into an idle pool (the pool manager's ReloadPool); a busy pool is never
swapped; a model that fails to load ends its tasks with the load's error and is not tried on that
pool again for a while; a pool that may not swap leaves such tasks refused at admission."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from llorch.orchestrator.v1 import orchestrator_pb2

from mesh.server import open_channel
from provisioners.models import register_local_file
from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from tests.conftest import Mesh, start_mesh, stop_mesh
from tests.e2e.helpers import collect, error_details, generate_request, register_model


async def _other(mesh: Mesh, tmp_path: Path) -> None:
    await register_model(
        mesh, "other-llama", write_tiny_model(tmp_path / "other.gguf", TinyModelSpec(seed=9))
    )


async def test_a_task_for_another_model_loads_it_into_the_idle_pool_and_back(
    mesh: Mesh, tmp_path: Path
) -> None:
    await _other(mesh, tmp_path)
    pool = mesh.pool_manager.manager.pools["cpu-0"]
    got = await collect(mesh.stub.Generate(generate_request(model_id="other-llama", max_tokens=3)))
    got.assert_contiguous()
    assert got.finished.tokens_out == 3
    assert pool.model_id == "other-llama"
    back = await collect(mesh.stub.Generate(generate_request(max_tokens=3)))
    assert back.finished.tokens_out == 3
    assert pool.model_id == "tiny-llama"


async def test_a_busy_pool_is_not_swapped_until_its_work_is_done(
    long_mesh: Mesh, tmp_path: Path
) -> None:
    mesh = long_mesh
    await _other(mesh, tmp_path)
    hog = mesh.stub.Generate(generate_request(max_tokens=30_000, ignore_eos=True))
    hog_id = ""
    async for response in hog:
        hog_id = response.event.task_id
        if response.event.WhichOneof("kind") == "token":
            break
    waiting = await mesh.stub.SubmitTask(
        orchestrator_pb2.SubmitTaskRequest(
            model_id="other-llama",
            prompt="later",
            sampling=generate_request(max_tokens=3).sampling,
        )
    )
    await asyncio.sleep(0.5)
    task = (await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=waiting.task_id))).task
    assert task.state == orchestrator_pb2.TASK_STATE_QUEUED
    assert mesh.pool_manager.manager.pools["cpu-0"].model_id == "tiny-llama"
    await mesh.stub.CancelTask(orchestrator_pb2.CancelTaskRequest(task_id=hog_id))
    done = await collect(
        mesh.stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=waiting.task_id))
    )
    assert done.finished.tokens_out == 3
    assert mesh.pool_manager.manager.pools["cpu-0"].model_id == "other-llama"
    hog.cancel()


@pytest.fixture(params=[True, False], ids=["spares", "no-spares"])
async def any_mesh(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_model: Path
) -> AsyncIterator[Mesh]:
    """A mesh with spare workers on and off: nothing may depend on the node's state changing
    after a failed load (a new spare becoming ready would wake the orchestrator)."""
    running = await start_mesh(
        tmp_path / "mesh", tiny_model, pool_manager={"spare_workers": request.param}
    )
    try:
        yield running
    finally:
        await stop_mesh(running)


async def test_a_model_that_fails_to_load_fails_its_tasks_and_is_not_retried_at_once(
    any_mesh: Mesh, tmp_path: Path
) -> None:
    mesh = any_mesh
    # Registered whole, then damaged on disk: the header reads, llama.cpp refuses the load.
    broken = write_tiny_model(tmp_path / "broken.gguf", TinyModelSpec(seed=11))
    await register_model(mesh, "broken-llama", broken)
    broken.write_bytes(broken.read_bytes()[:4096] + os.urandom(4096))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await collect(
            mesh.stub.Generate(generate_request(model_id="broken-llama", max_tokens=3), timeout=30)
        )
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(failed.value)["reason"] == "MODEL_LOAD_FAILED"
    assert "rolled back to tiny-llama" in failed.value.details()
    pool = mesh.pool_manager.manager.pools["cpu-0"]
    assert pool.model_id == "tiny-llama"
    worker = mesh.worker_pid()
    # Within the cooldown the pool is not tried again: the task fails without a reload.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await collect(
            mesh.stub.Generate(generate_request(model_id="broken-llama", max_tokens=3), timeout=5)
        )
    assert error_details(again.value)["reason"] == "MODEL_LOAD_FAILED"
    assert mesh.worker_pid() == worker
    served = await collect(mesh.stub.Generate(generate_request(max_tokens=3)))
    assert served.finished.tokens_out == 3


async def test_a_pool_that_may_not_swap_refuses_other_models_at_admission(
    tmp_path: Path, tiny_model: Path
) -> None:
    mesh = await start_mesh(tmp_path, tiny_model, pool={"swappable": False})
    try:
        await _other(mesh, tmp_path)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(
                mesh.stub.Generate(generate_request(model_id="other-llama", max_tokens=3))
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(refused.value)["reason"] == "NO_POOL_FOR_MODEL"
    finally:
        await stop_mesh(mesh)


async def test_a_model_the_node_lacks_is_fetched_into_its_store_and_recorded(
    tmp_path: Path, tiny_model: Path
) -> None:
    store = tmp_path / "store"
    mesh = await start_mesh(tmp_path, tiny_model, pool_manager={"model_store": store})
    try:
        source = write_tiny_model(tmp_path / "elsewhere" / "other.gguf", TinyModelSpec(seed=9))
        channel = open_channel(mesh.catalog.address)
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        # Only another node holds it; its ref says where it came from.
        await register_local_file(catalog, "other-llama", source, "node-elsewhere")
        broken = write_tiny_model(tmp_path / "gone" / "broken.gguf", TinyModelSpec(seed=3))
        await register_local_file(catalog, "gone-llama", broken, "node-elsewhere")
        broken.unlink()  # its source is gone: fetching it must fail, and say why
        got = await collect(
            mesh.stub.Generate(generate_request(model_id="other-llama", max_tokens=3))
        )
        assert got.finished.tokens_out == 3
        assert (store / "other-llama.gguf").read_bytes() == source.read_bytes()
        where = await catalog.LocateModel(catalog_pb2.LocateModelRequest(model_id="other-llama"))
        assert sorted(loc.node_id for loc in where.locations) == ["local", "node-elsewhere"]
        assert "other-llama" in mesh.pool_manager.manager.stored_models
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await collect(mesh.stub.Generate(generate_request(model_id="gone-llama")))
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "SOURCE_NOT_FOUND" in (failed.value.details() or "")
        assert not (store / "gone-llama.gguf").exists()
        await channel.close()
    finally:
        await stop_mesh(mesh)

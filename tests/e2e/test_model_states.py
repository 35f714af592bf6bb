"""Retired models on a running mesh: new tasks are refused, running ones finish; the
``llorch models retire|activate|pin|unpin`` commands and the list filters."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from tests.conftest import Mesh
from tests.e2e.helpers import collect, error_details, generate_request, run_llorch


async def test_a_retired_model_takes_no_new_tasks_and_running_ones_finish(
    long_mesh: Mesh,
) -> None:
    mesh = long_mesh
    running = mesh.stub.Generate(generate_request(max_tokens=60, ignore_eos=True))
    async for response in running:
        if response.event.WhichOneof("kind") == "token":
            break
    async with grpc.aio.insecure_channel(mesh.catalog.address) as channel:
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        await catalog.SetModelState(
            catalog_pb2.SetModelStateRequest(
                model_id="tiny-llama", state=catalog_pb2.MODEL_STATE_RETIRED
            )
        )
        # The orchestrator caches model facts for up to 2 s.
        deadline = time.monotonic() + 5
        while True:
            try:
                await collect(mesh.stub.Generate(generate_request(max_tokens=1)))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_details(err)["reason"] == "MODEL_RETIRED"
                break
            assert time.monotonic() < deadline, "a retired model still takes tasks"
            await asyncio.sleep(0.2)
        # The task that was running when the model was retired runs to its end.
        rest = await collect(running)
        assert rest.finished.tokens_out == 60
        await catalog.SetModelState(
            catalog_pb2.SetModelStateRequest(
                model_id="tiny-llama", state=catalog_pb2.MODEL_STATE_ACTIVE
            )
        )
    await asyncio.sleep(2.1)
    again = await collect(mesh.stub.Generate(generate_request(max_tokens=2)))
    assert again.finished.tokens_out == 2


@pytest.mark.parametrize("mesh", ["grpc"], indirect=True)
async def test_model_state_commands(mesh: Mesh) -> None:
    address = mesh.catalog.address
    retired = await asyncio.to_thread(
        run_llorch, "models", "retire", "tiny-llama", "--catalog", address
    )
    assert retired.returncode == 0, retired.stderr
    assert retired.stdout.strip() == "tiny-llama: retired"
    pinned = await asyncio.to_thread(
        run_llorch, "models", "pin", "tiny-llama", "--catalog", address
    )
    assert pinned.stdout.strip() == "tiny-llama: retired, pinned"
    listed = await asyncio.to_thread(
        run_llorch, "models", "list", "--state", "retired", "--json", "--catalog", address
    )
    assert listed.returncode == 0, listed.stderr
    assert '"model_id": "tiny-llama"' in listed.stdout and '"pinned": true' in listed.stdout
    active = await asyncio.to_thread(
        run_llorch, "models", "list", "--state", "active", "--json", "--catalog", address
    )
    assert active.stdout.strip() == "[]"
    back = await asyncio.to_thread(
        run_llorch, "models", "activate", "tiny-llama", "--catalog", address
    )
    unpinned = await asyncio.to_thread(
        run_llorch, "models", "unpin", "tiny-llama", "--catalog", address
    )
    assert back.returncode == 0 and unpinned.stdout.strip() == "tiny-llama: active"
    missing = await asyncio.to_thread(
        run_llorch, "models", "retire", "no-such", "--catalog", address
    )
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


@pytest.mark.parametrize("mesh", ["grpc"], indirect=True)
async def test_pool_managers_report_when_models_ran(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.catalog.address) as channel:
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        before = (await catalog.GetModel(catalog_pb2.GetModelRequest(model_id="tiny-llama"))).model
        await mesh.pool_manager.report_usage()  # nothing ran yet: nothing is reported
        assert before.last_used_unix_ms == 0
        started = int(time.time() * 1000)
        await collect(mesh.stub.Generate(generate_request(max_tokens=2)))
        await mesh.pool_manager.report_usage()  # what the minute timer does
        after = (await catalog.GetModel(catalog_pb2.GetModelRequest(model_id="tiny-llama"))).model
        assert after.last_used_unix_ms >= started
        where = await catalog.LocateModel(
            catalog_pb2.LocateModelRequest(
                model_id="tiny-llama", node_id=mesh.pool_manager.manager.node_id
            )
        )
        assert where.locations[0].last_used_unix_ms >= started
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await catalog.MarkModelsUsed(
                catalog_pb2.MarkModelsUsedRequest(node_id="n1", model_ids=["ok", "Not OK"])
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model_ids[1]" in (bad.value.details() or "")

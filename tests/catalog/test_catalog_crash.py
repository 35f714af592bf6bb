"""The catalog process SIGKILLed while it registers models, many times over: it always opens
again, and every model it knows has its whole record (facts and replica), never half of one."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import grpc
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from provisioners.models import register_local_file
from tests.e2e.helpers import start_llorch


async def _register_until_killed(address: str, model: Path, start: int) -> int:
    """Registers models one after another until the catalog goes away; returns how many
    answered."""
    done = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        try:
            for i in range(start, start + 10_000):
                await register_local_file(stub, f"m-{i:05d}", model, "local")
                done += 1
        except Exception:  # the catalog was killed mid-call
            pass
    return done


async def test_a_catalog_killed_mid_registration_always_reopens_consistent(
    tmp_path: Path, tiny_model: Path
) -> None:
    rng = random.Random(11)
    env = {"LLORCH_DATA_DIR": str(tmp_path / "data"), "LLORCH_LISTEN": "127.0.0.1:0"}
    answered = 0
    for round_ in range(6):
        proc, address = await asyncio.to_thread(start_llorch, ["serve", "catalog"], env)
        writer = asyncio.create_task(_register_until_killed(address, tiny_model, round_ * 10_000))
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        answered += await writer
    # It opens again, and what it holds is whole.
    proc, address = await asyncio.to_thread(start_llorch, ["serve", "catalog"], env)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            models, token = [], ""
            while True:
                page = await stub.ListModels(
                    catalog_pb2.ListModelsRequest(page_size=1000, page_token=token)
                )
                models += list(page.models)
                token = page.next_page_token
                if not token:
                    break
            # Every registration that was answered is there; at most one per round beyond.
            assert answered <= len(models) <= answered + 6
            for model in models:
                assert model.facts.architecture == "llama" and len(model.sha256) == 64
                where = await stub.LocateModel(
                    catalog_pb2.LocateModelRequest(model_id=model.model_id)
                )
                assert [loc.node_id for loc in where.locations] == ["local"]
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait)
    assert answered > 0  # the test did register things before each kill

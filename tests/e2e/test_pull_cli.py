"""``llorch models pull`` from a local HTTP server into the node's store: registered with its
replica and served by the mesh (loaded on demand); a failed pull registers nothing and leaves
no file."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from tests.conftest import Mesh
from tests.e2e.helpers import collect, generate_request, run_llorch
from tests.provisioners.model_server import ModelServer


@pytest.mark.parametrize("mesh", ["grpc"], indirect=True)
async def test_pull_registers_the_file_and_the_mesh_serves_it(mesh: Mesh, tmp_path: Path) -> None:
    data = write_tiny_model(tmp_path / "src.gguf", TinyModelSpec(seed=5)).read_bytes()
    server = ModelServer({"Other-Llama.gguf": data}).start()
    store = tmp_path / "store"
    node = mesh.pool_manager.manager.node_id
    try:
        url = f"{server.url}/drop/Other-Llama.gguf"  # the first transfer breaks halfway
        pulled = await asyncio.to_thread(
            run_llorch,
            "models",
            "pull",
            url,
            "--store",
            str(store),
            "--node-id",
            node,
            "--catalog",
            mesh.catalog.address,
        )
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.startswith("other-llama: ")
        assert "B/s" in pulled.stderr or "iB" in pulled.stderr  # the progress bar
        bad = await asyncio.to_thread(
            run_llorch,
            "models",
            "pull",
            f"{server.url}/Other-Llama.gguf",
            "--name",
            "second",
            "--sha256",
            "0" * 64,
            "--store",
            str(store),
            "--catalog",
            mesh.catalog.address,
        )
        assert bad.returncode == 1 and "SHA256_MISMATCH" in bad.stderr
    finally:
        server.stop()
    assert sorted(p.name for p in store.iterdir()) == ["other-llama.gguf"]
    async with grpc.aio.insecure_channel(mesh.catalog.address) as channel:
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        model = (await catalog.GetModel(catalog_pb2.GetModelRequest(model_id="other-llama"))).model
        assert model.source_ref == url and model.size_bytes == len(data)
        where = await catalog.LocateModel(catalog_pb2.LocateModelRequest(model_id="other-llama"))
        assert [(loc.node_id, loc.path) for loc in where.locations] == [
            (node, str(store / "other-llama.gguf"))
        ]
        with pytest.raises(grpc.aio.AioRpcError):
            await catalog.GetModel(catalog_pb2.GetModelRequest(model_id="second"))
    got = await collect(mesh.stub.Generate(generate_request(model_id="other-llama", max_tokens=3)))
    assert got.finished.tokens_out == 3
    # The file lost (a disk swap, a GC elsewhere): pulling the same ref again restores it.
    (store / "other-llama.gguf").unlink()
    server = ModelServer({"Other-Llama.gguf": data}).start()
    try:
        again = await asyncio.to_thread(
            run_llorch,
            "models",
            "pull",
            f"{server.url}/Other-Llama.gguf",
            "--name",
            "other-llama",
            "--store",
            str(store),
            "--node-id",
            node,
            "--catalog",
            mesh.catalog.address,
        )
    finally:
        server.stop()
    assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr  # another ref: refused
    server = ModelServer({"Other-Llama.gguf": data}).start()
    try:
        same_ref = f"{server.url}/drop/Other-Llama.gguf"
        restored = await asyncio.to_thread(
            run_llorch,
            "models",
            "pull",
            same_ref,
            "--sha256",
            model.sha256,
            "--store",
            str(store),
            "--node-id",
            node,
            "--catalog",
            mesh.catalog.address,
        )
    finally:
        server.stop()
    assert restored.returncode == 0, restored.stderr
    assert (store / "other-llama.gguf").read_bytes() == data


@pytest.mark.parametrize("mesh", ["grpc"], indirect=True)
async def test_hf_refs_pull_through_huggingface_hub_with_its_endpoint_cache_and_token(
    mesh: Mesh, tmp_path: Path
) -> None:
    data = write_tiny_model(tmp_path / "src.gguf", TinyModelSpec(seed=9)).read_bytes()
    server = ModelServer({"tiny.gguf": data, "corrupt.gguf": data}).start()
    server.hub_sha256["corrupt.gguf"] = hashlib.sha256(b"what the hub published").hexdigest()
    store = tmp_path / "store"
    cache = tmp_path / "hf-cache"
    hub_env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN": "hf_stand_in_token",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    node = mesh.pool_manager.manager.node_id

    def pull(ref: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return run_llorch(
            "models",
            "pull",
            ref,
            *extra,
            "--store",
            str(store),
            "--node-id",
            node,
            "--catalog",
            mesh.catalog.address,
            env=hub_env,
        )

    try:
        ref = "hf:org/tiny-repo@main/tiny.gguf"
        pulled = await asyncio.to_thread(pull, ref)
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.startswith("tiny: ")
        assert "B/s" in pulled.stderr or "iB" in pulled.stderr  # the progress bar
        assert "Bearer hf_stand_in_token" in server.authorization
        assert list(cache.glob("models--org--tiny-repo/snapshots/*/tiny.gguf"))

        refused = {
            "hf:org/tiny-repo/corrupt.gguf": "SHA256_MISMATCH",  # not what the hub published
            "hf:missing/repo/tiny.gguf": "SOURCE_NOT_FOUND",
            "hf:org/tiny-repo@nope/tiny.gguf": "SOURCE_NOT_FOUND",
            "hf:org/tiny-repo/absent.gguf": "SOURCE_NOT_FOUND",
            "hf:no-repo.gguf": "INVALID_ARGUMENT",
        }
        for i, (bad, reason) in enumerate(refused.items()):
            failed = await asyncio.to_thread(pull, bad, "--name", f"bad-{i}")
            assert failed.returncode != 0 and reason in failed.stderr, (bad, failed.stderr)
    finally:
        server.stop()
    assert sorted(p.name for p in store.iterdir()) == ["tiny.gguf"]
    async with grpc.aio.insecure_channel(mesh.catalog.address) as channel:
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        model = (await catalog.GetModel(catalog_pb2.GetModelRequest(model_id="tiny"))).model
        assert model.source_ref == ref
        assert model.sha256 == hashlib.sha256(data).hexdigest()
        listed = await catalog.ListModels(catalog_pb2.ListModelsRequest())
        assert {m.model_id for m in listed.models}.isdisjoint(f"bad-{i}" for i in range(5))
    got = await collect(mesh.stub.Generate(generate_request(model_id="tiny", max_tokens=3)))
    assert got.finished.tokens_out == 3


@pytest.mark.parametrize("mesh", ["grpc"], indirect=True)
async def test_pulls_killed_at_any_moment_leave_the_catalog_and_store_consistent(
    mesh: Mesh, tmp_path: Path
) -> None:
    data = write_tiny_model(tmp_path / "src.gguf", TinyModelSpec(seed=6)).read_bytes()
    server = ModelServer({"crashy.gguf": data}).start()
    store = tmp_path / "store"
    rng = random.Random(7)
    command = [
        sys.executable,
        "-m",
        "launch.cli",
        "models",
        "pull",
        f"{server.url}/slow/crashy.gguf",
        "--store",
        str(store),
        "--catalog",
        mesh.catalog.address,
    ]
    try:
        for _ in range(8):
            # SIGKILL somewhere between start-up, the transfer (~0.4 s), the checks, the
            # rename and the registration.
            proc = await asyncio.create_subprocess_exec(
                *command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            await asyncio.sleep(rng.uniform(0.3, 2.0))
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await _assert_consistent(mesh, store, data)
        # The next pull cleans up after the killed ones and completes (or finds it done).
        final = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=120, check=False
        )
        assert final.returncode == 0, final.stderr  # a second pull of the same ref is a no-op
    finally:
        server.stop()
    assert await _assert_consistent(mesh, store, data)
    assert not list(store.glob(".*.partial"))


async def _assert_consistent(mesh: Mesh, store: Path, data: bytes) -> bool:
    """A registered model always has its whole, verified file; returns whether it is there."""
    async with grpc.aio.insecure_channel(mesh.catalog.address) as channel:
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        try:
            model = (await catalog.GetModel(catalog_pb2.GetModelRequest(model_id="crashy"))).model
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            return False
    path = store / "crashy.gguf"
    assert path.read_bytes() == data
    assert model.sha256 == hashlib.sha256(data).hexdigest()
    return True

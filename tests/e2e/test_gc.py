"""Garbage collection of a pool manager's model store on a running mesh: retired models go,
pinned and in-use ones stay, files the catalog does not know and temporary files of dead pulls
are cleaned, a dry run deletes nothing; the policy and the commands."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from llorch.poolmanager.v1 import poolmanager_pb2, poolmanager_pb2_grpc

from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from tests.conftest import Mesh, start_mesh, stop_mesh
from tests.e2e.helpers import register_model, run_llorch


@pytest.fixture
async def gc_mesh(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[Mesh, Path]]:
    store = tmp_path / "store"
    store.mkdir()
    running = await start_mesh(
        tmp_path / "mesh",
        tiny_model,
        pool_manager={"model_store": store, "gc_interval_s": 0, "spare_workers": False},
    )
    try:
        yield running, store
    finally:
        await stop_mesh(running)


async def _retire(catalog: catalog_pb2_grpc.CatalogServiceStub, model_id: str) -> None:
    await catalog.SetModelState(
        catalog_pb2.SetModelStateRequest(model_id=model_id, state=catalog_pb2.MODEL_STATE_RETIRED)
    )


def _names(decisions: object) -> list[str]:
    return sorted(Path(d.path).name for d in decisions)  # type: ignore[attr-defined]


async def test_gc_deletes_by_policy_and_never_what_is_in_use(
    gc_mesh: tuple[Mesh, Path],
) -> None:
    mesh, store = gc_mesh
    for seed, name in enumerate(["keep-me", "old", "pinned-old", "busy"], start=20):
        await register_model(
            mesh, name, write_tiny_model(store / f"{name}.gguf", TinyModelSpec(seed))
        )
    stray = write_tiny_model(store / "stray.gguf", TinyModelSpec(30))
    hour_ago = time.time() - 3600
    os.utime(stray, (hour_ago, hour_ago))
    fresh = write_tiny_model(store / "fresh.gguf", TinyModelSpec(31))  # a pull about to register
    dead_partial = store / ".old2.gguf.999999999.partial"
    dead_partial.write_bytes(b"half")
    async with (
        grpc.aio.insecure_channel(mesh.catalog.address) as channel,
        grpc.aio.insecure_channel(mesh.pool_manager.address) as pm_channel,
    ):
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        pm = poolmanager_pb2_grpc.PoolManagerServiceStub(pm_channel)
        for name in ("old", "pinned-old", "busy"):
            await _retire(catalog, name)
        # Retired models go once unused (and unchanged) for this long; 0: at once.
        await catalog.SetGcPolicy(
            catalog_pb2.SetGcPolicyRequest(
                policy=catalog_pb2.GcPolicy(
                    max_disk_usage_pct=90, keep_active=True, keep_used_within_days=7
                )
            )
        )
        # A file in the store that another node's record names is never this node's to delete.
        theirs = write_tiny_model(store / "theirs.gguf", TinyModelSpec(33))
        os.utime(theirs, (hour_ago, hour_ago))
        async with grpc.aio.insecure_channel(mesh.catalog.address) as c2:
            from provisioners.models import register_local_file

            await register_local_file(
                catalog_pb2_grpc.CatalogServiceStub(c2), "theirs", theirs, "other-node"
            )
        await catalog.SetModelPinned(
            catalog_pb2.SetModelPinnedRequest(model_id="pinned-old", pinned=True)
        )
        # The pool serves "busy" (retired while loaded): in use, so it stays.
        await pm.ReloadPool(poolmanager_pb2.ReloadPoolRequest(pool_id="cpu-0", model_id="busy"))

        dry = await pm.CollectGarbage(poolmanager_pb2.CollectGarbageRequest(dry_run=True))
        assert dry.dry_run and _names(dry.deleted) == ["old.gguf", "stray.gguf"]
        assert (store / "old.gguf").exists() and stray.exists() and dead_partial.exists()
        reasons = {Path(d.path).name: d.reason for d in [*dry.deleted, *dry.kept]}
        assert reasons["old.gguf"].startswith("retired, and neither used nor changed for 0.0 days")
        assert "theirs.gguf" not in reasons
        assert reasons["stray.gguf"] == "no catalog record names it"
        assert reasons["pinned-old.gguf"] == "pinned"
        assert reasons["busy.gguf"].startswith("in use: pool cpu-0 is ready with it")
        assert reasons["keep-me.gguf"] == "active (keep_active)"

        done = await pm.CollectGarbage(poolmanager_pb2.CollectGarbageRequest())
        assert not done.dry_run and _names(done.deleted) == ["old.gguf", "stray.gguf"]
        assert done.stale_partials_removed == 1 and not dead_partial.exists()
        assert sorted(p.name for p in store.iterdir()) == [
            "busy.gguf",
            "fresh.gguf",
            "keep-me.gguf",
            "pinned-old.gguf",
            "theirs.gguf",
        ]
        assert fresh.exists()  # unknown but new: left for its pull to register
        gone = await catalog.LocateModel(catalog_pb2.LocateModelRequest(model_id="old"))
        assert list(gone.locations) == []  # the record went with the file


async def test_policy_and_gc_commands(gc_mesh: tuple[Mesh, Path]) -> None:
    mesh, store = gc_mesh
    old = write_tiny_model(store / "old.gguf", TinyModelSpec(40))
    await register_model(mesh, "old", old)

    shown = await asyncio.to_thread(
        run_llorch,
        "gc",
        "policy",
        "--catalog",
        mesh.catalog.address,
        "--keep-active",
        "false",
        "--max-disk-usage-pct",
        "0.5",
    )
    assert shown.returncode == 1 and "policy.max_disk_usage_pct" in shown.stderr
    shown = await asyncio.to_thread(
        run_llorch,
        "gc",
        "policy",
        "--catalog",
        mesh.catalog.address,
        "--keep-active",
        "false",
        "--keep-used-within-days",
        "0",
        "--min-free-bytes",
        str(2**62),
    )
    assert shown.returncode == 0, shown.stderr
    assert '"keep_active": false' in shown.stdout and '"keep_used_within_days": 0.0' in shown.stdout
    # Now the disk is "full" by the policy: the unused, unpinned, not-in-use file goes.
    dry = await asyncio.to_thread(
        run_llorch, "gc", "--dry-run", "--pool-manager", mesh.pool_manager.address
    )
    assert dry.returncode == 0, dry.stderr
    assert (
        "would delete" in dry.stdout and "old.gguf" in dry.stdout and "disk pressure" in dry.stdout
    )
    assert old.exists()
    real = await asyncio.to_thread(run_llorch, "gc", "--pool-manager", mesh.pool_manager.address)
    assert real.returncode == 0 and "deleted" in real.stdout and not old.exists()

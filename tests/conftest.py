"""Shared fixtures: the generated tiny model and a real mesh started on ephemeral ports."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from llorch.orchestrator.v1 import orchestrator_pb2_grpc

from launch.harness import Services
from launch.harness import start_mesh as start_mesh_services
from mesh.settings import OrchestratorSettings, PoolManagerSettings, PoolSettings, Settings
from orchestrator.app import OrchestratorApp, start_orchestrator
from provisioners.tiny_model import DEFAULT_MODEL_ID, write_tiny_model

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model, generated once per test session."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@dataclass
class Mesh(Services):
    """The harness's catalog, pool manager (one CPU pool) and orchestrator, with a client."""

    channel: grpc.aio.Channel
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub

    async def settle(self, pool_id: str = "cpu-0") -> None:
        """Waits until the pool's spare worker is warm: from then on the node's state changes
        only when something happens to it (tests that count changes start here)."""
        manager = self.pool_manager.manager
        async with asyncio.timeout(30):
            while not manager.pools[pool_id].spare_ready:
                await manager.wait_change(manager.version, 0.5)

    def worker_pid(self, pool_id: str = "cpu-0") -> int:
        """Pid of a pool's current worker."""
        worker = self.pool_manager.manager.pools[pool_id].worker
        assert worker is not None
        return worker.pid


async def start_mesh(
    data_dir: Path,
    model_path: Path,
    link: str = "grpc",
    pool: dict[str, object] | None = None,
    pool_manager: dict[str, object] | None = None,
    **orchestrator_overrides: object,
) -> Mesh:
    """Starts the three services in this event loop (launch.harness, as ``llorch up`` does),
    each on its own ephemeral port, serving ``model_path`` as the default model.

    ``link`` is how the orchestrator reaches the pool manager: ``grpc`` (as between machines) or
    ``local`` (in-process, as the home profile does). ``pool`` adds settings of the one pool,
    ``pool_manager`` settings of the pool manager.
    """
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        in_process_link=link == "local",
        pool_manager=PoolManagerSettings(
            pools=[
                PoolSettings(
                    pool_id="cpu-0",
                    model_id=DEFAULT_MODEL_ID,
                    n_threads=1,
                    **(pool or {}),  # type: ignore[arg-type]
                )
            ],
            **(pool_manager or {}),  # type: ignore[arg-type]
        ),
        orchestrator_service=OrchestratorSettings(
            node_heartbeat_s=0.2,
            journal_path=data_dir / "journal.db",
            **orchestrator_overrides,  # type: ignore[arg-type]
        ),
    )
    services = await start_mesh_services(settings, dict(os.environ), {DEFAULT_MODEL_ID: model_path})
    client = grpc.aio.insecure_channel(services.address)
    return Mesh(
        services.catalog,
        services.pool_manager,
        services.orchestrator,
        client,
        orchestrator_pb2_grpc.OrchestratorServiceStub(client),
    )


async def restart_orchestrator(mesh: Mesh, data_dir: Path) -> OrchestratorApp:
    """A new orchestrator (over gRPC) on the mesh's catalog, pool manager and the journal
    start_mesh gave it in ``data_dir``, as after a restart; stop ``mesh.orchestrator`` first."""
    return await start_orchestrator(
        OrchestratorSettings(
            catalog=mesh.catalog.address,
            pool_managers=[mesh.pool_manager.address],
            node_heartbeat_s=0.2,
            journal_path=data_dir / "journal.db",
        ),
        "127.0.0.1:0",
    )


async def stop_mesh(mesh: Mesh) -> None:
    """Stops everything start_mesh started."""
    await mesh.channel.close()
    await mesh.stop()


# Every test on a mesh runs twice: orchestrator → pool manager over gRPC, and in-process.
LINKS = ["grpc", "local"]


@pytest.fixture(params=LINKS)
async def mesh(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_model: Path
) -> AsyncIterator[Mesh]:
    """A fresh mesh for one test."""
    running = await start_mesh(tmp_path, tiny_model, request.param)
    try:
        yield running
    finally:
        await stop_mesh(running)


@pytest.fixture(scope="session")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 32k context: long generations for cancel and crash tests."""
    from provisioners.tiny_model import TinyModelSpec

    return write_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-llama-32k.gguf",
        TinyModelSpec(context_length=32768),
    )


@pytest.fixture(params=LINKS)
async def long_mesh(
    request: pytest.FixtureRequest, tmp_path: Path, long_model: Path
) -> AsyncIterator[Mesh]:
    """A mesh serving the 32k-context tiny model as tiny-llama."""
    running = await start_mesh(tmp_path, long_model, request.param)
    try:
        yield running
    finally:
        await stop_mesh(running)

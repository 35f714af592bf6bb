"""grpc.health.v1 and server reflection on every server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from catalog.app import start_catalog
from mesh.settings import PoolManagerSettings, PoolSettings, Settings
from poolmanager.app import start_pool_manager
from poolmanager.servicer import SERVICE_NAME as POOL_MANAGER_SERVICE
from tests.conftest import Mesh

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


def _services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


async def test_every_server_reports_health_and_reflects(mesh: Mesh) -> None:
    servers = {
        mesh.address: "llorch.orchestrator.v1.OrchestratorService",
        mesh.catalog.address: "llorch.catalog.v1.CatalogService",
        mesh.pool_manager.address: POOL_MANAGER_SERVICE,
    }
    for address, service in servers.items():
        assert await _health(address, "") == SERVING
        assert await _health(address, service) == SERVING
        services = await asyncio.to_thread(_services, address)  # sync client, own thread
        assert service in services
        assert "grpc.health.v1.Health" in services
        assert "grpc.reflection.v1alpha.ServerReflection" in services


async def test_pool_manager_is_not_serving_until_its_model_is_loaded(
    tmp_path: Path, tiny_model: Path
) -> None:
    from llorch.catalog.v1 import catalog_pb2_grpc

    from mesh.server import open_channel
    from provisioners.models import register_local_file

    catalog = await start_catalog(Settings(data_dir=tmp_path))
    async with open_channel(catalog.address) as channel:
        await register_local_file(
            catalog_pb2_grpc.CatalogServiceStub(channel), "tiny-llama", tiny_model, "local"
        )
    pm = await start_pool_manager(
        PoolManagerSettings(
            catalog=catalog.address,
            pools=[PoolSettings(pool_id="p0", model_id="tiny-llama", n_threads=1)],
        ),
        dict(os.environ),
    )
    try:
        # Liveness at once; readiness only once the worker has loaded the model.
        assert await _health(pm.address, "") == SERVING
        assert await _health(pm.address, POOL_MANAGER_SERVICE) == NOT_SERVING
        assert await pm.manager.wait_ready(60)
        assert await _health(pm.address, POOL_MANAGER_SERVICE) == SERVING
    finally:
        await pm.stop()
        await catalog.stop()

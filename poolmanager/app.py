"""Starts a pool manager: its pools' workers + PoolManagerService on the mesh bootstrap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from catalog.client import CatalogClient
from mesh.server import MeshServer, create_server, open_channel
from mesh.settings import PoolManagerSettings
from poolmanager.manager import PoolManager
from poolmanager.servicer import SERVICE_NAME, PoolManagerServicer


@dataclass
class PoolManagerApp:
    """A running pool manager."""

    server: MeshServer
    manager: PoolManager
    servicer: PoolManagerServicer
    catalog_channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        """Loopback address of the server."""
        return f"127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        """Stops serving, then stops every worker."""
        await self.server.stop(grace_s=1.0)
        await self.manager.stop()
        await self.catalog_channel.close()


async def start_pool_manager(
    settings: PoolManagerSettings, base_env: Mapping[str, str], log_level: str = "INFO"
) -> PoolManagerApp:
    """Starts serving (NOT_SERVING until every pool is ready) and starts the pools' workers."""
    if not settings.catalog:
        raise ValueError("pool_manager.catalog: the catalog address is required")
    channel = open_channel(settings.catalog)
    catalog = CatalogClient(channel)

    async def locate(model_id: str) -> str:
        return await catalog.local_path(model_id, settings.node_id)

    server_box: list[MeshServer] = []
    readiness = {"ready": False}

    async def on_change() -> None:
        ready = manager.all_ready()
        if server_box and ready != readiness["ready"]:
            readiness["ready"] = ready
            await server_box[0].set_ready(SERVICE_NAME, ready)

    manager = PoolManager(settings, locate, base_env, on_change, log_level)
    servicer = PoolManagerServicer(manager)
    server = await create_server(settings.listen, [servicer.binding()], ready=False)
    server_box.append(server)
    await manager.start()
    return PoolManagerApp(server, manager, servicer, channel)

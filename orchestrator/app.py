"""Starts the orchestrator: Orchestrator + OrchestratorService on the mesh bootstrap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from catalog.client import CatalogClient
from mesh import logs
from mesh.server import MeshServer, create_server, open_channel
from mesh.settings import OrchestratorSettings
from orchestrator.control import ControlServicer
from orchestrator.journal import Journal
from orchestrator.pools import PoolRegistry
from orchestrator.service import Orchestrator
from orchestrator.servicer import OrchestratorServicer

_log = logs.get_logger("orchestrator")


@dataclass
class OrchestratorApp:
    """A running orchestrator."""

    server: MeshServer
    orchestrator: Orchestrator
    catalog_channel: grpc.aio.Channel

    @property
    def port(self) -> int:
        """Port the server listens on."""
        return self.server.port

    async def stop(self) -> None:
        """Stops taking calls, ends open tasks (UNAVAILABLE), closes channels."""
        await self.orchestrator.stop()
        await self.server.stop(grace_s=1.0)
        await self.catalog_channel.close()


async def start_orchestrator(
    settings: OrchestratorSettings,
    listen: str,
    local_pool_managers: Mapping[str, object] | None = None,
) -> OrchestratorApp:
    """Connects to the catalog and pool managers and starts serving on ``listen``.

    ``local_pool_managers`` maps addresses of pool managers in this process to their
    in-process stubs (poolmanager.local), which the orchestrator then calls without a socket.
    """
    if not settings.catalog:
        raise ValueError("orchestrator_service.catalog: the catalog address is required")
    channel = open_channel(settings.catalog)
    registry = PoolRegistry(
        settings.pool_managers,
        settings.node_heartbeat_s,
        settings.node_lost_s,
        open_channel,
        local_pool_managers,
    )
    journal = Journal(settings.journal_path) if settings.journal and settings.journal_path else None
    if journal is None:
        _log.warning("no task journal: queued tasks will not survive a restart")
    orchestrator = Orchestrator(settings, CatalogClient(channel), registry, journal=journal)
    await orchestrator.start()
    servicer = OrchestratorServicer(orchestrator, settings)
    control = ControlServicer(orchestrator)
    server = await create_server(listen, [servicer.binding(), control.binding()])
    return OrchestratorApp(server, orchestrator, channel)

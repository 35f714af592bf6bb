"""Starts the orchestrator: Orchestrator + OrchestratorService on the mesh bootstrap."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from catalog.client import CatalogClient
from mesh import logs
from mesh.apikeys import ApiKeyStore
from mesh.server import (
    CLIENT_PORT_MESSAGE_BYTES,
    NODE_PORT_MESSAGE_BYTES,
    MeshServer,
    client_port_security,
    create_server,
    open_channel,
    service_security,
)
from mesh.settings import OrchestratorSettings
from mesh.tls import ServerCertificates, TlsFiles
from orchestrator.control import ControlServicer
from orchestrator.journal import Journal
from orchestrator.nodes import NodeServicer
from orchestrator.pool_client import StubPoolClient
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
    keys: ApiKeyStore | None = None
    node_server: MeshServer | None = None
    """The node port, where pool managers register (``node_listen``)."""

    @property
    def port(self) -> int:
        """Port the server listens on."""
        return self.server.port

    async def stop(self) -> None:
        """Stops taking calls, ends open tasks (UNAVAILABLE), closes channels."""
        if self.node_server is not None:
            await self.node_server.stop(grace_s=0.5)
        await self.orchestrator.stop()
        await self.server.stop(grace_s=1.0)
        await self.catalog_channel.close()
        if self.keys is not None:
            self.keys.close()


async def start_orchestrator(
    settings: OrchestratorSettings,
    listen: str,
    local_pool_managers: Mapping[str, object] | None = None,
    tls: TlsFiles | None = None,
) -> OrchestratorApp:
    """Connects to the catalog and pool managers and starts serving on ``listen``.

    ``local_pool_managers`` maps addresses of pool managers in this process to their
    in-process stubs (poolmanager.local), which the orchestrator then calls without a socket.
    With ``tls``: its client port takes TLS and the API keys in ``settings.keys_path``, and it
    calls the catalog and pool managers with its certificate.
    """
    if not settings.catalog:
        raise ValueError("orchestrator_service.catalog: the catalog address is required")
    if tls is not None and settings.keys_path is None:
        raise ValueError("orchestrator_service.keys_path: API keys are needed with TLS")
    channel = open_channel(settings.catalog, tls=tls)
    registry = PoolRegistry(
        settings.pool_managers,
        settings.node_heartbeat_s,
        settings.node_lost_s,
        functools.partial(open_channel, tls=tls, server_name=settings.pool_manager_tls_name),
        {a: StubPoolClient(stub, a) for a, stub in (local_pool_managers or {}).items()},
        ServerCertificates(tls, settings.pool_manager_tls_name) if tls is not None else None,
    )
    journal = Journal(settings.journal_path) if settings.journal and settings.journal_path else None
    if journal is None:
        _log.warning("no task journal: queued tasks will not survive a restart")
    orchestrator = Orchestrator(settings, CatalogClient(channel), registry, journal=journal)
    await orchestrator.start()
    servicer = OrchestratorServicer(orchestrator, settings)
    control = ControlServicer(orchestrator)
    keys = ApiKeyStore(settings.keys_path) if tls is not None and settings.keys_path else None
    credentials, authorize = client_port_security(tls, keys)
    if authorize is None:
        _log.warning("the client port takes no API keys: loopback only, every caller trusted")
    server = await create_server(
        listen,
        [servicer.binding(), control.binding()],
        credentials=credentials,
        authorize=authorize,
        max_message_bytes=max(CLIENT_PORT_MESSAGE_BYTES, settings.max_prompt_bytes + 1024 * 1024),
    )
    node_server = None
    if settings.node_listen:
        node_credentials, node_authorize = service_security(tls)
        node_server = await create_server(
            settings.node_listen,
            [
                NodeServicer(
                    registry,
                    settings.node_register_interval_s,
                    any_node_id=settings.node_identity == "any",
                ).binding()
            ],
            credentials=node_credentials,
            authorize=node_authorize,
            max_message_bytes=NODE_PORT_MESSAGE_BYTES,
        )
    return OrchestratorApp(server, orchestrator, channel, keys, node_server)

"""The one server bootstrap: every llama-orch server is built here.

It adds the mesh interceptors, grpc.health.v1 (overall liveness on "" and readiness per service),
server reflection, and the transport credentials. TLS plugs in through ``credentials``; the rest
of the mesh does not change when it does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh.interceptors import MeshServerInterceptor, client_interceptors

# Tokens are small, prompts are bounded by settings; 16 MiB leaves room for large prompts.
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

AddServicer = Callable[[grpc.aio.Server], None]


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer to add: its full service name and the generated ``add_*_to_server`` call."""

    name: str
    add: AddServicer


class MeshServer:
    """A started gRPC server with health and reflection."""

    def __init__(
        self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer
    ) -> None:
        self.server = server
        self.port = port
        self._health = health_servicer

    async def set_ready(self, service_name: str, ready: bool) -> None:
        """Readiness of one named service, as grpc.health.v1 reports it."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set(service_name, status)

    async def stop(self, grace_s: float | None = 1.0) -> None:
        """Stops accepting calls; running calls get ``grace_s`` to finish."""
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def create_server(
    address: str,
    services: Sequence[ServiceBinding],
    *,
    credentials: grpc.ServerCredentials | None = None,
    ready: bool = True,
) -> MeshServer:
    """Builds, binds and starts a server; ``address`` may use port 0.

    Args:
        address: host:port to bind; port 0 picks a free port (see ``MeshServer.port``).
        services: servicers to add.
        credentials: TLS credentials; None serves plaintext (loopback home profile only).
        ready: initial readiness of every named service. Liveness ("") is SERVING once started.
    """
    server = grpc.aio.server(interceptors=[MeshServerInterceptor()], options=_OPTIONS)
    for binding in services:
        binding.add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.name for b in services]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    mesh_server = MeshServer(server, port, health_servicer)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in names:
        await mesh_server.set_ready(name, ready)
    return mesh_server


def open_channel(
    address: str, *, credentials: grpc.ChannelCredentials | None = None
) -> grpc.aio.Channel:
    """A channel to another mesh service, carrying the correlation id on every call."""
    if credentials is None:
        return grpc.aio.insecure_channel(
            address, options=_OPTIONS, interceptors=client_interceptors()
        )
    return grpc.aio.secure_channel(
        address, credentials, options=_OPTIONS, interceptors=client_interceptors()
    )

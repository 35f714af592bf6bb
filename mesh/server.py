"""The one server bootstrap: every llama-orch server is built here.

It adds the mesh interceptors, grpc.health.v1 (overall liveness on "" and readiness per service),
server reflection, and the transport credentials. TLS plugs in through ``credentials``; the rest
of the mesh does not change when it does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh.apikeys import ApiKeyStore
from mesh.auth import Authorizer, CertAuthorizer, KeyAuthorizer
from mesh.interceptors import (
    MalformedRequestInterceptor,
    MeshServerInterceptor,
    client_interceptors,
)
from mesh.revocation import Denylist
from mesh.tls import TlsFiles, channel_credentials, server_credentials

_MiB = 1024 * 1024
CLIENT_PORT_MESSAGE_BYTES = 16 * _MiB
"""The largest request the orchestrator's client port takes: a SubmitTasks batch of many
prompts (each within ``max_prompt_bytes``); more than that, or than one prompt's limit plus
1 MiB, is refused by gRPC itself with RESOURCE_EXHAUSTED."""
NODE_PORT_MESSAGE_BYTES = 64 * 1024
"""RegisterNode carries a node id and an address."""
CATALOG_MESSAGE_BYTES = 8 * _MiB
"""A model record holds at most 512 KiB of control tokens (catalog.store)."""
POOL_MANAGER_MESSAGE_BYTES = 32 * _MiB
"""Execute carries a prompt of up to ``max_prompt_bytes`` (at most 16 MiB) and its grammar."""
PROBE_MESSAGE_BYTES = 64 * 1024
"""The plaintext health port: a service name."""
_CHANNEL_MESSAGE_BYTES = 32 * _MiB  # calls between services: the receiving server decides
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max(max_message_bytes, 16 * _MiB)),
        *_KEEPALIVE,
    ]


AddServicer = Callable[[grpc.aio.Server], None]


class InsecureListenError(ValueError):
    """A server was asked to listen off loopback without TLS and auth."""


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names a loopback host (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        self._probes: list[grpc.aio.Server] = []

    async def set_ready(self, service_name: str, ready: bool) -> None:
        """Readiness of one named service, as grpc.health.v1 reports it."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set(service_name, status)

    async def serve_health(self, address: str) -> int:
        """Also answers grpc.health.v1 alone, in plaintext, on ``address`` (its port): for
        probes that cannot speak TLS, such as the kubelet's gRPC probes. Nothing but health is
        there, so it may listen off loopback; it stops with this server."""
        probe = grpc.aio.server(
            interceptors=[MalformedRequestInterceptor()], options=_options(PROBE_MESSAGE_BYTES)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, probe)
        port = probe.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        await probe.start()
        self._probes.append(probe)
        return int(port)

    async def stop(self, grace_s: float | None = 1.0) -> None:
        """Stops accepting calls; running calls get ``grace_s`` to finish."""
        await self._health.enter_graceful_shutdown()
        for probe in self._probes:
            await probe.stop(0)
        await self.server.stop(grace_s)


async def create_server(
    address: str,
    services: Sequence[ServiceBinding],
    *,
    credentials: grpc.ServerCredentials | None = None,
    authorize: Authorizer | None = None,
    ready: bool = True,
    max_message_bytes: int = CLIENT_PORT_MESSAGE_BYTES,
) -> MeshServer:
    """Builds, binds and starts a server; ``address`` may use port 0.

    Args:
        address: host:port to bind; port 0 picks a free port (see ``MeshServer.port``).
        services: servicers to add.
        credentials: TLS credentials; None serves plaintext, on loopback only.
        authorize: checks every call's caller (mesh.auth); None: no auth, on loopback only.
        ready: initial readiness of every named service. Liveness ("") is SERVING once started.
        max_message_bytes: the largest request message taken; a larger one ends
            RESOURCE_EXHAUSTED ("Received message larger than max") before any handler runs.

    Raises:
        InsecureListenError: plaintext or no auth asked for off loopback.
    """
    if (credentials is None or authorize is None) and not is_loopback(address):
        raise InsecureListenError(
            f"refusing to listen on {address} without TLS and auth: off loopback every service "
            "needs tls.ca_file, tls.cert_file and tls.key_file (make them with `llorch certs "
            "init` and `llorch certs issue`), or listen on 127.0.0.1"
        )
    server = grpc.aio.server(
        interceptors=[MalformedRequestInterceptor(), MeshServerInterceptor(authorize)],
        options=_options(max_message_bytes),
    )
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
    address: str, *, tls: TlsFiles | None = None, server_name: str = ""
) -> grpc.aio.Channel:
    """A channel to another mesh service, carrying the correlation id on every call; over TLS,
    presenting this process's certificate, when ``tls`` is given. ``server_name``: the name the
    server's certificate must carry, when it is not the host dialled (a pod's IP)."""
    if tls is None:
        return grpc.aio.insecure_channel(
            address, options=_options(_CHANNEL_MESSAGE_BYTES), interceptors=client_interceptors()
        )
    options: list[tuple[str, int | str]] = list(_options(_CHANNEL_MESSAGE_BYTES))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(
        address, channel_credentials(tls), options=options, interceptors=client_interceptors()
    )


def service_security(
    tls: TlsFiles | None,
) -> tuple[grpc.ServerCredentials | None, Authorizer | None]:
    """Credentials and authorizer of a service port: mTLS with role checks and the certificate
    denylist, or none without TLS (loopback only)."""
    if tls is None:
        return None, None
    return server_credentials(tls, require_client_cert=True), CertAuthorizer(Denylist(tls.denylist))


def client_port_security(
    tls: TlsFiles | None, keys: ApiKeyStore | None
) -> tuple[grpc.ServerCredentials | None, Authorizer | None]:
    """Credentials and authorizer of the orchestrator's client port: TLS and API keys, or none
    without TLS (loopback only)."""
    if tls is None or keys is None:
        return None, None
    return server_credentials(tls, require_client_cert=False), KeyAuthorizer(keys)

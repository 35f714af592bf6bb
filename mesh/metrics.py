"""The Prometheus endpoint of a process: ``metrics_listen`` serves its registry over HTTP.

Each service keeps its metrics in its own ``CollectorRegistry`` (orchestrator/metrics.py,
poolmanager/metrics.py); the process serves them together at ``/metrics``. With TLS settings
the endpoint is HTTPS and asks for a client certificate from the mesh's CA (Prometheus's
``tls_config`` gives one); without TLS it stays on loopback, like every other port.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.registry import Collector

from mesh.server import InsecureListenError, is_loopback
from mesh.tls import TlsFiles


class _Union(Collector):
    """Several registries as one."""

    def __init__(self, registries: Iterable[CollectorRegistry]) -> None:
        self._registries = list(registries)

    def collect(self) -> Iterable[Any]:
        for registry in self._registries:
            yield from registry.collect()


@dataclass
class MetricsEndpoint:
    """A running /metrics server."""

    port: int
    _server: Any

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(
    address: str, registries: Iterable[CollectorRegistry], tls: TlsFiles | None
) -> MetricsEndpoint:
    """Serves ``registries`` at ``http(s)://address/metrics`` from a thread.

    Raises:
        InsecureListenError: plaintext asked for off loopback.
    """
    host, _, port = address.rpartition(":")
    if tls is None and not is_loopback(address):
        raise InsecureListenError(
            f"refusing to serve metrics on {address} without TLS: set tls.* (then scrapers "
            "present a certificate from the mesh's CA), or listen on 127.0.0.1"
        )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Union(registries))
    ProcessCollector(registry=registry)  # CPU, memory, open files of the process
    options: dict[str, Any] = {}
    if tls is not None:
        options = {
            "certfile": str(tls.cert),
            "keyfile": str(tls.key),
            "client_cafile": str(tls.ca),
            "client_auth_required": True,
        }
    server, _thread = start_http_server(
        int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry, **options
    )
    return MetricsEndpoint(int(server.server_port), server)

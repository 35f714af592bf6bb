"""The Prometheus endpoint of a process: ``metrics_listen`` serves its registry over HTTP.

Each service keeps its metrics in its own ``CollectorRegistry`` (orchestrator/metrics.py,
poolmanager/metrics.py); the process serves them together at ``/metrics``. With TLS settings
the endpoint is HTTPS and asks for a client certificate from the mesh's CA (Prometheus's
``tls_config`` gives one) whose role may read metrics (``METRICS_ROLES``: a ``metrics``
certificate made for the scraper, or an operator's or orchestrator's) and which is not on the
denylist (mesh.revocation); others get 403. Without TLS it stays on loopback, like every other
port.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app, start_http_server
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from mesh import logs
from mesh.revocation import Denylist, cert_id
from mesh.server import InsecureListenError, is_loopback
from mesh.tls import TlsFiles, identity_of_uri

METRICS_ROLES = frozenset({"metrics", "operator", "orchestrator"})
"""Certificate roles that may scrape /metrics over TLS."""
_HANDSHAKE_TIMEOUT_S = 10.0
_MAX_CONNECTIONS = 16
"""Connections served at once; more are closed at once (a scraper needs one)."""
_log = logs.get_logger("metrics")


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
    bind = host.strip("[]") or "127.0.0.1"
    if tls is None:
        server, _thread = start_http_server(int(port), addr=bind, registry=registry)
        return MetricsEndpoint(int(server.server_port), server)
    return _serve_tls(bind, int(port), registry, tls)


def _serve_tls(host: str, port: int, registry: CollectorRegistry, tls: TlsFiles) -> MetricsEndpoint:
    if tls.cert is None or tls.key is None:
        raise ValueError("an HTTPS metrics endpoint needs tls.cert_file and tls.key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(tls.cert), str(tls.key))
    denylist = Denylist(tls.denylist)

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        _slots = threading.BoundedSemaphore(_MAX_CONNECTIONS)

        def process_request(self, request: Any, client_address: Any) -> None:
            # A thread per connection, but only so many: each may wait out a handshake.
            if not self._slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A scraper without a certificate, or one that hung up: not this process's error.
            _log.info("metrics request failed", extra={"peer": str(client_address[0])})

    httpd = make_server(
        host, port, _role_checked(make_wsgi_app(registry), denylist), Server, _TlsHandler
    )
    # The handshake runs in each request's thread (_TlsHandler.setup), so a slow or silent
    # peer holds up only itself, not the accepting thread.
    httpd.socket = context.wrap_socket(
        httpd.socket, server_side=True, do_handshake_on_connect=False
    )
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return MetricsEndpoint(int(httpd.server_port), httpd)


class _TlsHandler(WSGIRequestHandler):
    """Handshakes, then hands the verified peer certificate to the app in the environ."""

    timeout = _HANDSHAKE_TIMEOUT_S

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        self.request.do_handshake()
        super().setup()

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        environ["llorch.peer_der"] = self.request.getpeercert(binary_form=True)
        environ["llorch.peer_sans"] = (self.request.getpeercert() or {}).get("subjectAltName", ())
        return environ

    def log_message(self, format: str, *args: Any) -> None:
        """Logs nothing per request."""

    def get_stderr(self) -> Any:
        """Where wsgiref writes a request's traceback (a scraper gone mid-answer): the log."""
        return _LogWriter()


class _LogWriter:
    def write(self, text: str) -> None:
        if text.strip():
            _log.info("metrics answer failed", extra={"error": text.strip().splitlines()[-1]})

    def flush(self) -> None:
        pass


def _role_checked(app: Callable[..., Any], denylist: Denylist) -> Callable[..., Any]:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        uris = [value for kind, value in environ.get("llorch.peer_sans", ()) if kind == "URI"]
        identity = next((i for i in map(identity_of_uri, uris) if i is not None), None)
        der = environ.get("llorch.peer_der")
        refusal = ""
        if identity is None:
            refusal = "the certificate names no llama-orch role"
        elif identity.role not in METRICS_ROLES:
            refusal = f"{identity} may not read metrics (roles {', '.join(sorted(METRICS_ROLES))})"
        elif der and denylist.revoked(cert_id(der)):
            refusal = f"certificate {identity} is revoked"
        if refusal:
            _log.warning("metrics scrape refused", extra={"peer": str(identity), "error": refusal})
            start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")])
            return [refusal.encode() + b"\n"]
        return app(environ, start_response)

    return guarded

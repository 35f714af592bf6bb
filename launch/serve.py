"""``llorch serve SERVICE``: one service of the mesh in the foreground, as a fleet runs them.

The catalog, a pool manager (one per machine) or the orchestrator, each from the same settings
(``catalog_service``, ``pool_manager``, ``orchestrator_service`` sections) as the home profile.
Prints one line when ready, ``llorch ready: <service> <address>``, and stops cleanly on Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CollectorRegistry

from catalog.app import start_catalog
from mesh import logs
from mesh.errors import LlorchError
from mesh.metrics import serve_metrics
from mesh.server import MeshServer
from mesh.settings import Settings
from orchestrator.app import start_orchestrator
from poolmanager.app import start_pool_manager
from poolmanager.metrics import pool_manager_registry

_log = logs.get_logger("serve")

SERVICES = ("catalog", "poolmanager", "orchestrator")


async def serve(
    settings: Settings, service: str, base_env: Mapping[str, str], stop: asyncio.Event
) -> None:
    """Runs one service until ``stop`` is set."""
    close: Callable[[], Awaitable[None]]
    server: MeshServer
    registries: list[CollectorRegistry] = []
    if service == "catalog":
        catalog = await start_catalog(settings)
        address, close, server = catalog.address, catalog.stop, catalog.server
    elif service == "poolmanager":
        pm_settings = settings.pool_manager
        if pm_settings.model_store is None:  # where `llorch models pull` puts files by default
            pm_settings = pm_settings.model_copy(
                update={"model_store": settings.data_dir / "models"}
            )
        pool_manager = await start_pool_manager(
            pm_settings, base_env, settings.log_level, settings.tls.files()
        )
        address, close, server = pool_manager.address, pool_manager.stop, pool_manager.server
        registries.append(pool_manager_registry(pool_manager.manager))
    elif service == "orchestrator":
        orch_settings = settings.orchestrator_service
        if orch_settings.journal and orch_settings.journal_path is None:
            orch_settings = orch_settings.model_copy(
                update={"journal_path": settings.data_dir / "orchestrator" / "journal.db"}
            )
        if orch_settings.keys_path is None:
            orch_settings = orch_settings.model_copy(
                update={"keys_path": settings.data_dir / "orchestrator" / "keys.db"}
            )
        orchestrator = await start_orchestrator(
            orch_settings, settings.listen, tls=settings.tls.files()
        )
        host = settings.listen.rsplit(":", 1)[0]
        address, close = f"{host}:{orchestrator.port}", orchestrator.stop
        server = orchestrator.server
        registries.append(orchestrator.orchestrator.metrics.registry)
    else:
        raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    endpoint = None
    try:
        if settings.metrics_listen:
            endpoint = serve_metrics(settings.metrics_listen, registries, settings.tls.files())
            _log.info("metrics at port %d", endpoint.port)
        if settings.health_listen:
            port = await server.serve_health(settings.health_listen)
            _log.info("health probes answered on port %d", port)
        print(f"llorch ready: {service} {address}", flush=True)
        await stop.wait()
        _log.info("stopping")
    finally:
        if endpoint is not None:
            endpoint.stop()
        await close()


def main_serve(settings: Settings, service: str, base_env: Mapping[str, str]) -> int:
    """``llorch serve``: runs one service in the foreground until Ctrl-C or SIGTERM."""
    return run_foreground(
        f"llorch serve {service}", lambda stop: serve(settings, service, base_env, stop)
    )


def run_foreground(name: str, body: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Runs ``body(stop)`` on a new event loop; Ctrl-C or SIGTERM sets ``stop``. A failure to
    start is printed as one line prefixed with ``name``; returns the exit status."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await body(stop)

    try:
        asyncio.run(runner())
    except (RuntimeError, OSError, ValueError, LlorchError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    return 0

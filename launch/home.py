"""The home profile: catalog, one pool manager and the orchestrator in one process, on loopback.

Each service still runs its own gRPC server, composed by launch/harness.py as in the tests.
Catalog traffic goes over gRPC exactly as on separate machines; the orchestrator calls the pool
manager in-process (``in_process_link``, on by default) because a loopback gRPC hop costs the
first token ~3 ms.
The pool manager's workers are child processes and are stopped before this returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from launch.gateway import find_gateway, start_gateway
from launch.harness import start_mesh
from mesh import logs
from mesh.metrics import serve_metrics
from mesh.settings import PoolSettings, Settings
from poolmanager.metrics import pool_manager_registry
from provisioners.tiny_model import DEFAULT_MODEL_ID

_log = logs.get_logger("home")

ENDPOINTS_FILE = Path("run") / "endpoints.json"


def endpoints_path(data_dir: Path) -> Path:
    """Where ``llorch up`` records the addresses of its services."""
    return data_dir / ENDPOINTS_FILE


async def run_home(settings: Settings, base_env: Mapping[str, str], stop: asyncio.Event) -> None:
    """Runs the home profile until ``stop`` is set (also while still starting)."""
    stack: list[Callable[[], Awaitable[None]]] = []
    starting = asyncio.create_task(_start_home(settings, base_env, stack))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            path = starting.result()
            await stopping
            _log.info("stopping")
            path.unlink(missing_ok=True)
        else:
            _log.info("stopping while starting")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    finally:
        stopping.cancel()
        for close in reversed(stack):
            await close()


async def _start_home(
    settings: Settings, base_env: Mapping[str, str], stack: list[Callable[[], Awaitable[None]]]
) -> Path:
    """Starts every service, pushing each one's stop onto ``stack``; returns the endpoints file."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    if settings.tls.files() is not None:
        # One process holds one certificate, hence one role; the home profile plays them all.
        raise ValueError(
            "the home profile (llorch up) runs on loopback without TLS; for TLS run each "
            "service with `llorch serve` and its own certificate (docs/cloud.md)"
        )
    _log.warning("no TLS and no authentication: every service listens on loopback only")
    pm_settings = settings.pool_manager.model_copy(
        update={"model_store": settings.pool_manager.model_store or data_dir / "models"}
    )
    if not pm_settings.pools:
        pm_settings.pools = [PoolSettings(pool_id="cpu-0", model_id=DEFAULT_MODEL_ID)]
    services = await start_mesh(
        settings.model_copy(update={"pool_manager": pm_settings}), base_env, default_model=True
    )
    stack.append(services.stop)
    catalog, pool_manager, orchestrator = (
        services.catalog,
        services.pool_manager,
        services.orchestrator,
    )
    host = settings.listen.rsplit(":", 1)[0]
    orchestrator_address = f"{host}:{orchestrator.port}"
    endpoints: dict[str, object] = {
        "orchestrator": orchestrator_address,
        "catalog": catalog.address,
        "pool_manager": pool_manager.address,
        "pid": os.getpid(),
    }
    if settings.gateway_listen:
        binary = find_gateway()
        if binary is None:
            _log.warning("llorch-gateway is not built (make gateway): no REST edge")
        else:
            try:
                gateway = await start_gateway(
                    binary, settings.gateway_listen, orchestrator_address, catalog.address
                )
            except RuntimeError as exc:
                # gRPC still serves; a busy REST port should not take the whole mesh down.
                _log.warning("no REST edge: %s", exc)
            else:
                stack.append(gateway.stop)
                endpoints["gateway"] = gateway.url
    if settings.metrics_listen:
        metrics = serve_metrics(
            settings.metrics_listen,
            [
                orchestrator.orchestrator.metrics.registry,
                pool_manager_registry(pool_manager.manager),
            ],
            None,
        )
        stack.append(lambda: asyncio.to_thread(metrics.stop))
        endpoints["metrics"] = f"127.0.0.1:{metrics.port}"
    path = endpoints_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(endpoints))
    models = ", ".join(sorted({p.model_id for p in pm_settings.pools}))
    rest = f", REST {endpoints['gateway']}" if "gateway" in endpoints else ""
    print(
        f"llorch ready: orchestrator {endpoints['orchestrator']} serving {models} "
        f"(catalog {catalog.address}, pool manager {pool_manager.address}{rest})",
        flush=True,
    )
    return path


def main_up(settings: Settings, base_env: Mapping[str, str]) -> int:
    """``llorch up``: runs the home profile in the foreground until Ctrl-C or SIGTERM."""
    from launch.serve import run_foreground

    return run_foreground("llorch up", lambda stop: run_home(settings, base_env, stop))

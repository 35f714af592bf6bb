"""One composition of the mesh, shared by ``llorch up``, the tests and the benchmarks.

``start_mesh`` starts a catalog, one pool manager and an orchestrator in this event loop, each on
its own gRPC server, from one ``Settings``: the home profile (launch/home.py) calls it, and so
does tests/conftest.py. ``start_home``/``stop_home`` run ``llorch up`` as its own process, as the
benchmarks and the CLI tests do, and ``LLORCH`` is the command line that runs the CLI of this
checkout. ``start_llorch``, ``free_port`` and ``FleetPki`` build fleets of ``llorch serve``
processes with mTLS, as the benchmarks do.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from llorch.catalog.v1 import catalog_pb2_grpc

from catalog.app import CatalogApp, start_catalog
from mesh.server import open_channel
from mesh.settings import Settings
from mesh.tls import TlsFiles, init_ca, issue
from orchestrator.app import OrchestratorApp, start_orchestrator
from poolmanager.app import PoolManagerApp, start_pool_manager
from poolmanager.local import LocalPoolManagerStub
from provisioners.models import ensure_default_model, register_local_file
from provisioners.pull import remove_stale_partials

LLORCH = [sys.executable, "-m", "launch.cli"]
"""The ``llorch`` command of this checkout (the console script may be another install's)."""


@dataclass
class Services:
    """A running catalog, pool manager and orchestrator."""

    catalog: CatalogApp
    pool_manager: PoolManagerApp
    orchestrator: OrchestratorApp

    @property
    def address(self) -> str:
        """The orchestrator's address on loopback."""
        return f"127.0.0.1:{self.orchestrator.port}"

    async def stop(self) -> None:
        """Stops the three, clients' entry point first."""
        await self.orchestrator.stop()
        await self.pool_manager.stop()
        await self.catalog.stop()


async def start_mesh(
    settings: Settings,
    base_env: Mapping[str, str],
    models: Mapping[str, Path] | None = None,
    *,
    default_model: bool = False,
) -> Services:
    """Starts the three services of ``settings`` in this event loop.

    Registers ``models`` (model id → GGUF file of this node) and, with ``default_model``, writes
    the embedded tiny model into ``<data dir>/models`` first. The orchestrator's journal defaults
    to ``<data dir>/orchestrator/journal.db``. The orchestrator calls the pool manager
    in-process when ``settings.in_process_link`` is on, over gRPC otherwise. Whatever started is
    stopped again if a later step fails or is cancelled.
    """
    data_dir = settings.data_dir
    started: list[Any] = []
    try:
        catalog = await start_catalog(settings)
        started.append(catalog)
        node_id = settings.pool_manager.node_id
        channel = open_channel(catalog.address)
        try:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            if default_model:
                # Temporary files of pulls that died with their process are of no use to anyone.
                await asyncio.to_thread(remove_stale_partials, data_dir / "models")
                await ensure_default_model(stub, data_dir / "models", node_id)
            for model_id, path in {**settings.models, **(models or {})}.items():
                await register_local_file(stub, model_id, path, node_id)
        finally:
            await channel.close()
        pm_settings = settings.pool_manager.model_copy(update={"catalog": catalog.address})
        pool_manager = await start_pool_manager(pm_settings, base_env, settings.log_level)
        started.append(pool_manager)
        manager = pool_manager.manager
        if not await manager.wait_ready(pm_settings.worker_start_timeout_s):
            errors = "; ".join(
                f"{p.settings.pool_id}: {p.last_error or p.state.value}"
                for p in manager.pools.values()
            )
            raise RuntimeError(f"pools did not become ready: {errors}")
        orch_settings = settings.orchestrator_service.model_copy(
            update={
                "catalog": catalog.address,
                "pool_managers": [pool_manager.address],
                "journal_path": settings.orchestrator_service.journal_path
                or data_dir / "orchestrator" / "journal.db",
            }
        )
        # In-process, the orchestrator calls this process's pool manager directly
        # (poolmanager.local); its gRPC server still serves everyone else.
        local = (
            {pool_manager.address: LocalPoolManagerStub(pool_manager.servicer)}
            if settings.in_process_link
            else None
        )
        orchestrator = await start_orchestrator(orch_settings, settings.listen, local)
    except BaseException:
        for app in reversed(started):
            await app.stop()
        raise
    return Services(catalog, pool_manager, orchestrator)


def start_home(
    data_dir: Path,
    pools: list[dict[str, Any]],
    models: Mapping[str, Path] | None = None,
    **settings: str,
) -> tuple[subprocess.Popen[str], str]:
    """``llorch up`` in its own process with these pools (and extra model files), gRPC only;
    returns it and its orchestrator address. ``settings`` are more ``LLORCH_*`` variables (name
    without the prefix). Its log goes to ``<data_dir>/llorch-up.log``, shown if it fails to
    start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "LLORCH_DATA_DIR": str(data_dir),
        "LLORCH_LISTEN": "127.0.0.1:0",
        "LLORCH_GATEWAY_LISTEN": "",  # the benchmarks measure gRPC; no REST edge
        "LLORCH_LOG_LEVEL": "WARNING",
        "LLORCH_MODELS": json.dumps({k: str(v) for k, v in (models or {}).items()}),
        "LLORCH_POOL_MANAGER__POOLS": json.dumps(pools),
        "GRPC_VERBOSITY": "ERROR",
        **{f"LLORCH_{name}": value for name, value in settings.items()},
    }
    log_path = data_dir / "llorch-up.log"
    try:
        return start_llorch(["up"], env, log_path)
    except RuntimeError:
        raise SystemExit(f"llorch up failed: {log_path.read_text()[-2000:]}") from None


def stop_home(proc: subprocess.Popen[str]) -> None:
    """Stops ``llorch up`` as Ctrl-C would; kills it if it does not stop within a minute."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def start_llorch(
    args: list[str], env: Mapping[str, str], log: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Starts ``llorch <args>`` (``up`` or ``serve ...``) with ``env`` added to this process's
    environment; returns the process and the address from its ready line. Its logs go to ``log``
    (appended), or are dropped. RuntimeError (the process killed) when it does not get ready."""
    stderr: IO[str] | int = log.open("a") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [*LLORCH, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, **env},
        )
    finally:
        if not isinstance(stderr, int):
            stderr.close()  # the child has its own copy
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("llorch ready: "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"llorch {' '.join(args)} did not get ready: {line!r}")
    return proc, line.split()[3]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (for settings that need one before a service starts)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class FleetPki:
    """A CA in ``<root>/ca`` and a certificate in ``<root>/certs`` for each process of a
    loopback cloud-profile fleet (the benchmarks' ``llorch serve`` fleets): ``catalog``,
    ``orch`` (orchestrator), ``ops`` (operator) and one pool manager per node."""

    def __init__(self, root: Path, nodes: Iterable[str]) -> None:
        self.root = root
        init_ca(root / "ca")
        for role, name in [
            ("catalog", "catalog"),
            ("orchestrator", "orch"),
            ("operator", "ops"),
            *(("poolmanager", n) for n in nodes),
        ]:
            issue(root / "ca", role, name, root / "certs")

    def files(self, name: str) -> TlsFiles:
        certs = self.root / "certs"
        return TlsFiles(self.root / "ca" / "ca.pem", certs / f"{name}.pem", certs / f"{name}.key")

    def env(self, name: str) -> dict[str, str]:
        """The ``LLORCH_TLS__*`` settings of the process with certificate ``name``."""
        files = self.files(name)
        return {
            "LLORCH_TLS__CA_FILE": str(files.ca),
            "LLORCH_TLS__CERT_FILE": str(files.cert),
            "LLORCH_TLS__KEY_FILE": str(files.key),
        }

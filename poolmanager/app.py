"""Starts a pool manager: its pools' workers + PoolManagerService on the mesh bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from llorch.orchestrator.v1 import nodes_pb2, nodes_pb2_grpc

from catalog.client import CatalogClient
from mesh import logs
from mesh.errors import LlorchError
from mesh.server import (
    POOL_MANAGER_MESSAGE_BYTES,
    MeshServer,
    create_server,
    is_loopback,
    open_channel,
    service_security,
)
from mesh.settings import PoolManagerSettings
from mesh.tls import TlsFiles
from poolmanager.collector import GarbageCollector
from poolmanager.fetch import ModelFetcher
from poolmanager.manager import PoolManager
from poolmanager.servicer import SERVICE_NAME, PoolManagerServicer
from poolmanager.staging import require_regular_file

_log = logs.get_logger("poolmanager.app")


@dataclass
class PoolManagerApp:
    """A running pool manager."""

    server: MeshServer
    manager: PoolManager
    servicer: PoolManagerServicer
    catalog_channel: grpc.aio.Channel
    gc_timer: asyncio.Task[None] | None = None
    usage_timer: asyncio.Task[None] | None = None
    registration: asyncio.Task[None] | None = None
    store_timer: asyncio.Task[None] | None = None

    async def refresh_store(self) -> None:
        """Reads which models the catalog records in this node's store; keeps the last answer
        when the catalog cannot be reached."""
        stub = catalog_pb2_grpc.CatalogServiceStub(self.catalog_channel)
        found: list[str] = []
        token = ""
        try:
            while True:
                page = await stub.ListModels(
                    catalog_pb2.ListModelsRequest(
                        node_id=self.manager.node_id, page_size=500, page_token=token
                    ),
                    timeout=10.0,
                )
                found.extend(m.model_id for m in page.models)
                token = page.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as err:
            _log.warning("could not read this node's models from the catalog: %s", err.code().name)
            return
        await self.manager.set_stored_models(found)

    async def report_usage(self, timeout_s: float = 10.0) -> None:
        """Tells the catalog which models ran here since the last report (kept for the next
        report when the catalog cannot be reached)."""
        used = self.manager.take_used()
        if not used:
            return
        try:
            await catalog_pb2_grpc.CatalogServiceStub(self.catalog_channel).MarkModelsUsed(
                catalog_pb2.MarkModelsUsedRequest(
                    node_id=self.manager.node_id, model_ids=sorted(used)
                ),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as err:
            self.manager.give_back_used(used)
            _log.warning("could not report model use to the catalog: %s", err.code().name)

    @property
    def address(self) -> str:
        """Loopback address of the server."""
        return f"127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        """Stops serving, then stops every worker."""
        for timer in (self.registration, self.store_timer, self.gc_timer, self.usage_timer):
            if timer is not None:
                timer.cancel()
                await asyncio.gather(timer, return_exceptions=True)
        await self.report_usage(timeout_s=2.0)  # the last minute's use is not lost
        await self.server.stop(grace_s=1.0)
        await self.manager.stop()
        await self.catalog_channel.close()


async def start_pool_manager(
    settings: PoolManagerSettings,
    base_env: Mapping[str, str],
    log_level: str = "INFO",
    tls: TlsFiles | None = None,
) -> PoolManagerApp:
    """Starts serving (NOT_SERVING until every pool is ready) and starts the pools' workers.
    With ``tls``: mTLS on its port and to the catalog."""
    if not settings.catalog:
        raise ValueError("pool_manager.catalog: the catalog address is required")
    if (
        settings.orchestrator
        and not settings.advertise_address
        and not is_loopback(settings.listen)
    ):
        raise ValueError(
            "pool_manager.advertise_address: required to register with the orchestrator when "
            f"listening on {settings.listen} (the host:port the orchestrator dials)"
        )
    channel = open_channel(settings.catalog, tls=tls)
    catalog = CatalogClient(channel)

    async def refresh_store() -> None:
        if app_box:  # a fetch while the pools first load is seen at the app's first refresh
            await app_box[0].refresh_store()

    fetcher = (
        ModelFetcher(
            catalog,
            catalog_pb2_grpc.CatalogServiceStub(channel),
            settings.node_id,
            settings.model_store,
            refresh_store,
        )
        if settings.model_store is not None
        else None
    )

    async def locate(model_id: str) -> str:
        if fetcher is not None:  # fetched into the store when this node holds no copy
            path = await fetcher.path(model_id)
        else:
            path = await catalog.local_path(model_id, settings.node_id)
        with contextlib.suppress(FileNotFoundError):  # a missing file fails the load as before
            await asyncio.to_thread(require_regular_file, model_id, Path(path))
        return path

    server_box: list[MeshServer] = []
    readiness = {"ready": False}

    async def on_change() -> None:
        ready = manager.all_ready()
        if server_box and ready != readiness["ready"]:
            readiness["ready"] = ready
            await server_box[0].set_ready(SERVICE_NAME, ready)

    manager = PoolManager(settings, locate, base_env, on_change, log_level)
    app_box: list[PoolManagerApp] = []  # the collector refreshes the app's store index
    collector = None
    if settings.model_store is not None:
        collector = GarbageCollector(
            catalog_pb2_grpc.CatalogServiceStub(channel),
            settings.node_id,
            settings.model_store,
            manager.models_in_use,
            after_collect=refresh_store,
        )
    servicer = PoolManagerServicer(manager, collector)
    credentials, authorize = service_security(tls)
    server = await create_server(
        settings.listen,
        [servicer.binding()],
        credentials=credentials,
        authorize=authorize,
        ready=False,
        max_message_bytes=POOL_MANAGER_MESSAGE_BYTES,
    )
    server_box.append(server)
    await manager.start()
    app = PoolManagerApp(server, manager, servicer, channel)
    app_box.append(app)
    # In the background: serving must not wait for the catalog (it may be down, or slow).
    app.store_timer = asyncio.create_task(_refresh_every(app, STORE_REFRESH_S), name="store")
    app.usage_timer = asyncio.create_task(
        _report_every(app, settings.usage_report_s), name="usage-report"
    )
    if collector is not None and settings.gc_interval_s > 0:
        app.gc_timer = asyncio.create_task(
            _collect_every(collector, settings.gc_interval_s), name="gc-timer"
        )
    if settings.orchestrator:
        advertise = settings.advertise_address or f"localhost:{server.port}"
        app.registration = asyncio.create_task(
            _register_every(settings.orchestrator, tls, settings.node_id, advertise),
            name="node-registration",
        )
    return app


async def _register_every(
    orchestrator: str, tls: TlsFiles | None, node_id: str, address: str
) -> None:
    """Announces this node to the orchestrator's node port now and whenever it asks to hear
    again; retries with backoff while it cannot be reached."""
    backoff_s = 0.2
    async with open_channel(orchestrator, tls=tls) as channel:
        stub = nodes_pb2_grpc.NodeServiceStub(channel)
        request = nodes_pb2.RegisterNodeRequest(node_id=node_id, address=address)
        registered = False
        while True:
            try:
                answer = await stub.RegisterNode(request, timeout=5.0)
            except grpc.aio.AioRpcError as err:
                if registered or backoff_s >= 3.2:
                    _log.warning(
                        "cannot register with the orchestrator at %s: %s %s",
                        orchestrator,
                        err.code().name,
                        err.details(),
                    )
                registered = False
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            if not registered:
                _log.info("registered with the orchestrator at %s as %s", orchestrator, address)
            registered, backoff_s = True, 0.2
            await asyncio.sleep(max(0.5, answer.register_again_ms / 1000))


STORE_REFRESH_S = 30.0
"""How often a pool manager reads again which models its store holds (pulls by operators
land in the catalog, not here)."""


async def _refresh_every(app: PoolManagerApp, interval_s: float) -> None:
    while True:
        await app.refresh_store()
        await asyncio.sleep(interval_s)


async def _report_every(app: PoolManagerApp, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await app.report_usage()


async def _collect_every(collector: GarbageCollector, interval_s: float) -> None:
    """Garbage collection on a timer; a failed round is logged and the next one comes."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            done = await collector.collect(dry_run=False)
        except LlorchError as exc:
            _log.warning("garbage collection failed: %s", exc.message)
            continue
        except Exception:  # a bug: log it; the timer goes on
            _log.exception("garbage collection failed")
            continue
        if done.plan.delete or done.unknown_files:
            _log.info(
                "garbage collection freed %d bytes",
                done.plan.freed_bytes,
                extra={"deleted": len(done.plan.delete) + len(done.unknown_files)},
            )

"""ControlService: the operators' face of the orchestrator. Transport only."""

from __future__ import annotations

import time

import grpc
from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc
from llorch.poolmanager.v1 import poolmanager_pb2

from mesh.errors import InvalidArgumentError, NotFoundError
from mesh.ids import check_name
from mesh.server import ServiceBinding
from orchestrator.placement import PreloadAction, pool_key
from orchestrator.service import Orchestrator

SERVICE_NAME = control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name

_MAX_DRAIN_DEADLINE_MS = 24 * 3600 * 1000


class ControlServicer(control_pb2_grpc.ControlServiceServicer):
    """gRPC face of the orchestrator's operator operations."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orch = orchestrator

    def binding(self) -> ServiceBinding:
        """How the bootstrap adds this servicer."""
        return ServiceBinding(
            SERVICE_NAME, lambda s: control_pb2_grpc.add_ControlServiceServicer_to_server(self, s)
        )

    async def ListPools(
        self, request: control_pb2.ListPoolsRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListPoolsResponse:
        return control_pb2.ListPoolsResponse(pools=self._statuses())

    async def ListNodes(
        self, request: control_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListNodesResponse:
        now = time.monotonic()
        return control_pb2.ListNodesResponse(
            nodes=[
                control_pb2.NodeStatus(
                    node_id=node.node_id,
                    address=node.address,
                    reachable=node.reachable,
                    registered=node.registered,
                    last_seen_ms_ago=0
                    if node.last_seen is None
                    else max(1, round((now - node.last_seen) * 1000)),
                    pool_ids=list(node.pool_ids),
                )
                for node in self._orch.registry_nodes()
            ]
        )

    async def GetPool(
        self, request: control_pb2.GetPoolRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.GetPoolResponse:
        return control_pb2.GetPoolResponse(pool=self._status(request.node_id, request.pool_id))

    async def DrainPool(
        self, request: control_pb2.DrainPoolRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.DrainPoolResponse:
        node_id, pool_id = _pool_ref(request.node_id, request.pool_id)
        if request.deadline_ms > _MAX_DRAIN_DEADLINE_MS:
            raise InvalidArgumentError("deadline_ms", "must be at most 24 hours")
        self._orch.drain(node_id, pool_id, request.deadline_ms / 1000)
        return control_pb2.DrainPoolResponse(pool=self._status(node_id, pool_id))

    async def ResumePool(
        self, request: control_pb2.ResumePoolRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ResumePoolResponse:
        node_id, pool_id = _pool_ref(request.node_id, request.pool_id)
        self._orch.resume(node_id, pool_id)
        return control_pb2.ResumePoolResponse(pool=self._status(node_id, pool_id))

    async def ReloadPool(
        self, request: control_pb2.ReloadPoolRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ReloadPoolResponse:
        node_id, pool_id = _pool_ref(request.node_id, request.pool_id)
        model_id = check_name(request.model_id, "model_id")
        deadline_s = None
        if request.HasField("deadline_ms"):
            if request.deadline_ms > _MAX_DRAIN_DEADLINE_MS:
                raise InvalidArgumentError("deadline_ms", "must be at most 24 hours")
            deadline_s = request.deadline_ms / 1000
        report = await self._orch.reload_pool(node_id, pool_id, model_id, deadline_s)
        return control_pb2.ReloadPoolResponse(
            pool=self._status(node_id, pool_id),
            finished=report.finished,
            cancelled=report.cancelled,
        )

    async def PreloadModel(
        self, request: control_pb2.PreloadModelRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.PreloadModelResponse:
        model_id = check_name(request.model_id, "model_id")
        node_id = pool_id = ""
        if request.node_id or request.pool_id:
            node_id, pool_id = _pool_ref(request.node_id, request.pool_id)
        view, action, previous = await self._orch.preload_model(model_id, node_id, pool_id)
        return control_pb2.PreloadModelResponse(
            pool=self._status(view.node_id, view.pool_id),
            replaced_model_id=previous,
            already_loaded=action is PreloadAction.NONE,
        )

    async def DeleteModel(
        self, request: control_pb2.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.DeleteModelResponse:
        model_id = check_name(request.model_id, "model_id")
        drained, ended, files = await self._orch.delete_model(model_id, request.drain)
        return control_pb2.DeleteModelResponse(
            drained_pools=drained, tasks_ended=ended, files=files
        )

    async def GetCapabilities(
        self, request: control_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.GetCapabilitiesResponse:
        by_model: dict[str, control_pb2.ModelCapability] = {}
        for view in self._orch.pool_views():
            cap = by_model.setdefault(
                view.model_id, control_pb2.ModelCapability(model_id=view.model_id)
            )
            cap.pools += 1
            usable = view.ready and view.reachable and not view.failed and not view.draining
            if usable:
                cap.pools_ready += 1
                cap.max_context_tokens = max(cap.max_context_tokens, view.n_ctx)
                if view.engine_version and view.engine_version not in cap.engine_versions:
                    cap.engine_versions.append(view.engine_version)
        return control_pb2.GetCapabilitiesResponse(models=[by_model[m] for m in sorted(by_model)])

    def _statuses(self) -> list[control_pb2.PoolStatus]:
        views = {v.key: v for v in self._orch.pool_views()}
        out = []
        for node_id, reachable, pool in sorted(
            self._orch.registry_pools(), key=lambda entry: (entry[0], entry[2].pool_id)
        ):
            key = pool_key(node_id, pool.pool_id)
            view = views.get(key)
            finished, tokens = self._orch.metrics.per_pool.get(key, (0, 0))
            out.append(
                control_pb2.PoolStatus(
                    node_id=node_id,
                    pool_id=pool.pool_id,
                    model_id=pool.model_id,
                    state=poolmanager_pb2.PoolState.Name(pool.state)
                    .removeprefix("POOL_STATE_")
                    .lower(),
                    reachable=reachable,
                    drained=self._orch.is_drained(node_id, pool.pool_id),
                    slots_total=pool.slots_total,
                    slots_busy=view.in_flight if view else 0,
                    n_ctx=pool.n_ctx,
                    engine_version=pool.engine_version,
                    devices=list(pool.devices),
                    queued=self._orch.queued_count(pool.model_id),
                    last_error=pool.last_error,
                    vram_estimate_bytes=pool.vram_estimate_bytes,
                    vram_measured_bytes=pool.vram_measured_bytes,
                    vram_free_bytes=view.vram_free_bytes if view else 0,
                    cpu_only=pool.cpu_only,
                    tasks_finished=finished,
                    tokens_out=tokens,
                    prefix_cache_entries=pool.prefix_cache.entries,
                    prefix_lookup_tokens=pool.prefix_cache.lookup_tokens,
                    prefix_hit_tokens=pool.prefix_cache.hit_tokens,
                )
            )
        return out

    def _status(self, node_id: str, pool_id: str) -> control_pb2.PoolStatus:
        node_id, pool_id = _pool_ref(node_id, pool_id)
        for status in self._statuses():
            if status.node_id == node_id and status.pool_id == pool_id:
                return status
        raise NotFoundError(f"pool {node_id}/{pool_id} does not exist", reason="POOL_NOT_FOUND")


def _pool_ref(node_id: str, pool_id: str) -> tuple[str, str]:
    return check_name(node_id, "node_id"), check_name(pool_id, "pool_id")

"""PoolManagerService: transport only. Validates requests and converts protobuf."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc
from llorch.common.v1 import common_pb2
from llorch.poolmanager.v1 import poolmanager_pb2, poolmanager_pb2_grpc

from mesh import logs
from mesh.common_types import FINISH_REASON_TO_PB, MAX_GRAMMAR_BYTES, check_sampling
from mesh.errors import FailedPreconditionError, InvalidArgumentError
from mesh.ids import check_name
from mesh.server import ServiceBinding
from poolmanager.collector import GarbageCollector
from poolmanager.execution import (
    ExecFinished,
    ExecStarted,
    ExecTokens,
    Execution,
    ExecutionSpec,
)
from poolmanager.manager import PoolManager
from poolmanager.pool import Pool, PoolState
from provisioners.gc import GcReplica

SERVICE_NAME = poolmanager_pb2.DESCRIPTOR.services_by_name["PoolManagerService"].full_name

_STATE_TO_PB = {
    PoolState.UNLOADED: poolmanager_pb2.POOL_STATE_UNLOADED,
    PoolState.LOADING: poolmanager_pb2.POOL_STATE_LOADING,
    PoolState.READY: poolmanager_pb2.POOL_STATE_READY,
    PoolState.DRAINING: poolmanager_pb2.POOL_STATE_DRAINING,
    PoolState.FAILED: poolmanager_pb2.POOL_STATE_FAILED,
}


class PoolManagerServicer(poolmanager_pb2_grpc.PoolManagerServiceServicer):
    """gRPC face of a PoolManager."""

    def __init__(self, manager: PoolManager, collector: GarbageCollector | None = None) -> None:
        self._manager = manager
        self._collector = collector

    def binding(self) -> ServiceBinding:
        """How the bootstrap adds this servicer."""
        return ServiceBinding(
            SERVICE_NAME,
            lambda s: poolmanager_pb2_grpc.add_PoolManagerServiceServicer_to_server(self, s),
        )

    async def GetNode(
        self, request: poolmanager_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> poolmanager_pb2.GetNodeResponse:
        return poolmanager_pb2.GetNodeResponse(node=node_to_pb(self._manager))

    async def Execute(
        self, request: poolmanager_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[poolmanager_pb2.ExecuteResponse]:
        async for response in self.responses(self.begin(request)):
            yield response

    def begin(self, request: poolmanager_pb2.ExecuteRequest) -> Execution:
        """Validates an ExecuteRequest and hands it to the worker (synchronously)."""
        spec = _spec_from_pb(request)
        logs.task_id.set(spec.task_id)
        logs.pool_id.set(spec.pool_id)
        logs.node_id.set(self._manager.node_id)
        return self._manager.begin(spec)

    async def responses(
        self, execution: Execution
    ) -> AsyncGenerator[poolmanager_pb2.ExecuteResponse]:
        """An execution's events as ExecuteResponse messages."""
        async for batch in execution.events():
            for event in batch:
                yield _event_to_pb(event)

    async def WatchNode(
        self, request: poolmanager_pb2.WatchNodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[poolmanager_pb2.WatchNodeResponse]:
        heartbeat_s = max(100, request.heartbeat_ms or 1000) / 1000
        while True:
            version = self._manager.version
            yield poolmanager_pb2.WatchNodeResponse(node=node_to_pb(self._manager), version=version)
            await self._manager.wait_change(version, heartbeat_s)

    async def PreloadPool(
        self, request: poolmanager_pb2.PreloadPoolRequest, context: grpc.aio.ServicerContext
    ) -> poolmanager_pb2.PreloadPoolResponse:
        check_name(request.pool_id, "pool_id")
        if request.model_id:
            check_name(request.model_id, "model_id")
        pool = await self._manager.to_the_end(
            self._manager.preload(request.pool_id, request.model_id)
        )
        return poolmanager_pb2.PreloadPoolResponse(pool=pool_to_pb(self._manager, pool))

    async def DrainPool(
        self, request: poolmanager_pb2.DrainPoolRequest, context: grpc.aio.ServicerContext
    ) -> poolmanager_pb2.DrainPoolResponse:
        check_name(request.pool_id, "pool_id")
        report = await self._manager.to_the_end(
            self._manager.drain(request.pool_id, _deadline_s(request))
        )
        return poolmanager_pb2.DrainPoolResponse(
            pool=pool_to_pb(self._manager, self._manager.pool(request.pool_id)),
            finished=report.finished,
            cancelled=report.cancelled,
        )

    async def ReloadPool(
        self, request: poolmanager_pb2.ReloadPoolRequest, context: grpc.aio.ServicerContext
    ) -> poolmanager_pb2.ReloadPoolResponse:
        check_name(request.pool_id, "pool_id")
        check_name(request.model_id, "model_id")
        report = await self._manager.to_the_end(
            self._manager.reload(request.pool_id, request.model_id, _deadline_s(request))
        )
        return poolmanager_pb2.ReloadPoolResponse(
            pool=pool_to_pb(self._manager, self._manager.pool(request.pool_id)),
            finished=report.finished,
            cancelled=report.cancelled,
        )

    async def CollectGarbage(
        self, request: poolmanager_pb2.CollectGarbageRequest, context: grpc.aio.ServicerContext
    ) -> poolmanager_pb2.CollectGarbageResponse:
        if self._collector is None:
            raise FailedPreconditionError(
                "this pool manager has no model store (setting pool_manager.model_store)",
                reason="NO_MODEL_STORE",
            )
        done = await self._collector.collect(request.dry_run)
        plan = done.plan

        def decisions(pairs: list[tuple[GcReplica, str]]) -> list[poolmanager_pb2.GcDecision]:
            return [
                poolmanager_pb2.GcDecision(
                    model_id=r.model_id, path=r.path, size_bytes=r.size_bytes, reason=why
                )
                for r, why in pairs
            ]

        unknown = [
            poolmanager_pb2.GcDecision(path=path, reason="no catalog record names it")
            for path in done.unknown_files
        ]
        return poolmanager_pb2.CollectGarbageResponse(
            dry_run=done.dry_run,
            deleted=decisions(plan.delete) + unknown,
            kept=decisions(plan.keep),
            disk_total_bytes=plan.disk_before.total_bytes,
            disk_free_bytes_before=plan.disk_before.free_bytes,
            disk_free_bytes_after=plan.disk_after.free_bytes,
            stale_partials_removed=done.stale_partials_removed,
        )

    async def StageModel(
        self, request: poolmanager_pb2.StageModelRequest, context: grpc.aio.ServicerContext
    ) -> poolmanager_pb2.StageModelResponse:
        check_name(request.model_id, "model_id")
        await self._manager.stage(request.model_id)
        return poolmanager_pb2.StageModelResponse(staging=staging_to_pb(self._manager))

    async def UnstageModel(
        self, request: poolmanager_pb2.UnstageModelRequest, context: grpc.aio.ServicerContext
    ) -> poolmanager_pb2.UnstageModelResponse:
        check_name(request.model_id, "model_id")
        removed = await self._manager.unstage(request.model_id)
        return poolmanager_pb2.UnstageModelResponse(
            removed=removed, staging=staging_to_pb(self._manager)
        )

    async def CancelExecution(
        self, request: poolmanager_pb2.CancelExecutionRequest, context: grpc.aio.ServicerContext
    ) -> poolmanager_pb2.CancelExecutionResponse:
        if not request.execution_id:
            raise InvalidArgumentError("execution_id", "is required")
        return poolmanager_pb2.CancelExecutionResponse(
            cancelled=self._manager.cancel(request.execution_id)
        )


def node_to_pb(manager: PoolManager) -> poolmanager_pb2.Node:
    """The node's state as protobuf."""
    return poolmanager_pb2.Node(
        node_id=manager.node_id,
        pools=[pool_to_pb(manager, p) for p in manager.pools.values()],
        gpus=[
            poolmanager_pb2.Gpu(
                index=d.index,
                uuid=d.uuid,
                name=d.name,
                vram_total_bytes=d.vram_total_bytes,
                vram_free_bytes=d.vram_free_bytes,
                vram_used_bytes=d.vram_used_bytes,
                utilization_pct=d.utilization_pct,
                compute_capability=d.compute_capability,
            )
            for d in manager.inventory.devices()
        ],
        gpu_status=manager.inventory.unavailable_reason,
        staging=staging_to_pb(manager),
        stored_models=sorted(manager.stored_models),
    )


def pool_to_pb(manager: PoolManager, p: Pool) -> poolmanager_pb2.Pool:
    """One pool's state as protobuf."""
    return poolmanager_pb2.Pool(
        pool_id=p.pool_id,
        state=_STATE_TO_PB[p.state],
        model_id=p.model_id,
        engine_version=p.engine_version,
        devices=p.settings.devices,
        slots_total=p.settings.slots,
        slots_free=p.slots_free,
        n_ctx=p.n_ctx,
        last_error=p.last_error,
        cpu_only=p.cpu_only,
        vram_estimate_bytes=p.vram_estimate_bytes,
        vram_measured_bytes=p.vram_measured_bytes,
        load_ms=p.load_ms,
        loaded_from=p.loaded_from,
        restarts=p.restarts,
        breaker_open=p.breaker_open,
        spare_ready=p.spare_ready,
        loaded_in_spare=p.loaded_in_spare,
        can_load=p.settings.swappable,
        prefix_cache=_prefix_cache_to_pb(p),
    )


def _prefix_cache_to_pb(p: Pool) -> poolmanager_pb2.PrefixCache:
    """The pool's prefix cache as its worker last reported it (empty without a worker)."""
    cache = p.worker.cache if p.worker is not None else None
    return poolmanager_pb2.PrefixCache(
        entries=cache.entries if cache else 0,
        cells=cache.cells if cache else 0,
        block_hashes=cache.block_hashes if cache else (),
        lookup_tokens=p.prefix_lookup_tokens,
        hit_tokens=p.prefix_hit_tokens,
        prefill_ms_per_token=cache.prefill_ms_per_token if cache else 0.0,
    )


def staging_to_pb(manager: PoolManager) -> poolmanager_pb2.Staging:
    """The RAM staging cache as protobuf."""
    cache = manager.staging
    if cache is None:
        return poolmanager_pb2.Staging()
    return poolmanager_pb2.Staging(
        budget_bytes=cache.budget_bytes,
        staged_bytes=cache.staged_bytes,
        hits=cache.hits,
        misses=cache.misses,
        models=[
            poolmanager_pb2.StagedModel(
                model_id=m.model_id,
                size_bytes=m.size_bytes,
                in_use=manager.model_in_use(m.model_id),
            )
            for m in cache.models()
        ],
    )


def _deadline_s(
    request: poolmanager_pb2.DrainPoolRequest | poolmanager_pb2.ReloadPoolRequest,
) -> float | None:
    return request.deadline_ms / 1000 if request.HasField("deadline_ms") else None


def _spec_from_pb(request: poolmanager_pb2.ExecuteRequest) -> ExecutionSpec:
    if not request.execution_id or len(request.execution_id) > 128:
        raise InvalidArgumentError("execution_id", "is required, at most 128 characters")
    check_name(request.pool_id, "pool_id")
    check_name(request.model_id, "model_id")
    if not request.prompt:
        raise InvalidArgumentError("prompt", "is required")
    s = request.sampling
    if not s.HasField("max_tokens") or s.max_tokens <= 0:
        raise InvalidArgumentError("sampling.max_tokens", "must be set and > 0")
    check_sampling(s.temperature, s.top_p, s.top_k, s.stop)
    if len(request.grammar.encode("utf-8")) > MAX_GRAMMAR_BYTES:
        raise InvalidArgumentError("grammar", f"is longer than {MAX_GRAMMAR_BYTES} bytes")
    if request.grammar and s.ignore_eos:
        raise InvalidArgumentError(
            "sampling.ignore_eos", "cannot be set with a grammar, which ends with end-of-sequence"
        )
    return ExecutionSpec(
        execution_id=request.execution_id,
        task_id=request.task_id,
        pool_id=request.pool_id,
        model_id=request.model_id,
        prompt=request.prompt,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
        max_tokens_defaulted=request.max_tokens_defaulted,
        templated=request.templated,
        grammar=request.grammar,
    )


def _event_to_pb(event: ExecStarted | ExecTokens | ExecFinished) -> poolmanager_pb2.ExecuteResponse:
    if isinstance(event, ExecTokens):
        return poolmanager_pb2.ExecuteResponse(
            token=common_pb2.Token(index=event.index, text=event.text, token_ids=event.token_ids)
        )
    if isinstance(event, ExecStarted):
        return poolmanager_pb2.ExecuteResponse(
            started=poolmanager_pb2.ExecutionStarted(
                engine_version=event.engine_version, tokens_in=event.tokens_in
            )
        )
    return poolmanager_pb2.ExecuteResponse(
        finished=common_pb2.Finished(
            finish_reason=FINISH_REASON_TO_PB[event.reason],
            tokens_in=event.tokens_in,
            tokens_out=event.tokens_out,
            ttft_ms=event.ttft_ms,
            decode_ms=event.decode_ms,
            tokens_cached=event.tokens_cached,
        )
    )

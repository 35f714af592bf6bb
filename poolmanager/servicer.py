"""PoolManagerService: transport only. Validates requests and converts protobuf."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc
from llorch.common.v1 import common_pb2
from llorch.poolmanager.v1 import poolmanager_pb2, poolmanager_pb2_grpc

from mesh import logs
from mesh.common_types import FINISH_REASON_TO_PB, check_sampling
from mesh.errors import InvalidArgumentError
from mesh.ids import check_name
from mesh.server import ServiceBinding
from poolmanager.manager import (
    ExecFinished,
    ExecStarted,
    ExecTokens,
    Execution,
    ExecutionSpec,
    PoolManager,
    PoolState,
)

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

    def __init__(self, manager: PoolManager) -> None:
        self._manager = manager

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
        pools=[
            poolmanager_pb2.Pool(
                pool_id=p.settings.pool_id,
                state=_STATE_TO_PB[p.state],
                model_id=p.settings.model_id,
                engine_version=p.engine_version,
                devices=p.settings.devices,
                slots_total=p.settings.slots,
                slots_free=p.slots_free,
                n_ctx=p.n_ctx,
                last_error=p.last_error,
            )
            for p in manager.pools.values()
        ],
    )


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
        )
    )

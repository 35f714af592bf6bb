"""The orchestrator's port to one pool manager: ``PoolClient``, and the one adapter behind it.

Everything the orchestrator asks of a node goes through this port: the Execute stream, the
lifecycle calls (preload, reload, drain), garbage collection and the WatchNode stream.
``StubPoolClient`` adapts the generated gRPC stub, or ``poolmanager.local``'s in-process twin
(same method names, errors raised as ``LlorchError``), and maps transport errors once
(``pool_error``). Unit tests pass a fake of their own (tests/orchestrator/fakes.py).

Execute returns the call itself, not a wrapper: the first token's path keeps its direct call,
and the relay maps a broken stream with ``pool_error`` where it reads it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
from llorch.poolmanager.v1 import poolmanager_pb2

from mesh.errors import LlorchError, UnavailableError, from_rpc_error

Metadata = Sequence[tuple[str, str]]


class ExecuteCall(Protocol):
    """A pool manager's Execute stream: a grpc.aio call, or poolmanager.local's in-process twin."""

    def __aiter__(self) -> AsyncIterator[poolmanager_pb2.ExecuteResponse]: ...

    def cancel(self) -> bool: ...


class WatchCall(Protocol):
    """A pool manager's WatchNode stream."""

    def __aiter__(self) -> AsyncIterator[poolmanager_pb2.WatchNodeResponse]: ...


class PoolClient(Protocol):
    """What the orchestrator calls on one pool manager. Unary calls raise ``LlorchError``."""

    def execute(
        self,
        request: poolmanager_pb2.ExecuteRequest,
        *,
        timeout: float | None,
        metadata: Metadata,
    ) -> ExecuteCall:
        """Starts an execution; its request goes out at once. Read errors with ``pool_error``."""
        ...

    async def preload_pool(
        self, request: poolmanager_pb2.PreloadPoolRequest
    ) -> poolmanager_pb2.PreloadPoolResponse: ...

    async def reload_pool(
        self, request: poolmanager_pb2.ReloadPoolRequest
    ) -> poolmanager_pb2.ReloadPoolResponse: ...

    async def drain_pool(
        self, request: poolmanager_pb2.DrainPoolRequest
    ) -> poolmanager_pb2.DrainPoolResponse: ...

    async def collect_garbage(
        self, request: poolmanager_pb2.CollectGarbageRequest
    ) -> poolmanager_pb2.CollectGarbageResponse: ...

    def watch_node(self, request: poolmanager_pb2.WatchNodeRequest) -> WatchCall:
        """The node's state on every change and heartbeat; a broken stream raises."""
        ...


def pool_error(err: grpc.aio.AioRpcError, where: str) -> LlorchError:
    """The error a failed call to the pool manager of ``where`` (a node or pool) stands for.

    UNAVAILABLE without status details is the transport's (the node is gone or partitioned):
    NODE_UNREACHABLE, retriable. Anything else is the pool manager's own error, rebuilt with
    its reason and retriability.
    """
    if err.code() == grpc.StatusCode.UNAVAILABLE and not _has_details(err):
        return UnavailableError(
            f"pool manager of {where} is unreachable",
            reason="NODE_UNREACHABLE",
            retry_delay_s=1.0,
        )
    return from_rpc_error(err)


def _has_details(err: grpc.aio.AioRpcError) -> bool:
    return any(k == "grpc-status-details-bin" for k, _ in (err.trailing_metadata() or ()))


class StubPoolClient:
    """``PoolClient`` over a ``PoolManagerServiceStub`` or ``poolmanager.local``'s twin."""

    def __init__(self, stub: Any, where: str) -> None:
        """``stub``: the generated stub or its in-process twin; ``where``: the node's address,
        named in NODE_UNREACHABLE errors."""
        self._stub = stub
        self._where = where

    def execute(
        self,
        request: poolmanager_pb2.ExecuteRequest,
        *,
        timeout: float | None,
        metadata: Metadata,
    ) -> ExecuteCall:
        call: ExecuteCall = self._stub.Execute(request, timeout=timeout, metadata=metadata)
        return call

    async def preload_pool(
        self, request: poolmanager_pb2.PreloadPoolRequest
    ) -> poolmanager_pb2.PreloadPoolResponse:
        try:
            response: poolmanager_pb2.PreloadPoolResponse = await self._stub.PreloadPool(request)
        except grpc.aio.AioRpcError as err:
            raise pool_error(err, self._where) from None
        return response

    async def reload_pool(
        self, request: poolmanager_pb2.ReloadPoolRequest
    ) -> poolmanager_pb2.ReloadPoolResponse:
        try:
            response: poolmanager_pb2.ReloadPoolResponse = await self._stub.ReloadPool(request)
        except grpc.aio.AioRpcError as err:
            raise pool_error(err, self._where) from None
        return response

    async def drain_pool(
        self, request: poolmanager_pb2.DrainPoolRequest
    ) -> poolmanager_pb2.DrainPoolResponse:
        try:
            response: poolmanager_pb2.DrainPoolResponse = await self._stub.DrainPool(request)
        except grpc.aio.AioRpcError as err:
            raise pool_error(err, self._where) from None
        return response

    async def collect_garbage(
        self, request: poolmanager_pb2.CollectGarbageRequest
    ) -> poolmanager_pb2.CollectGarbageResponse:
        try:
            response: poolmanager_pb2.CollectGarbageResponse = await self._stub.CollectGarbage(
                request
            )
        except grpc.aio.AioRpcError as err:
            raise pool_error(err, self._where) from None
        return response

    def watch_node(self, request: poolmanager_pb2.WatchNodeRequest) -> WatchCall:
        call: WatchCall = self._stub.WatchNode(request)
        return call

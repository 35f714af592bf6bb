"""The PoolManagerService of a pool manager in the caller's own process, without a socket.

``LocalPoolManagerStub`` offers the methods of the generated ``PoolManagerServiceStub`` that the
orchestrator uses and calls the servicer directly: the same validation, the same messages, the
same errors (raised as ``LlorchError`` instead of carried in an ``AioRpcError``). The home profile
uses it between its co-located orchestrator and pool manager, where a loopback gRPC hop costs
about 3 ms of the first token's latency and buys nothing (see docs/decisions.md). A remote pool
manager is always reached over gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from llorch.poolmanager.v1 import poolmanager_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from mesh import tracing
from mesh.errors import DeadlineExceededError, LlorchError
from poolmanager.execution import Execution
from poolmanager.servicer import PoolManagerServicer


class LocalPoolManagerStub:
    """Calls a ``PoolManagerServicer`` in this process as the orchestrator's stub would."""

    def __init__(self, servicer: PoolManagerServicer) -> None:
        self._servicer = servicer

    def WatchNode(
        self, request: poolmanager_pb2.WatchNodeRequest, timeout: float | None = None
    ) -> AsyncGenerator[poolmanager_pb2.WatchNodeResponse]:
        """As ``PoolManagerServiceStub.WatchNode``: the node's state, on change and heartbeat."""
        return self._servicer.WatchNode(request, None)

    async def PreloadPool(
        self, request: poolmanager_pb2.PreloadPoolRequest
    ) -> poolmanager_pb2.PreloadPoolResponse:
        """As ``PoolManagerServiceStub.PreloadPool`` (errors raised as ``LlorchError``)."""
        return await self._servicer.PreloadPool(request, None)

    async def ReloadPool(
        self, request: poolmanager_pb2.ReloadPoolRequest
    ) -> poolmanager_pb2.ReloadPoolResponse:
        """As ``PoolManagerServiceStub.ReloadPool`` (errors raised as ``LlorchError``)."""
        return await self._servicer.ReloadPool(request, None)

    async def DrainPool(
        self, request: poolmanager_pb2.DrainPoolRequest
    ) -> poolmanager_pb2.DrainPoolResponse:
        """As ``PoolManagerServiceStub.DrainPool`` (errors raised as ``LlorchError``)."""
        return await self._servicer.DrainPool(request, None)

    async def CollectGarbage(
        self, request: poolmanager_pb2.CollectGarbageRequest
    ) -> poolmanager_pb2.CollectGarbageResponse:
        """As ``PoolManagerServiceStub.CollectGarbage`` (errors raised as ``LlorchError``)."""
        return await self._servicer.CollectGarbage(request, None)

    def Execute(
        self,
        request: poolmanager_pb2.ExecuteRequest,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> LocalCall:
        """As ``PoolManagerServiceStub.Execute``: a stream of ``ExecuteResponse``.

        The execution reaches the worker before this returns (a gRPC call's request goes out
        later, from the event loop). Errors are raised as ``LlorchError`` when the stream is
        read; a passed ``timeout`` ends it with ``DeadlineExceededError``. The caller's log
        context (correlation id) is already the task's; of ``metadata`` only the trace context
        is read, to open the span the server interceptor would have.
        """
        return LocalCall(self._servicer, request, timeout, metadata)


_EXECUTE = "/llorch.poolmanager.v1.PoolManagerService/Execute"


class LocalCall:
    """One local Execute stream; iterate it, and ``cancel()`` it to stop the execution."""

    def __init__(
        self,
        servicer: PoolManagerServicer,
        request: poolmanager_pb2.ExecuteRequest,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else loop.time() + timeout
        self._servicer = servicer
        self._error: LlorchError | None = None
        self._execution: Execution | None = None
        self._stream: AsyncGenerator[poolmanager_pb2.ExecuteResponse] | None = None
        self._cancelled = False
        self._closing: asyncio.Task[None] | None = None  # held so the loop keeps it alive
        self._span: trace.Span | None = None
        token = None
        if tracing.enabled():
            self._span = tracing.tracer("llorch.rpc").start_span(
                _EXECUTE.lstrip("/"),
                # No trace context sent: a root, not whichever call is current here.
                context=tracing.extract(metadata) or Context(),
                kind=SpanKind.SERVER,
                attributes={**tracing.rpc_attributes(_EXECUTE), "llorch.link": "in-process"},
            )
            token = otel_context.attach(trace.set_span_in_context(self._span))
        try:
            self._execution = servicer.begin(request)
        except LlorchError as err:  # reported on the first read, as a gRPC status would be
            self._error = err
            tracing.end_rpc_span(self._span, err)
        finally:
            if token is not None:
                otel_context.detach(token)

    def __aiter__(self) -> LocalCall:
        return self

    async def __anext__(self) -> poolmanager_pb2.ExecuteResponse:
        try:
            return await self._next()
        except StopAsyncIteration:
            tracing.end_rpc_span(self._span, None)
            raise
        except BaseException as exc:
            tracing.end_rpc_span(self._span, exc)
            raise

    async def _next(self) -> poolmanager_pb2.ExecuteResponse:
        if self._error is not None:
            raise self._error
        if self._stream is None:
            if self._execution is None or self._cancelled:
                raise StopAsyncIteration
            self._stream = self._servicer.responses(self._execution)
        if self._deadline is None:
            return await anext(self._stream)
        try:
            async with asyncio.timeout_at(self._deadline):
                return await anext(self._stream)
        except TimeoutError:
            await self._stream.aclose()
            raise DeadlineExceededError(
                "the execution's deadline passed", reason="DEADLINE_WHILE_RUNNING"
            ) from None

    def cancel(self) -> bool:
        """Stops the execution (the pool manager cancels it in the worker) unless it ended.

        Called by the reader once it stops iterating (a reader cancelled while it waited for a
        message has already closed the stream through that cancellation).
        """
        if self._cancelled:
            return False
        self._cancelled = True
        tracing.end_rpc_span(self._span, asyncio.CancelledError())
        if self._stream is None:
            if self._execution is not None:
                self._execution.abandon()
        else:
            # Closing runs the pool manager's clean-up, which finishes within a loop turn.
            self._closing = asyncio.get_running_loop().create_task(self._stream.aclose())
        return True

"""gRPC interceptors every server and channel of the mesh gets from the bootstrap.

Server side: a correlation id for every call (taken from ``x-correlation-id`` metadata or made up,
echoed in the initial metadata, and set in the logging context), a SERVER span under the
caller's W3C trace context when tracing is on (mesh/tracing.py), and the mapping of
:class:`~mesh.errors.LlorchError` to a status with google.rpc details. Anything else that escapes
a handler is a bug: it is logged with its traceback and sent as INTERNAL without one.

Client side: the correlation id and the trace context of the current context travel on every
outgoing call (a call that already carries a ``traceparent`` keeps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_interceptor import AsyncServerInterceptor
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from mesh import auth, logs, tracing
from mesh.errors import LlorchError
from mesh.ids import random_id

CORRELATION_HEADER = "x-correlation-id"
_CORRELATION_RE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_log = logs.get_logger("rpc")
# Probes and tools call these all the time; a span each would bury the traces of real work.
# So are the watches that stay open for a whole connection: a span of hours tells nothing.
_UNTRACED = (
    "/grpc.health.v1.",
    "/grpc.reflection.",
    "/llorch.poolmanager.v1.PoolManagerService/WatchNode",
)


def new_correlation_id() -> str:
    """A fresh correlation id."""
    return random_id()


def correlation_from_metadata(metadata: Any) -> str:
    """The caller's correlation id if it is well-formed, else a new one."""
    for key, value in metadata or ():
        if (
            key == CORRELATION_HEADER
            and isinstance(value, str)
            and _CORRELATION_RE.fullmatch(value)
        ):
            return value
    return new_correlation_id()


RECHECK_S = 0.5
"""How often open streams of authenticated callers are checked against revocations."""


class _Watched:
    """One open stream of an authenticated caller, as _OpenStreams sees it."""

    __slots__ = ("awaiting", "refusal", "responses", "task", "who")

    def __init__(self, task: asyncio.Task[Any], who: auth.Caller, responses: Any) -> None:
        self.task = task
        self.who = who
        self.responses = responses
        self.awaiting = False
        """Waiting for the handler's next response (not in gRPC's own send)."""
        self.refusal: LlorchError | None = None
        """Why the caller no longer holds, once the sweep found it."""


class _OpenStreams:
    """The streams of authenticated callers that are open on a server, rechecked while any is:
    all of them when the authorizer's generation moved (a key file or denylist changed), those
    opened since the last look otherwise.

    A stream whose caller no longer holds ends with the authorizer's refusal. Waiting for its
    handler, its task is cancelled there (the handler cleans up as for a caller that went
    away; ``_stream`` turns the cancellation into the refusal). In gRPC's own send instead (a
    client that reads slowly, or not at all), a cancel would land in gRPC's code and leave the
    call without a status, so the handler is closed (its cleanup runs: a Generate task is
    cancelled) and the refusal is sent as soon as the send returns.
    """

    def __init__(self, authorize: auth.Authorizer) -> None:
        self._authorize = authorize
        self._calls: dict[asyncio.Task[Any], _Watched] = {}
        self._fresh: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references
        self._generation = -1

    def add(self, task: asyncio.Task[Any], who: auth.Caller, responses: Any) -> _Watched:
        watched = self._calls[task] = _Watched(task, who, responses)
        self._fresh.add(task)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return watched

    def discard(self, task: asyncio.Task[Any]) -> None:
        self._calls.pop(task, None)
        self._fresh.discard(task)

    async def _sweep(self) -> None:
        try:
            while self._calls:
                await asyncio.sleep(RECHECK_S)
                try:
                    self._sweep_once()
                except Exception:  # the key file or denylist failed to read: try again later
                    _log.exception("rechecking open streams failed")
        finally:
            self._sweeper = None

    def _sweep_once(self) -> None:
        generation = self._authorize.generation()
        if generation != self._generation:
            self._generation = generation
            suspects = list(self._calls.values())
        else:
            suspects = [self._calls[t] for t in self._fresh if t in self._calls]
        self._fresh.clear()
        for watched in suspects:
            if watched.refusal is not None:
                continue
            refusal = self._authorize.recheck(watched.who)
            if refusal is None:
                continue
            _log.warning(
                "ending the stream of a revoked caller",
                extra={"peer": watched.who.name, "reason": refusal.reason},
            )
            watched.refusal = refusal
            if watched.awaiting:
                watched.task.cancel()
            else:
                closing = asyncio.get_running_loop().create_task(_close(watched.responses))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)


async def _close(responses: Any) -> None:
    """Closes a handler's response stream, suspended while gRPC sends what it yielded."""
    with contextlib.suppress(Exception):
        await responses.aclose()


class MeshServerInterceptor(AsyncServerInterceptor):
    """Correlation ids, authorization (when the server has an authorizer), the end of streams
    whose caller is revoked meanwhile, and error mapping for every RPC of a server."""

    def __init__(self, authorize: auth.Authorizer | None = None) -> None:
        self._authorize = authorize
        self._open = _OpenStreams(authorize) if authorize is not None else None

    async def intercept(
        self,
        method: Callable[[Any, grpc.aio.ServicerContext], Any],
        request_or_iterator: Any,
        context: grpc.aio.ServicerContext,
        method_name: str,
    ) -> Any:
        metadata = context.invocation_metadata()
        cid = correlation_from_metadata(metadata)
        logs.correlation_id.set(cid)
        span = None
        if tracing.enabled() and not method_name.startswith(_UNTRACED):
            span = tracing.tracer("llorch.rpc").start_span(
                method_name.lstrip("/"),
                context=tracing.extract(metadata),
                kind=SpanKind.SERVER,
                attributes=tracing.rpc_attributes(method_name),
            )
            # Each call runs in a task of its own: the span stays current for the whole call,
            # as the correlation id does.
            otel_context.attach(trace.set_span_in_context(span))
        streaming = False
        who = None
        try:
            if self._authorize is not None:
                try:
                    who = self._authorize(method_name, context, request_or_iterator)
                    auth.caller.set(who)
                except LlorchError as err:
                    tracing.end_rpc_span(span, err)
                    await _abort(context, err, method_name)
            # The echo goes out while the handler works instead of before it starts, so it
            # costs the first response nothing; every response and status waits for it,
            # keeping the order.
            echo = asyncio.ensure_future(
                context.send_initial_metadata(((CORRELATION_HEADER, cid),))
            )
            try:
                response = method(request_or_iterator, context)
                if hasattr(response, "__aiter__"):
                    streaming = True
                    return self._stream(response, context, method_name, echo, span, who)
                result = await response
                await _settle(echo)
                tracing.end_rpc_span(span, None)
                return result
            except LlorchError as err:
                await _settle(echo)
                tracing.end_rpc_span(span, err)
                await _abort(context, err, method_name)
            except grpc.aio.AbortError as err:
                tracing.end_rpc_span(span, err, context.code())
                raise  # the handler aborted on purpose
            except Exception as exc:
                await _settle(echo)
                tracing.end_rpc_span(span, exc)
                await _abort_internal(context, method_name)
            finally:
                if not streaming:
                    echo.cancel()  # no-op once sent; stops it if the call was cancelled
        finally:
            if span is not None and not streaming and span.is_recording():
                # The call went away while the handler ran.
                tracing.end_rpc_span(span, asyncio.CancelledError())

    async def _stream(
        self,
        responses: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        method_name: str,
        echo: asyncio.Future[None],
        span: trace.Span | None,
        who: auth.Caller | None,
    ) -> AsyncIterator[Any]:
        failure: BaseException | None = None
        aborted_code = None
        task = asyncio.current_task()
        watched = None
        if who is not None and self._open is not None and task is not None:
            watched = self._open.add(task, who, responses)
        try:
            while True:
                if watched is not None:
                    if watched.refusal is not None:
                        raise watched.refusal  # found while gRPC was sending: end it now
                    watched.awaiting = True
                try:
                    response = await anext(responses)
                except StopAsyncIteration:
                    break
                finally:
                    if watched is not None:
                        watched.awaiting = False
                if not echo.done():
                    await _settle(echo)
                yield response
            await _settle(echo)
        except LlorchError as err:
            failure = err
            await _settle(echo)
            await _abort(context, err, method_name)
        except grpc.aio.AbortError as err:
            failure = err
            aborted_code = context.code()
            raise  # the handler aborted on purpose
        except Exception as exc:
            failure = exc
            await _settle(echo)
            await _abort_internal(context, method_name)
        except asyncio.CancelledError as exc:
            refusal = watched.refusal if watched is not None else None
            failure = refusal or exc
            if refusal is None or task is None:
                raise  # the caller went away
            # Cancelled by _OpenStreams: the caller's key or certificate was revoked.
            task.uncancel()
            if not echo.cancelled():
                await _settle(echo)
            await _abort(context, refusal, method_name)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if watched is not None and self._open is not None:
                self._open.discard(watched.task)
            echo.cancel()
            tracing.end_rpc_span(span, failure, aborted_code)


async def _settle(echo: asyncio.Future[None]) -> None:
    """Waits for the metadata echo to be written. If writing it failed, the call is gone and the
    next write says so; the echo's own error adds nothing."""
    with contextlib.suppress(Exception):
        await echo


async def _abort(context: grpc.aio.ServicerContext, err: LlorchError, method_name: str) -> None:
    _log.info(
        "rpc failed",
        extra={
            "method": method_name,
            "code": err.code.name,
            "reason": err.reason,
            "error": err.message,
        },
    )
    await context.abort_with_status(err.to_grpc_status())


async def _abort_internal(context: grpc.aio.ServicerContext, method_name: str) -> None:
    _log.exception("unhandled error", extra={"method": method_name})
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error; correlation id {logs.correlation_id.get()}",
    )


def _with_correlation(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    cid = logs.correlation_id.get()
    trace_context = tracing.inject() if tracing.enabled() else []
    if not cid and not trace_context:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    if cid and CORRELATION_HEADER not in metadata:
        metadata.add(CORRELATION_HEADER, cid)
    if trace_context and "traceparent" not in metadata:
        for key, value in trace_context:
            metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# grpc.aio files each interceptor under one call type only, hence one class per type.
class _CorrelationUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_correlation(details), request)


class _CorrelationUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_correlation(details), request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors every mesh channel carries: the correlation id on outgoing calls."""
    return [_CorrelationUnaryUnary(), _CorrelationUnaryStream()]


class _Malformed:
    """What a request that is not a valid message deserializes to (never the bytes)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Bytes that are not a valid request message end INVALID_ARGUMENT naming the message type,
    logged at WARNING without the bytes. Without it grpc's own deserialization fails first and
    the call ends UNKNOWN with "Unexpected <class 'google.protobuf.message.DecodeError'>".

    It stands first among a server's interceptors, so the request it hands on is a message.
    Methods that stream requests (none of ours; reflection's) are left as grpc handles them."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            # No llorch method streams requests; reflection's does, and keeps grpc's handling.
            return handler
        deserialize = handler.request_deserializer
        owner = getattr(deserialize, "__self__", None)
        descriptor = getattr(owner, "DESCRIPTOR", None)
        type_name = getattr(descriptor, "full_name", "request message")
        method = details.method

        def safe(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:  # DecodeError, or anything a bad message provokes
                return _Malformed(exc)

        async def refuse(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
            _log.warning(
                "malformed request refused",
                extra={"method": method, "error": type(request.error).__name__},
            )
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {type_name}"
            )

        if handler.response_streaming:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                async for response in inner_us(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, safe, handler.response_serializer
            )
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, safe, handler.response_serializer)

"""Traces: OpenTelemetry spans across the mesh, orchestrator → pool manager → worker.

The W3C trace context (``traceparent``, ``tracestate``) travels in gRPC metadata: the server
interceptor (mesh/interceptors.py) opens a SERVER span per call under the caller's context, and
the client interceptor puts the current context on every outgoing call. Work that outlives a
call carries its context itself: a task keeps its own (orchestrator/tracing.py), and the pool
manager hands the worker a ``traceparent`` with each execution.

Off by default: a process without ``tracing.otlp_endpoint`` has no tracer provider, makes no
spans and pays one branch per call. Tests give a provider of their own with ``use_provider``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh.errors import LlorchError
from mesh.settings import TracingSettings

_PROPAGATOR = TraceContextTextMapPropagator()
HEADERS = frozenset(_PROPAGATOR.fields)
"""The metadata keys of the trace context (``traceparent``, ``tracestate``)."""

_provider: trace.TracerProvider | None = None
_tracers: dict[str, trace.Tracer] = {}


def configure(settings: TracingSettings, service_name: str) -> None:
    """Sets up this process's traces from its settings (nothing when no endpoint is set)."""
    if not settings.otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.namespace": "llama-orch"}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(settings.otlp_endpoint)))
    use_provider(provider)


def shutdown() -> None:
    """Sends the spans still buffered and stops the exporter (at process exit)."""
    provider = use_provider(None)
    if provider is not None and hasattr(provider, "shutdown"):
        provider.shutdown()


def use_provider(provider: trace.TracerProvider | None) -> trace.TracerProvider | None:
    """Makes ``provider`` this process's (None: tracing off); returns the previous one."""
    global _provider
    previous, _provider = _provider, provider
    _tracers.clear()
    return previous


def enabled() -> bool:
    """Whether this process makes spans."""
    return _provider is not None


def tracer(name: str) -> trace.Tracer:
    """The tracer of one layer (``llorch.orchestrator``…); a no-op one when tracing is off."""
    found = _tracers.get(name)
    if found is None:
        provider = _provider or trace.NoOpTracerProvider()
        found = _tracers[name] = provider.get_tracer(name)
    return found


def extract(metadata: Iterable[tuple[str, Any]] | None) -> Context | None:
    """The caller's trace context from gRPC metadata, or None when it sent none."""
    carrier = {key: value for key, value in metadata or () if key in HEADERS}
    if not carrier:
        return None
    return _PROPAGATOR.extract(carrier)


def inject(context: Context | None = None) -> list[tuple[str, str]]:
    """Metadata entries carrying ``context`` (default: the current one); empty if invalid."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return list(carrier.items())


def traceparent(span: trace.Span) -> str:
    """The W3C ``traceparent`` naming ``span`` ("" for an invalid span; an unsampled one
    gives its ids with the sampled flag off)."""
    for key, value in inject(trace.set_span_in_context(span)):
        if key == "traceparent":
            return value
    return ""


def rpc_attributes(method_name: str) -> dict[str, str]:
    """Semantic-convention attributes of a gRPC method (``/pkg.Service/Method``)."""
    service, _, method = method_name.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def end_rpc_span(
    span: trace.Span | None, failure: BaseException | None, aborted_code: Any = None
) -> None:
    """Ends a call's span with its outcome (no-op without a span or once ended).
    ``aborted_code``: the status a handler's own abort set, when ``failure`` is that abort."""
    if span is None or not span.is_recording():
        return
    if failure is None:
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
    else:
        if isinstance(failure, LlorchError):
            code, message = failure.code, failure.message
            span.set_attribute("llorch.error.reason", failure.reason)
        elif isinstance(failure, grpc.aio.AbortError):
            code = aborted_code if isinstance(aborted_code, grpc.StatusCode) else None
            code, message = code or grpc.StatusCode.UNKNOWN, "aborted by the handler"
        elif isinstance(failure, asyncio.CancelledError | GeneratorExit):
            code, message = grpc.StatusCode.CANCELLED, "the call was cancelled"
        else:
            code, message = grpc.StatusCode.INTERNAL, type(failure).__name__
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(Status(StatusCode.ERROR, message))
    span.end()

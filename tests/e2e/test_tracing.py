"""Traces: one trace spans every hop of a task, client → orchestrator → pool manager → worker,
over gRPC and over the in-process link; log lines carry its ids; tracing off makes no spans;
`llorch up` with an OTLP endpoint sends its spans to a (real, in-test) OTLP/gRPC collector.

The services run in this process with an in-memory exporter (the worker is its own process:
its phases come back with its result, and its log lines carry the trace id it was handed).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mesh import logs, tracing
from tests.conftest import LINKS, Mesh, restart_orchestrator, start_mesh, stop_mesh
from tests.e2e.helpers import collect, generate_request, start_llorch

TASK_PHASES = {
    "llorch.admission",
    "llorch.queue_wait",
    "llorch.placement",
    "llorch.dispatch",
    "llorch.first_token",
    "llorch.decode",
}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    previous = tracing.use_provider(provider)
    try:
        yield exported
    finally:
        tracing.use_provider(previous)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The llorch log records of the test, as the services' JSON lines."""
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.addFilter(logs._ContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("llorch")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield sink
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def _parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return span.parent.span_id


@pytest.mark.parametrize("link", LINKS)
async def test_one_trace_spans_every_hop_of_a_task(
    link: str,
    tmp_path: Path,
    tiny_model: Path,
    exporter: InMemorySpanExporter,
    log_lines: io.StringIO,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # Started here rather than by a fixture, so that the worker's stderr is this test's.
    mesh = await start_mesh(tmp_path, tiny_model, link)
    try:
        client = tracing.tracer("test-client").start_span("client", kind=SpanKind.CLIENT)
        metadata = tracing.inject(trace.set_span_in_context(client))
        assert [key for key, _ in metadata] == ["traceparent"]
        call = mesh.stub.Generate(generate_request(max_tokens=6), metadata=metadata)
        out = await collect(call)
        client.end()
    finally:
        await stop_mesh(mesh)
    assert out.finished.tokens_out == 6
    task_id = out.events[0].task_id

    trace_id = client.get_span_context().trace_id
    everything = exporter.get_finished_spans()  # start-up calls are traces of their own
    spans = tuple(s for s in everything if s.context.trace_id == trace_id)
    of_task = [s for s in everything if (s.attributes or {}).get("llorch.task_id") == task_id]
    assert of_task and {s.context.trace_id for s in of_task} == {trace_id}

    server = _by_name(spans, "llorch.orchestrator.v1.OrchestratorService/Generate")
    assert server.kind is SpanKind.SERVER and _parent_of(server) == client.context.span_id
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 0

    task = _by_name(spans, "llorch.task")
    assert _parent_of(task) == server.context.span_id
    assert task.attributes is not None
    assert task.attributes["llorch.task_id"] == task_id
    assert task.attributes["llorch.pool_id"] == "cpu-0"
    assert task.attributes["llorch.tokens_out"] == 6
    for name in TASK_PHASES:
        phase = _by_name(spans, name)
        assert _parent_of(phase) == task.context.span_id, name
        assert phase.attributes is not None and phase.attributes["llorch.task_id"] == task_id
        assert phase.start_time is not None and phase.end_time is not None
        assert task.start_time is not None and task.end_time is not None
        assert task.start_time <= phase.start_time <= phase.end_time <= task.end_time, name
    first_token = _by_name(spans, "llorch.first_token")
    decode = _by_name(spans, "llorch.decode")
    assert first_token.end_time == decode.start_time

    dispatch = _by_name(spans, "llorch.dispatch")
    execute = _by_name(spans, "llorch.poolmanager.v1.PoolManagerService/Execute")
    assert execute.kind is SpanKind.SERVER and _parent_of(execute) == dispatch.context.span_id
    worker = _by_name(spans, "llorch.worker")
    assert _parent_of(worker) == execute.context.span_id
    assert worker.attributes is not None and worker.attributes["llorch.tokens_out"] == 6
    prompt = _by_name(spans, "llorch.worker.prompt")
    decoding = _by_name(spans, "llorch.worker.decode")
    assert _parent_of(prompt) == _parent_of(decoding) == worker.context.span_id
    assert prompt.end_time == decoding.start_time

    # Logs: the orchestrator's lines of the task, and the worker's, name the same trace.
    trace_hex = f"{trace_id:032x}"
    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    dispatched = [r for r in records if r["msg"] == "task dispatched"]
    assert dispatched and dispatched[0]["trace_id"] == trace_hex
    assert dispatched[0]["task_id"] == task_id
    worker_lines = [
        json.loads(line)
        for line in capfd.readouterr().err.splitlines()
        if line.startswith("{") and '"llorch.worker"' in line
    ]
    started = [r for r in worker_lines if r["msg"] == "execution started"]
    assert started and started[-1]["trace_id"] == trace_hex
    assert started[-1]["span_id"] == f"{worker.context.span_id:016x}"


async def test_a_cancelled_task_ends_its_trace_as_an_error(
    mesh: Mesh, exporter: InMemorySpanExporter
) -> None:
    call = mesh.stub.Generate(generate_request(max_tokens=1000))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for response in call:
            if response.event.WhichOneof("kind") == "started":
                await mesh.stub.CancelTask(
                    orchestrator_pb2.CancelTaskRequest(task_id=response.event.task_id)
                )
    assert ended.value.code() == grpc.StatusCode.CANCELLED
    task = _by_name(exporter.get_finished_spans(), "llorch.task")
    assert task.status.status_code is StatusCode.ERROR
    assert task.attributes is not None
    assert task.attributes["llorch.error.reason"] == "TASK_CANCELLED"


async def test_untraced_without_a_provider(mesh: Mesh, log_lines: io.StringIO) -> None:
    assert not tracing.enabled()
    out = await collect(mesh.stub.Generate(generate_request(max_tokens=2)))
    assert out.finished.tokens_out == 2
    assert mesh.orchestrator.orchestrator.get(out.events[0].task_id).trace is None
    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    assert any(r["msg"] == "task dispatched" for r in records)
    assert not any("trace_id" in r for r in records)


async def test_health_checks_make_no_spans(mesh: Mesh, exporter: InMemorySpanExporter) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    await health_pb2_grpc.HealthStub(mesh.channel).Check(health_pb2.HealthCheckRequest())
    assert exporter.get_finished_spans() == ()


async def test_refused_call_is_an_error_span(mesh: Mesh, exporter: InMemorySpanExporter) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(mesh.stub.Generate(generate_request(model_id="no-such-model")))
    name = "llorch.orchestrator.v1.OrchestratorService/Generate"
    # The client may see the error before the server's handler has returned and ended its span.
    async with asyncio.timeout(5):
        while not any(s.name == name for s in exporter.get_finished_spans()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    server = _by_name(exporter.get_finished_spans(), name)
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert server.attributes["llorch.error.reason"] == "MODEL_NOT_FOUND"


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_llorch_up_exports_spans_over_otlp(tmp_path: Path) -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    data_dir = tmp_path / "data"
    try:
        proc, address = start_llorch(
            ["up"],
            {
                "LLORCH_DATA_DIR": str(data_dir),
                "LLORCH_LISTEN": "127.0.0.1:0",
                "LLORCH_GATEWAY_LISTEN": "",
                "LLORCH_TRACING__OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            },
        )
        try:
            with grpc.insecure_channel(address) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                events = list(stub.Generate(generate_request(max_tokens=4), timeout=60))
            assert events[-1].event.finished.tokens_out == 4
            proc.send_signal(signal.SIGINT)  # a clean stop sends what is still buffered
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        server.stop(0)
    spans = [
        (resource.resource, span)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    names = {span.name for _, span in spans}
    assert TASK_PHASES | {"llorch.task", "llorch.worker", "llorch.worker.decode"} <= names, names
    services = {
        attr.value.string_value
        for resource, _ in spans
        for attr in resource.attributes
        if attr.key == "service.name"
    }
    assert services == {"llorch-home"}
    task = next(span for _, span in spans if span.name == "llorch.task")
    same_trace = {span.name for _, span in spans if span.trace_id == task.trace_id}
    assert {"llorch.orchestrator.v1.OrchestratorService/Generate", "llorch.worker"} <= same_trace


async def test_shutdown_ends_task_traces_and_a_recovered_task_gets_its_own(
    tmp_path: Path, long_model: Path, exporter: InMemorySpanExporter
) -> None:
    # One slot: the second task stays queued behind the first.
    mesh = await start_mesh(tmp_path, long_model, pool={"slots": 1})
    new_app = None
    try:
        hog = mesh.stub.Generate(generate_request(max_tokens=30_000))
        async for response in hog:
            if response.event.WhichOneof("kind") == "token":
                break
        caller = tracing.tracer("test-client").start_span("client", kind=SpanKind.CLIENT)
        submitted = await mesh.stub.SubmitTask(
            orchestrator_pb2.SubmitTaskRequest(
                model_id="tiny-llama",
                prompt="queued behind the hog",
                sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True),
            ),
            metadata=tracing.inject(trace.set_span_in_context(caller)),
        )
        caller.end()
        await mesh.orchestrator.stop()  # the pool manager and catalog keep running
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in hog:
                pass
        ended = [s for s in exporter.get_finished_spans() if s.name == "llorch.task"]
        assert len(ended) == 2  # the running task and the queued one, both ended by the stop
        for span in ended:
            assert span.status.status_code is StatusCode.ERROR
            assert span.attributes is not None
            assert span.attributes["llorch.error.reason"] == "SHUTDOWN"
        exporter.clear()

        new_app = await restart_orchestrator(mesh, tmp_path)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{new_app.port}") as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            done = await collect(
                stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=submitted.task_id))
            )
        assert done.kinds[-1] == "finished"
        spans = exporter.get_finished_spans()
        task = next(
            s
            for s in spans
            if s.name == "llorch.task"
            and (s.attributes or {}).get("llorch.task_id") == submitted.task_id
        )
        assert task.parent is None and (task.attributes or {}).get("llorch.recovered") is True
        assert task.context.trace_id != caller.get_span_context().trace_id
        in_trace = {s.name for s in spans if s.context.trace_id == task.context.trace_id}
        assert {"llorch.queue_wait", "llorch.dispatch", "llorch.worker"} <= in_trace, in_trace
    finally:
        if new_app is not None:
            await new_app.stop()
        await stop_mesh(mesh)

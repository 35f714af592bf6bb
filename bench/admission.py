"""Admission benchmark: sustained SubmitTask/s against a running orchestrator on loopback.

Starts ``llorch up`` (its own process; a queue big enough never to fill; two CPU pools:
tiny-llama, and a 32k-context copy of it), then runs client processes that each keep
``--concurrency`` SubmitTask calls in flight for ``--seconds``. Two cases:

- ``queueing``: one long generation holds the 32k pool and every submitted task waits behind
  it, so the figure is admission alone, with a queue growing to thousands;
- ``serving``: one-token tasks for tiny-llama, which its pool runs meanwhile, so the same
  process also places, relays and finishes tasks;
- ``batched``: as ``queueing``, but each call is a SubmitTasks of ``--batch`` tasks (the path
  for clients with many tasks at once: one round trip and one journal commit per batch).

Counts accepted tasks per second over the measured window and prints them beside the
targets (ours: 3,000/s; the seed's: 1,000/s) as ratios, then one line of JSON. The baseline in
the same run: GetTask (a unary RPC on the same server through the same interceptors, admitting
nothing) at the same concurrency, which bounds what any RPC reaches on this machine.

  .venv/bin/python bench/admission.py
  .venv/bin/python bench/admission.py --seconds 3 --clients 1   # quick
  .venv/bin/python bench/admission.py --trace   # every task traced and exported over OTLP
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from launch.harness import start_home, stop_home
from provisioners.tiny_model import TinyModelSpec, write_tiny_model

TARGET_PER_S = 3000.0
SEED_TARGET_PER_S = 1000.0


LONG_MODEL = "bench-32k"


class _OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC collector that counts the spans it is sent (``--trace``)."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def start_orchestrator(
    data_dir: Path, journal: bool, otlp_endpoint: str = ""
) -> tuple[subprocess.Popen[str], str]:
    long_path = write_tiny_model(
        data_dir / f"{LONG_MODEL}.gguf", TinyModelSpec(context_length=32768)
    )
    pools = [
        {"pool_id": "cpu-0", "model_id": "tiny-llama", "n_threads": 1},
        {"pool_id": "cpu-long", "model_id": LONG_MODEL, "n_threads": 1},
    ]
    return start_home(
        data_dir,
        pools,
        {LONG_MODEL: long_path},
        ORCHESTRATOR_SERVICE__QUEUE_CAPACITY="1000000",
        ORCHESTRATOR_SERVICE__JOURNAL=str(journal).lower(),
        TRACING__OTLP_ENDPOINT=otlp_endpoint,
    )


async def _drive(
    address: str, kind: str, concurrency: int, start_at: float, stop_at: float, batch: int
) -> int:
    """Keeps ``concurrency`` calls in flight until ``stop_at``; counts the tasks they admitted
    (or the GetTask calls they made) after ``start_at``."""
    request = orchestrator_pb2.SubmitTaskRequest(
        model_id="tiny-llama" if kind == "serving" else LONG_MODEL,
        prompt="Hi",
        priority=common_pb2.PRIORITY_BATCH,
        sampling=common_pb2.SamplingParams(max_tokens=1),
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        probe = await stub.SubmitTask(request)
        get = orchestrator_pb2.GetTaskRequest(task_id=probe.task_id)
        many = orchestrator_pb2.SubmitTasksRequest(requests=[request] * batch)
        done = 0

        async def loop() -> None:
            nonlocal done
            while time.time() < stop_at:
                count = 1
                if kind == "get":
                    await stub.GetTask(get)
                elif kind == "batched":
                    response = await stub.SubmitTasks(many)
                    count = sum(1 for r in response.results if r.HasField("task"))
                else:
                    await stub.SubmitTask(request)
                if time.time() >= start_at:
                    done += count

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done


def _client(args: tuple[str, str, int, float, float, int]) -> int:
    return asyncio.run(_drive(*args))


def measure(
    address: str, kind: str, clients: int, concurrency: int, seconds: float, batch: int = 1
) -> float:
    """Tasks admitted (or calls made) per second of ``kind`` over ``seconds``, after a warm-up."""
    start_at = time.time() + 1.5  # client processes start, then warm up
    stop_at = start_at + seconds
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(clients) as pool:
        counts = pool.map(
            _client, [(address, kind, concurrency, start_at, stop_at, batch)] * clients
        )
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight per client")
    parser.add_argument(
        "--batch", type=int, default=100, help="tasks per SubmitTasks call (batched case)"
    )
    parser.add_argument(
        "--batch-concurrency", type=int, default=4, help="SubmitTasks calls in flight per client"
    )
    parser.add_argument("--no-journal", action="store_true", help="run without the task journal")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="trace every task, exported to an OTLP collector in this process (tracing's cost)",
    )
    parser.add_argument("--hog", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hog:
        hog(args.hog)
        return
    sink, collector, endpoint = _OtlpSink(), None, ""
    if args.trace:
        collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, collector)
        endpoint = f"http://127.0.0.1:{collector.add_insecure_port('127.0.0.1:0')}"
        collector.start()
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as tmp:
        proc, address = start_orchestrator(Path(tmp), not args.no_journal, endpoint)
        try:
            rates = {"get": measure(address, "get", args.clients, args.concurrency, args.seconds)}
            rates["serving"] = measure(
                address, "serving", args.clients, args.concurrency, args.seconds
            )
            holder = subprocess.Popen([sys.executable, __file__, "--hog", address])
            try:
                rates["queueing"] = measure(
                    address, "queueing", args.clients, args.concurrency, args.seconds
                )
                rates["batched"] = measure(
                    address,
                    "batched",
                    args.clients,
                    args.batch_concurrency,
                    args.seconds,
                    args.batch,
                )
            finally:
                holder.kill()
                holder.wait()
        finally:
            stop_home(proc)  # a clean stop sends the spans still buffered
    if collector is not None:
        collector.stop(0)
    baseline = rates["get"]
    summary: dict[str, object] = {
        "get_task_per_s": round(baseline, 1),
        "journal": not args.no_journal,
        "traced": args.trace,
        "spans_exported": sink.spans,
        "clients": args.clients,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "batch": args.batch,
    }
    print(f"{'case':<10} {'tasks/s':>9} {'vs GetTask':>11} {'vs 3,000/s':>11} {'vs 1,000/s':>11}")
    print(f"{'GetTask':<10} {baseline:>9.1f}")
    for case in ("queueing", "serving", "batched"):
        rate = rates[case]
        figures = {
            "admissions_per_s": round(rate, 1),
            "ratio_to_bare_rpc": round(rate / baseline, 3) if baseline else 0.0,
            "ratio_to_target": round(rate / TARGET_PER_S, 3),
            "ratio_to_seed_target": round(rate / SEED_TARGET_PER_S, 3),
        }
        summary[case] = figures
        print(
            f"{case:<10} {rate:>9.1f} {figures['ratio_to_bare_rpc']:>10.3f}x "
            f"{figures['ratio_to_target']:>10.3f}x {figures['ratio_to_seed_target']:>10.3f}x"
        )
    traced = f", every task traced: {sink.spans} spans exported" if args.trace else ""
    print(f"(journal {'off' if args.no_journal else 'on'}{traced})")
    print(json.dumps(summary))


def hog(address: str) -> None:
    """Holds the 32k pool with one long generation until killed."""

    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            request = orchestrator_pb2.GenerateRequest(
                model_id=LONG_MODEL,
                prompt="hold",
                sampling=common_pb2.SamplingParams(max_tokens=32000, ignore_eos=True),
            )
            async for _ in stub.Generate(request):
                pass

    asyncio.run(run())


if __name__ == "__main__":
    main()

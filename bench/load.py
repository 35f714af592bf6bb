"""Load benchmark: a deep queue and many concurrent streams against one orchestrator.

In one run, on the generated tiny model (one CPU pool):

- ``engine``: the same one-token task (prompt, sampling, engine threads) run directly with
  llama-cpp-python in this process, one after another: the engine's own cost per task;
- ``queued``: the pool is drained (DrainPool), ``--queued`` one-token tasks are submitted with
  SubmitTasks (up to 1,000 per call), and the orchestrator's resident memory (VmRSS of its
  process) is read before and after: RSS per queued task. Then ResumePool, and the time until
  every task has ended: the drain, tasks per second, and the dispatch overhead per task: drain
  time per task minus the engine's time per task. The CPU time each process of the mesh used
  over the drain, per task, is reported too (/proc): on a shared machine it moves far less
  than the wall clock. Every task is checked with ListTasks afterwards (none lost, all
  succeeded);
- ``streams``: ``--streams`` Generate calls started at once (``--stream-tokens`` each): how
  many completed, time to first token p50/p99 from the moment they were all started, and the
  messages (Queued updates among them) each stream received.

Whose memory: with ``--layout serve`` (the default) the catalog, the pool manager and the
orchestrator are separate ``llorch serve`` processes on loopback (plaintext, as a fleet without
TLS), so the RSS read is the orchestrator's alone, and each task crosses a gRPC hop to its pool
manager. ``--layout home`` runs ``llorch up``: its RSS is orchestrator, catalog and pool
manager together (an upper bound on the orchestrator's; the workers are child processes, not
counted), and the orchestrator calls its pool manager in-process, as the home profile ships.

Targets: ``--queued`` 10,000 with the orchestrator at most 300 MB RSS; ``--streams`` 1,000 all
complete. The dispatch overhead is reported (about 10 ms per task end to end was seen in the
home profile before this benchmark). The last line is JSON.

  .venv/bin/python bench/load.py                                  # 10,000 queued, 1,000 streams
  .venv/bin/python bench/load.py --queued 300 --streams 50        # quick
  .venv/bin/python bench/load.py --layout home                    # llorch up, in-process link
"""

from __future__ import annotations

# llama_cpp before anything that loads numpy's libraries (see bench/relay.py).
import llama_cpp  # noqa: F401  # isort: skip

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from concurrency import Stream, level_figures  # bench/concurrency.py
from llorch.catalog.v1 import catalog_pb2_grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc, orchestrator_pb2_grpc
from llorch.orchestrator.v1 import orchestrator_pb2 as pb
from relay import direct_llama, write_model  # bench/relay.py

from launch.harness import start_home, start_llorch, stop_home
from mesh.server import open_channel
from provisioners.models import register_local_file

MODELS = {"tiny": "tiny-llama", "170m": "bench-170m"}
PROMPT = "Hello"
RSS_TARGET_MB = 300.0
SEED_DISPATCH_MS = 10.0
"""Per-task cost end to end on the tiny model in the home profile before this benchmark (10,000
tasks drained in 105 s, December 2026)."""
SUBMIT_BATCH = 1000
"""Most tasks per SubmitTasks call (the RPC's bound)."""
POOL_ID = "cpu-0"
NODE_ID = "local"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def mb(kb: int) -> float:
    return round(kb / 1024, 1)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (a pool manager's workers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == pid:
            out.append(int(stat.parent.name))
    return out


# ----- the mesh ----------------------------------------------------------------------------------


@dataclass
class Mesh:
    """The processes of one layout; ``orchestrator_pid`` is the process whose RSS is read."""

    address: str
    orchestrator_pid: int
    procs: list[subprocess.Popen[str]]
    home: bool

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each process of the mesh, the workers (children of the
        pool manager's process) together, and this benchmark's client."""
        roles = ["llorch_up"] if self.home else ["catalog", "pool_manager", "orchestrator"]
        out = {role: cpu_s(proc.pid) for role, proc in zip(roles, self.procs, strict=True)}
        out["workers"] = sum(cpu_s(pid) for pid in children(self.procs[0 if self.home else 1].pid))
        out["bench_client"] = cpu_s(os.getpid())
        return out

    def stop(self) -> None:
        if self.home:
            stop_home(self.procs[0])
            return
        for proc in reversed(self.procs):  # orchestrator first, catalog last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start(args: argparse.Namespace, model_id: str, path: Path, root: Path) -> Mesh:
    pool: dict[str, Any] = {
        "pool_id": POOL_ID,
        "model_id": model_id,
        "n_threads": args.threads,
        "slots": args.slots,
    }
    capacity = str(max(args.queued, args.streams) + 1000)
    if args.layout == "home":
        proc, address = start_home(
            root / "home", [pool], {model_id: path}, ORCHESTRATOR_SERVICE__QUEUE_CAPACITY=capacity
        )
        return Mesh(address, proc.pid, [proc], True)
    quiet = {"LLORCH_LOG_LEVEL": "WARNING", "GRPC_VERBOSITY": "ERROR"}
    procs: list[subprocess.Popen[str]] = []

    def serve(service: str, env: dict[str, str]) -> str:
        data_dir = root / service
        data_dir.mkdir(parents=True, exist_ok=True)
        proc, address = start_llorch(
            ["serve", service, "--data-dir", str(data_dir)],
            {**quiet, **env},
            root / f"{service}.log",
        )
        procs.append(proc)
        return address

    try:
        catalog = serve("catalog", {"LLORCH_CATALOG_SERVICE__LISTEN": "127.0.0.1:0"})
        asyncio.run(_register(catalog, model_id, path))
        pool_manager = serve(
            "poolmanager",
            {
                "LLORCH_POOL_MANAGER__LISTEN": "127.0.0.1:0",
                "LLORCH_POOL_MANAGER__CATALOG": catalog,
                "LLORCH_POOL_MANAGER__POOLS": json.dumps([pool]),
            },
        )
        address = serve(
            "orchestrator",
            {
                "LLORCH_LISTEN": "127.0.0.1:0",
                "LLORCH_ORCHESTRATOR_SERVICE__CATALOG": catalog,
                "LLORCH_ORCHESTRATOR_SERVICE__POOL_MANAGERS": json.dumps([pool_manager]),
                "LLORCH_ORCHESTRATOR_SERVICE__QUEUE_CAPACITY": capacity,
            },
        )
    except BaseException:
        Mesh("", 0, procs, False).stop()
        raise
    return Mesh(address, procs[-1].pid, procs, False)


async def _register(catalog: str, model_id: str, path: Path) -> None:
    channel = open_channel(catalog)
    try:
        await register_local_file(
            catalog_pb2_grpc.CatalogServiceStub(channel), model_id, path, NODE_ID
        )
    finally:
        await channel.close()


# ----- the phases --------------------------------------------------------------------------------


def engine_ms_per_task(path: Path, threads: int, tasks: int) -> tuple[float, float]:
    """The one-token task run directly, ``tasks`` times one after another (after a warm-up):
    tokenize, read the prompt, sample one token, detokenize it. Wall and CPU ms per task."""
    llm = direct_llama(path, threads, ["cpu"])
    started = cpu_started = 0.0
    for i in range(tasks + 10):
        if i == 10:
            started, cpu_started = time.perf_counter(), time.process_time()
        prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
            llm.detokenize([token])
            break
    wall_ms = (time.perf_counter() - started) * 1000 / tasks
    cpu_ms = (time.process_time() - cpu_started) * 1000 / tasks
    llm.close()
    return wall_ms, cpu_ms


def task_request(model_id: str, max_tokens: int, priority: int) -> pb.SubmitTaskRequest:
    return pb.SubmitTaskRequest(
        model_id=model_id,
        prompt=PROMPT,
        priority=priority,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


def generate_request(model_id: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model_id=model_id,
        prompt=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


async def pool_status(control: control_pb2_grpc.ControlServiceStub) -> control_pb2.PoolStatus:
    response = await control.ListPools(control_pb2.ListPoolsRequest())
    for status in response.pools:
        if status.pool_id == POOL_ID:
            return status
    raise RuntimeError(f"pool {POOL_ID} is not listed")


async def wait_ready(control: control_pb2_grpc.ControlServiceStub, timeout_s: float) -> None:
    """Until the orchestrator sees the pool ready (in the serve layout the pool manager may
    still be loading, or not yet watched)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                status = await pool_status(control)
                if status.state == "ready" and status.reachable:
                    return
            except (grpc.aio.AioRpcError, RuntimeError):
                pass
            await asyncio.sleep(0.1)


async def queue_and_drain(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub,
    control: control_pb2_grpc.ControlServiceStub,
    args: argparse.Namespace,
    model_id: str,
    mesh: Mesh,
) -> dict[str, Any]:
    """Queues ``args.queued`` tasks on the drained pool, reads the RSS, resumes and drains."""
    out: dict[str, Any] = {}
    pid = mesh.orchestrator_pid
    await control.DrainPool(control_pb2.DrainPoolRequest(node_id=NODE_ID, pool_id=POOL_ID))
    before = await pool_status(control)
    assert before.drained and before.slots_busy == 0 and before.queued == 0, before
    rss_before_kb = rss_kb(pid)["VmRSS"]
    out["rss_before_mb"] = mb(rss_before_kb)
    priority = (
        common_pb2.PRIORITY_BATCH if args.priority == "batch" else common_pb2.PRIORITY_INTERACTIVE
    )
    request = task_request(model_id, 1, priority)
    ids: list[str] = []
    refused: Counter[str] = Counter()
    started = time.perf_counter()
    left = args.queued
    while left:
        count = min(SUBMIT_BATCH, left)
        response = await stub.SubmitTasks(pb.SubmitTasksRequest(requests=[request] * count))
        for result in response.results:
            if result.HasField("task"):
                ids.append(result.task.task_id)
            else:
                refused[result.error.message] += 1
        left -= count
    out["queue_s"] = round(time.perf_counter() - started, 3)
    out["queued"] = len(ids)
    out["refused"] = sum(refused.values())
    if refused:
        log(f"refused at submission: {dict(refused)}")
    status = await pool_status(control)
    out["queued_seen"] = status.queued
    rss = rss_kb(pid)
    out["rss_queued_mb"] = mb(rss["VmRSS"])
    out["rss_per_queued_task_kb"] = round((rss["VmRSS"] - rss_before_kb) / max(1, len(ids)), 2)
    log(
        f"queued {len(ids)} tasks in {out['queue_s']:.2f} s; orchestrator RSS "
        f"{out['rss_before_mb']} -> {out['rss_queued_mb']} MB "
        f"({out['rss_per_queued_task_kb']} KiB per task)"
    )
    finished_before = status.tasks_finished
    cpu_before = mesh.cpu()
    started = time.perf_counter()
    await control.ResumePool(control_pb2.ResumePoolRequest(node_id=NODE_ID, pool_id=POOL_ID))
    next_report = started + 10
    async with asyncio.timeout(args.drain_timeout_s):
        while True:
            status = await pool_status(control)
            done = status.tasks_finished - finished_before
            if status.queued == 0 and status.slots_busy == 0:
                break
            now = time.perf_counter()
            if now >= next_report:
                log(f"  draining: {done} finished, {status.queued} queued")
                next_report = now + 10
            await asyncio.sleep(0.02)
    drain_s = time.perf_counter() - started
    cpu = {k: v - cpu_before[k] for k, v in mesh.cpu().items()}
    out["drain_s"] = round(drain_s, 3)
    out["tasks_per_s"] = round(len(ids) / drain_s, 1) if drain_s else 0.0
    out["ms_per_task"] = round(drain_s * 1000 / max(1, len(ids)), 3)
    out["cpu_ms_per_task"] = {k: round(v * 1000 / max(1, len(ids)), 3) for k, v in cpu.items()}
    states = await task_states(stub, set(ids))
    out["states"] = dict(sorted(states.items()))
    out["succeeded"] = states.get("TASK_STATE_SUCCEEDED", 0)
    out["lost"] = len(ids) - sum(states.values())
    rss = rss_kb(pid)
    out["rss_drained_mb"] = mb(rss["VmRSS"])
    log(
        f"drained in {drain_s:.2f} s ({out['tasks_per_s']} tasks/s, {out['ms_per_task']} ms per "
        f"task); states {out['states']}; RSS {out['rss_drained_mb']} MB; CPU ms per task "
        f"{out['cpu_ms_per_task']}"
    )
    return out


async def task_states(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, ids: set[str]
) -> Counter[str]:
    """The state of every task of ``ids`` the orchestrator lists (ListTasks, every page)."""
    states: Counter[str] = Counter()
    token = ""
    while True:
        page = await stub.ListTasks(pb.ListTasksRequest(page_size=1000, page_token=token))
        for task in page.tasks:
            if task.task_id in ids:
                states[pb.TaskState.Name(task.state)] += 1
        token = page.next_page_token
        if not token:
            return states


@dataclass
class StreamResult:
    stream: Stream
    finished: bool = False
    error: str = ""
    messages: int = 0
    queued_messages: int = 0


async def one_stream(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub,
    request: pb.GenerateRequest,
    start: float,
    timeout_s: float,
) -> StreamResult:
    result = StreamResult(Stream())
    stream = result.stream
    try:
        async for response in stub.Generate(request, timeout=timeout_s):
            event = response.event
            kind = event.WhichOneof("kind")
            result.messages += 1
            if kind == "queued":
                result.queued_messages += 1
            elif kind == "token":
                now = time.perf_counter() - start
                if stream.tokens == 0:
                    stream.first_s = now
                stream.tokens += len(event.token.token_ids)
                stream.last_s = now
            elif kind == "finished":
                result.finished = True
    except grpc.aio.AioRpcError as err:
        result.error = err.code().name
    return result


async def streams(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub,
    args: argparse.Namespace,
    model_id: str,
    mesh: Mesh,
) -> dict[str, Any]:
    request = generate_request(model_id, args.stream_tokens)
    cpu_before = mesh.cpu()
    start = time.perf_counter()
    results = await asyncio.gather(
        *(one_stream(stub, request, start, args.drain_timeout_s) for _ in range(args.streams))
    )
    wall_s = time.perf_counter() - start
    cpu = {k: round(v - cpu_before[k], 2) for k, v in mesh.cpu().items()}
    done = [r for r in results if r.finished and r.stream.tokens == args.stream_tokens]
    errors = Counter(r.error for r in results if r.error)
    out: dict[str, Any] = {
        "streams": args.streams,
        "tokens": args.stream_tokens,
        "started": sum(1 for r in results if r.stream.tokens > 0),
        "completed": len(done),
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "wall_s": round(wall_s, 3),
        "messages_per_stream": round(sum(r.messages for r in results) / len(results), 1),
        "queued_messages_per_stream": round(
            sum(r.queued_messages for r in results) / len(results), 1
        ),
    }
    if done:
        figures = level_figures([[r.stream for r in done]])
        out["ttft_p50_ms"] = figures["ttft_p50_ms"]
        out["ttft_p99_ms"] = figures["ttft_p99_ms"]
        out["aggregate_tokens_per_s"] = figures["aggregate_tokens_per_s"]
    out["cpu_s"] = cpu
    out["rss_after_mb"] = mb(rss_kb(mesh.orchestrator_pid)["VmRSS"])
    log(
        f"{args.streams} streams: {out['completed']} completed, {out['failed']} failed "
        f"{out['errors'] or ''}in {wall_s:.2f} s; TTFT p50 {out.get('ttft_p50_ms')} ms, p99 "
        f"{out.get('ttft_p99_ms')} ms"
    )
    return out


async def run(args: argparse.Namespace, model_id: str, mesh: Mesh) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        control = control_pb2_grpc.ControlServiceStub(channel)
        await wait_ready(control, 120)
        # Warm-up: the first tasks pay for connections, the journal and first placements.
        warm = generate_request(model_id, 1)
        await asyncio.gather(*(one_stream(stub, warm, time.perf_counter(), 60) for _ in range(20)))
        figures: dict[str, Any] = {}
        if args.queued:
            figures["queued"] = await queue_and_drain(stub, control, args, model_id, mesh)
        if args.streams:
            figures["streams"] = await streams(stub, args, model_id, mesh)
        figures["rss_peak_mb"] = mb(rss_kb(mesh.orchestrator_pid)["VmHWM"])
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=10_000, help="tasks queued at once")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent Generate streams")
    parser.add_argument("--stream-tokens", type=int, default=16, help="tokens per stream")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--layout", choices=["serve", "home"], default="serve")
    parser.add_argument("--threads", type=int, default=1, help="engine threads, both paths")
    parser.add_argument("--slots", type=int, default=0, help="pool slots (0: the CPU default)")
    parser.add_argument("--priority", choices=["batch", "interactive"], default="batch")
    parser.add_argument(
        "--engine-tasks", type=int, default=1000, help="tasks of the direct engine baseline"
    )
    parser.add_argument("--drain-timeout-s", type=float, default=900.0)
    args = parser.parse_args()
    model_id = MODELS[args.model]
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as tmp:
        root = Path(tmp)
        path = write_model(root / f"{model_id}.gguf", args.model)
        engine_ms, engine_cpu_ms = engine_ms_per_task(path, args.threads, args.engine_tasks)
        log(f"engine alone: {engine_ms:.3f} ms ({engine_cpu_ms:.3f} ms CPU) per one-token task")
        mesh = start(args, model_id, path, root)
        try:
            figures = asyncio.run(run(args, model_id, mesh))
        finally:
            mesh.stop()
    summary: dict[str, Any] = {
        "model": model_id,
        "layout": args.layout,
        "rss_of": "orchestrator process"
        if args.layout == "serve"
        else "llorch up (orchestrator, catalog, pool manager)",
        "slots": args.slots,
        "threads": args.threads,
        "priority": args.priority,
        "engine_ms_per_task": round(engine_ms, 3),
        "engine_cpu_ms_per_task": round(engine_cpu_ms, 3),
        **figures.get("queued", {}),
    }
    if args.queued:
        overhead = summary["ms_per_task"] - engine_ms
        summary["dispatch_overhead_ms_per_task"] = round(overhead, 3)
        summary["dispatch_overhead_vs"] = (
            "drain time per task minus the same one-token task run directly with "
            "llama-cpp-python in the bench process, one after another (engine_ms_per_task)"
        )
        cpu = summary["cpu_ms_per_task"]
        summary["mesh_cpu_ms_per_task_beyond_engine"] = round(
            sum(v for k, v in cpu.items() if k != "bench_client") - engine_cpu_ms, 3
        )
        summary["target_rss_queued_ok"] = (
            summary["rss_queued_mb"] <= RSS_TARGET_MB and summary["queued"] == args.queued
        )
        summary["target_drained_all_ok"] = summary["succeeded"] == args.queued
        log(
            f"dispatch overhead {overhead:.2f} ms per task (engine {engine_ms:.3f} ms; seen "
            f"before: ~{SEED_DISPATCH_MS:.0f} ms end to end); the mesh's CPU beyond the engine "
            f"{summary['mesh_cpu_ms_per_task_beyond_engine']} ms per task; RSS target <= "
            f"{RSS_TARGET_MB:.0f} MB: {summary['target_rss_queued_ok']}"
        )
    if args.streams:
        summary["streams"] = figures["streams"]
        summary["target_streams_complete_ok"] = figures["streams"]["completed"] == args.streams
    summary["rss_peak_mb"] = figures["rss_peak_mb"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

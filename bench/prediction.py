"""Prediction benchmark: how close the queue's predicted start times come to the real ones.

Starts ``llorch up`` with two CPU pools for tiny-llama (``--slots`` sequences each, batched), warms
the service-time measurements with a few tasks, then submits a mixed load at once: tasks of 16 to
512 tokens, INTERACTIVE and BATCH, two tenants. Each SubmitTask answer carries the predicted start
(ms from now); each task's Started event carries the time it actually waited. Prints the error of
the first prediction per task (median, p90, and the median relative error beside the median actual
wait), the same for the last prediction a reader saw before Started (against the time from that
message to Started), then one line of JSON.

  .venv/bin/python bench/prediction.py [--slots 4] [--tasks 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from launch.harness import start_home, stop_home


def start(data_dir: Path, slots: int) -> tuple[subprocess.Popen[str], str]:
    pools = [
        {"pool_id": f"cpu-{i}", "model_id": "tiny-llama", "n_threads": 1, "slots": slots}
        for i in range(2)
    ]
    return start_home(data_dir, pools)


def request(tokens: int, batch: bool, seed: int) -> orchestrator_pb2.SubmitTaskRequest:
    return orchestrator_pb2.SubmitTaskRequest(
        model_id="tiny-llama",
        prompt=f"Task number {seed} tells a story about",
        priority=common_pb2.PRIORITY_BATCH if batch else common_pb2.PRIORITY_INTERACTIVE,
        sampling=common_pb2.SamplingParams(max_tokens=tokens, seed=seed, ignore_eos=True),
    )


async def follow(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, task_id: str
) -> tuple[float, tuple[float, float] | None]:
    """The task's whole wait (ms), and (prediction, actual ms until Started) for the last Queued
    the stream delivered while the task still waited."""
    last: tuple[int, float] | None = None
    async for response in stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=task_id)):
        event = response.event
        kind = event.WhichOneof("kind")
        now = time.monotonic()
        if kind == "queued":
            last = (event.queued.predicted_start_ms, now)
        elif kind == "started":
            seen = None if last is None else (float(last[0]), (now - last[1]) * 1000)
            queue_ms = event.started.queue_ms
            async for _ in stub.StreamTask(
                orchestrator_pb2.StreamTaskRequest(task_id=task_id, from_index=1 << 30)
            ):
                pass  # to the end of the task
            return queue_ms, seen
    raise AssertionError("the task never started")


def errors(pairs: list[tuple[float, float]]) -> dict[str, float]:
    """Absolute and relative errors of (predicted, actual) pairs, in ms (zeros for none)."""
    if not pairs:
        return {
            "n": 0,
            "median_abs_ms": 0.0,
            "p90_abs_ms": 0.0,
            "median_rel": 0.0,
            "median_actual_ms": 0.0,
        }
    absolute = sorted(abs(p - a) for p, a in pairs)
    relative = sorted(abs(p - a) / a for p, a in pairs if a >= 50)
    return {
        "n": len(pairs),
        "median_abs_ms": round(statistics.median(absolute), 1),
        "p90_abs_ms": round(absolute[int(0.9 * (len(absolute) - 1))], 1),
        "median_rel": round(statistics.median(relative), 3) if relative else 0.0,
        "median_actual_ms": round(statistics.median(a for _, a in pairs), 1),
    }


async def run(address: str, tasks: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        # Warm-up: the orchestrator learns service times from finished tasks.
        warm = [await stub.SubmitTask(request(rng.choice([64, 256]), False, i)) for i in range(6)]
        await asyncio.gather(*(follow(stub, w.task_id) for w in warm))
        specs = [
            (rng.choice([16, 64, 128, 256, 512]), rng.random() < 0.4, 100 + i, rng.choice("ab"))
            for i in range(tasks)
        ]
        submitted = []
        for tokens, batch, task_seed, tenant in specs:
            response = await stub.SubmitTask(
                request(tokens, batch, task_seed), metadata=(("x-llorch-tenant", tenant),)
            )
            submitted.append(response)
        results = await asyncio.gather(*(follow(stub, s.task_id) for s in submitted))
    first = [(float(s.predicted_start_ms), r[0]) for s, r in zip(submitted, results, strict=True)]
    # Readers attach after every submit, so the first Queued they see may already be stale
    # by then; those whose Started came within 5 ms of attaching measured nothing.
    last = [r[1] for r in results if r[1] is not None and r[1][1] > 5]
    # INTERACTIVE tasks are overtaken by nothing submitted later (except other tenants' share);
    # BATCH predictions cannot foresee the INTERACTIVE work that will arrive after them.
    interactive = [pair for pair, spec in zip(first, specs, strict=True) if not spec[1]]
    return {
        "tasks": tasks,
        "at_submit": errors(first),
        "at_submit_interactive": errors(interactive),
        "last_seen": errors(last),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--slots", type=int, default=4, help="slots of each of the two pools")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as tmp:
        proc, address = start(Path(tmp), args.slots)
        try:
            started = time.monotonic()
            result = asyncio.run(run(address, args.tasks, args.seed))
            result["seconds"] = round(time.monotonic() - started, 1)
            result["slots"] = args.slots
        finally:
            stop_home(proc)
    for key in ("at_submit", "at_submit_interactive", "last_seen"):
        e = result[key]
        assert isinstance(e, dict)
        print(
            f"{key:<22} median error {e['median_abs_ms']:>8.1f} ms, "
            f"p90 {e['p90_abs_ms']:>8.1f} ms, median relative {e['median_rel']:.3f} "
            f"(median actual {e['median_actual_ms']} ms)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""``llorch top``: pools, queue and throughput, live, from the orchestrator's control API."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import grpc

from launch.cli.common import ORCHESTRATOR, call, orchestrator_address, table

Sample = tuple[float, Any, Any]
"""When it was taken, the pools, the nodes."""


def add_parsers(sub: Any) -> None:
    """Adds ``top``."""
    top = sub.add_parser(
        "top", parents=[ORCHESTRATOR], help="pools, queue and throughput, live (operators)"
    )
    top.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    top.add_argument("--once", action="store_true", help="print one update and stop")
    top.set_defaults(run=_cmd_top)


def frame(before: Sample, now: Sample) -> str:
    """One screen: the fleet's totals, then a row per pool with its rates since ``before``."""
    elapsed = max(1e-6, now[0] - before[0])
    old = {(p.node_id, p.pool_id): p for p in before[1]}
    rows, total_tasks, total_tokens, queued = [], 0.0, 0.0, {}
    for p in now[1]:
        prev = old.get((p.node_id, p.pool_id))
        tasks_s = (p.tasks_finished - prev.tasks_finished) / elapsed if prev else 0.0
        tokens_s = (p.tokens_out - prev.tokens_out) / elapsed if prev else 0.0
        total_tasks += tasks_s
        total_tokens += tokens_s
        queued[p.model_id] = p.queued
        state = "drained" if p.drained else (p.state if p.reachable else "unreachable")
        rows.append(
            {
                "pool": f"{p.node_id}/{p.pool_id}",
                "model": p.model_id,
                "state": state,
                "slots": f"{p.slots_busy}/{p.slots_total}",
                "queued": p.queued,
                "tasks/s": f"{tasks_s:.1f}",
                "tokens/s": f"{tokens_s:.0f}",
            }
        )
    reachable = sum(1 for n in now[2] if n.reachable)
    head = (
        f"llorch top  {time.strftime('%H:%M:%S')}  nodes {reachable}/{len(now[2])}  "
        f"queued {sum(queued.values())}  tasks/s {total_tasks:.1f}  "
        f"tokens/s {total_tokens:.0f}"
    )
    columns = ["pool", "model", "state", "slots", "queued", "tasks/s", "tokens/s"]
    return f"{head}\n\n{table(rows, columns)}"


def _cmd_top(args: argparse.Namespace) -> int:
    from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc

    interval = max(0.2, args.interval)

    async def sample(stub: Any) -> Sample:
        pools = (await stub.ListPools(control_pb2.ListPoolsRequest())).pools
        nodes = (await stub.ListNodes(control_pb2.ListNodesRequest())).nodes
        return time.monotonic(), pools, nodes

    async def run(channel: grpc.aio.Channel) -> None:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        before = await sample(stub)
        while True:
            await asyncio.sleep(interval)
            now = await sample(stub)
            if sys.stdout.isatty() and not args.once:
                print("\x1b[H\x1b[2J", end="")
            print(frame(before, now), flush=True)
            if args.once:
                return
            before = now

    try:
        return call(orchestrator_address(args), run)
    except KeyboardInterrupt:
        return 0

"""``llorch pools``: the pools the orchestrator places work on, and what operators do to them."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc

from launch.cli.common import (
    JSON,
    ORCHESTRATOR,
    call,
    orchestrator_address,
    print_messages,
    seconds,
    with_progress,
)


def add_parsers(sub: Any) -> None:
    """Adds ``pools list|drain|resume|reload|preload``."""
    pools = sub.add_parser("pools", help="the pools the orchestrator places work on")
    pools_sub = pools.add_subparsers(title="pools commands")
    plist = pools_sub.add_parser("list", parents=[ORCHESTRATOR, JSON], help="list pools")
    plist.set_defaults(run=_cmd_pools, action="list")
    pdrain = pools_sub.add_parser(
        "drain", parents=[ORCHESTRATOR], help="stop placing work on a pool"
    )
    pdrain.add_argument("pool", help="NODE/POOL")
    pdrain.add_argument(
        "--deadline", type=seconds, default=60.0, help="seconds running work may take (60)"
    )
    pdrain.set_defaults(run=_cmd_pools, action="drain")
    presume = pools_sub.add_parser(
        "resume", parents=[ORCHESTRATOR], help="put a drained pool back into placement"
    )
    presume.add_argument("pool", help="NODE/POOL")
    presume.set_defaults(run=_cmd_pools, action="resume")
    reloadp = pools_sub.add_parser(
        "reload",
        parents=[ORCHESTRATOR],
        help="change a pool's model (drain, load, check; rolls back on failure)",
    )
    reloadp.add_argument("pool", help="NODE/POOL")
    reloadp.add_argument("model", help="catalog id of the model to load")
    reloadp.add_argument(
        "--deadline", type=seconds, help="seconds running work may take (node default)"
    )
    reloadp.set_defaults(run=_cmd_pools, action="reload")
    preloadp = pools_sub.add_parser(
        "preload", parents=[ORCHESTRATOR], help="make a model ready before tasks ask for it"
    )
    preloadp.add_argument("model", help="catalog id of the model")
    preloadp.add_argument("--pool", default="", help="NODE/POOL (default: the orchestrator picks)")
    preloadp.set_defaults(run=_cmd_pools, action="preload")


def _cmd_pools(args: argparse.Namespace) -> int:
    from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc

    node_id, _, pool_id = getattr(args, "pool", "").partition("/")

    async def change(stub: Any) -> list[Any]:
        """The action's call; the pools it answers with."""
        if args.action == "drain":
            drained = await with_progress(
                f"draining {args.pool}",
                stub.DrainPool,
                control_pb2.DrainPoolRequest(
                    node_id=node_id, pool_id=pool_id, deadline_ms=round(args.deadline * 1000)
                ),
            )
            return [drained.pool]
        if args.action == "resume":
            resumed = await stub.ResumePool(
                control_pb2.ResumePoolRequest(node_id=node_id, pool_id=pool_id)
            )
            return [resumed.pool]
        if args.action == "reload":
            request = control_pb2.ReloadPoolRequest(
                node_id=node_id, pool_id=pool_id, model_id=args.model
            )
            if args.deadline is not None:
                request.deadline_ms = round(args.deadline * 1000)
            reloaded = await with_progress(
                f"reloading {args.pool} to {args.model}", stub.ReloadPool, request
            )
            return [reloaded.pool]
        if args.action == "preload":
            preloaded = await with_progress(
                f"preloading {args.model}",
                stub.PreloadModel,
                control_pb2.PreloadModelRequest(
                    model_id=args.model, node_id=node_id, pool_id=pool_id
                ),
            )
            if preloaded.replaced_model_id:
                print(f"replaced {preloaded.replaced_model_id}", file=sys.stderr)
            return [preloaded.pool]
        return list((await stub.ListPools(control_pb2.ListPoolsRequest())).pools)

    async def run(channel: grpc.aio.Channel) -> None:
        statuses = await change(control_pb2_grpc.ControlServiceStub(channel))
        if getattr(args, "json", False):
            print_messages(statuses)
            return
        print(
            f"{'POOL':<24} {'MODEL':<20} {'STATE':<9} {'SLOTS':>7} {'QUEUED':>6} "
            f"{'CACHED':>6} {'HIT':>5}  NOTE"
        )
        for s in statuses:
            note = "drained" if s.drained else ("" if s.reachable else "node unreachable")
            note = note or s.last_error
            hit = (
                f"{100 * s.prefix_hit_tokens / s.prefix_lookup_tokens:.0f}%"
                if s.prefix_lookup_tokens
                else "-"
            )
            print(
                f"{s.node_id + '/' + s.pool_id:<24} {s.model_id:<20} {s.state:<9} "
                f"{f'{s.slots_busy}/{s.slots_total}':>7} {s.queued:>6} "
                f"{s.prefix_cache_entries:>6} {hit:>5}  {note}"
            )

    return call(orchestrator_address(args), run)

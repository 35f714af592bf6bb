"""``llorch engines``: find this node's inference engine and record it; list the recorded ones."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc

from launch.cli.common import (
    CATALOG,
    JSON,
    call,
    catalog_address,
    fail,
    print_messages,
    print_table,
)


def add_parsers(sub: Any) -> None:
    """Adds ``engines check`` and ``engines list``."""
    engines = sub.add_parser("engines", help="inference engines of the nodes")
    engines_sub = engines.add_subparsers(title="engines commands")
    echeck = engines_sub.add_parser(
        "check",
        parents=[CATALOG, JSON],
        help="find this node's engine, say whether it can use a GPU, record it",
    )
    echeck.add_argument("--node-id", default="local", help="this node's id (local)")
    echeck.set_defaults(run=_cmd_engines, action="check")
    elist = engines_sub.add_parser(
        "list", parents=[CATALOG, JSON], help="list the engines recorded in the catalog"
    )
    elist.add_argument("--node", default="", help="only this node's")
    elist.set_defaults(run=_cmd_engines, action="list")


def _cmd_engines(args: argparse.Namespace) -> int:
    from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

    from catalog.convert import engine_to_pb
    from provisioners.engines import EngineCheckError, check_engine

    address = catalog_address(args)
    problem = ""
    if args.action == "check":
        try:
            facts = check_engine()
        except EngineCheckError as exc:
            return fail(str(exc))
        problem = facts.problem()

    async def run(channel: grpc.aio.Channel) -> None:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        if args.action == "check":
            request = catalog_pb2.RegisterEngineRequest(
                engine=engine_to_pb(facts.record(args.node_id))
            )
            engines = [(await stub.RegisterEngine(request, timeout=10)).engine]
        else:
            listed = await stub.ListEngines(
                catalog_pb2.ListEnginesRequest(node_id=args.node), timeout=10
            )
            engines = list(listed.engines)
        if args.json:
            print_messages(engines)
            return
        print_table(
            [
                {
                    "node": e.node_id,
                    "engine": f"{e.name} {e.version}",
                    "backend": e.backend,
                    "gpu_offload": "yes" if e.gpu_offload else "no",
                    "libraries": ",".join(e.backend_libraries),
                }
                for e in engines
            ],
            ["node", "engine", "backend", "gpu_offload", "libraries"],
        )

    status = call(address, run)
    if status == 0 and problem:
        print(f"note: {problem}", file=sys.stderr)
    return status

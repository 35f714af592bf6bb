"""``llorch nodes``: the pool managers the orchestrator knows."""

from __future__ import annotations

import argparse
from typing import Any

import grpc

from launch.cli.common import (
    JSON,
    ORCHESTRATOR,
    call,
    orchestrator_address,
    print_messages,
    print_table,
)


def add_parsers(sub: Any) -> None:
    """Adds ``nodes list``."""
    nodes = sub.add_parser("nodes", help="the pool managers the orchestrator knows")
    nodes_sub = nodes.add_subparsers(title="nodes commands")
    nlist = nodes_sub.add_parser(
        "list", parents=[ORCHESTRATOR, JSON], help="list nodes: address, reachable, pools"
    )
    nlist.set_defaults(run=_cmd_nodes_list)


def _cmd_nodes_list(args: argparse.Namespace) -> int:
    from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc

    async def run(channel: grpc.aio.Channel) -> None:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        nodes = (await stub.ListNodes(control_pb2.ListNodesRequest())).nodes
        if args.json:
            print_messages(nodes)
            return
        rows = [
            {
                "node": n.node_id or "?",
                "address": n.address,
                "state": "reachable" if n.reachable else "unreachable",
                "joined": "registered" if n.registered else "settings",
                "last_seen": f"{n.last_seen_ms_ago / 1000:.1f}s ago"
                if n.last_seen_ms_ago
                else "never",
                "pools": ",".join(n.pool_ids),
            }
            for n in nodes
        ]
        print_table(rows, ["node", "address", "state", "joined", "last_seen", "pools"])

    return call(orchestrator_address(args), run)

"""``llorch gc``: delete model files by the garbage collection policy; show or set the policy."""

from __future__ import annotations

import argparse
import json
from typing import Any

import grpc

from launch.cli.common import (
    CATALOG,
    DATA_DIR,
    call,
    catalog_address,
    home_endpoint,
    non_negative_int,
)


def add_parsers(sub: Any) -> None:
    """Adds ``gc`` and ``gc policy``."""
    gc = sub.add_parser(
        "gc", parents=[DATA_DIR], help="delete model files by the garbage collection policy"
    )
    gc.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    gc.add_argument("--pool-manager", help="pool manager address (default: the home profile's)")
    gc.set_defaults(run=_cmd_gc)
    gc_sub = gc.add_subparsers(title="gc commands")
    gpolicy = gc_sub.add_parser(
        "policy", parents=[CATALOG], help="show or change the garbage collection policy"
    )
    gpolicy.add_argument("--node", default="", help="a node's own policy (default: every node's)")
    gpolicy.add_argument("--max-disk-usage-pct", type=float)
    gpolicy.add_argument("--min-free-bytes", type=non_negative_int)
    gpolicy.add_argument("--keep-active", choices=["true", "false"])
    gpolicy.add_argument("--keep-used-within-days", type=float)
    gpolicy.add_argument("--delete-retired-after-days", type=float)
    gpolicy.set_defaults(run=_cmd_gc_policy)


def _cmd_gc(args: argparse.Namespace) -> int:
    from llorch.poolmanager.v1 import poolmanager_pb2, poolmanager_pb2_grpc

    async def run(channel: grpc.aio.Channel) -> None:
        stub = poolmanager_pb2_grpc.PoolManagerServiceStub(channel)
        done = await stub.CollectGarbage(
            poolmanager_pb2.CollectGarbageRequest(dry_run=args.dry_run), timeout=300
        )
        verb = "would delete" if done.dry_run else "deleted"
        for d in done.deleted:
            print(f"{verb}  {d.path}  ({d.model_id or '-'}, {d.size_bytes} bytes): {d.reason}")
        for d in done.kept:
            print(f"keep         {d.path}  ({d.model_id}, {d.size_bytes} bytes): {d.reason}")
        freed = done.disk_free_bytes_after - done.disk_free_bytes_before
        print(
            f"{'dry run: ' if done.dry_run else ''}{len(done.deleted)} files, {freed} bytes; "
            f"disk {done.disk_free_bytes_before} → {done.disk_free_bytes_after} bytes free "
            f"of {done.disk_total_bytes}"
        )

    return call(args.pool_manager or home_endpoint(args, "pool_manager"), run)


def _cmd_gc_policy(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

    changes = {
        "max_disk_usage_pct": args.max_disk_usage_pct,
        "min_free_bytes": args.min_free_bytes,
        "keep_active": None if args.keep_active is None else args.keep_active == "true",
        "keep_used_within_days": args.keep_used_within_days,
        "delete_retired_after_days": args.delete_retired_after_days,
    }

    async def run(channel: grpc.aio.Channel) -> None:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        current = await stub.GetGcPolicy(
            catalog_pb2.GetGcPolicyRequest(node_id=args.node), timeout=10
        )
        policy = current.policy
        if any(v is not None for v in changes.values()):
            for name, value in changes.items():
                if value is not None:
                    setattr(policy, name, value)
            policy = (
                await stub.SetGcPolicy(
                    catalog_pb2.SetGcPolicyRequest(node_id=args.node, policy=policy), timeout=10
                )
            ).policy
        shown = json_format.MessageToDict(
            policy, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(shown, indent=2))

    return call(catalog_address(args), run)

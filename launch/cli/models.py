"""``llorch models``: the model catalog — list, add, pull, states, pins, delete, the tiny model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from launch.cli.common import (
    CATALOG,
    JSON,
    ORCHESTRATOR,
    call,
    catalog_address,
    failed,
    orchestrator_address,
    print_table,
    with_progress,
)

_MODEL_STATES = {"active": 1, "retired": 2}  # catalog_pb2.MODEL_STATE_*


def add_parsers(sub: Any) -> None:
    """Adds ``models list|add|pull|rm|retire|activate|pin|unpin|write-tiny``."""
    models = sub.add_parser("models", help="the model catalog")
    models_sub = models.add_subparsers(title="models commands")
    mlist = models_sub.add_parser("list", parents=[CATALOG, JSON], help="list models")
    mlist.add_argument("--state", choices=["active", "retired"], help="only models in this state")
    mlist.add_argument("--node", default="", help="only models with a copy on this node")
    mlist.set_defaults(run=_cmd_models_list)
    mrm = models_sub.add_parser(
        "rm",
        parents=[ORCHESTRATOR],
        help="delete a model (refused while in use unless --drain); its files follow",
    )
    mrm.add_argument("name")
    mrm.add_argument(
        "--drain", action="store_true", help="unload the pools holding it and end its tasks"
    )
    mrm.set_defaults(run=_cmd_models_rm)
    mpull = models_sub.add_parser(
        "pull",
        parents=[CATALOG],
        help="fetch a model (file:, https:, hf:) into this node's store and add it",
    )
    mpull.add_argument(
        "ref", help="file:/abs/path.gguf, https://host/path.gguf or hf:ORG/REPO[@REVISION]/PATH"
    )
    mpull.add_argument("--name", default="", help="catalog id (default: from the file name)")
    mpull.add_argument("--sha256", default="", help="expected SHA-256; refused when it differs")
    mpull.add_argument("--node-id", default="local", help="node the store belongs to (local)")
    mpull.add_argument("--store", type=Path, help="model store (default: <data dir>/models)")
    mpull.set_defaults(run=_cmd_models_pull)
    for verb, help_text in (
        ("retire", "admit no new tasks for a model (running ones finish)"),
        ("activate", "admit tasks for a retired model again"),
        ("pin", "never garbage-collect a model's files"),
        ("unpin", "let garbage collection consider a model again"),
    ):
        mverb = models_sub.add_parser(verb, parents=[CATALOG], help=help_text)
        mverb.add_argument("name")
        mverb.set_defaults(run=_cmd_models_set, verb=verb)
    mtiny = models_sub.add_parser(
        "write-tiny",
        help="write the embedded tiny model (random weights, for trying the mesh) to a file",
    )
    mtiny.add_argument("path", type=Path)
    mtiny.set_defaults(run=_cmd_models_write_tiny)
    madd = models_sub.add_parser("add", parents=[CATALOG], help="register a GGUF file on this node")
    madd.add_argument("name")
    madd.add_argument("path", type=Path)
    madd.add_argument("--node-id", default="local", help="node holding the file (local)")
    madd.set_defaults(run=_cmd_models_add)


def _cmd_models_list(args: argparse.Namespace) -> int:
    from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

    async def run(channel: grpc.aio.Channel) -> None:
        rows: list[dict[str, Any]] = []
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListModels(
                catalog_pb2.ListModelsRequest(
                    page_token=token,
                    state=_MODEL_STATES.get(args.state or "", 0),
                    node_id=args.node,
                ),
                timeout=10,
            )
            for m in page.models:
                rows.append(
                    {
                        "model_id": m.model_id,
                        "state": catalog_pb2.ModelState.Name(m.state)
                        .removeprefix("MODEL_STATE_")
                        .lower(),
                        "architecture": m.facts.architecture,
                        "file_type": m.facts.file_type,
                        "context_length": m.facts.context_length,
                        "size_bytes": m.size_bytes,
                        "pinned": m.pinned,
                        "source_ref": m.source_ref,
                    }
                )
            token = page.next_page_token
            if not token:
                break
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        columns = ["model_id", "state", "pinned", "architecture", "file_type", "context_length"]
        print_table(rows, [*columns, "size_bytes"])

    return call(catalog_address(args), run)


def _cmd_models_rm(args: argparse.Namespace) -> int:
    from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc

    async def run(channel: grpc.aio.Channel) -> None:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        request = control_pb2.DeleteModelRequest(model_id=args.name, drain=args.drain)
        if args.drain:  # draining and unloading pools takes a while
            done = await with_progress(
                f"draining and deleting {args.name}", stub.DeleteModel, request
            )
        else:
            done = await stub.DeleteModel(request, timeout=300)
        for pool in done.drained_pools:
            print(f"unloaded {pool}")
        if done.tasks_ended:
            print(f"ended {done.tasks_ended} tasks")
        for file in done.files:
            print(f"forgot {file}")
        print(f"{args.name}: deleted")

    return call(orchestrator_address(args), run)


def _cmd_models_write_tiny(args: argparse.Namespace) -> int:
    from provisioners.tiny_model import write_tiny_model

    path = write_tiny_model(args.path)
    print(f"{path}: {path.stat().st_size} bytes (tiny-llama, random weights)")
    return 0


def _cmd_models_pull(args: argparse.Namespace) -> int:
    from llorch.catalog.v1 import catalog_pb2_grpc
    from tqdm import tqdm

    from mesh.settings import ClientSettings
    from provisioners.models import pull_model
    from provisioners.pull import PullError

    address = catalog_address(args)
    store = args.store or (args.data_dir or ClientSettings().data_dir) / "models"
    bars: list[tqdm[Any]] = []  # made at the first byte: a pull refused at once shows none

    def progress(done: int, total: int | None) -> None:
        if not bars:
            bars.append(
                tqdm(
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=args.ref.rstrip("/").rsplit("/", 1)[-1][:40],
                    file=sys.stderr,
                )
            )
        bar = bars[0]
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    async def run(channel: grpc.aio.Channel) -> int:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        try:
            model = await pull_model(
                stub,
                args.ref,
                store,
                args.node_id,
                name=args.name,
                sha256=args.sha256,
                progress=progress,
            )
        except PullError as exc:
            return failed(exc.reason, str(exc))
        finally:
            for bar in bars:
                bar.close()
        print(f"{model.model_id}: {model.size_bytes} bytes, sha256 {model.sha256}")
        return 0

    return call(address, run)


def _cmd_models_set(args: argparse.Namespace) -> int:
    from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

    async def run(channel: grpc.aio.Channel) -> None:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        if args.verb in ("retire", "activate"):
            state = catalog_pb2.MODEL_STATE_RETIRED
            if args.verb == "activate":
                state = catalog_pb2.MODEL_STATE_ACTIVE
            model = (
                await stub.SetModelState(
                    catalog_pb2.SetModelStateRequest(model_id=args.name, state=state), timeout=10
                )
            ).model
        else:
            model = (
                await stub.SetModelPinned(
                    catalog_pb2.SetModelPinnedRequest(
                        model_id=args.name, pinned=args.verb == "pin"
                    ),
                    timeout=10,
                )
            ).model
        state_name = catalog_pb2.ModelState.Name(model.state).removeprefix("MODEL_STATE_").lower()
        print(f"{model.model_id}: {state_name}{', pinned' if model.pinned else ''}")

    return call(catalog_address(args), run)


def _cmd_models_add(args: argparse.Namespace) -> int:
    from llorch.catalog.v1 import catalog_pb2_grpc

    from provisioners.models import register_local_file

    async def run(channel: grpc.aio.Channel) -> None:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        model = await register_local_file(stub, args.name, args.path, args.node_id)
        print(
            f"registered {model.model_id} ({model.size_bytes} bytes, sha256 {model.sha256[:12]}…)"
        )

    return call(catalog_address(args), run)

"""The ``llorch`` command.

llorch up                              run the home profile in the foreground
llorch serve catalog|poolmanager|orchestrator   run one service (a fleet's processes)
llorch generate --model M "prompt"     stream tokens from the orchestrator
llorch models list | add NAME PATH | pull REF | rm NAME | retire|activate|pin|unpin NAME
llorch engines check | list              this node's engine, and every node's recorded
llorch gc [--dry-run] | gc policy [...]   delete model files by policy; show or set the policy
llorch pools list | drain NODE/POOL | resume NODE/POOL   pools, for operators
llorch pools reload NODE/POOL MODEL | preload MODEL [--pool NODE/POOL]   change what pools hold
llorch tasks get ID                    one task's state
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from mesh import cli_security
from mesh.settings import ClientSettings, ConfigError, Settings, load_settings
from mesh.tls import channel_credentials


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"llorch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def client_channel(address: str) -> grpc.aio.Channel:
    """A channel of the client commands: over TLS when ``LLORCH_CA_FILE`` is set (presenting
    ``LLORCH_CERT_FILE`` to mTLS service ports), with ``LLORCH_API_KEY`` on every call."""
    settings = ClientSettings()
    files = settings.tls_files()
    if files is None:
        return grpc.aio.insecure_channel(address)
    credentials = channel_credentials(files)
    if settings.api_key:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(settings.api_key)
        )
    return grpc.aio.secure_channel(address, credentials)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llorch", description="llama-orch: LLM inference mesh")
    sub = parser.add_subparsers(title="commands")

    up = sub.add_parser("up", help="run the home profile (catalog, pool manager, orchestrator)")
    up.add_argument("--listen", help="orchestrator address (LLORCH_LISTEN; 127.0.0.1:50051)")
    up.add_argument("--data-dir", type=Path, help="data directory (LLORCH_DATA_DIR)")
    up.add_argument("--config", type=Path, help="TOML settings file (LLORCH_CONFIG)")
    up.add_argument("--log-format", choices=["json", "text"], help="log format (LLORCH_LOG_FORMAT)")
    up.set_defaults(run=_cmd_up)

    serve = sub.add_parser("serve", help="run one service of the mesh in the foreground")
    serve.add_argument("service", choices=["catalog", "poolmanager", "orchestrator"])
    serve.add_argument("--listen", help="orchestrator address (LLORCH_LISTEN)")
    serve.add_argument("--data-dir", type=Path, help="data directory (LLORCH_DATA_DIR)")
    serve.add_argument("--config", type=Path, help="TOML settings file (LLORCH_CONFIG)")
    serve.add_argument(
        "--log-format", choices=["json", "text"], help="log format (LLORCH_LOG_FORMAT)"
    )
    serve.set_defaults(run=_cmd_serve)

    gen = sub.add_parser("generate", help="generate text and print tokens as they arrive")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, help="catalog id of the model")
    gen.add_argument("--orchestrator", help="orchestrator address (LLORCH_ORCHESTRATOR)")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate max_tokens even past the model's end-of-generation tokens",
    )
    gen.add_argument("--priority", choices=["interactive", "batch"], default="interactive")
    gen.add_argument("--timeout", type=float, help="deadline in seconds")
    gen.add_argument("--json", action="store_true", help="print every event as a JSON line")
    gen.set_defaults(run=_cmd_generate)

    models = sub.add_parser("models", help="the model catalog")
    models_sub = models.add_subparsers(title="models commands")
    mlist = models_sub.add_parser("list", help="list models")
    mlist.add_argument("--catalog", help="catalog address (LLORCH_CATALOG)")
    mlist.add_argument("--data-dir", type=Path, help="home profile data dir (LLORCH_DATA_DIR)")
    mlist.add_argument("--json", action="store_true", help="print JSON")
    mlist.add_argument("--state", choices=["active", "retired"], help="only models in this state")
    mlist.add_argument("--node", default="", help="only models with a copy on this node")
    mlist.set_defaults(run=_cmd_models_list)
    mrm = models_sub.add_parser(
        "rm", help="delete a model (refused while in use unless --drain); its files follow"
    )
    mrm.add_argument("name")
    mrm.add_argument(
        "--drain", action="store_true", help="unload the pools holding it and end its tasks"
    )
    mrm.add_argument("--orchestrator", help="orchestrator address (LLORCH_ORCHESTRATOR)")
    mrm.set_defaults(run=_cmd_models_rm)
    mpull = models_sub.add_parser(
        "pull", help="fetch a model (file:, https:, hf:) into this node's store and add it"
    )
    mpull.add_argument(
        "ref", help="file:/abs/path.gguf, https://host/path.gguf or hf:ORG/REPO[@REVISION]/PATH"
    )
    mpull.add_argument("--name", default="", help="catalog id (default: from the file name)")
    mpull.add_argument("--sha256", default="", help="expected SHA-256; refused when it differs")
    mpull.add_argument("--node-id", default="local", help="node the store belongs to (local)")
    mpull.add_argument("--store", type=Path, help="model store (default: <data dir>/models)")
    mpull.add_argument("--catalog", help="catalog address (LLORCH_CATALOG)")
    mpull.add_argument("--data-dir", type=Path, help="home profile data dir (LLORCH_DATA_DIR)")
    mpull.set_defaults(run=_cmd_models_pull)
    for verb, help_text in (
        ("retire", "admit no new tasks for a model (running ones finish)"),
        ("activate", "admit tasks for a retired model again"),
        ("pin", "never garbage-collect a model's files"),
        ("unpin", "let garbage collection consider a model again"),
    ):
        mverb = models_sub.add_parser(verb, help=help_text)
        mverb.add_argument("name")
        mverb.add_argument("--catalog", help="catalog address (LLORCH_CATALOG)")
        mverb.add_argument("--data-dir", type=Path, help="home profile data dir (LLORCH_DATA_DIR)")
        mverb.set_defaults(run=_cmd_models_set, verb=verb)
    mtiny = models_sub.add_parser(
        "write-tiny",
        help="write the embedded tiny model (random weights, for trying the mesh) to a file",
    )
    mtiny.add_argument("path", type=Path)
    mtiny.set_defaults(run=_cmd_models_write_tiny)
    madd = models_sub.add_parser("add", help="register a GGUF file on this node")
    madd.add_argument("name")
    madd.add_argument("path", type=Path)
    madd.add_argument("--node-id", default="local", help="node holding the file (local)")
    madd.add_argument("--catalog", help="catalog address (LLORCH_CATALOG)")
    madd.add_argument("--data-dir", type=Path, help="home profile data dir (LLORCH_DATA_DIR)")
    madd.set_defaults(run=_cmd_models_add)

    gc = sub.add_parser("gc", help="delete model files by the garbage collection policy")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    gc.add_argument("--pool-manager", help="pool manager address (default: the home profile's)")
    gc.add_argument("--data-dir", type=Path, help="home profile data dir (LLORCH_DATA_DIR)")
    gc.set_defaults(run=_cmd_gc)
    gc_sub = gc.add_subparsers(title="gc commands")
    gpolicy = gc_sub.add_parser("policy", help="show or change the garbage collection policy")
    gpolicy.add_argument("--node", default="", help="a node's own policy (default: every node's)")
    gpolicy.add_argument("--max-disk-usage-pct", type=float)
    gpolicy.add_argument("--min-free-bytes", type=_non_negative_int)
    gpolicy.add_argument("--keep-active", choices=["true", "false"])
    gpolicy.add_argument("--keep-used-within-days", type=float)
    gpolicy.add_argument("--delete-retired-after-days", type=float)
    gpolicy.add_argument("--catalog", help="catalog address (LLORCH_CATALOG)")
    gpolicy.add_argument("--data-dir", type=Path, help="home profile data dir (LLORCH_DATA_DIR)")
    gpolicy.set_defaults(run=_cmd_gc_policy)

    engines = sub.add_parser("engines", help="inference engines of the nodes")
    engines_sub = engines.add_subparsers(title="engines commands")
    echeck = engines_sub.add_parser(
        "check", help="find this node's engine, say whether it can use a GPU, record it"
    )
    echeck.add_argument("--node-id", default="local", help="this node's id (local)")
    echeck.set_defaults(run=_cmd_engines, action="check")
    elist = engines_sub.add_parser("list", help="list the engines recorded in the catalog")
    elist.add_argument("--node", default="", help="only this node's")
    elist.set_defaults(run=_cmd_engines, action="list")
    for p in (echeck, elist):
        p.add_argument("--catalog", help="catalog address (LLORCH_CATALOG)")
        p.add_argument("--data-dir", type=Path, help="home profile data dir (LLORCH_DATA_DIR)")
        p.add_argument("--json", action="store_true", help="print JSON")

    top = sub.add_parser("top", help="pools, queue and throughput, live (operators)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    top.add_argument("--once", action="store_true", help="print one update and stop")
    top.add_argument("--orchestrator", help="orchestrator address (LLORCH_ORCHESTRATOR)")
    top.set_defaults(run=_cmd_top)

    nodes = sub.add_parser("nodes", help="the pool managers the orchestrator knows")
    nodes_sub = nodes.add_subparsers(title="nodes commands")
    nlist = nodes_sub.add_parser("list", help="list nodes: address, reachable, pools")
    nlist.add_argument("--json", action="store_true", help="print JSON")
    nlist.add_argument("--orchestrator", help="orchestrator address (LLORCH_ORCHESTRATOR)")
    nlist.set_defaults(run=_cmd_nodes_list)

    pools = sub.add_parser("pools", help="the pools the orchestrator places work on")
    pools_sub = pools.add_subparsers(title="pools commands")
    plist = pools_sub.add_parser("list", help="list pools")
    plist.add_argument("--json", action="store_true", help="print JSON")
    plist.set_defaults(run=_cmd_pools, action="list")
    pdrain = pools_sub.add_parser("drain", help="stop placing work on a pool")
    pdrain.add_argument("pool", help="NODE/POOL")
    pdrain.add_argument(
        "--deadline", type=_seconds, default=60.0, help="seconds running work may take (60)"
    )
    pdrain.set_defaults(run=_cmd_pools, action="drain")
    presume = pools_sub.add_parser("resume", help="put a drained pool back into placement")
    presume.add_argument("pool", help="NODE/POOL")
    presume.set_defaults(run=_cmd_pools, action="resume")
    reloadp = pools_sub.add_parser(
        "reload", help="change a pool's model (drain, load, check; rolls back on failure)"
    )
    reloadp.add_argument("pool", help="NODE/POOL")
    reloadp.add_argument("model", help="catalog id of the model to load")
    reloadp.add_argument(
        "--deadline", type=_seconds, help="seconds running work may take (node default)"
    )
    reloadp.set_defaults(run=_cmd_pools, action="reload")
    preloadp = pools_sub.add_parser("preload", help="make a model ready before tasks ask for it")
    preloadp.add_argument("model", help="catalog id of the model")
    preloadp.add_argument("--pool", default="", help="NODE/POOL (default: the orchestrator picks)")
    preloadp.set_defaults(run=_cmd_pools, action="preload")
    for p in (plist, pdrain, presume, reloadp, preloadp):
        p.add_argument("--orchestrator", help="orchestrator address (LLORCH_ORCHESTRATOR)")

    cli_security.add_parsers(sub)

    tasks = sub.add_parser("tasks", help="tasks")
    tasks_sub = tasks.add_subparsers(title="tasks commands")
    tget = tasks_sub.add_parser("get", help="print one task's state as JSON")
    tget.add_argument("task_id")
    tget.add_argument("--orchestrator", help="orchestrator address (LLORCH_ORCHESTRATOR)")
    tget.set_defaults(run=_cmd_tasks_get)
    tlist = tasks_sub.add_parser("list", help="list tasks, newest first")
    tlist.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    tlist.add_argument("--model", default="", help="only tasks of this model")
    tlist.add_argument("--limit", type=int, default=50, help="most tasks to print")
    tlist.add_argument("--json", action="store_true", help="one JSON object per task")
    tlist.add_argument("--orchestrator", help="orchestrator address (LLORCH_ORCHESTRATOR)")
    tlist.set_defaults(run=_cmd_tasks_list)
    return parser


def _non_negative_int(text: str) -> int:
    """A count flag: a whole number, at least 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 0")
    return int(text)


def _seconds(text: str) -> float:
    """A duration flag: seconds, at least 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86_400:
        raise argparse.ArgumentTypeError("must be between 0 and 86400 seconds")
    return value


def _service_settings(args: argparse.Namespace) -> Settings:
    """Settings of a service command (flags over environment over TOML), logging set up."""
    from mesh.logs import configure_logging

    config = args.config or (
        Path(os.environ["LLORCH_CONFIG"]) if "LLORCH_CONFIG" in os.environ else None
    )
    settings = load_settings(
        config, listen=args.listen, data_dir=args.data_dir, log_format=args.log_format
    )
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _cmd_up(args: argparse.Namespace) -> int:
    from mesh import tracing
    from mesh.home import main_up

    settings = _service_settings(args)
    tracing.configure(settings.tracing, "llorch-home")
    try:
        return main_up(settings, dict(os.environ))
    finally:
        tracing.shutdown()


def _cmd_serve(args: argparse.Namespace) -> int:
    from mesh import tracing
    from mesh.serve import main_serve

    settings = _service_settings(args)
    tracing.configure(settings.tracing, f"llorch-{args.service}")
    try:
        return main_serve(settings, args.service, dict(os.environ))
    finally:
        tracing.shutdown()


def _cmd_pools(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc

    address = args.orchestrator or ClientSettings().orchestrator
    node_id, _, pool_id = getattr(args, "pool", "").partition("/")

    async def run() -> int:
        async with client_channel(address) as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            try:
                if args.action == "drain":
                    drained = await _with_progress(
                        f"draining {args.pool}",
                        stub.DrainPool,
                        control_pb2.DrainPoolRequest(
                            node_id=node_id,
                            pool_id=pool_id,
                            deadline_ms=round(args.deadline * 1000),
                        ),
                    )
                    statuses = [drained.pool]
                elif args.action == "resume":
                    resumed = await stub.ResumePool(
                        control_pb2.ResumePoolRequest(node_id=node_id, pool_id=pool_id)
                    )
                    statuses = [resumed.pool]
                elif args.action == "reload":
                    request = control_pb2.ReloadPoolRequest(
                        node_id=node_id, pool_id=pool_id, model_id=args.model
                    )
                    if args.deadline is not None:
                        request.deadline_ms = round(args.deadline * 1000)
                    reloaded = await _with_progress(
                        f"reloading {args.pool} to {args.model}", stub.ReloadPool, request
                    )
                    statuses = [reloaded.pool]
                elif args.action == "preload":
                    preloaded = await _with_progress(
                        f"preloading {args.model}",
                        stub.PreloadModel,
                        control_pb2.PreloadModelRequest(
                            model_id=args.model, node_id=node_id, pool_id=pool_id
                        ),
                    )
                    statuses = [preloaded.pool]
                    if preloaded.replaced_model_id:
                        print(f"replaced {preloaded.replaced_model_id}", file=sys.stderr)
                else:
                    statuses = list((await stub.ListPools(control_pb2.ListPoolsRequest())).pools)
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)
        if getattr(args, "json", False):
            print(json.dumps([json_format.MessageToDict(s) for s in statuses], indent=2))
            return 0
        print(f"{'POOL':<24} {'MODEL':<20} {'STATE':<9} {'SLOTS':>7} {'QUEUED':>6}  NOTE")
        for s in statuses:
            note = "drained" if s.drained else ("" if s.reachable else "node unreachable")
            note = note or s.last_error
            print(
                f"{s.node_id + '/' + s.pool_id:<24} {s.model_id:<20} {s.state:<9} "
                f"{f'{s.slots_busy}/{s.slots_total}':>7} {s.queued:>6}  {note}"
            )
        return 0

    return asyncio.run(run())


def _cmd_top(args: argparse.Namespace) -> int:
    from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc

    address = args.orchestrator or ClientSettings().orchestrator
    interval = max(0.2, args.interval)

    async def sample(stub: Any) -> tuple[float, Any, Any]:
        pools = (await stub.ListPools(control_pb2.ListPoolsRequest())).pools
        nodes = (await stub.ListNodes(control_pb2.ListNodesRequest())).nodes
        return time.monotonic(), pools, nodes

    def frame(before: tuple[float, Any, Any], now: tuple[float, Any, Any]) -> str:
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
        lines = [head, ""]
        columns = ["pool", "model", "state", "slots", "queued", "tasks/s", "tokens/s"]
        widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
        lines.append("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
        for row in rows:
            lines.append("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
        return "\n".join(lines)

    async def run() -> int:
        async with client_channel(address) as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            try:
                before = await sample(stub)
                while True:
                    await asyncio.sleep(interval)
                    now = await sample(stub)
                    if sys.stdout.isatty() and not args.once:
                        print("\x1b[H\x1b[2J", end="")
                    print(frame(before, now), flush=True)
                    if args.once:
                        return 0
                    before = now
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


def _cmd_nodes_list(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc

    address = args.orchestrator or ClientSettings().orchestrator

    async def run() -> int:
        async with client_channel(address) as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            try:
                nodes = (await stub.ListNodes(control_pb2.ListNodesRequest())).nodes
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)
        if args.json:
            print(json.dumps([json_format.MessageToDict(n) for n in nodes], indent=2))
            return 0
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
        _print_table(rows, ["node", "address", "state", "joined", "last_seen", "pools"])
        return 0

    return asyncio.run(run())


def _cmd_tasks_list(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    address = args.orchestrator or ClientSettings().orchestrator
    state = 0
    if args.state:
        state = orchestrator_pb2.TaskState.Value(f"TASK_STATE_{args.state.upper()}")
    limit = max(1, args.limit)

    async def run() -> int:
        tasks: list[Any] = []
        async with client_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            token = ""
            try:
                while len(tasks) < limit:
                    page = await stub.ListTasks(
                        orchestrator_pb2.ListTasksRequest(
                            page_size=min(1000, limit - len(tasks)),
                            page_token=token,
                            state=state,
                            model_id=args.model,
                        )
                    )
                    tasks.extend(page.tasks)
                    token = page.next_page_token
                    if not token:
                        break
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)
        if args.json:
            for task in tasks:
                print(json.dumps(json_format.MessageToDict(task)))
            return 0
        rows = [
            {
                "task": t.task_id,
                "model": t.model_id,
                "state": orchestrator_pb2.TaskState.Name(t.state)
                .removeprefix("TASK_STATE_")
                .lower(),
                "tenant": t.tenant,
                "where": f"{t.node_id}/{t.pool_id}"
                if t.pool_id
                else (
                    f"#{t.queue_position}" if t.state == orchestrator_pb2.TASK_STATE_QUEUED else ""
                ),
                "tokens": t.tokens_out,
                "note": t.error.reason or t.wait_reason,
            }
            for t in tasks
        ]
        _print_table(rows, ["task", "model", "state", "tenant", "where", "tokens", "note"])
        return 0

    return asyncio.run(run())


def _cmd_tasks_get(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    address = args.orchestrator or ClientSettings().orchestrator

    async def run() -> int:
        async with client_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            try:
                got = await stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=args.task_id))
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)
        print(json.dumps(json_format.MessageToDict(got.task), indent=2))
        return 0

    return asyncio.run(run())


def _rpc_failed(err: grpc.aio.AioRpcError) -> int:
    print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
    return 1


def _cmd_generate(args: argparse.Namespace) -> int:
    from llorch.common.v1 import common_pb2
    from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    client = ClientSettings()
    address = args.orchestrator or client.orchestrator
    sampling = common_pb2.SamplingParams(stop=args.stop, ignore_eos=args.ignore_eos)
    for field in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(sampling, field, value)
    request = orchestrator_pb2.GenerateRequest(
        model_id=args.model,
        prompt=args.prompt,
        sampling=sampling,
        priority=common_pb2.PRIORITY_BATCH
        if args.priority == "batch"
        else common_pb2.PRIORITY_INTERACTIVE,
    )

    async def run() -> int:
        from google.protobuf import json_format

        async with client_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            started = time.perf_counter()
            try:
                async for response in stub.Generate(request, timeout=args.timeout):
                    event = response.event
                    if args.json:
                        print(json_format.MessageToJson(event, indent=None), flush=True)
                        continue
                    kind = event.WhichOneof("kind")
                    if kind == "token":
                        sys.stdout.write(event.token.text)
                        sys.stdout.flush()
                    elif kind == "finished":
                        f = event.finished
                        print()
                        print(
                            f"[{f.tokens_out} tokens, ttft {f.ttft_ms:.1f} ms, "
                            f"total {(time.perf_counter() - started) * 1000:.0f} ms]",
                            file=sys.stderr,
                        )
            except grpc.aio.AioRpcError as err:
                if not args.json:
                    print()
                return _rpc_failed(err)
        return 0

    return asyncio.run(run())


def _catalog_address(args: argparse.Namespace) -> str:
    client = ClientSettings()
    if args.catalog or client.catalog:
        return str(args.catalog or client.catalog)
    from mesh.home import endpoints_path

    path = endpoints_path(args.data_dir or client.data_dir)
    try:
        return str(json.loads(path.read_text())["catalog"])
    except (OSError, ValueError, KeyError):
        raise ConfigError(
            f"no catalog address: pass --catalog, set LLORCH_CATALOG, or run `llorch up` "
            f"(which records it in {path})"
        ) from None


def _cmd_models_list(args: argparse.Namespace) -> int:
    from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

    address = _catalog_address(args)

    async def run() -> int:
        rows: list[dict[str, Any]] = []
        async with client_channel(address) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            token = ""
            try:
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
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_table(
                rows,
                [
                    "model_id",
                    "state",
                    "pinned",
                    "architecture",
                    "file_type",
                    "context_length",
                    "size_bytes",
                ],
            )
        return 0

    return asyncio.run(run())


def _cmd_gc(args: argparse.Namespace) -> int:
    from llorch.poolmanager.v1 import poolmanager_pb2, poolmanager_pb2_grpc

    address = args.pool_manager or _home_endpoint(args, "pool_manager")

    async def run() -> int:
        async with client_channel(address) as channel:
            stub = poolmanager_pb2_grpc.PoolManagerServiceStub(channel)
            try:
                done = await stub.CollectGarbage(
                    poolmanager_pb2.CollectGarbageRequest(dry_run=args.dry_run), timeout=300
                )
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)
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
        return 0

    return asyncio.run(run())


def _cmd_gc_policy(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

    address = _catalog_address(args)
    changes = {
        "max_disk_usage_pct": args.max_disk_usage_pct,
        "min_free_bytes": args.min_free_bytes,
        "keep_active": None if args.keep_active is None else args.keep_active == "true",
        "keep_used_within_days": args.keep_used_within_days,
        "delete_retired_after_days": args.delete_retired_after_days,
    }

    async def run() -> int:
        async with client_channel(address) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            try:
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
                            catalog_pb2.SetGcPolicyRequest(node_id=args.node, policy=policy),
                            timeout=10,
                        )
                    ).policy
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)
        shown = json_format.MessageToDict(
            policy, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(shown, indent=2))
        return 0

    return asyncio.run(run())


def _home_endpoint(args: argparse.Namespace, name: str) -> str:
    from mesh.home import endpoints_path

    path = endpoints_path(args.data_dir or ClientSettings().data_dir)
    try:
        return str(json.loads(path.read_text())[name])
    except (OSError, ValueError, KeyError):
        raise ConfigError(
            f"no {name} address: pass it, or run `llorch up` (which records it in {path})"
        ) from None


def _cmd_engines(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

    from catalog.servicer import engine_to_pb
    from provisioners.engines import EngineCheckError, check_engine

    address = _catalog_address(args)
    problem = ""
    if args.action == "check":
        try:
            facts = check_engine()
        except EngineCheckError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        problem = facts.problem()

    async def run() -> list[catalog_pb2.Engine] | int:
        async with client_channel(address) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            try:
                if args.action == "check":
                    request = catalog_pb2.RegisterEngineRequest(
                        engine=engine_to_pb(facts.record(args.node_id))
                    )
                    return [(await stub.RegisterEngine(request, timeout=10)).engine]
                listed = await stub.ListEngines(
                    catalog_pb2.ListEnginesRequest(node_id=args.node), timeout=10
                )
                return list(listed.engines)
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)

    engines = asyncio.run(run())
    if isinstance(engines, int):
        return engines
    if args.json:
        print(json.dumps([json_format.MessageToDict(e) for e in engines], indent=2))
    else:
        _print_table(
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
    if problem:
        print(f"note: {problem}", file=sys.stderr)
    return 0


def _cmd_models_rm(args: argparse.Namespace) -> int:
    from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc

    address = args.orchestrator or ClientSettings().orchestrator

    async def run() -> int:
        async with client_channel(address) as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            try:
                request = control_pb2.DeleteModelRequest(model_id=args.name, drain=args.drain)
                if args.drain:  # draining and unloading pools takes a while
                    done = await _with_progress(
                        f"draining and deleting {args.name}", stub.DeleteModel, request
                    )
                else:
                    done = await stub.DeleteModel(request, timeout=300)
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)
        for pool in done.drained_pools:
            print(f"unloaded {pool}")
        if done.tasks_ended:
            print(f"ended {done.tasks_ended} tasks")
        for file in done.files:
            print(f"forgot {file}")
        print(f"{args.name}: deleted")
        return 0

    return asyncio.run(run())


def _cmd_models_write_tiny(args: argparse.Namespace) -> int:
    from provisioners.tiny_model import write_tiny_model

    path = write_tiny_model(args.path)
    print(f"{path}: {path.stat().st_size} bytes (tiny-llama, random weights)")
    return 0


def _cmd_models_pull(args: argparse.Namespace) -> int:
    from llorch.catalog.v1 import catalog_pb2_grpc
    from tqdm import tqdm

    from mesh.errors import LlorchError
    from provisioners.models import pull_model
    from provisioners.pull import PullError

    address = _catalog_address(args)
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

    def close_bar() -> None:
        for bar in bars:
            bar.close()

    async def run() -> int:
        async with client_channel(address) as channel:
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
                close_bar()
                print(f"error: {exc.reason}: {exc}", file=sys.stderr)
                return 1
            except LlorchError as err:
                close_bar()
                print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
                return 1
        close_bar()
        print(f"{model.model_id}: {model.size_bytes} bytes, sha256 {model.sha256}")
        return 0

    return asyncio.run(run())


_MODEL_STATES = {"active": 1, "retired": 2}  # catalog_pb2.MODEL_STATE_*


def _cmd_models_set(args: argparse.Namespace) -> int:
    from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

    address = _catalog_address(args)

    async def run() -> int:
        async with client_channel(address) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            try:
                if args.verb in ("retire", "activate"):
                    state = catalog_pb2.MODEL_STATE_RETIRED
                    if args.verb == "activate":
                        state = catalog_pb2.MODEL_STATE_ACTIVE
                    model = (
                        await stub.SetModelState(
                            catalog_pb2.SetModelStateRequest(model_id=args.name, state=state),
                            timeout=10,
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
            except grpc.aio.AioRpcError as err:
                return _rpc_failed(err)
        state_name = catalog_pb2.ModelState.Name(model.state).removeprefix("MODEL_STATE_").lower()
        print(f"{model.model_id}: {state_name}{', pinned' if model.pinned else ''}")
        return 0

    return asyncio.run(run())


def _cmd_models_add(args: argparse.Namespace) -> int:
    from llorch.catalog.v1 import catalog_pb2_grpc

    from mesh.errors import LlorchError
    from provisioners.models import register_local_file

    address = _catalog_address(args)

    async def run() -> int:
        async with client_channel(address) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            try:
                model = await register_local_file(stub, args.name, args.path, args.node_id)
            except LlorchError as err:
                print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
                return 1
        print(
            f"registered {model.model_id} ({model.size_bytes} bytes, sha256 {model.sha256[:12]}…)"
        )
        return 0

    return asyncio.run(run())


async def _with_progress(label: str, call: Any, request: Any) -> Any:
    """Makes a long call, saying on stderr that it waits and for how long: a line that counts
    the seconds on a terminal, a line before and after otherwise."""
    started = time.monotonic()
    live = sys.stderr.isatty()
    if not live:
        print(f"{label} …", file=sys.stderr, flush=True)
    task = asyncio.ensure_future(call(request))
    while not task.done():
        if live:
            print(f"\r{label} … {time.monotonic() - started:.1f} s", end="", file=sys.stderr)
        await asyncio.wait({task}, timeout=0.5)
    ok = task.exception() is None
    end = "\r" if live else ""
    print(
        f"{end}{label}: {'done' if ok else 'failed'} in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return task.result()


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


if __name__ == "__main__":
    sys.exit(main())

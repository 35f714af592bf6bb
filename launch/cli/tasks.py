"""``llorch tasks``: one task's state, or the tasks the orchestrator holds."""

from __future__ import annotations

import argparse
import json
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
    """Adds ``tasks get`` and ``tasks list``."""
    tasks = sub.add_parser("tasks", help="tasks")
    tasks_sub = tasks.add_subparsers(title="tasks commands")
    tget = tasks_sub.add_parser(
        "get", parents=[ORCHESTRATOR], help="print one task's state as JSON"
    )
    tget.add_argument("task_id")
    tget.set_defaults(run=_cmd_tasks_get)
    tlist = tasks_sub.add_parser(
        "list", parents=[ORCHESTRATOR, JSON], help="list tasks, newest first (JSON: one per line)"
    )
    tlist.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    tlist.add_argument("--model", default="", help="only tasks of this model")
    tlist.add_argument("--limit", type=int, default=50, help="most tasks to print")
    tlist.set_defaults(run=_cmd_tasks_list)


def _cmd_tasks_list(args: argparse.Namespace) -> int:
    from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    state = 0
    if args.state:
        state = orchestrator_pb2.TaskState.Value(f"TASK_STATE_{args.state.upper()}")
    limit = max(1, args.limit)

    async def run(channel: grpc.aio.Channel) -> None:
        tasks: list[Any] = []
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        token = ""
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
        if args.json:
            print_messages(tasks, lines=True)
            return
        queued = orchestrator_pb2.TASK_STATE_QUEUED
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
                else (f"#{t.queue_position}" if t.state == queued else ""),
                "tokens": t.tokens_out,
                "note": t.error.reason or t.wait_reason,
            }
            for t in tasks
        ]
        print_table(rows, ["task", "model", "state", "tenant", "where", "tokens", "note"])

    return call(orchestrator_address(args), run)


def _cmd_tasks_get(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    async def run(channel: grpc.aio.Channel) -> None:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        got = await stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=args.task_id))
        print(json.dumps(json_format.MessageToDict(got.task), indent=2))

    return call(orchestrator_address(args), run)

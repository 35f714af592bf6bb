"""Prefix reuse end to end: the worker keeps a finished chat warm, the next turn reads only what
is new (Finished.tokens_cached), the pool reports what it holds (ListPools, metrics) and the
orchestrator's placement names the blocks it found (GetTask.prefix_hit_blocks)."""

from __future__ import annotations

import asyncio

from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc
from llorch.orchestrator.v1 import orchestrator_pb2 as pb
from prometheus_client import generate_latest

from poolmanager.metrics import pool_manager_registry
from tests.conftest import Mesh
from tests.e2e.helpers import collect

SYSTEM = "You answer briefly and you know the river and the mountain well. " * 20  # ~1.3 KB


def turn(messages: list[pb.ChatMessage]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model_id="tiny-llama",
        messages=messages,
        sampling=common_pb2.SamplingParams(max_tokens=16, temperature=0.0),
    )


async def pools(mesh: Mesh) -> list[control_pb2.PoolStatus]:
    stub = control_pb2_grpc.ControlServiceStub(mesh.channel)
    return list((await stub.ListPools(control_pb2.ListPoolsRequest(), timeout=10)).pools)


async def test_a_follow_up_turn_reuses_the_conversation_and_placement_names_the_hit(
    mesh: Mesh,
) -> None:
    messages = [
        pb.ChatMessage(role=pb.ROLE_SYSTEM, content=SYSTEM),
        pb.ChatMessage(role=pb.ROLE_USER, content="Is the river quiet?"),
    ]
    first = await collect(mesh.stub.Generate(turn(messages), timeout=60))
    assert first.finished.tokens_cached == 0
    # The pool's summary reaches the orchestrator on the node's watch stream.
    async with asyncio.timeout(20):
        while not (await pools(mesh))[0].prefix_cache_entries:  # noqa: ASYNC110  # a remote state
            await asyncio.sleep(0.05)
    messages += [
        pb.ChatMessage(role=pb.ROLE_ASSISTANT, content=first.text),
        pb.ChatMessage(role=pb.ROLE_USER, content="And the mountain?"),
    ]
    second = await collect(mesh.stub.Generate(turn(messages), timeout=60))
    finished = second.finished
    # The system prompt and the first turn were not read again.
    assert finished.tokens_cached > finished.tokens_in // 2
    task_id = second.events[0].task_id
    task = (await mesh.stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=10)).task
    assert task.finished.tokens_cached == finished.tokens_cached
    assert task.prefix_hit_blocks >= len(SYSTEM.encode()) // 256
    (status,) = await pools(mesh)
    assert status.prefix_lookup_tokens >= first.finished.tokens_in + finished.tokens_in
    assert status.prefix_hit_tokens == finished.tokens_cached
    text = generate_latest(pool_manager_registry(mesh.pool_manager.manager)).decode()
    assert f'prefix_cache_hit_tokens_total{{node_id="{status.node_id}",pool="cpu-0"}} ' in text
    hit_line = next(x for x in text.splitlines() if x.startswith("prefix_cache_hit_tokens_total"))
    assert float(hit_line.split()[-1]) == finished.tokens_cached
    assert any(
        x.startswith("prefix_cache_entries{") and float(x.split()[-1]) >= 1
        for x in text.splitlines()
    )

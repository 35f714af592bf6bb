"""Several pool managers, each its own `llorch serve poolmanager` process, behind one orchestrator.

Node a has two pools, node b one, all serving the 32k tiny model as tiny-llama, each pool one slot
(so three tasks fill the fleet). Shown here: load
spreads over the three pools; a pool manager SIGKILLed with running and queued tasks ends the
running ones retriable while the queued ones complete on the other node; a pool manager that
hangs (SIGSTOP) before a task's first token costs that task only a longer wait on another node.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from llorch.catalog.v1 import catalog_pb2_grpc
from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from catalog.app import CatalogApp, start_catalog
from mesh.server import open_channel
from mesh.settings import OrchestratorSettings, Settings
from orchestrator.app import OrchestratorApp, start_orchestrator
from provisioners.models import register_local_file
from provisioners.tiny_model import DEFAULT_MODEL_ID
from tests.e2e.helpers import collect, error_details, generate_request, start_llorch

LONG = 30_000


@dataclass
class Fleet:
    catalog: CatalogApp
    nodes: dict[str, subprocess.Popen[str]]
    orchestrator: OrchestratorApp
    channel: grpc.aio.Channel
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub


def _pool_manager(
    node_id: str, pools: list[str], catalog: str
) -> tuple[subprocess.Popen[str], str]:
    return start_llorch(
        ["serve", "poolmanager"],
        {
            "LLORCH_POOL_MANAGER__NODE_ID": node_id,
            "LLORCH_POOL_MANAGER__CATALOG": catalog,
            "LLORCH_POOL_MANAGER__POOLS": json.dumps(
                [
                    {"pool_id": p, "model_id": DEFAULT_MODEL_ID, "n_threads": 1, "slots": 1}
                    for p in pools
                ]
            ),
            "LLORCH_LOG_LEVEL": "WARNING",
        },
    )


@pytest.fixture
async def fleet(tmp_path: Path, long_model: Path) -> AsyncIterator[Fleet]:
    catalog = await start_catalog(Settings(data_dir=tmp_path, listen="127.0.0.1:0"))
    channel = open_channel(catalog.address)
    stub = catalog_pb2_grpc.CatalogServiceStub(channel)
    for node in ("node-a", "node-b"):
        await register_local_file(stub, DEFAULT_MODEL_ID, long_model, node)
    await channel.close()
    nodes: dict[str, subprocess.Popen[str]] = {}
    addresses = []
    try:
        for node, pools in (("node-a", ["cpu-0", "cpu-1"]), ("node-b", ["cpu-0"])):
            nodes[node], address = _pool_manager(node, pools, catalog.address)
            addresses.append(address)
        orch = await start_orchestrator(
            OrchestratorSettings(
                catalog=catalog.address,
                pool_managers=addresses,
                node_heartbeat_s=0.2,
                node_lost_s=1.0,
                journal_path=tmp_path / "journal.db",
            ),
            "127.0.0.1:0",
        )
        # Every pool ready before the tests place work.
        async with asyncio.timeout(60):
            while sum(v.ready for v in orch.orchestrator.registry.views()) < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        client = grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}")
        yield Fleet(
            catalog, nodes, orch, client, orchestrator_pb2_grpc.OrchestratorServiceStub(client)
        )
        await client.close()
        await orch.stop()
    finally:
        for proc in nodes.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        await catalog.stop()


async def _hold(fleet: Fleet) -> tuple[grpc.aio.UnaryStreamCall, str, str]:
    """Starts a long generation; returns its call, task id and node once its first token came."""
    call = fleet.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True))
    node = ""
    async for response in call:
        event = response.event
        if event.WhichOneof("kind") == "started":
            node = event.started.node_id
        if event.WhichOneof("kind") == "token":
            return call, event.task_id, node
    raise AssertionError("ended before its first token")


async def _submit(fleet: Fleet, name: str) -> str:
    response = await fleet.stub.SubmitTask(
        orchestrator_pb2.SubmitTaskRequest(
            model_id=DEFAULT_MODEL_ID,
            prompt=f"task {name}",
            sampling=generate_request(max_tokens=5).sampling,
        )
    )
    return str(response.task_id)


async def _drain(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError | None:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        return err
    return None


async def test_load_spreads_over_every_pool(fleet: Fleet) -> None:
    holds = [await _hold(fleet) for _ in range(3)]
    pools = set()
    for _, task_id, _ in holds:
        task = (await fleet.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=task_id))).task
        pools.add((task.node_id, task.pool_id))
    assert pools == {("node-a", "cpu-0"), ("node-a", "cpu-1"), ("node-b", "cpu-0")}
    for call, _, _ in holds:
        call.cancel()


async def test_a_killed_pool_manager_fails_running_tasks_and_queued_ones_run_elsewhere(
    fleet: Fleet,
) -> None:
    holds = [await _hold(fleet) for _ in range(3)]
    queued = [await _submit(fleet, str(i)) for i in range(3)]
    fleet.nodes["node-a"].kill()
    fleet.nodes["node-a"].wait()
    for call, task_id, node in holds:
        if node != "node-a":
            continue
        err = await _drain(call)
        assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(err)["retriable"] is True
        task = (await fleet.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=task_id))).task
        assert task.state == orchestrator_pb2.TASK_STATE_FAILED
        assert task.tokens_out > 0  # the journal knows how far it got
    # Free node b: the queued tasks run there, all of them, one after another.
    for call, _, node in holds:
        if node == "node-b":
            call.cancel()
    for task_id in queued:
        done = await collect(
            fleet.stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=task_id))
        )
        assert done.kinds[-1] == "finished"
        done.assert_contiguous()
        started = [e.started for e in done.events if e.WhichOneof("kind") == "started"]
        assert [s.node_id for s in started] == ["node-b"]


async def test_a_hung_pool_manager_costs_a_task_without_tokens_only_a_longer_wait(
    fleet: Fleet,
) -> None:
    # Node b busy; node a hangs (SIGSTOP) but still looks alive for node_lost_s.
    holds = [await _hold(fleet) for _ in range(3)]
    b_hold = next(h for h in holds if h[2] == "node-b")
    for call, _, node in holds:
        if node == "node-a":
            call.cancel()
    await asyncio.sleep(0.3)  # node a reports its two pools free again
    os.kill(fleet.nodes["node-a"].pid, signal.SIGSTOP)
    waiting = fleet.stub.Generate(generate_request(max_tokens=5))
    reader = asyncio.create_task(collect(waiting))
    await asyncio.sleep(1.5)  # node a is found lost; the task goes back to the queue
    b_hold[0].cancel()  # node b frees up and takes it
    done = await asyncio.wait_for(reader, 30)
    started = [e.started.node_id for e in done.events if e.WhichOneof("kind") == "started"]
    assert started == ["node-a", "node-b"]
    assert done.kinds[-1] == "finished"
    done.assert_contiguous()
    # Queued, Started on a, Queued again (its position may be updated), Started on b, tokens.
    second_start = done.kinds.index("started", 2)
    assert done.kinds[:3] == ["queued", "started", "queued"]
    assert set(done.kinds[2:second_start]) == {"queued"}
    assert "token" not in done.kinds[:second_start]

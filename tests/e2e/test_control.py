"""ControlService and the operator commands: list, drain, resume, capabilities."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import grpc
import pytest
from llorch.orchestrator.v1 import (
    control_pb2,
    control_pb2_grpc,
    orchestrator_pb2,
)

from mesh.settings import CPU_DEFAULT_SLOTS
from provisioners.tiny_model import DEFAULT_MODEL_ID as MODEL
from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from tests.conftest import Mesh
from tests.e2e.helpers import collect, error_details, generate_request, register_model, run_llorch

LONG = 30_000


def control(mesh: Mesh) -> control_pb2_grpc.ControlServiceStub:
    return control_pb2_grpc.ControlServiceStub(mesh.channel)


async def test_list_get_and_capabilities(mesh: Mesh) -> None:
    node = mesh.pool_manager.manager.node_id
    pools = (await control(mesh).ListPools(control_pb2.ListPoolsRequest())).pools
    assert [(p.node_id, p.pool_id, p.model_id, p.state) for p in pools] == [
        (node, "cpu-0", "tiny-llama", "ready")
    ]
    assert pools[0].reachable and not pools[0].drained
    # A CPU pool that leaves slots unset decodes CPU_DEFAULT_SLOTS sequences at once.
    assert pools[0].slots_total == CPU_DEFAULT_SLOTS == 4 and list(pools[0].devices) == ["cpu"]
    got = await control(mesh).GetPool(control_pb2.GetPoolRequest(node_id=node, pool_id="cpu-0"))
    assert got.pool == pools[0]
    caps = (await control(mesh).GetCapabilities(control_pb2.GetCapabilitiesRequest())).models
    assert [(c.model_id, c.pools, c.pools_ready) for c in caps] == [("tiny-llama", 1, 1)]
    assert caps[0].max_context_tokens == pools[0].n_ctx > 0
    assert list(caps[0].engine_versions) == [pools[0].engine_version]


async def test_bad_pool_references(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await control(mesh).GetPool(control_pb2.GetPoolRequest(node_id="nope", pool_id="cpu-0"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(missing.value)["reason"] == "POOL_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await control(mesh).DrainPool(control_pb2.DrainPoolRequest(pool_id="cpu-0"))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(empty.value)["fields"] == ["node_id"]
    node = mesh.pool_manager.manager.node_id
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await control(mesh).DrainPool(
            control_pb2.DrainPoolRequest(node_id=node, pool_id="cpu-0", deadline_ms=10**9)
        )
    assert error_details(too_long.value)["fields"] == ["deadline_ms"]


async def test_drain_ends_running_work_at_the_deadline_and_resume_serves_the_queue(
    long_mesh: Mesh,
) -> None:
    mesh = long_mesh
    node = mesh.pool_manager.manager.node_id
    hog = mesh.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True))
    async for response in hog:
        if response.event.WhichOneof("kind") == "token":
            break
    drained = await control(mesh).DrainPool(
        control_pb2.DrainPoolRequest(node_id=node, pool_id="cpu-0", deadline_ms=300)
    )
    assert drained.pool.drained
    # New work waits; the drained pool is named as the reason.
    waiting = await mesh.stub.SubmitTask(
        orchestrator_pb2.SubmitTaskRequest(
            model_id="tiny-llama", prompt="after", sampling=generate_request(max_tokens=3).sampling
        )
    )
    # The running task is cancelled at the deadline, retriable.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for _ in hog:
            pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(ended.value)["reason"] == "POOL_DRAINED"
    await asyncio.sleep(0.2)
    task = (await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=waiting.task_id))).task
    assert task.state == orchestrator_pb2.TASK_STATE_QUEUED
    assert [e.reason for e in task.excluded_pools] == ["draining"]
    resumed = await control(mesh).ResumePool(
        control_pb2.ResumePoolRequest(node_id=node, pool_id="cpu-0")
    )
    assert not resumed.pool.drained
    done = await collect(
        mesh.stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=waiting.task_id))
    )
    assert done.kinds[-1] == "finished"


async def test_operator_commands(mesh: Mesh) -> None:
    node = mesh.pool_manager.manager.node_id
    listed = await asyncio.to_thread(run_llorch, "pools", "list", "--orchestrator", mesh.address)
    assert listed.returncode == 0, listed.stderr
    assert f"{node}/cpu-0" in listed.stdout and "tiny-llama" in listed.stdout
    drained = await asyncio.to_thread(
        run_llorch,
        "pools",
        "drain",
        f"{node}/cpu-0",
        "--deadline",
        "1",
        "--orchestrator",
        mesh.address,
    )
    assert drained.returncode == 0, drained.stderr
    assert "drained" in drained.stdout
    resumed = await asyncio.to_thread(
        run_llorch, "pools", "resume", f"{node}/cpu-0", "--orchestrator", mesh.address
    )
    assert resumed.returncode == 0 and "drained" not in resumed.stdout
    reloaded = await asyncio.to_thread(
        run_llorch,
        "pools",
        "reload",
        f"{node}/cpu-0",
        "tiny-llama",
        "--deadline",
        "1",
        "--orchestrator",
        mesh.address,
    )
    assert reloaded.returncode == 0, reloaded.stderr
    assert "ready" in reloaded.stdout
    # A long operation says what it waits for, and how long it took.
    assert re.search(rf"reloading {node}/cpu-0 to tiny-llama: done in \d+\.\d s", reloaded.stderr)
    preloaded = await asyncio.to_thread(
        run_llorch, "pools", "preload", "tiny-llama", "--orchestrator", mesh.address
    )
    assert preloaded.returncode == 0 and f"{node}/cpu-0" in preloaded.stdout, preloaded.stderr
    unknown = await asyncio.to_thread(
        run_llorch, "pools", "preload", "no-such", "--orchestrator", mesh.address
    )
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    missing = await asyncio.to_thread(
        run_llorch, "pools", "drain", "x/y", "--orchestrator", mesh.address
    )
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    done = await collect(mesh.stub.Generate(generate_request(max_tokens=2)))
    task = await asyncio.to_thread(
        run_llorch, "tasks", "get", done.events[0].task_id, "--orchestrator", mesh.address
    )
    assert task.returncode == 0, task.stderr
    assert '"state": "TASK_STATE_SUCCEEDED"' in task.stdout


async def _wait_state(mesh: Mesh, state: str) -> control_pb2.PoolStatus:
    node = mesh.pool_manager.manager.node_id
    request = control_pb2.GetPoolRequest(node_id=node, pool_id="cpu-0")
    for _ in range(200):
        pool = (await control(mesh).GetPool(request)).pool
        if pool.state == state:
            return pool
        await asyncio.sleep(0.05)
    raise AssertionError(f"pool never became {state}: {pool}")


async def test_reload_and_preload_change_what_the_pool_serves(mesh: Mesh, tmp_path: Path) -> None:
    node = mesh.pool_manager.manager.node_id
    await register_model(
        mesh, "other-llama", write_tiny_model(tmp_path / "o.gguf", TinyModelSpec(9))
    )
    reloaded = await control(mesh).ReloadPool(
        control_pb2.ReloadPoolRequest(
            node_id=node, pool_id="cpu-0", model_id="other-llama", deadline_ms=1000
        )
    )
    assert (reloaded.pool.model_id, reloaded.pool.state) == ("other-llama", "ready")
    assert reloaded.pool.cpu_only and not reloaded.pool.drained
    got = await collect(mesh.stub.Generate(generate_request(model_id="other-llama", max_tokens=3)))
    assert got.finished.tokens_out == 3
    # PreloadModel without a pool swaps the idle pool back, then finds it loaded.
    swapped = await control(mesh).PreloadModel(control_pb2.PreloadModelRequest(model_id=MODEL))
    assert (swapped.pool.model_id, swapped.pool.state) == (MODEL, "ready")
    assert swapped.replaced_model_id == "other-llama" and not swapped.already_loaded
    again = await control(mesh).PreloadModel(control_pb2.PreloadModelRequest(model_id=MODEL))
    assert again.already_loaded and again.replaced_model_id == ""

    # An unloaded pool is loaded with the model named.
    await mesh.pool_manager.manager.drain("cpu-0", 0)
    await _wait_state(mesh, "unloaded")
    loaded = await control(mesh).PreloadModel(
        control_pb2.PreloadModelRequest(model_id="other-llama", node_id=node, pool_id="cpu-0")
    )
    assert (loaded.pool.model_id, loaded.pool.state) == ("other-llama", "ready")
    assert not loaded.already_loaded and loaded.replaced_model_id == ""

    # A reload to a model that cannot load rolls back, and the operator is told why.
    # Registered whole, then damaged on disk: the header reads, llama.cpp refuses the load.
    broken = write_tiny_model(tmp_path / "broken.gguf", TinyModelSpec(11))
    await register_model(mesh, "broken-llama", broken)
    broken.write_bytes(broken.read_bytes()[:4096] + os.urandom(4096))
    with pytest.raises(grpc.aio.AioRpcError) as rolled_back:
        await control(mesh).ReloadPool(
            control_pb2.ReloadPoolRequest(node_id=node, pool_id="cpu-0", model_id="broken-llama")
        )
    assert rolled_back.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(rolled_back.value)["reason"] == "RELOAD_ROLLED_BACK"
    pool = await _wait_state(mesh, "ready")
    assert pool.model_id == "other-llama" and "rolled back" in pool.last_error


async def test_preload_never_evicts_a_busy_model(long_mesh: Mesh, tmp_path: Path) -> None:
    mesh = long_mesh
    await register_model(
        mesh, "other-llama", write_tiny_model(tmp_path / "o.gguf", TinyModelSpec(9))
    )
    hog = mesh.stub.Generate(generate_request(max_tokens=LONG, ignore_eos=True))
    async for response in hog:
        if response.event.WhichOneof("kind") == "token":
            break
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await control(mesh).PreloadModel(control_pb2.PreloadModelRequest(model_id="other-llama"))
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(busy.value)["reason"] == "NO_POOL_FOR_PRELOAD"
    assert "a busy model is never evicted" in busy.value.details()
    hog.cancel()


async def test_bad_reload_and_preload_requests_name_the_field(mesh: Mesh) -> None:
    node = mesh.pool_manager.manager.node_id
    cases = [
        (control_pb2.PreloadModelRequest(), "PreloadModel", ["model_id"]),
        (
            control_pb2.PreloadModelRequest(model_id=MODEL, node_id=node),
            "PreloadModel",
            ["pool_id"],
        ),
        (control_pb2.ReloadPoolRequest(node_id=node, pool_id="cpu-0"), "ReloadPool", ["model_id"]),
        (
            control_pb2.ReloadPoolRequest(
                node_id=node, pool_id="cpu-0", model_id=MODEL, deadline_ms=10**9
            ),
            "ReloadPool",
            ["deadline_ms"],
        ),
    ]
    for request, method, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await getattr(control(mesh), method)(request)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert error_details(bad.value)["fields"] == fields
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await control(mesh).ReloadPool(
            control_pb2.ReloadPoolRequest(node_id=node, pool_id="cpu-0", model_id="no-such")
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as no_pool:
        await control(mesh).PreloadModel(
            control_pb2.PreloadModelRequest(model_id=MODEL, node_id=node, pool_id="nope")
        )
    assert no_pool.value.code() == grpc.StatusCode.NOT_FOUND


async def test_one_change_of_a_pool_at_a_time(mesh: Mesh) -> None:
    node = mesh.pool_manager.manager.node_id
    registry = mesh.orchestrator.orchestrator.registry
    # As while an on-demand load runs on the pool (set directly: a load on the tiny model
    # is over before a second request could be sent).
    registry.set_changing(f"{node}/cpu-0", "other-llama")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await control(mesh).ReloadPool(
                control_pb2.ReloadPoolRequest(node_id=node, pool_id="cpu-0", model_id=MODEL)
            )
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(busy.value)["reason"] == "POOL_BUSY"
    finally:
        registry.set_changing(f"{node}/cpu-0", None)


async def test_a_reload_whose_caller_gives_up_still_ends_ready(mesh: Mesh, tmp_path: Path) -> None:
    node = mesh.pool_manager.manager.node_id
    other = write_tiny_model(tmp_path / "o.gguf", TinyModelSpec(9))
    await register_model(mesh, "other-llama", other)
    with pytest.raises(grpc.aio.AioRpcError) as gave_up:
        await control(mesh).ReloadPool(
            control_pb2.ReloadPoolRequest(node_id=node, pool_id="cpu-0", model_id="other-llama"),
            timeout=0.05,
        )
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    pool = await _wait_state(mesh, "ready")
    for _ in range(100):  # READY may still be the old model for a moment
        if pool.model_id == "other-llama":
            break
        await asyncio.sleep(0.05)
        pool = await _wait_state(mesh, "ready")
    assert pool.model_id == "other-llama"
    got = await collect(mesh.stub.Generate(generate_request(model_id="other-llama", max_tokens=2)))
    assert got.finished.tokens_out == 2


@pytest.mark.parametrize("mesh", ["local"], indirect=True)
async def test_top_shows_pools_queue_and_throughput(mesh: Mesh) -> None:
    node = mesh.pool_manager.manager.node_id
    busy = True

    async def keep_busy() -> int:
        finished = 0
        while busy:
            done = await collect(mesh.stub.Generate(generate_request(max_tokens=32)))
            finished += done.kinds[-1] == "finished"
        return finished

    worker = asyncio.create_task(keep_busy())
    try:
        top = await asyncio.to_thread(
            run_llorch, "top", "--once", "--interval", "1.5", "--orchestrator", mesh.address
        )
    finally:
        busy = False
        finished = await worker
    assert top.returncode == 0, top.stderr
    head, _, header, row = top.stdout.splitlines()[:4]
    assert head.startswith("llorch top") and "nodes 1/1" in head
    assert header.split() == ["POOL", "MODEL", "STATE", "SLOTS", "QUEUED", "TASKS/S", "TOKENS/S"]
    cells = row.split()
    assert cells[0] == f"{node}/cpu-0" and cells[1] == MODEL
    assert float(cells[5]) > 0 and float(cells[6]) > 0, top.stdout  # it measured the work
    assert finished > 0
    pools = await control_pb2_grpc.ControlServiceStub(mesh.channel).ListPools(
        control_pb2.ListPoolsRequest()
    )
    assert pools.pools[0].tasks_finished >= finished
    assert pools.pools[0].tokens_out >= 32 * finished


@pytest.mark.parametrize("mesh", ["local"], indirect=True)
async def test_tasks_are_listed_newest_first_page_by_page(mesh: Mesh) -> None:
    ids = []
    for _ in range(3):
        done = await collect(mesh.stub.Generate(generate_request(max_tokens=2)))
        ids.append(done.events[0].task_id)
    first = await mesh.stub.ListTasks(orchestrator_pb2.ListTasksRequest(page_size=2))
    assert [t.task_id for t in first.tasks] == ids[::-1][:2] and first.next_page_token
    second = await mesh.stub.ListTasks(
        orchestrator_pb2.ListTasksRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [t.task_id for t in second.tasks] == [ids[0]] and not second.next_page_token
    done_only = await mesh.stub.ListTasks(
        orchestrator_pb2.ListTasksRequest(state=orchestrator_pb2.TASK_STATE_SUCCEEDED)
    )
    assert {t.task_id for t in done_only.tasks} == set(ids)
    for bad, field in (
        (orchestrator_pb2.ListTasksRequest(page_token="not-a-token"), "page_token"),
        (
            orchestrator_pb2.ListTasksRequest(
                page_token=first.next_page_token, state=orchestrator_pb2.TASK_STATE_QUEUED
            ),
            "page_token",
        ),
        (orchestrator_pb2.ListTasksRequest(page_size=1001), "page_size"),
        (orchestrator_pb2.ListTasksRequest(model_id="Not/A/Model"), "model_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.stub.ListTasks(bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(refused.value)["fields"] == [field]
    table = await asyncio.to_thread(
        run_llorch, "tasks", "list", "--limit", "2", "--orchestrator", mesh.address
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["TASK", "MODEL", "STATE", "TENANT", "WHERE", "TOKENS", "NOTE"]
    assert [line.split()[0] for line in lines[1:]] == ids[::-1][:2]
    as_json = await asyncio.to_thread(
        run_llorch,
        "tasks",
        "list",
        "--json",
        "--state",
        "succeeded",
        "--orchestrator",
        mesh.address,
    )
    assert [json.loads(line)["taskId"] for line in as_json.stdout.splitlines()] == ids[::-1]

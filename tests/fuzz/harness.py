"""A real mesh for the fuzz: where each service is served, how a request is sent as bytes, and
the state the fuzz must leave alone.

The state kept across a batch is written under ids made of 64 random bits (``kept-<hex>``), and
the fuzz draws its strings from random text, ``strategies.WORDS`` and the mesh's ``vocabulary``,
which holds none of them: so no fuzzed call can legitimately delete, retire, cancel or
overwrite it (a random string equal to one has probability 2**-64). The ids the fuzz may hit
(the default model, its pool and node, a finished task of its own) let requests get past lookups;
when a batch has legitimately drained, deleted or replaced one of those, the next batch gets a
fresh mesh (``FuzzMeshes.ready``).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc, orchestrator_pb2

from provisioners.tiny_model import DEFAULT_MODEL_ID
from tests.conftest import Mesh, start_mesh, stop_mesh
from tests.fuzz.strategies import Rpc, Vocabulary

CLIENT, NODE, CATALOG, POOL_MANAGER = "client", "node", "catalog", "pool_manager"
SERVED_AT = {
    "llorch.orchestrator.v1.OrchestratorService": CLIENT,
    "llorch.orchestrator.v1.ControlService": CLIENT,
    "llorch.orchestrator.v1.NodeService": NODE,
    "llorch.catalog.v1.CatalogService": CATALOG,
    "llorch.poolmanager.v1.PoolManagerService": POOL_MANAGER,
}
"""Which server serves each service of the generated package (a test checks it names them all)."""

POOL_ID = "cpu-0"
NODE_ID = "local"
UNARY_TIMEOUT_S = 5.0
"""Client deadline of a unary call: long enough for a drain or a reload of the tiny model."""
STREAM_TIMEOUT_S = 2.0
"""Client deadline of a streaming call."""
STREAM_READ_S = 0.3
"""A stream is cancelled after this long (WatchNode never ends by itself)."""
STREAM_MESSAGES = 8
"""A stream is cancelled after this many messages: errors come before or among the first."""


ENDED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


@dataclass
class Kept:
    """State accepted before a batch, and how it read then."""

    model_id: str
    node_id: str
    model: catalog_pb2.Model
    locations: list[catalog_pb2.ModelLocation]
    engines: list[catalog_pb2.Engine]
    gc_policy: catalog_pb2.GetGcPolicyResponse
    requests: dict[str, orchestrator_pb2.SubmitTaskRequest] = field(default_factory=dict)
    """Task id → the request that made it."""
    tasks: dict[str, orchestrator_pb2.Task] = field(default_factory=dict)
    events: dict[str, list[orchestrator_pb2.TaskEvent]] = field(default_factory=dict)


@dataclass
class FuzzMesh:
    """A mesh with one channel per server, the state kept, and the fuzz's vocabulary."""

    mesh: Mesh
    data_dir: Path
    model_path: Path
    channels: dict[str, grpc.aio.Channel]
    vocabulary: Vocabulary = field(default_factory=Vocabulary)
    kept: Kept | None = None

    def channel(self, rpc: Rpc) -> grpc.aio.Channel:
        """The channel to the server of ``rpc``'s service."""
        role = SERVED_AT.get(rpc.service.full_name)
        if role is None:
            pytest.fail(f"{rpc.service.full_name} is not in tests/fuzz/harness.SERVED_AT")
        return self.channels[role]

    async def stop(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        await stop_mesh(self.mesh)


async def send(channel: grpc.aio.Channel, rpc: Rpc, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Sends ``payload`` as ``rpc``'s request; the status it ended with and its message.

    A stream is read until it ends, for ``STREAM_MESSAGES`` messages or for ``STREAM_READ_S``;
    a stream cut short by this client counts as OK (its CANCELLED is ours)."""
    method = rpc.method
    try:
        if method.client_streaming:
            requests = iter([payload])
            if method.server_streaming:
                await _read(channel.stream_stream(rpc.path)(requests, timeout=STREAM_TIMEOUT_S))
            else:
                await channel.stream_unary(rpc.path)(requests, timeout=UNARY_TIMEOUT_S)
        elif method.server_streaming:
            await _read(channel.unary_stream(rpc.path)(payload, timeout=STREAM_TIMEOUT_S))
        else:
            await channel.unary_unary(rpc.path)(payload, timeout=UNARY_TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def _read(call: grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall) -> None:
    try:
        async with asyncio.timeout(STREAM_READ_S):
            for _ in range(STREAM_MESSAGES):
                if await call.read() is grpc.aio.EOF:
                    return
    except TimeoutError:
        pass
    call.cancel()


class FuzzMeshes:
    """One mesh per link, replaced when a batch has left it unable to serve the default model."""

    def __init__(self, root: Path, model: Path) -> None:
        self._root = root
        self._model = model
        self._meshes: dict[str, FuzzMesh] = {}
        self.started = 0

    async def ready(self, link: str) -> FuzzMesh:
        """The link's mesh, as it was started, with its kept state written."""
        current = self._meshes.get(link)
        if current is not None and await pristine(current):
            return current
        if current is not None:
            await current.stop()
        fresh = await self._start(link)
        self._meshes[link] = fresh
        return fresh

    async def stop(self) -> None:
        for fuzz_mesh in self._meshes.values():
            await fuzz_mesh.stop()
        self._meshes.clear()

    async def _start(self, link: str) -> FuzzMesh:
        self.started += 1
        data_dir = self._root / f"{link}-{self.started}"
        models = data_dir / "models"
        models.mkdir(parents=True)
        # A copy of its own: garbage collection or DeleteModel may delete it.
        model_path = models / "tiny-llama.gguf"
        shutil.copyfile(self._model, model_path)
        mesh = await start_mesh(
            data_dir,
            model_path,
            link,
            pool_manager={"staging_dir": data_dir / "staging", "model_store": models},
            node_listen="127.0.0.1:0",
        )
        node_server = mesh.orchestrator.node_server
        assert node_server is not None
        addresses = {
            CLIENT: mesh.address,
            NODE: f"127.0.0.1:{node_server.port}",
            CATALOG: mesh.catalog.address,
            POOL_MANAGER: mesh.pool_manager.address,
        }
        fuzz_mesh = FuzzMesh(
            mesh,
            data_dir,
            model_path,
            {role: grpc.aio.insecure_channel(a) for role, a in addresses.items()},
        )
        await mesh.settle()
        victim = await _finished_task(fuzz_mesh, f"victim-{secrets.token_hex(4)}")
        pool_manager_port = mesh.pool_manager.address.rsplit(":", 1)[1]
        fuzz_mesh.vocabulary = Vocabulary.of(
            {
                # The default model, and one the catalog does not hold (for RegisterModel).
                "model_id": [DEFAULT_MODEL_ID, "fuzz-model"],
                "model_ids": [DEFAULT_MODEL_ID, "fuzz-model"],
                "pool_id": [POOL_ID],
                "node_id": [NODE_ID],
                "task_id": [victim],
                "address": [*addresses.values(), f"localhost:{pool_manager_port}"],
                # Formats the services take, so plausible requests pass their checks.
                "execution_id": ["fuzz-execution"],
                "sha256": ["0" * 64],
                "source_ref": ["hf:org/model/file.gguf"],
                "path": [str(data_dir / "absent.gguf")],
                "backend": ["cpu"],
                "name": ["llama.cpp"],
                "version": ["b1234"],
            }
        )
        fuzz_mesh.kept = await keep(fuzz_mesh)
        return fuzz_mesh


def _kept_request(request_id: str) -> orchestrator_pb2.SubmitTaskRequest:
    return orchestrator_pb2.SubmitTaskRequest(
        model_id=DEFAULT_MODEL_ID,
        prompt=f"Kept task {request_id}",
        sampling=common_pb2.SamplingParams(max_tokens=3, ignore_eos=True, seed=7),
        priority=common_pb2.PRIORITY_BATCH,
        request_id=request_id,
    )


async def _finished_task(fuzz_mesh: FuzzMesh, request_id: str) -> str:
    """Submits a short task and waits for its end (its stream ends with it); its id."""
    stub = fuzz_mesh.mesh.stub
    task_id: str = (await stub.SubmitTask(_kept_request(request_id), timeout=30)).task_id
    async for _ in stub.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=task_id), timeout=30):
        pass
    return task_id


async def _events(fuzz_mesh: FuzzMesh, task_id: str) -> list[orchestrator_pb2.TaskEvent]:
    stub = fuzz_mesh.mesh.stub
    request = orchestrator_pb2.StreamTaskRequest(task_id=task_id)
    return [r.event async for r in stub.StreamTask(request, timeout=30)]


def _catalog(fuzz_mesh: FuzzMesh) -> catalog_pb2_grpc.CatalogServiceStub:
    return catalog_pb2_grpc.CatalogServiceStub(fuzz_mesh.channels[CATALOG])


async def keep(fuzz_mesh: FuzzMesh) -> Kept:
    """Writes the state the fuzz must not change (ids of 64 random bits, see the module's
    docstring) and reads it back."""
    token = secrets.token_hex(8)
    model_id, node_id = f"kept-{token}", f"kept-node-{token}"
    catalog = _catalog(fuzz_mesh)
    await catalog.RegisterModel(
        catalog_pb2.RegisterModelRequest(
            model=catalog_pb2.Model(
                model_id=model_id,
                source_ref=f"hf:kept/{token}/model.gguf",
                sha256=secrets.token_hex(32),
                size_bytes=123_456,
                facts=catalog_pb2.ModelFacts(
                    architecture="llama",
                    context_length=2048,
                    chat_template="{{ messages }}",
                    control_tokens=["<|kept|>"],
                ),
                pinned=True,
            ),
            locations=[
                catalog_pb2.ModelLocation(
                    node_id=node_id, path=f"/kept/{token}.gguf", size_bytes=123_456
                )
            ],
        ),
        timeout=10,
    )
    await catalog.RegisterEngine(
        catalog_pb2.RegisterEngineRequest(
            engine=catalog_pb2.Engine(
                node_id=node_id, name="llama.cpp", version=f"kept-{token}", backend="cpu"
            )
        ),
        timeout=10,
    )
    await catalog.SetGcPolicy(
        catalog_pb2.SetGcPolicyRequest(
            node_id=node_id,
            policy=catalog_pb2.GcPolicy(
                max_disk_usage_pct=42.5, min_free_bytes=77, keep_used_within_days=3.0
            ),
        ),
        timeout=10,
    )
    kept = Kept(model_id, node_id, *await _read_catalog(fuzz_mesh, model_id, node_id))
    for i in range(2):
        request = _kept_request(f"kept-{token}-{i}")
        task_id = await _finished_task(fuzz_mesh, request.request_id)
        kept.requests[task_id] = request
        answer = await fuzz_mesh.mesh.stub.GetTask(
            orchestrator_pb2.GetTaskRequest(task_id=task_id), timeout=10
        )
        kept.tasks[task_id] = answer.task
        kept.events[task_id] = await _events(fuzz_mesh, task_id)
    return kept


async def _read_catalog(
    fuzz_mesh: FuzzMesh, model_id: str, node_id: str
) -> tuple[
    catalog_pb2.Model,
    list[catalog_pb2.ModelLocation],
    list[catalog_pb2.Engine],
    catalog_pb2.GetGcPolicyResponse,
]:
    catalog = _catalog(fuzz_mesh)
    model = await catalog.GetModel(catalog_pb2.GetModelRequest(model_id=model_id), timeout=10)
    located = await catalog.LocateModel(
        catalog_pb2.LocateModelRequest(model_id=model_id), timeout=10
    )
    engines = await catalog.ListEngines(catalog_pb2.ListEnginesRequest(node_id=node_id), timeout=10)
    policy = await catalog.GetGcPolicy(catalog_pb2.GetGcPolicyRequest(node_id=node_id), timeout=10)
    return model.model, list(located.locations), list(engines.engines), policy


async def all_tasks(fuzz_mesh: FuzzMesh, **where: object) -> list[orchestrator_pb2.Task]:
    """Every task ListTasks shows (``where``: its filters), page by page."""
    tasks: list[orchestrator_pb2.Task] = []
    token = ""
    for _ in range(10_000):
        page = await fuzz_mesh.mesh.stub.ListTasks(
            orchestrator_pb2.ListTasksRequest(page_size=1000, page_token=token, **where),
            timeout=10,
        )
        tasks.extend(page.tasks)
        token = page.next_page_token
        if not token:
            return tasks
    raise AssertionError("ListTasks did not stop paging")


async def check_kept(fuzz_mesh: FuzzMesh) -> None:
    """The kept state reads as it did before the batch: catalog records, tasks (by GetTask,
    ListTasks and their events), and each request id still names its task."""
    kept = fuzz_mesh.kept
    assert kept is not None
    model, locations, engines, policy = await _read_catalog(fuzz_mesh, kept.model_id, kept.node_id)
    assert model == kept.model
    assert locations == kept.locations
    assert engines == kept.engines
    assert policy == kept.gc_policy
    stub = fuzz_mesh.mesh.stub
    listed = {t.task_id: t for t in await all_tasks(fuzz_mesh)}
    for task_id, task in kept.tasks.items():
        answer = await stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=task_id), timeout=10)
        assert answer.task == task
        assert listed.get(task_id) == task
        assert await _events(fuzz_mesh, task_id) == kept.events[task_id]
        again = await stub.SubmitTask(kept.requests[task_id], timeout=10)
        assert again.task_id == task_id


async def check_serving(fuzz_mesh: FuzzMesh) -> None:
    """Every server still answers grpc.health.v1 with SERVING."""
    for role, channel in fuzz_mesh.channels.items():
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, role


async def tidy(fuzz_mesh: FuzzMesh) -> None:
    """Cancels the tasks the batch left queued or running (valid fuzzed submissions of up to
    thousands of tokens), so they do not slow the next batch."""
    kept = set(fuzz_mesh.kept.tasks) if fuzz_mesh.kept is not None else set()
    for state in (orchestrator_pb2.TASK_STATE_QUEUED, orchestrator_pb2.TASK_STATE_RUNNING):
        for task in await all_tasks(fuzz_mesh, state=state):
            if task.task_id in kept:
                continue
            try:
                await fuzz_mesh.mesh.stub.CancelTask(
                    orchestrator_pb2.CancelTaskRequest(task_id=task.task_id), timeout=10
                )
            except grpc.aio.AioRpcError as err:
                # It may have ended meanwhile.
                assert err.code() in ENDED, err


async def pristine(fuzz_mesh: FuzzMesh) -> bool:
    """Whether the mesh still serves the default model as it did at start: the file and the
    catalog record there, the one node, its pool ready and not drained."""
    if not fuzz_mesh.model_path.exists():
        return False
    try:
        model = await _catalog(fuzz_mesh).GetModel(
            catalog_pb2.GetModelRequest(model_id=DEFAULT_MODEL_ID), timeout=10
        )
    except grpc.aio.AioRpcError:
        return False
    if model.model.state != catalog_pb2.MODEL_STATE_ACTIVE:
        return False
    control = control_pb2_grpc.ControlServiceStub(fuzz_mesh.channels[CLIENT])
    nodes = await control.ListNodes(control_pb2.ListNodesRequest(), timeout=10)
    pools = await control.ListPools(control_pb2.ListPoolsRequest(), timeout=10)
    return [n.node_id for n in nodes.nodes] == [NODE_ID] and any(
        p.node_id == NODE_ID
        and p.pool_id == POOL_ID
        and p.model_id == DEFAULT_MODEL_ID
        and p.state == "ready"
        and p.reachable
        and not p.drained
        for p in pools.pools
    )

"""A fleet as separate processes, all with mTLS: one catalog, one orchestrator and three pool
managers (`llorch serve`), the pool managers registering themselves. One pool manager is
SIGKILLed while each node streams a long generation: its stream ends UNAVAILABLE (retriable),
the other streams go on, the orchestrator marks the node unreachable within node_lost_s (3 s),
new tasks run elsewhere, and the node, restarted on a new port, registers again and gets work.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llorch.catalog.v1 import catalog_pb2_grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import (
    control_pb2,
    control_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
)

from mesh.apikeys import ApiKeyStore
from mesh.server import open_channel
from mesh.tls import issue
from provisioners.models import register_local_file
from provisioners.tiny_model import DEFAULT_MODEL_ID
from tests.e2e.helpers import collect, error_details, free_port, start_llorch
from tests.e2e.secure_mesh import Pki

NODES = ("node-a", "node-b", "node-c")
LONG = 30_000


def _tls_env(pki: Pki, name: str, log_level: str = "WARNING") -> dict[str, str]:
    return {**pki.env(name), "GRPC_VERBOSITY": "ERROR", "LLORCH_LOG_LEVEL": log_level}


class Fleet:
    def __init__(self, root: Path, model: Path, log_level: str = "WARNING") -> None:
        self.root = root
        self.log_level = log_level
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.pki = Pki(root / "pki")
        for node in NODES[1:]:
            issue(root / "pki" / "ca", "poolmanager", node, root / "pki" / "certs")
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.catalog = ""
        self.orchestrator = ""
        self.node_port = ""
        self.client_key = ""
        self.operator_key = ""

    def start(self, name: str, args: list[str], env: dict[str, str]) -> str:
        env = {**env, "LLORCH_LOG_LEVEL": self.log_level}
        proc, address = start_llorch(args, env, self.logs / f"{name}.log")
        self.procs[name] = proc
        return address.replace("127.0.0.1", "localhost")

    def start_pool_manager(self, node: str) -> None:
        # One slot a node: two streams fill the fleet.
        pools = [{"pool_id": "cpu-0", "model_id": DEFAULT_MODEL_ID, "n_threads": 1, "slots": 1}]
        self.start(
            node,
            ["serve", "poolmanager", "--data-dir", str(self.root / node)],
            {
                **_tls_env(self.pki, node),
                "LLORCH_POOL_MANAGER__NODE_ID": node,
                "LLORCH_POOL_MANAGER__CATALOG": self.catalog,
                "LLORCH_POOL_MANAGER__ORCHESTRATOR": self.node_port,
                "LLORCH_POOL_MANAGER__POOLS": json.dumps(pools),
                "LLORCH_POOL_MANAGER__SPARE_WORKERS": "false",
                "LLORCH_POOL_MANAGER__USAGE_REPORT_S": "3600",
            },
        )

    async def boot(self) -> None:
        self.catalog = await asyncio.to_thread(
            self.start,
            "catalog",
            ["serve", "catalog", "--data-dir", str(self.root / "catalog")],
            {**_tls_env(self.pki, "catalog"), "LLORCH_CATALOG_SERVICE__LISTEN": "127.0.0.1:0"},
        )
        channel = open_channel(self.catalog, tls=self.pki.files("alice"))
        try:
            for node in NODES:
                await register_local_file(
                    catalog_pb2_grpc.CatalogServiceStub(channel), DEFAULT_MODEL_ID, self.model, node
                )
        finally:
            await channel.close()
        keys = ApiKeyStore(self.root / "orch" / "orchestrator" / "keys.db")
        self.client_key, _ = keys.create("team-a", "client")
        self.operator_key, _ = keys.create("ops", "operator")
        keys.close()
        self.node_port = f"localhost:{free_port()}"
        self.orchestrator = await asyncio.to_thread(
            self.start,
            "orchestrator",
            ["serve", "orchestrator", "--data-dir", str(self.root / "orch")],
            {
                **_tls_env(self.pki, "orch"),
                "LLORCH_LISTEN": "127.0.0.1:0",
                "LLORCH_ORCHESTRATOR_SERVICE__CATALOG": self.catalog,
                "LLORCH_ORCHESTRATOR_SERVICE__NODE_LISTEN": self.node_port.replace(
                    "localhost", "127.0.0.1"
                ),
            },
        )
        await asyncio.gather(*(asyncio.to_thread(self.start_pool_manager, n) for n in NODES))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
async def fleet(tmp_path: Path, long_model: Path) -> AsyncIterator[Fleet]:
    running = Fleet(tmp_path, long_model)
    try:
        await running.boot()
        yield running
    finally:
        await asyncio.to_thread(running.stop)


async def _reachable(control: control_pb2_grpc.ControlServiceStub) -> dict[str, bool]:
    listed = await control.ListNodes(control_pb2.ListNodesRequest())
    return {n.node_id: n.reachable for n in listed.nodes}


async def _until(check: object, timeout_s: float) -> float:
    """Polls ``check`` (an async callable returning bool) until true; the seconds it took."""
    start = time.monotonic()
    while not await check():  # type: ignore[operator]
        assert time.monotonic() - start < timeout_s, "timed out"
        await asyncio.sleep(0.1)
    return time.monotonic() - start


async def _started_on(call: grpc.aio.UnaryStreamCall) -> str:
    """Reads a Generate stream until its first token; the node it runs on."""
    node = ""
    async for response in call:
        kind = response.event.WhichOneof("kind")
        if kind == "started":
            node = response.event.started.node_id
        if kind == "token":
            return node
    raise AssertionError("the stream ended before its first token")


def _long() -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(
        model_id=DEFAULT_MODEL_ID,
        prompt="hold",
        sampling=common_pb2.SamplingParams(max_tokens=LONG, ignore_eos=True),
    )


async def test_a_killed_pool_manager_fails_its_streams_only_and_rejoins_after_restart(
    fleet: Fleet,
) -> None:
    client = fleet.pki.key_channel(fleet.orchestrator, fleet.client_key)
    ops = fleet.pki.key_channel(fleet.orchestrator, fleet.operator_key)
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(client)
    control = control_pb2_grpc.ControlServiceStub(ops)
    try:

        async def all_three() -> bool:
            return await _reachable(control) == dict.fromkeys(NODES, True)

        await _until(all_three, 60)
        calls = [stub.Generate(_long()) for _ in NODES]
        placed = dict(
            zip(await asyncio.gather(*(_started_on(c) for c in calls)), calls, strict=True)
        )
        assert set(placed) == set(NODES)  # one long task per node: the load spread

        fleet.procs["node-b"].kill()  # SIGKILL mid-stream
        killed_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in placed["node-b"]:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(ended.value)["retriable"] is True

        async def b_lost() -> bool:
            return (await _reachable(control))["node-b"] is False

        await _until(b_lost, 10)
        assert time.monotonic() - killed_at <= 3.5  # node_lost_s, plus polling
        for node in ("node-a", "node-c"):  # the other streams go on
            response = await anext(aiter(placed[node]))
            assert response.event.WhichOneof("kind") == "token"
            placed[node].cancel()

        short = orchestrator_pb2.GenerateRequest(
            model_id=DEFAULT_MODEL_ID,
            prompt="new",
            sampling=common_pb2.SamplingParams(max_tokens=3),
        )
        for _ in range(2):
            done = await collect(stub.Generate(short))
            started = next(e.started for e in done.events if e.WhichOneof("kind") == "started")
            assert started.node_id in ("node-a", "node-c")
            assert done.finished.tokens_out == 3

        await asyncio.to_thread(fleet.start_pool_manager, "node-b")  # a new port this time
        await _until(all_three, 60)
        again = [stub.Generate(_long()) for _ in NODES]
        nodes = await asyncio.gather(*(_started_on(c) for c in again))
        assert "node-b" in nodes  # it gets work again
        for call in again:
            call.cancel()
        listed = await control.ListNodes(control_pb2.ListNodesRequest())
        assert [n.node_id for n in listed.nodes] == list(NODES)  # the old entry was replaced
        assert all(n.registered for n in listed.nodes)
    finally:
        await client.close()
        await ops.close()


@pytest.fixture
async def chatty_fleet(tmp_path: Path, long_model: Path) -> AsyncIterator[Fleet]:
    """The fleet with every service logging at DEBUG, into files."""
    running = Fleet(tmp_path, long_model, log_level="DEBUG")
    try:
        await running.boot()
        yield running
    finally:
        await asyncio.to_thread(running.stop)


async def test_no_log_line_holds_an_api_key_or_a_prompt(chatty_fleet: Fleet) -> None:
    fleet = chatty_fleet
    prompt = "the secret plan is purple-elephant-42"
    bad_key = fleet.client_key[:-8] + "Zz9Yy8Xx"  # right id, wrong secret
    client = fleet.pki.key_channel(fleet.orchestrator, fleet.client_key)
    bad = fleet.pki.key_channel(fleet.orchestrator, bad_key)
    try:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(client)
        request = orchestrator_pb2.GenerateRequest(
            model_id=DEFAULT_MODEL_ID,
            prompt=prompt,
            sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True),
        )
        done = await collect(stub.Generate(request))
        assert done.finished.tokens_out == 4
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await orchestrator_pb2_grpc.OrchestratorServiceStub(bad).Generate(request).read()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await client.close()
        await bad.close()
    await asyncio.to_thread(fleet.stop)  # every line written
    logs = {p.name: p.read_text() for p in fleet.logs.glob("*.log")}
    assert set(logs) == {"catalog.log", "orchestrator.log", *(f"{n}.log" for n in NODES)}
    everything = "\n".join(logs.values())
    assert "execution finished" in everything  # the workers' lines are here too
    assert '"task_id": ' in logs["orchestrator.log"] and '"correlation_id": ' in everything
    assert "bad API key" in logs["orchestrator.log"]
    for secret in (
        "purple-elephant-42",
        fleet.client_key.split("_", 2)[2],
        bad_key.split("_", 2)[2],
    ):
        assert secret not in everything, secret

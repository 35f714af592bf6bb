"""A pool manager cut off by the network, not killed: it runs in its own network namespace,
joined to this one by a veth pair, and the link goes down mid-stream. Nothing closes the
connections, so only the missing heartbeats tell: within node_lost_s (3 s) the orchestrator marks
the node unreachable and ends its stream UNAVAILABLE (retriable), while the stream on the other
node goes on; once the link is back the node is reachable again and gets work.

Needs root and `ip netns`; skips, saying why, where the machine does not allow them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
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

from launch.harness import LLORCH
from mesh.apikeys import ApiKeyStore
from mesh.server import open_channel
from mesh.tls import issue
from provisioners.models import register_local_file
from provisioners.tiny_model import DEFAULT_MODEL_ID
from tests.e2e.helpers import error_details, free_port
from tests.e2e.secure_mesh import Pki

SUFFIX = f"{os.getpid() % 10000}"
NETNS = f"llorch-test-{SUFFIX}"
HOST_IF, NS_IF = f"llh{SUFFIX}", f"lln{SUFFIX}"
HOST_IP, NS_IP = "10.213.7.1", "10.213.7.2"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def netns() -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip); the kill test covers the rest")
    made = _ip("netns", "add", NETNS)
    if made.returncode != 0:
        pytest.skip(f"this machine does not allow network namespaces: {made.stderr.strip()}")
    try:
        steps = [
            ("link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF),
            ("link", "set", NS_IF, "netns", NETNS),
            ("addr", "add", f"{HOST_IP}/30", "dev", HOST_IF),
            ("link", "set", HOST_IF, "up"),
            ("-n", NETNS, "addr", "add", f"{NS_IP}/30", "dev", NS_IF),
            ("-n", NETNS, "link", "set", NS_IF, "up"),
            ("-n", NETNS, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot build a veth link: ip {' '.join(step)}: {done.stderr.strip()}")
        yield
    finally:
        _ip("link", "del", HOST_IF)
        _ip("netns", "del", NETNS)


def _serve(
    args: list[str], env: dict[str, str], in_netns: bool = False
) -> tuple[subprocess.Popen[str], str]:
    prefix = ["ip", "netns", "exec", NETNS] if in_netns else []
    proc = subprocess.Popen(
        [*prefix, *LLORCH, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR", "LLORCH_LOG_LEVEL": "WARNING", **env},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("llorch ready: "), line
    return proc, line.split()[3]


async def test_a_node_cut_off_by_the_network_is_lost_in_3_s_and_comes_back(
    netns: None, tmp_path: Path, long_model: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    for node, ip in (("node-ns", NS_IP), ("node-host", HOST_IP)):
        issue(pki.root / "ca", "poolmanager", node, pki.root / "certs", sans=(ip,))
    issue(pki.root / "ca", "catalog", "cat", pki.root / "certs", sans=(HOST_IP,))
    issue(pki.root / "ca", "orchestrator", "orch-net", pki.root / "certs", sans=(HOST_IP,))
    procs: list[subprocess.Popen[str]] = []
    try:
        proc, catalog = await asyncio.to_thread(
            _serve,
            ["serve", "catalog", "--data-dir", str(tmp_path / "catalog")],
            {**pki.env("cat"), "LLORCH_CATALOG_SERVICE__LISTEN": f"{HOST_IP}:0"},
        )
        procs.append(proc)
        catalog = catalog.replace("127.0.0.1", HOST_IP)
        channel = open_channel(catalog, tls=pki.files("alice"))
        for node in ("node-ns", "node-host"):
            await register_local_file(
                catalog_pb2_grpc.CatalogServiceStub(channel), DEFAULT_MODEL_ID, long_model, node
            )
        await channel.close()
        keys = ApiKeyStore(tmp_path / "orch" / "orchestrator" / "keys.db")
        client_key, _ = keys.create("team", "client")
        ops_key, _ = keys.create("ops", "operator")
        keys.close()
        node_port = f"{HOST_IP}:{free_port(HOST_IP)}"
        proc, orchestrator = await asyncio.to_thread(
            _serve,
            ["serve", "orchestrator", "--data-dir", str(tmp_path / "orch")],
            {
                **pki.env("orch-net"),
                "LLORCH_LISTEN": "127.0.0.1:0",
                "LLORCH_ORCHESTRATOR_SERVICE__CATALOG": catalog,
                "LLORCH_ORCHESTRATOR_SERVICE__NODE_LISTEN": node_port,
            },
        )
        procs.append(proc)
        # One slot a node: two long streams take one node each.
        pools = json.dumps(
            [{"pool_id": "cpu-0", "model_id": DEFAULT_MODEL_ID, "n_threads": 1, "slots": 1}]
        )
        for node, ip, in_netns in (("node-ns", NS_IP, True), ("node-host", HOST_IP, False)):
            proc, _ = await asyncio.to_thread(
                _serve,
                ["serve", "poolmanager", "--data-dir", str(tmp_path / node)],
                {
                    **pki.env(node),
                    "LLORCH_POOL_MANAGER__NODE_ID": node,
                    "LLORCH_POOL_MANAGER__LISTEN": f"{ip}:7101",
                    "LLORCH_POOL_MANAGER__ADVERTISE_ADDRESS": f"{ip}:7101",
                    "LLORCH_POOL_MANAGER__CATALOG": catalog,
                    "LLORCH_POOL_MANAGER__ORCHESTRATOR": node_port,
                    "LLORCH_POOL_MANAGER__POOLS": pools,
                    "LLORCH_POOL_MANAGER__SPARE_WORKERS": "false",
                },
                in_netns,
            )
            procs.append(proc)

        client = pki.key_channel(orchestrator.replace("127.0.0.1", "localhost"), client_key)
        ops = pki.key_channel(orchestrator.replace("127.0.0.1", "localhost"), ops_key)
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(client)
        control = control_pb2_grpc.ControlServiceStub(ops)

        async def reachable() -> dict[str, bool]:
            listed = await control.ListNodes(control_pb2.ListNodesRequest())
            return {n.node_id: n.reachable for n in listed.nodes}

        async def wait_for(want: dict[str, bool], timeout_s: float) -> float:
            start = time.monotonic()
            while await reachable() != want:
                assert time.monotonic() - start < timeout_s, await reachable()
                await asyncio.sleep(0.1)
            return time.monotonic() - start

        both = {"node-host": True, "node-ns": True}
        await wait_for(both, 60)
        long = orchestrator_pb2.GenerateRequest(
            model_id=DEFAULT_MODEL_ID,
            prompt="hold",
            sampling=common_pb2.SamplingParams(max_tokens=30_000, ignore_eos=True),
        )
        calls = [stub.Generate(long), stub.Generate(long)]
        on: dict[str, grpc.aio.UnaryStreamCall] = {}
        for call in calls:
            async for response in call:
                if response.event.WhichOneof("kind") == "started":
                    on[response.event.started.node_id] = call
                    break
        assert set(on) == set(both)

        assert _ip("link", "set", HOST_IF, "down").returncode == 0  # the cable is pulled
        cut_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in on["node-ns"]:
                pass
        lost_after = time.monotonic() - cut_at
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(ended.value)["retriable"] is True
        assert 2.0 < lost_after < 5.0, lost_after  # node_lost_s (3 s): heartbeats, not a reset
        assert (await reachable())["node-ns"] is False
        response = await anext(aiter(on["node-host"]))  # the other node streams on
        assert response.event.WhichOneof("kind") == "token"
        on["node-host"].cancel()

        assert _ip("link", "set", HOST_IF, "up").returncode == 0
        await wait_for(both, 30)
        again = [stub.Generate(long), stub.Generate(long)]

        async def started_on(call: grpc.aio.UnaryStreamCall) -> str:
            async for response in call:
                if response.event.WhichOneof("kind") == "started":
                    return str(response.event.started.node_id)
            raise AssertionError("ended before it started")

        # Both hold their slots until both started: a cancel would free one for the other.
        nodes = set(await asyncio.gather(*(started_on(call) for call in again)))
        for call in again:
            call.cancel()
        assert nodes == set(both)  # it gets work again
        await client.close()
        await ops.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

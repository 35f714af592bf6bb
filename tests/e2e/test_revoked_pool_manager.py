"""A pool manager whose certificate is revoked gets no more work: the orchestrator checks the
server certificate of each pool manager it watches against the denylist, and takes the node
out of placement within seconds of the change; taken off the list, the node comes back."""

from __future__ import annotations

import asyncio
from pathlib import Path

from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc

from tests.e2e.secure_mesh import start_secure_mesh


async def _reachable(control: control_pb2_grpc.ControlServiceStub) -> bool:
    nodes = (await control.ListNodes(control_pb2.ListNodesRequest(), timeout=10)).nodes
    return any(n.node_id == "node-a" and n.reachable for n in nodes)


async def _until(control: control_pb2_grpc.ControlServiceStub, reachable: bool) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while await _reachable(control) != reachable:
        assert loop.time() - started < 10, f"node-a still {'un' * reachable}reachable"
        await asyncio.sleep(0.1)
    return loop.time() - started


async def test_a_revoked_pool_manager_is_taken_out_of_placement(
    tmp_path: Path, tiny_model: Path
) -> None:
    secure = await start_secure_mesh(tmp_path, tiny_model)
    try:
        ops, _ = secure.keys.create("ops", "operator")
        channel = secure.pki.key_channel(secure.orchestrator_address, ops)
        control = control_pb2_grpc.ControlServiceStub(channel)
        try:
            await _until(control, True)
            denylist = secure.pki.root / "ca" / "revoked.txt"
            before = denylist.read_text()
            secure.pki.revoke("node-a")
            took_s = await _until(control, False)
            assert took_s < 5, took_s  # the denylist is read every second; a heartbeat after
            denylist.write_text(before)  # taken off the list again
            await _until(control, True)
        finally:
            await channel.close()
    finally:
        await secure.stop()

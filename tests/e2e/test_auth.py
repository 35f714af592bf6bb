"""The cloud profile's security end to end: every RPC of every service, called by every kind of
caller, gets the status the policy says; keys carry tenants, model lists and rate limits, and a
revoked key stops working without a restart.

The auth matrix is built from the services' descriptors, so an RPC added later without a policy
entry shows up here as denied to everyone (and fails the test that every RPC has a policy).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import (
    control_pb2,
    control_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
)
from llorch.poolmanager.v1 import poolmanager_pb2, poolmanager_pb2_grpc

from mesh.apikeys import ApiKeyStore
from mesh.auth import POLICY
from mesh.tls import issue
from tests.e2e.helpers import collect, error_details, generate_request
from tests.e2e.secure_mesh import SecureMesh, start_secure_mesh

SERVICE_PORT_SERVICES = {
    "catalog": catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"],
    "poolmanager": poolmanager_pb2.DESCRIPTOR.services_by_name["PoolManagerService"],
    "node port": nodes_pb2.DESCRIPTOR.services_by_name["NodeService"],
}
CLIENT_PORT_SERVICES = [
    orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
    control_pb2.DESCRIPTOR.services_by_name["ControlService"],
]
CERT_CALLERS = {
    "no client certificate": (None, False),
    "certificate of another CA": ("orch", True),
    "expired certificate": ("expired", False),
    "role orchestrator": ("orch", False),
    "role poolmanager": ("node-a", False),
    "role catalog": ("catalog", False),
    "role operator": ("alice", False),
    "role client": ("bob", False),
    "role metrics": ("prometheus", False),
    "revoked certificate": ("mallory", False),
}
REFUSED_IN_HANDSHAKE = {"no client certificate", "certificate of another CA", "expired certificate"}
REVOKED = {"revoked certificate"}
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


# One secure mesh for the whole module: its tests share one event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> AsyncIterator[SecureMesh]:
    mesh = await start_secure_mesh(tmp_path_factory.mktemp("secure"), tiny_model)
    try:
        yield mesh
    finally:
        await mesh.stop()


def _path(service: ServiceDescriptor, method: MethodDescriptor) -> str:
    return f"/{service.full_name}/{method.name}"


async def _call(
    channel: grpc.aio.Channel, service: ServiceDescriptor, method: MethodDescriptor
) -> grpc.StatusCode:
    """Calls ``method`` with an empty request; the status it ends with (OK for a stream that sent
    something). Only the status matters: an allowed caller gets past auth to validation."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = _path(service, method)
    try:
        if method.server_streaming:
            call = channel.unary_stream(
                path, request_class.SerializeToString, response_class.FromString
            )(request_class(), timeout=10)
            async for _ in call:
                call.cancel()
                break
        else:
            await channel.unary_unary(
                path, request_class.SerializeToString, response_class.FromString
            )(request_class(), timeout=10)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK
        return err.code()
    return grpc.StatusCode.OK


async def test_every_rpc_has_a_policy() -> None:
    services = [*SERVICE_PORT_SERVICES.values(), *CLIENT_PORT_SERVICES]
    paths = {_path(s, m) for s in services for m in s.methods}
    assert paths == set(POLICY)


async def test_service_ports_check_the_certificate_and_its_role(secure: SecureMesh) -> None:
    addresses = {
        "catalog": secure.catalog_address,
        "poolmanager": secure.pool_manager_address,
        "node port": secure.node_port_address,
    }
    table: list[tuple[str, str, str]] = []
    for kind, service in SERVICE_PORT_SERVICES.items():
        for caller, (cert, other_ca) in CERT_CALLERS.items():
            channel = secure.pki.channel(addresses[kind], cert, other_ca=other_ca)
            try:
                for method in service.methods:
                    code = await _call(channel, service, method)
                    table.append((_path(service, method), caller, code.name))
                    if caller in REFUSED_IN_HANDSHAKE:
                        assert code == grpc.StatusCode.UNAVAILABLE, (method.name, caller)
                        continue
                    if caller in REVOKED:  # an operator's, which is refused all the same
                        assert code == grpc.StatusCode.UNAUTHENTICATED, (method.name, caller)
                        continue
                    role = caller.removeprefix("role ")
                    if role in POLICY[_path(service, method)]:
                        assert code not in DENIED, (method.name, caller, code)
                    else:
                        assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, caller)
            finally:
                await channel.close()
    # The issue's rules, spelled out rather than read back from POLICY.
    outcome = {(m.rsplit("/", 1)[1], c): code for m, c, code in table}
    assert outcome[("Execute", "role orchestrator")] != "PERMISSION_DENIED"
    for role in ("operator", "poolmanager", "client", "catalog"):
        assert outcome[("Execute", f"role {role}")] == "PERMISSION_DENIED"
    assert outcome[("MarkModelsUsed", "role poolmanager")] != "PERMISSION_DENIED"
    assert outcome[("MarkModelsUsed", "role orchestrator")] == "PERMISSION_DENIED"
    assert outcome[("SetModelState", "role operator")] != "PERMISSION_DENIED"
    assert outcome[("SetModelState", "role orchestrator")] == "PERMISSION_DENIED"
    assert outcome[("GetModel", "role client")] == "PERMISSION_DENIED"
    assert outcome[("RegisterNode", "role poolmanager")] != "PERMISSION_DENIED"
    assert outcome[("RegisterNode", "role orchestrator")] == "PERMISSION_DENIED"
    assert {code for (_, c), code in outcome.items() if c == "role metrics"} == {
        "PERMISSION_DENIED"
    }  # a scraper's certificate reads /metrics and calls nothing
    assert outcome[("GetNode", "revoked certificate")] == "UNAUTHENTICATED"
    _print_table(table)


async def test_the_client_port_takes_api_keys_by_role(
    secure: SecureMesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client_key, _ = secure.keys.create("tenant-a", "client")
    operator_key, _ = secure.keys.create("ops", "operator")
    revoked_key, revoked = secure.keys.create("tenant-a", "client")
    secure.keys.revoke(revoked.key_id)
    callers = {
        "no key": None,
        "malformed key": "not-a-key",
        "unknown key": "llk_0123456789ab_" + "A" * 43,
        "revoked key": revoked_key,
        "client key": client_key,
        "operator key": operator_key,
    }
    table: list[tuple[str, str, str]] = []
    for caller, key in callers.items():
        channel = secure.pki.key_channel(secure.orchestrator_address, key)
        try:
            for service in CLIENT_PORT_SERVICES:
                for method in service.methods:
                    code = await _call(channel, service, method)
                    table.append((_path(service, method), caller, code.name))
                    if caller not in ("client key", "operator key"):
                        assert code == grpc.StatusCode.UNAUTHENTICATED, (method.name, caller)
                    elif caller == "client key" and service.name == "ControlService":
                        assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, caller)
                    else:
                        assert code not in DENIED, (method.name, caller, code)
        finally:
            await channel.close()
    _print_table(table)
    # Refusals are logged with the key's fingerprint (in the record's fields), never the key.
    logged = "\n".join(str(record.__dict__) for record in caplog.records)
    assert client_key[: len("llk_") + 12] in logged
    for key in (client_key, operator_key, revoked_key):
        assert key.split("_", 2)[2] not in logged


async def test_tenants_see_only_their_tasks_and_models_their_keys_allow(secure: SecureMesh) -> None:
    key_a, _ = secure.keys.create("tenant-a", "client")
    key_b, _ = secure.keys.create("tenant-b", "client", models=("some-other-model",))
    ops, _ = secure.keys.create("ops", "operator")
    a = secure.pki.key_channel(secure.orchestrator_address, key_a)
    b = secure.pki.key_channel(secure.orchestrator_address, key_b)
    o = secure.pki.key_channel(secure.orchestrator_address, ops)
    try:
        stub_a = orchestrator_pb2_grpc.OrchestratorServiceStub(a)
        stub_b = orchestrator_pb2_grpc.OrchestratorServiceStub(b)
        request = orchestrator_pb2.SubmitTaskRequest(
            model_id="tiny-llama", prompt="mine", sampling=common_pb2.SamplingParams(max_tokens=3)
        )
        task_id = (await stub_a.SubmitTask(request)).task_id
        got = await collect(stub_a.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=task_id)))
        assert got.finished.tokens_out == 3  # served over mTLS by the pool manager
        for call in (
            stub_b.GetTask(orchestrator_pb2.GetTaskRequest(task_id=task_id)),
            stub_b.CancelTask(orchestrator_pb2.CancelTaskRequest(task_id=task_id)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as other:
                await call
            assert other.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as other:
            async for _ in stub_b.StreamTask(orchestrator_pb2.StreamTaskRequest(task_id=task_id)):
                pass
        assert other.value.code() == grpc.StatusCode.NOT_FOUND
        listed_b = await stub_b.ListTasks(orchestrator_pb2.ListTasksRequest())
        assert task_id not in {t.task_id for t in listed_b.tasks}
        listed_a = await stub_a.ListTasks(orchestrator_pb2.ListTasksRequest())
        assert task_id in {t.task_id for t in listed_a.tasks}
        assert {t.tenant for t in listed_a.tasks} == {"tenant-a"}
        # An operator sees every tenant's tasks.
        seen = await orchestrator_pb2_grpc.OrchestratorServiceStub(o).GetTask(
            orchestrator_pb2.GetTaskRequest(task_id=task_id)
        )
        assert seen.task.task_id == task_id
        # Tenant B's key does not allow tiny-llama; the same request id is B's own.
        request.request_id = "same-key"
        first_a = (await stub_a.SubmitTask(request)).task_id
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub_b.SubmitTask(request)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_details(denied.value)["reason"] == "MODEL_NOT_ALLOWED"
        assert first_a != task_id
        # ListModels shows each key the models it may use.
        models = orchestrator_pb2.ListModelsRequest()
        assert "tiny-llama" in {m.model_id for m in (await stub_a.ListModels(models)).models}
        assert not (await stub_b.ListModels(models)).models
    finally:
        for channel in (a, b, o):
            await channel.close()


async def test_a_revoked_key_stops_working_without_a_restart(secure: SecureMesh) -> None:
    key, record = secure.keys.create("tenant-r", "client")
    channel = secure.pki.key_channel(secure.orchestrator_address, key)
    try:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        unknown = orchestrator_pb2.GetTaskRequest(task_id="0" * 32)
        with pytest.raises(grpc.aio.AioRpcError) as before:
            await stub.GetTask(unknown)
        assert before.value.code() == grpc.StatusCode.NOT_FOUND  # past auth
        # Revoked through another handle on the file, as `llorch keys revoke` does.
        other = ApiKeyStore(secure.keys.path)
        other.revoke(record.key_id)
        other.close()
        await asyncio.sleep(0.6)  # the orchestrator looks at the file at most every 0.5 s
        with pytest.raises(grpc.aio.AioRpcError) as after:
            await stub.GetTask(unknown)
        assert after.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()


async def test_revoking_a_key_ends_the_streams_it_opened(secure: SecureMesh) -> None:
    """A stream of a key revoked meanwhile ends UNAUTHENTICATED within about a second, and its
    task is cancelled; another key's stream goes on."""
    ops, _ = secure.keys.create("ops", "operator")
    doomed_key, doomed = secure.keys.create("tenant-r", "client")
    other_key, _ = secure.keys.create("tenant-r", "client")
    o = secure.pki.key_channel(secure.orchestrator_address, ops)
    d = secure.pki.key_channel(secure.orchestrator_address, doomed_key)
    k = secure.pki.key_channel(secure.orchestrator_address, other_key)
    control = control_pb2_grpc.ControlServiceStub(o)
    pool = {"node_id": "node-a", "pool_id": "cpu-0"}
    # Drained, the pool leaves both tasks queued: their streams stay open until told otherwise.
    await control.DrainPool(control_pb2.DrainPoolRequest(**pool))
    try:
        request = generate_request(max_tokens=2)
        doomed_call = orchestrator_pb2_grpc.OrchestratorServiceStub(d).Generate(request, timeout=30)
        other_call = orchestrator_pb2_grpc.OrchestratorServiceStub(k).Generate(request, timeout=30)
        first = await doomed_call.read()
        task_id = first.event.task_id
        await other_call.read()
        revoker = ApiKeyStore(secure.keys.path)  # as `llorch keys revoke` does
        revoker.revoke(doomed.key_id)
        revoker.close()
        started = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (await doomed_call.read()) is not grpc.aio.EOF:
                pass
        took_s = asyncio.get_running_loop().time() - started
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED, ended.value
        assert error_details(ended.value)["reason"] == "API_KEY_REVOKED"
        assert took_s < 3.0, took_s  # key file looked at every 0.5 s, streams every 0.5 s
        ops_stub = orchestrator_pb2_grpc.OrchestratorServiceStub(o)
        for _ in range(50):
            got = await ops_stub.GetTask(orchestrator_pb2.GetTaskRequest(task_id=task_id))
            if got.task.state == orchestrator_pb2.TASK_STATE_CANCELLED:
                break
            await asyncio.sleep(0.1)
        assert got.task.state == orchestrator_pb2.TASK_STATE_CANCELLED
        assert other_call.done() is False  # the other key's stream is still open
    finally:
        await control.ResumePool(control_pb2.ResumePoolRequest(**pool))
    try:
        last = None
        while (event := await other_call.read()) is not grpc.aio.EOF:
            last = event
        assert (
            last is not None
            and last.event.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
        )
    finally:
        for channel in (o, d, k):
            await channel.close()


async def test_a_revoked_certificate_fails_every_service_and_its_streams_end(
    secure: SecureMesh,
) -> None:
    """Put on the denylist, an operator's certificate is refused by the catalog and the pool
    manager within seconds, and its open WatchNode stream ends, without a restart."""
    issue(secure.pki.root / "ca", "operator", "carol", secure.pki.root / "certs")
    pm = secure.pki.channel(secure.pool_manager_address, "carol")
    cat = secure.pki.channel(secure.catalog_address, "carol")
    try:
        watch = poolmanager_pb2_grpc.PoolManagerServiceStub(pm).WatchNode(
            poolmanager_pb2.WatchNodeRequest(), timeout=30
        )
        assert (await watch.read()).node.node_id == "node-a"
        catalog = catalog_pb2_grpc.CatalogServiceStub(cat)
        await catalog.ListModels(catalog_pb2.ListModelsRequest())
        secure.pki.revoke("carol")
        started = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (await watch.read()) is not grpc.aio.EOF:
                pass
        took_s = asyncio.get_running_loop().time() - started
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED, ended.value
        assert error_details(ended.value)["reason"] == "CERTIFICATE_REVOKED"
        assert took_s < 3.0, took_s
        # Each process reads the denylist at most every second: new calls fail within that.
        pm_stub = poolmanager_pb2_grpc.PoolManagerServiceStub(pm)
        calls = {
            "catalog": lambda: catalog.ListModels(catalog_pb2.ListModelsRequest()),
            "pool manager": lambda: pm_stub.GetNode(poolmanager_pb2.GetNodeRequest()),
        }
        for service, call in calls.items():
            deadline = asyncio.get_running_loop().time() + 3.0
            while True:
                try:
                    await call()
                except grpc.aio.AioRpcError as refused:
                    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, service
                    assert "carol" in str(refused.details()) and "revoked" in str(refused.details())
                    break
                assert asyncio.get_running_loop().time() < deadline, f"{service} still serves"
                await asyncio.sleep(0.1)
    finally:
        await pm.close()
        await cat.close()


async def test_a_rate_limited_key_is_told_when_to_come_back(secure: SecureMesh) -> None:
    key, _ = secure.keys.create("tenant-slow", "client", rate_per_s=1.0)
    channel = secure.pki.key_channel(secure.orchestrator_address, key)
    try:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.SubmitTaskRequest(
            model_id="tiny-llama", prompt="x", sampling=common_pb2.SamplingParams(max_tokens=1)
        )
        await stub.SubmitTask(request)
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await stub.SubmitTask(request)
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(limited.value)
        assert details["reason"] == "RATE_LIMITED" and 0 < details["retry_delay_ms"] <= 1000
    finally:
        await channel.close()


def _print_table(rows: list[tuple[str, str, str]]) -> None:
    """The matrix as the closing note shows it (pytest -s prints it)."""
    callers = list(dict.fromkeys(c for _, c, _ in rows))
    methods = list(dict.fromkeys(m for m, _, _ in rows))
    cell = {(m, c): code for m, c, code in rows}
    print()
    print("| RPC | " + " | ".join(callers) + " |")
    print("|---|" + "---|" * len(callers))
    for m in methods:
        short = m.rsplit(".", 1)[-1]
        print(f"| {short} | " + " | ".join(_short(cell[(m, c)]) for c in callers) + " |")


def _short(code: str) -> str:
    return {"UNAVAILABLE": "handshake refused", "OK": "ok"}.get(code, code)


async def test_a_pool_manager_registers_only_as_the_node_its_certificate_names(
    secure: SecureMesh,
) -> None:
    channel = secure.pki.channel(secure.node_port_address, "node-a")
    operator_key, _ = secure.keys.create("ops", "operator")
    ops = secure.pki.key_channel(secure.orchestrator_address, operator_key)
    try:
        stub = nodes_pb2_grpc.NodeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await stub.RegisterNode(
                nodes_pb2.RegisterNodeRequest(node_id="node-b", address="localhost:1")
            )
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_details(other.value)["reason"] == "NODE_ID_MISMATCH"
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.RegisterNode(
                nodes_pb2.RegisterNodeRequest(node_id="node-a", address="no port")
            )
        assert error_details(bad.value)["fields"] == ["address"]
        # Its own node id at its real address: the orchestrator knows it already (settings)
        # and still answers when to register again.
        again = await stub.RegisterNode(
            nodes_pb2.RegisterNodeRequest(node_id="node-a", address=secure.pool_manager_address)
        )
        assert again.register_again_ms == 5000
        listed = await control_pb2_grpc.ControlServiceStub(ops).ListNodes(
            control_pb2.ListNodesRequest()
        )
        assert [(n.node_id, n.reachable, n.registered) for n in listed.nodes] == [
            ("node-a", True, False)
        ]
    finally:
        await channel.close()
        await ops.close()


async def test_a_pool_manager_cannot_take_another_nodes_address_or_write_its_records(
    secure: SecureMesh,
) -> None:
    issue(secure.pki.root / "ca", "poolmanager", "node-b", secure.pki.root / "certs")
    channel = secure.pki.channel(secure.node_port_address, "node-b")
    catalog_channel = secure.pki.channel(secure.catalog_address, "node-a")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            await nodes_pb2_grpc.NodeServiceStub(channel).RegisterNode(
                nodes_pb2.RegisterNodeRequest(node_id="node-b", address=secure.pool_manager_address)
            )
        assert taken.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_details(taken.value)["reason"] == "ADDRESS_TAKEN"
        catalog = catalog_pb2_grpc.CatalogServiceStub(catalog_channel)
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await catalog.MarkModelsUsed(
                catalog_pb2.MarkModelsUsedRequest(node_id="node-b", model_ids=["tiny-llama"])
            )
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_details(other.value)["reason"] == "NODE_ID_MISMATCH"
        await catalog.MarkModelsUsed(  # its own node: fine
            catalog_pb2.MarkModelsUsedRequest(node_id="node-a", model_ids=["tiny-llama"])
        )
    finally:
        await channel.close()
        await catalog_channel.close()


async def test_a_batch_larger_than_a_keys_burst_is_refused_as_such(secure: SecureMesh) -> None:
    key, _ = secure.keys.create("tenant-batch", "client", rate_per_s=2.0)
    channel = secure.pki.key_channel(secure.orchestrator_address, key)
    try:
        one = orchestrator_pb2.SubmitTaskRequest(
            model_id="tiny-llama", prompt="x", sampling=common_pb2.SamplingParams(max_tokens=1)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).SubmitTasks(
                orchestrator_pb2.SubmitTasksRequest(requests=[one] * 3)
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(refused.value)["fields"] == ["requests"]
    finally:
        await channel.close()

"""Bytes that are not a valid request end INVALID_ARGUMENT naming the message type, on every
kind of method a server has (unary and server-streaming here, health and reflection too), and
the server goes on answering; a message over a server's size limit ends RESOURCE_EXHAUSTED."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.server import (
    CATALOG_MESSAGE_BYTES,
    CLIENT_PORT_MESSAGE_BYTES,
    POOL_MANAGER_MESSAGE_BYTES,
)
from tests.conftest import Mesh

GARBAGE = b"\xff\xff\xff\xff\x0f"  # a field tag with no end: protobuf refuses it

METHODS = [
    ("/llorch.orchestrator.v1.OrchestratorService/GetTask", "unary", "GetTaskRequest"),
    ("/llorch.orchestrator.v1.OrchestratorService/Generate", "stream", "GenerateRequest"),
    ("/llorch.catalog.v1.CatalogService/GetModel", "unary", "GetModelRequest"),
    ("/llorch.poolmanager.v1.PoolManagerService/Execute", "stream", "ExecuteRequest"),
    ("/grpc.health.v1.Health/Check", "unary", "HealthCheckRequest"),
]


def _address(mesh: Mesh, method: str) -> str:
    if ".catalog." in method:
        return mesh.catalog.address
    if ".poolmanager." in method:
        return mesh.pool_manager.address
    return mesh.address


@pytest.fixture
async def channels(mesh: Mesh) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    opened = {m: grpc.aio.insecure_channel(_address(mesh, m)) for m, _, _ in METHODS}
    yield opened
    for channel in opened.values():
        await channel.close()


@pytest.mark.parametrize(("method", "kind", "type_name"), METHODS)
async def test_garbage_is_invalid_argument_naming_the_type(
    mesh: Mesh,
    channels: dict[str, grpc.aio.Channel],
    method: str,
    kind: str,
    type_name: str,
) -> None:
    channel = channels[method]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if kind == "unary":
            await channel.unary_unary(method)(GARBAGE, timeout=10)
        else:
            async for _ in channel.unary_stream(method)(GARBAGE, timeout=10):
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request is not a valid " in (info.value.details() or "")
    assert type_name in (info.value.details() or "")
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _string_field(size: int) -> bytes:
    """A request whose field 1 is a string of ``size`` bytes (each method below has one)."""
    length, varint = size, bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"\x0a" + bytes(varint) + b"a" * size


@pytest.mark.parametrize(
    ("method", "limit"),
    [
        ("/llorch.orchestrator.v1.OrchestratorService/GetTask", CLIENT_PORT_MESSAGE_BYTES),
        ("/llorch.catalog.v1.CatalogService/GetModel", CATALOG_MESSAGE_BYTES),
        ("/llorch.poolmanager.v1.PoolManagerService/CancelExecution", POOL_MANAGER_MESSAGE_BYTES),
    ],
)
async def test_a_message_over_the_servers_limit_is_resource_exhausted(
    mesh: Mesh, method: str, limit: int
) -> None:
    """Each server has its own explicit limit: under it a request reaches validation, over it
    gRPC refuses it with RESOURCE_EXHAUSTED before any handler runs, and health still answers."""
    async with grpc.aio.insecure_channel(_address(mesh, method)) as channel:
        call = channel.unary_unary(method)
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await call(_string_field(limit), timeout=30)  # the tag and length add to it
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (over.value.details() or "")
        try:  # under the limit the handler answers: refuses the id, or finds nothing to do
            await call(_string_field(limit // 2), timeout=30)
        except grpc.aio.AioRpcError as under:
            assert under.code() == grpc.StatusCode.INVALID_ARGUMENT, under
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

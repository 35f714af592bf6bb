"""TLS between services: the name a server's certificate must carry can be given apart from
the host dialled (pods reached by IP), and a certificate without it is refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.server import create_server, open_channel, service_security
from mesh.tls import issue
from tests.e2e.secure_mesh import Pki


async def test_a_server_name_is_checked_instead_of_the_host_dialled(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    issue(pki.root / "ca", "poolmanager", "pod", pki.root / "certs", sans=("llorch-poolmanager",))
    credentials, authorize = service_security(pki.files("pod"))
    server = await create_server("127.0.0.1:0", [], credentials=credentials, authorize=authorize)
    try:
        address = f"127.0.0.1:{server.port}"
        for name, works in (("llorch-poolmanager", True), ("someone-else", False)):
            channel = open_channel(address, tls=pki.files("orch"), server_name=name)
            try:
                call = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                if works:
                    assert (await call).status == health_pb2.HealthCheckResponse.SERVING
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                await channel.close()
    finally:
        await server.stop(0)

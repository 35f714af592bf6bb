"""A stream whose caller is revoked while it is open ends UNAUTHENTICATED with the authorizer's
reason, and its handler's cleanup runs within about a second, whether the handler was waiting
for work (the idle case) or gRPC was stuck sending to a client that stopped reading (where a
cancel would land in gRPC's own code and leave the call without a status)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from mesh.auth import Caller
from mesh.errors import UnauthenticatedError
from mesh.server import ServiceBinding, create_server

METHOD = "/test.Streams/Open"
CHUNK = b"x" * (256 * 1024)


class Switch:
    """An authorizer whose one caller is revoked when the test says so."""

    def __init__(self) -> None:
        self.revoked = False
        self._generation = 0

    def revoke(self) -> None:
        self.revoked = True
        self._generation += 1

    def __call__(self, method: str, context: Any, request: Any) -> Caller | None:
        return None if method.startswith("/grpc.health") else Caller("client", "c")

    def recheck(self, who: Caller) -> UnauthenticatedError | None:
        return UnauthenticatedError("revoked", reason="TEST_REVOKED") if self.revoked else None

    def generation(self) -> int:
        return self._generation


class Streams:
    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def open(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            yield CHUNK
            if request == b"flood":
                while True:
                    yield CHUNK
            await asyncio.Event().wait()  # idle: waits for work that never comes
        finally:
            self.closed.set()

    def binding(self) -> ServiceBinding:
        handler = grpc.unary_stream_rpc_method_handler(self.open)
        generic = grpc.method_handlers_generic_handler("test.Streams", {"Open": handler})
        return ServiceBinding(
            "test.Streams", lambda server: server.add_generic_rpc_handlers((generic,))
        )


@pytest.mark.parametrize("mode", ["idle", "flood"])
async def test_a_revoked_callers_stream_ends_and_its_handler_cleans_up(mode: str) -> None:
    switch, streams = Switch(), Streams()
    server = await create_server("127.0.0.1:0", [streams.binding()], authorize=switch)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_stream(METHOD)(mode.encode(), timeout=30)
            assert await call.read() == CHUNK
            if mode == "flood":
                await asyncio.sleep(
                    0.5
                )  # the handler fills the flow-control window; we read no more
            switch.revoke()
            async with asyncio.timeout(3):
                await streams.closed.wait()  # the cleanup ran, though nobody reads
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while (await call.read()) is not grpc.aio.EOF:
                    pass
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED, ended.value
            assert ended.value.details() == "revoked"
    finally:
        await server.stop(0)

"""Every RPC of every service, fuzzed against a real mesh with requests drawn from the message
descriptors (tests/fuzz/strategies.py) and with random bytes.

For each RPC a batch of about ``FUZZ_EXAMPLES`` requests (40 unless set; ``make fuzz`` sends 20
times more), half plausible, half wild or random bytes (a request repeated within a batch of
``BATCH`` is sent once). No call may end INTERNAL or UNKNOWN (a handler let something escape),
nor UNIMPLEMENTED (the RPC is not served where SERVED_AT says); any other status is an answer.
After the batch every server still answers health with SERVING, and the state accepted before
it (tests/fuzz/harness.Kept) reads the same.

The orchestrator's services run on both links to the pool manager (over gRPC and in-process,
as the other mesh tests do); the catalog's and the pool manager's servers do not depend on it.
The examples are the same on every run; ``FUZZ_SEED`` draws other ones (``make fuzz`` sets a
random one and a failure names it).
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from llorch.poolmanager.v1 import poolmanager_pb2, poolmanager_pb2_grpc

from tests.fuzz.harness import (
    CATALOG,
    CLIENT,
    NODE,
    NODE_ID,
    POOL_MANAGER,
    SERVED_AT,
    FuzzMeshes,
    check_kept,
    check_serving,
    keep,
    send,
    tidy,
)
from tests.fuzz.strategies import (
    Payload,
    Rpc,
    generated_rpcs,
    generated_services,
    payloads,
    plausible_payloads,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
SEED = os.environ.get("FUZZ_SEED", "")
BUGS = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNIMPLEMENTED,
}

BATCH = 10
"""Requests per hypothesis example. Hypothesis makes the examples of a run from earlier ones
(mutated, simplest first), so a small budget of single requests is much alike; the requests of
one example are drawn independently."""

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _cases() -> list[tuple[str, Rpc]]:
    cases: list[tuple[str, Rpc]] = []
    for rpc in generated_rpcs():
        links = (
            ["grpc", "local"]
            if SERVED_AT.get(rpc.service.full_name) in (CLIENT, NODE)
            else ["grpc"]
        )
        cases.extend((link, rpc) for link in links)
    return cases


CASES = _cases()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def meshes(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> AsyncIterator[FuzzMeshes]:
    started = FuzzMeshes(tmp_path_factory.mktemp("fuzz"), tiny_model)
    try:
        yield started
    finally:
        await started.stop()


async def test_every_generated_service_is_fuzzed() -> None:
    assert {s.full_name for s in generated_services()} == set(SERVED_AT)
    assert {rpc.path for _, rpc in CASES} == {
        f"/{s.full_name}/{m.name}" for s in generated_services() for m in s.methods
    }


def fuzz(
    rpc: Rpc,
    requests: SearchStrategy[Payload],
    count: int,
    call: Callable[[bytes], tuple[grpc.StatusCode, str]],
) -> Counter[str]:
    """Runs hypothesis over about ``count`` of ``requests`` in this (worker) thread, each sent
    by ``call`` on the event loop; how often each status came back."""
    seen: Counter[str] = Counter()

    @settings(
        max_examples=math.ceil(count / BATCH) + 1,  # the first example is the simplest
        deadline=None,
        database=None,
        derandomize=not SEED,
        print_blob=bool(SEED),
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )
    @given(st.lists(requests, min_size=BATCH, max_size=BATCH))
    def batch(batch: list[Payload]) -> None:
        sent: set[bytes] = set()
        for payload in batch:
            data = payload.encode()
            if data in sent:
                continue
            sent.add(data)
            code, details = call(data)
            seen[code.name] += 1
            reproduce = f" (FUZZ_SEED={SEED})" if SEED else ""
            assert code not in BUGS, (
                f"{rpc.path} ended {code.name}: {details!r}{reproduce}; request {payload!r}"
            )

    if SEED:
        batch = seed(int(SEED))(batch)
    batch()
    return seen


@pytest.mark.parametrize(("link", "rpc"), CASES, ids=[f"{link}-{rpc.name}" for link, rpc in CASES])
async def test_rpc_survives_fuzzed_requests(meshes: FuzzMeshes, link: str, rpc: Rpc) -> None:
    fuzz_mesh = await meshes.ready(link)
    channel = fuzz_mesh.channel(rpc)
    loop = asyncio.get_running_loop()

    def call(payload: bytes) -> tuple[grpc.StatusCode, str]:
        return asyncio.run_coroutine_threadsafe(send(channel, rpc, payload), loop).result(60)

    # Hypothesis runs in a thread: its test function is synchronous, and the servers and this
    # client live on this event loop, which must keep running meanwhile. Half the budget goes
    # to plausible requests, which reach the code behind validation, half to wild ones.
    seen: Counter[str] = Counter()
    for requests in (
        plausible_payloads(rpc.request, fuzz_mesh.vocabulary),
        payloads(rpc.request, fuzz_mesh.vocabulary),
    ):
        seen += await asyncio.to_thread(fuzz, rpc, requests, max(1, EXAMPLES // 2), call)
    print(f"{link} {rpc.path}: {sum(seen.values())} calls, {dict(seen)}")
    await check_serving(fuzz_mesh)
    await check_kept(fuzz_mesh)
    await tidy(fuzz_mesh)


async def test_fuzz_fails_when_a_call_ends_internal() -> None:
    rpc = next(r for r in generated_rpcs() if r.method.name == "GetModel")

    def call(payload: bytes) -> tuple[grpc.StatusCode, str]:
        if payload:
            return grpc.StatusCode.INTERNAL, "internal error"
        return grpc.StatusCode.INVALID_ARGUMENT, "model_id: is required"

    with pytest.raises(AssertionError, match="ended INTERNAL"):
        await asyncio.to_thread(fuzz, rpc, payloads(rpc.request), 10, call)


async def test_check_kept_notices_a_change(meshes: FuzzMeshes) -> None:
    fuzz_mesh = await meshes.ready("grpc")
    kept = fuzz_mesh.kept
    assert kept is not None
    catalog = catalog_pb2_grpc.CatalogServiceStub(fuzz_mesh.channels[CATALOG])
    await catalog.SetModelPinned(
        catalog_pb2.SetModelPinnedRequest(model_id=kept.model_id, pinned=False), timeout=10
    )
    with pytest.raises(AssertionError):
        await check_kept(fuzz_mesh)
    fuzz_mesh.kept = await keep(fuzz_mesh)  # what the next batch keeps
    await check_kept(fuzz_mesh)


# What the fuzz found, kept as regressions.


async def test_staging_refuses_a_model_file_that_is_not_a_regular_file(
    meshes: FuzzMeshes,
) -> None:
    # A location may name any absolute path: staging /dev/zero filled the tmpfs, a FIFO held
    # StageModel (and a thread) forever. /dev/null ends at once, so a regression fails here
    # instead of hanging.
    fuzz_mesh = await meshes.ready("grpc")
    model_id = f"device-{secrets.token_hex(8)}"
    catalog = catalog_pb2_grpc.CatalogServiceStub(fuzz_mesh.channels[CATALOG])
    await catalog.RegisterModel(
        catalog_pb2.RegisterModelRequest(
            model=catalog_pb2.Model(
                model_id=model_id,
                source_ref="file:///dev/null",
                sha256="0" * 64,
                size_bytes=1,
                facts=catalog_pb2.ModelFacts(architecture="llama", context_length=16),
            ),
            locations=[catalog_pb2.ModelLocation(node_id=NODE_ID, path="/dev/null")],
        ),
        timeout=10,
    )
    pool_manager = poolmanager_pb2_grpc.PoolManagerServiceStub(fuzz_mesh.channels[POOL_MANAGER])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await pool_manager.StageModel(
            poolmanager_pb2.StageModelRequest(model_id=model_id), timeout=10
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not a regular file" in (raised.value.details() or "")

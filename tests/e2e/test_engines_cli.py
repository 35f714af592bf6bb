"""``llorch engines check`` finds this node's engine and records it; ``engines list`` reads it
back from the catalog."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import Mesh
from tests.e2e.helpers import run_llorch


@pytest.mark.parametrize("mesh", ["grpc"], indirect=True)
async def test_engines_check_records_the_engine_and_says_a_gpu_pool_needs_cuda(
    mesh: Mesh,
) -> None:
    address = mesh.catalog.address
    checked = await asyncio.to_thread(
        run_llorch, "engines", "check", "--node-id", "node-a", "--catalog", address
    )
    assert checked.returncode == 0, checked.stderr
    assert "node-a" in checked.stdout and "llama-cpp-python" in checked.stdout
    assert "cpu" in checked.stdout
    # This machine's engine is a CPU build: the note says how to get one for GPU pools.
    assert "built for the CPU only" in checked.stderr and "-DGGML_CUDA=on" in checked.stderr
    listed = await asyncio.to_thread(run_llorch, "engines", "list", "--json", "--catalog", address)
    assert listed.returncode == 0, listed.stderr
    engines = json.loads(listed.stdout)
    assert [(e["nodeId"], e["backend"]) for e in engines] == [("node-a", "cpu")]
    assert engines[0].get("gpuOffload", False) is False

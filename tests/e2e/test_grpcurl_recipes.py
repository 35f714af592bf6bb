"""The grpcurl recipes of docs/operators.md, run with a real grpcurl against a mesh with TLS
(an orchestrator taking API keys, a catalog taking certificates), so the page cannot rot.

`make test` builds grpcurl into .venv/bin; without it (pytest run alone on a machine without
Go) this test skips and says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.e2e.helpers import doc_recipes, run_recipes
from tests.e2e.secure_mesh import SecureMesh, start_secure_mesh

REPO = Path(__file__).resolve().parents[2]
GRPCURL = shutil.which("grpcurl", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed (`make test` builds it)"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> AsyncIterator[SecureMesh]:
    mesh = await start_secure_mesh(tmp_path_factory.mktemp("grpcurl"), tiny_model)
    try:
        yield mesh
    finally:
        await mesh.stop()


async def test_every_grpcurl_recipe_runs(secure: SecureMesh) -> None:
    recipes = doc_recipes(REPO / "docs" / "operators.md", "## grpcurl recipes")
    assert len(recipes) == 5
    key, _ = secure.keys.create("ops", "operator")
    operator = secure.pki.files("alice")
    env = {
        **os.environ,
        "PATH": f"{Path(str(GRPCURL)).parent}:{os.environ['PATH']}",
        "ORCH": secure.orchestrator_address,
        "CATALOG": secure.catalog_address,
        "CA": str(secure.pki.ca),
        "KEY": key,
        "CERT": str(operator.cert),
        "CERT_KEY": str(operator.key),
    }
    outputs = await run_recipes(recipes, env)
    listed, health, generated, pools, models = outputs
    assert "llorch.orchestrator.v1.OrchestratorService" in listed
    assert "llorch.orchestrator.v1.ControlService" in listed
    assert "rpc Generate" in listed  # describe
    assert json.loads(health)["status"] == "SERVING"
    events = [json.loads(chunk) for chunk in re.split(r"(?<=})\n(?={)", generated.strip())]
    kinds = [next(k for k in e["event"] if k not in ("task_id", "taskId")) for e in events]
    assert kinds[0] == "queued" and "token" in kinds and kinds[-1] == "finished"
    assert '"drained": true' in pools  # DrainPool's answer
    model = json.loads(models)["models"][0]
    assert model.get("model_id", model.get("modelId")) == "tiny-llama"

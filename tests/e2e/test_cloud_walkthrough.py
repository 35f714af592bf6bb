"""docs/cloud.md, run as written: every ```sh block of the page, in order, in one bash, with
the ports moved to free ones. The walkthrough sets up a CA and certificates, a catalog, two
pool managers and an orchestrator as separate `llorch serve` processes over mTLS, makes API keys,
generates through a client key, lists pools with an operator key, and sees a client key refused
on an operator RPC and after its revocation, and an operator certificate refused after it is
put on the denylist."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)  # a loaded machine takes more than the suite's 120 s
def test_the_cloud_walkthrough_runs_as_written(tmp_path: Path) -> None:
    page = (REPO / "docs" / "cloud.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", page, re.S)
    assert len(blocks) >= 7
    script = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + "\n".join(blocks)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "ROOT": str(tmp_path / "llorch-cloud"),
        "GRPC_VERBOSITY": "ERROR",
        **{
            name: str(free_port())
            for name in (
                "CATALOG_PORT",
                "NODE_A_PORT",
                "NODE_B_PORT",
                "ORCHESTRATOR_PORT",
                "NODES_PORT",
                "REST_PORT",
            )
        },
    }
    for name in ("LLORCH_CA_FILE", "LLORCH_CERT_FILE", "LLORCH_KEY_FILE", "LLORCH_API_KEY"):
        env.pop(name, None)
    # Its own process group, killed whatever happens: a walkthrough cut short (a timeout)
    # leaves no llorch serve behind, as its EXIT trap would not run.
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text()[-1500:]}"
        for p in sorted((tmp_path / "llorch-cloud" / "logs").glob("*.log"))
    )
    assert done.returncode == 0, done.stdout + done.stderr + logs
    out = done.stdout
    assert "tiny-llama" in out  # models list
    assert "node-a/cpu-0" in out and "node-b/cpu-0" in out, out  # pools list
    assert re.search(r"node-a\s+localhost:\d+\s+reachable\s+registered", out), out
    rest = [json.loads(line) for line in out.splitlines() if line.startswith('{"result"')]
    # curl over HTTPS (the tiny model may sample its end of sequence before 8 tokens)
    assert 1 <= rest[-1]["result"]["event"]["finished"]["tokens_out"] <= 8, out
    lines = out.splitlines()
    refusal = json.loads(lines[lines.index("403") - 1])  # the body, then curl's status line
    assert refusal["details"][0]["reason"] == "ROLE_NOT_ALLOWED", refusal
    assert done.stderr.count("UNAUTHENTICATED") == 2, done.stderr  # revoked key, revoked cert
    assert "API key is unknown, malformed or revoked" in done.stderr
    assert "certificate operator/laptop" in done.stderr and "is revoked" in done.stderr
    assert done.stderr.count("PERMISSION_DENIED") == 1, done.stderr  # client key, operator RPC

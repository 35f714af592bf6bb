"""The relay benchmark runs end to end (its figures are not asserted: machines are noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_relay_benchmark_runs_and_prints_its_json_line() -> None:
    result = subprocess.run(
        [sys.executable, "bench/relay.py", "--models", "tiny", "--runs", "4", "--tokens", "32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    tiny = figures["tiny-llama"]
    for path in ("direct", "mesh", "mesh-grpc"):
        assert tiny[path]["runs"] == 4
        assert tiny[path]["tokens_per_run"] == 32
        assert tiny[path]["tokens_per_s"] > 0
    for path in ("mesh", "mesh-grpc"):
        assert "ttft_added_p50_ms" in tiny[path]
        assert "tokens_per_s_ratio" in tiny[path]

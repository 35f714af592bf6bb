"""The prediction benchmark runs a small mixed load and prints its JSON line (not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prediction_benchmark_runs_and_prints_its_json_line() -> None:
    result = subprocess.run(
        [sys.executable, "bench/prediction.py", "--tasks", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["tasks"] == 8
    assert figures["at_submit"]["median_actual_ms"] >= 0

"""The placement benchmark runs and reports every pool count (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_placement_benchmark_runs_and_prints_its_json_line() -> None:
    result = subprocess.run(
        [sys.executable, "bench/placement.py", "--calls", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures["pools"]) == {"8", "64", "256"}
    for size in figures["pools"].values():
        assert {c["outcome"] for c in size["cases"].values()} == {"assign", "wait"}
    assert figures["ratio_to_target_at_256"] > 0

"""Runs a benchmark script as a user would and returns the JSON of its last line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout_s: float = 120) -> dict[str, Any]:
    """``python bench/<script> <args>`` from the repository root; fails the test on error."""
    result = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures

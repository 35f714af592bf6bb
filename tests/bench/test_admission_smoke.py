"""The admission benchmark runs both cases and prints its JSON line (figures not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_admission_benchmark_runs_and_prints_its_json_line() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "bench/admission.py",
            "--seconds",
            "0.5",
            "--clients",
            "1",
            "--concurrency",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["get_task_per_s"] > 0
    for case in ("queueing", "serving"):
        assert figures[case]["admissions_per_s"] > 0
        assert figures[case]["ratio_to_target"] > 0

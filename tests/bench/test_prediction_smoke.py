"""The prediction benchmark runs a small mixed load and prints its JSON line (not asserted)."""

from __future__ import annotations

from tests.bench.runner import run_bench


def test_prediction_benchmark_runs_and_prints_its_json_line() -> None:
    # Two pools of two slots: half of the eight tasks wait, batched with the others.
    figures = run_bench("prediction.py", "--tasks", "8", "--slots", "2")
    assert figures["tasks"] == 8 and figures["slots"] == 2
    assert figures["at_submit"]["median_actual_ms"] >= 0

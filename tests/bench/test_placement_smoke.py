"""The placement benchmark runs and reports every pool count (figures are not asserted)."""

from __future__ import annotations

from tests.bench.runner import run_bench


def test_placement_benchmark_runs_and_prints_its_json_line() -> None:
    figures = run_bench("placement.py", "--calls", "20")
    assert set(figures["pools"]) == {"8", "64", "256"}
    for size in figures["pools"].values():
        assert {c["outcome"] for c in size["cases"].values()} == {"assign", "wait"}
    assert figures["ratio_to_target_at_256"] > 0

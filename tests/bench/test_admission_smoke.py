"""The admission benchmark runs every case and prints its JSON line (figures not asserted)."""

from __future__ import annotations

from tests.bench.runner import run_bench


def test_admission_benchmark_runs_and_prints_its_json_line() -> None:
    figures = run_bench(
        "admission.py", "--seconds", "0.5", "--clients", "1", "--concurrency", "4", "--batch", "10"
    )
    assert figures["get_task_per_s"] > 0
    for case in ("queueing", "serving", "batched"):
        assert figures[case]["admissions_per_s"] > 0
        assert figures[case]["ratio_to_target"] > 0

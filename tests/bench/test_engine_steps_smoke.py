"""The engine step benchmark runs end to end (its figures are not asserted: machines are noisy)."""

from __future__ import annotations

from tests.bench.runner import run_bench


def test_engine_steps_benchmark_runs_and_prints_its_json_line() -> None:
    figures = run_bench("engine_steps.py", "--model", "tiny")
    assert figures["model"] == "tiny-llama" and figures["prompt_tokens"] > 1
    assert set(figures["prompts_ms"]) == {"1", "2", "4", "8", "16"}
    assert set(figures["decode_step_ms"]) == {"1", "4", "8", "16"}
    assert set(figures["chunk64_ms_at"]) == {"0", "960", "1856"}
    assert all(v >= 0 for v in figures["logits_delta_vs_alone"].values())

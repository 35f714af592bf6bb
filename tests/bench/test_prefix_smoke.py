"""The prefix benchmark runs end to end, both parts (its timings are not asserted: machines are
noisy; that the cache was used is)."""

from __future__ import annotations

from tests.bench.runner import run_bench


def test_prefix_benchmark_runs_both_parts_and_prints_its_json_line() -> None:
    figures = run_bench(
        "prefix.py",
        *("--model", "tiny", "--tokens", "4", "--sessions", "1", "--system-tokens", "300"),
        *("--fleet-sessions", "2", "--fleet-system-tokens", "300", "--turns", "2"),
        *("--think-s", "0.2"),
        timeout_s=300,
    )
    reuse = figures["reuse"]
    assert reuse["on"]["follow_up_tokens_cached"] > 0
    assert reuse["off"]["follow_up_tokens_cached"] == 0
    assert reuse["follow_up_ttft_ratio"] > 0
    for mode in ("affinity", "least_loaded"):
        row = figures["affinity"][mode]
        assert row["follow_ups"] == 2 and 0 <= row["hit_rate"] <= 1
        assert row["ttft_p50_ms"] <= row["ttft_p99_ms"] and row["tokens_per_s"] > 0

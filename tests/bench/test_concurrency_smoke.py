"""The concurrency benchmark runs end to end (its figures are not asserted: machines are noisy)."""

from __future__ import annotations

from tests.bench.runner import run_bench


def test_concurrency_benchmark_runs_and_prints_its_json_line() -> None:
    figures = run_bench(
        "concurrency.py",
        *("--model", "tiny", "--levels", "1,2", "--rounds", "1", "--tokens", "8"),
        *("--chunks", "64"),
        timeout_s=240,
    )
    assert (figures["model"], figures["slots"], figures["tokens"]) == ("tiny-llama", 2, 8)
    for level in ("1", "2"):
        row = figures["levels"][level]
        for path in ("serial", "slots=1", "slots=N"):
            assert row[path]["aggregate_tokens_per_s"] > 0
            assert row[path]["ttft_p50_ms"] <= row[path]["ttft_p99_ms"]
        assert row["slots=N / slots=1"]["aggregate"] > 0
    long = figures["long_prompt"]["64"]
    assert long["prompt_tokens"] == 2000 and long["long_ttft_ms"] > 0

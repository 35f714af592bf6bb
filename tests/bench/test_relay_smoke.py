"""The relay benchmark runs end to end (its figures are not asserted: machines are noisy)."""

from __future__ import annotations

from tests.bench.runner import run_bench


def test_relay_benchmark_runs_and_prints_its_json_line() -> None:
    figures = run_bench("relay.py", "--models", "tiny", "--runs", "4", "--tokens", "32")
    assert figures["devices"] == "cpu"
    tiny = figures["tiny-llama"]
    for path in ("direct", "mesh", "mesh-grpc"):
        assert tiny[path]["runs"] == 4
        assert tiny[path]["tokens_per_run"] == 32
        assert tiny[path]["tokens_per_s"] > 0
    for path in ("mesh", "mesh-grpc"):
        assert "ttft_added_p50_ms" in tiny[path]
        assert "tokens_per_s_ratio" in tiny[path]

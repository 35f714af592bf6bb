"""The load benchmark runs end to end, small: every queued task and every stream completes (its
timings are not asserted: machines are noisy; what it counted is)."""

from __future__ import annotations

from tests.bench.runner import run_bench


def test_load_benchmark_queues_drains_and_streams_everything() -> None:
    figures = run_bench(
        "load.py",
        *("--queued", "300", "--streams", "50", "--stream-tokens", "4", "--engine-tasks", "50"),
        timeout_s=120,
    )
    assert figures["layout"] == "serve" and figures["rss_of"] == "orchestrator process"
    assert figures["queued"] == figures["queued_seen"] == 300 and figures["refused"] == 0
    assert figures["succeeded"] == 300 and figures["lost"] == 0
    assert figures["states"] == {"TASK_STATE_SUCCEEDED": 300}
    assert figures["target_drained_all_ok"] and figures["target_rss_queued_ok"]
    assert 0 < figures["rss_before_mb"] and 0 < figures["rss_queued_mb"] <= figures["rss_peak_mb"]
    assert figures["drain_s"] > 0 and figures["tasks_per_s"] > 0
    assert figures["ms_per_task"] > 0 and figures["engine_ms_per_task"] > 0
    assert figures["cpu_ms_per_task"]["orchestrator"] > 0
    assert figures["cpu_ms_per_task"]["workers"] > 0
    streams = figures["streams"]
    assert streams["started"] == streams["completed"] == 50 and streams["failed"] == 0
    assert 0 < streams["ttft_p50_ms"] <= streams["ttft_p99_ms"]
    assert figures["target_streams_complete_ok"]

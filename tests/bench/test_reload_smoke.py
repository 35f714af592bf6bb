"""bench/reload.py runs end to end on a small model and reports both reload paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runner import run_bench


def test_reload_bench_reports_cold_and_ram(tmp_path: Path) -> None:
    figures = run_bench(
        "reload.py", "--small", "--rounds", "1", "--model-dir", str(tmp_path), timeout_s=240
    )
    assert figures["bench"] == "reload" and figures["model"] == "bench-170m"
    for key in ("reload_cold_disk_ms", "reload_ram_ms", "plain_warm_load_ms"):
        assert figures[key] > 0
    # The ratio comes from the unrounded times, so it may differ from one of the printed
    # (rounded) times by a unit in the last place.
    assert figures["cold_over_ram"] == pytest.approx(
        figures["reload_cold_disk_ms"] / figures["reload_ram_ms"], abs=0.011
    )

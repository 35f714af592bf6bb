"""bench/gateway.py runs end to end and reports REST beside gRPC."""

from __future__ import annotations

import pytest

from launch.gateway import find_gateway
from tests.bench.runner import run_bench


@pytest.mark.skipif(find_gateway() is None, reason="llorch-gateway is not built (`make gateway`)")
def test_gateway_bench_reports_rest_beside_grpc() -> None:
    figures = run_bench("gateway.py", "--runs", "3", "--tokens", "8")
    assert figures["bench"] == "gateway" and figures["runs"] == 3
    for key in ("grpc_ttft_ms", "rest_ttft_ms", "grpc_total_ms", "rest_total_ms"):
        assert figures[key] > 0
    assert figures["grpc_ttft_ms"] <= figures["grpc_total_ms"]
    assert figures["rest_ttft_ms"] <= figures["rest_total_ms"]
    assert figures["rest_over_grpc_ttft"] > 0 and figures["rest_over_grpc_total"] > 0

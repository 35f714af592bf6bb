"""bench/gateway.py runs end to end and reports REST and the OpenAI routes beside gRPC."""

from __future__ import annotations

import pytest

from launch.gateway import find_gateway
from tests.bench.runner import run_bench


@pytest.mark.skipif(find_gateway() is None, reason="llorch-gateway is not built (`make gateway`)")
def test_gateway_bench_reports_rest_and_openai_beside_grpc() -> None:
    figures = run_bench("gateway.py", "--runs", "3", "--tokens", "8")
    assert figures["bench"] == "gateway" and figures["runs"] == 3
    for kind in ("grpc", "grpc_chat", "rest", "openai_completions", "openai_chat"):
        assert 0 < figures[f"{kind}_ttft_ms"] <= figures[f"{kind}_total_ms"]
        if not kind.startswith("grpc"):
            assert figures[f"{kind}_over_grpc_ttft"] > 0
            assert figures[f"{kind}_over_grpc_total"] > 0

"""Prometheus metrics: scraped over HTTP from a running mesh, they move as tasks run, by the
seed's metric contract; with TLS the endpoint asks for a client certificate from the CA whose
role may read metrics, and not on the denylist."""

from __future__ import annotations

import asyncio
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from llorch.orchestrator.v1 import orchestrator_pb2
from prometheus_client.parser import text_string_to_metric_families

from mesh.metrics import serve_metrics
from poolmanager.metrics import pool_manager_registry
from tests.conftest import Mesh
from tests.e2e.helpers import collect, generate_request
from tests.e2e.secure_mesh import Pki

CONTRACT = {
    "tasks_enqueued_total",
    "tasks_started_total",
    "tasks_canceled_total",
    "tasks_rejected_total",
    "admission_backpressure_events_total",
    "queue_depth",
    "latency_first_token_ms",
    "latency_decode_ms",
    "tokens_in_total",
    "tokens_out_total",
    "vram_used_bytes",
    "gpu_utilization",
    "model_cache_hits_total",
    "placement_decisions_total",
}


def _scrape(url: str, context: ssl.SSLContext | None = None) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        text = response.read().decode()
    samples: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _total(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return sum(
        value
        for (n, got), value in samples.items()
        if n == name and all(dict(got).get(k) == v for k, v in labels.items())
    )


async def test_metrics_move_as_tasks_run(mesh: Mesh) -> None:
    await mesh.settle()
    endpoint = serve_metrics(
        "127.0.0.1:0",
        [
            mesh.orchestrator.orchestrator.metrics.registry,
            pool_manager_registry(mesh.pool_manager.manager),
        ],
        None,
    )
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    try:
        before = await asyncio.to_thread(_scrape, url)
        # Every family is there before anything happened (label-less ones at least declared).
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=10).read().decode()
        )
        for metric in CONTRACT:
            assert f"# TYPE {metric.removesuffix('_total')}" in text, metric

        for _ in range(3):
            done = await collect(mesh.stub.Generate(generate_request(max_tokens=4)))
            assert done.finished.tokens_out == 4
        with pytest.raises(grpc.aio.AioRpcError):
            await mesh.stub.SubmitTask(
                orchestrator_pb2.SubmitTaskRequest(model_id="no-such-model", prompt="x")
            )
        cancelled = mesh.stub.Generate(generate_request(max_tokens=2000))
        async for response in cancelled:
            if response.event.WhichOneof("kind") == "token":
                break
        cancelled.cancel()
        for _ in range(100):  # the server learns of the cancel a moment later
            after = await asyncio.to_thread(_scrape, url)
            if _total(after, "tasks_canceled_total") > _total(before, "tasks_canceled_total"):
                break
            await asyncio.sleep(0.05)

        moved = {
            name: _total(after, name, **labels) - _total(before, name, **labels)
            for name, labels in [
                ("tasks_enqueued_total", {"model_id": "tiny-llama", "priority": "interactive"}),
                ("tasks_started_total", {"model_id": "tiny-llama"}),
                ("tasks_canceled_total", {"model_id": "tiny-llama"}),
                ("tasks_rejected_total", {"reason": "MODEL_NOT_FOUND"}),
                ("tokens_out_total", {"model_id": "tiny-llama"}),
                ("tokens_in_total", {"model_id": "tiny-llama"}),
                ("latency_first_token_ms_count", {"model_id": "tiny-llama"}),
                ("latency_decode_ms_count", {"model_id": "tiny-llama"}),
                ("placement_decisions_total", {"outcome": "assign"}),
            ]
        }
        assert moved["tasks_enqueued_total"] == 4
        assert moved["tasks_started_total"] == 4
        assert moved["tasks_canceled_total"] == 1
        assert moved["tasks_rejected_total"] == 1
        assert moved["tokens_out_total"] == 12
        assert moved["tokens_in_total"] > 0
        assert moved["latency_first_token_ms_count"] == 3
        assert moved["latency_decode_ms_count"] == 3
        assert moved["placement_decisions_total"] >= 4
        assert _total(after, "queue_depth") == 0
        assert ("model_cache_hits_total", (("node_id", "local"),)) in after
        assert _total(after, "process_cpu_seconds_total") > 0
        # Bounded labels: no task ids, tenants or prompts.
        for _, labels in after:
            assert {k for k, _ in labels} <= {
                "model_id", "priority", "pool", "reason", "kind", "outcome", "node_id", "gpu", "le"
            }  # fmt: skip
    finally:
        endpoint.stop()


def test_with_tls_the_endpoint_asks_for_a_certificate_whose_role_may_scrape(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki")
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("tasks_enqueued", "x", registry=registry).inc()
    endpoint = serve_metrics("127.0.0.1:0", [registry], pki.files("orch"))
    url = f"https://localhost:{endpoint.port}/metrics"

    def scraper(name: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(pki.ca))
        files = pki.files(name)
        context.load_cert_chain(str(files.cert), str(files.key))
        return context

    try:
        for allowed in ("prometheus", "alice", "orch"):  # roles metrics, operator, orchestrator
            assert _total(_scrape(url, scraper(allowed)), "tasks_enqueued_total") == 1, allowed
        for refused, says in (
            ("bob", "client/bob may not read metrics"),
            ("node-a", "poolmanager/node-a may not read metrics"),
            ("mallory", "operator/mallory is revoked"),  # on the denylist beside the CA
        ):
            with pytest.raises(urllib.error.HTTPError) as denied:
                _scrape(url, scraper(refused))
            assert denied.value.code == 403 and says in denied.value.read().decode(), refused
        anonymous = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _scrape(url, anonymous)
        # A peer that connects and says nothing holds up only itself.
        with socket.create_connection(("127.0.0.1", endpoint.port)):
            assert _total(_scrape(url, scraper("prometheus")), "tasks_enqueued_total") == 1
    finally:
        endpoint.stop()
    with pytest.raises(ValueError, match="without TLS"):
        serve_metrics("0.0.0.0:0", [registry], None)


def test_the_grafana_dashboard_charts_only_metrics_that_exist() -> None:
    import json
    import re

    dashboard = json.loads(
        (Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "llama-orch.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        name
        for expr in exprs
        for name in re.findall(
            r"\b([a-z_]+(?:_total|_bucket|_bytes|_depth|_utilization|_ready))\b", expr
        )
    }
    served = {m for m in CONTRACT} | {"model_cache_misses_total", "pool_ready"}
    served |= {f"{m}_bucket" for m in ("latency_first_token_ms", "latency_decode_ms")}
    assert used <= served, used - served
    assert {"queue_depth", "tasks_enqueued_total", "latency_first_token_ms_bucket"} <= used

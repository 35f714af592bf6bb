"""A pool manager's metrics, named by the seed's metric contract: its GPUs as NVML reports them
at scrape time, and its RAM staging cache. Labels: GPU index, pool id, model id (bounded by the
node's devices, pools and catalog)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from poolmanager.manager import PoolManager
from poolmanager.pool import PoolState


class _NodeCollector(Collector):
    def __init__(self, manager: PoolManager) -> None:
        self._manager = manager

    def collect(self) -> Iterable[Any]:
        node = self._manager.node_id
        vram = GaugeMetricFamily(
            "vram_used_bytes", "VRAM in use on each GPU (NVML).", labels=["node_id", "gpu"]
        )
        util = GaugeMetricFamily(
            "gpu_utilization",
            "GPU utilization over NVML's last sample, 0 to 1.",
            labels=["node_id", "gpu"],
        )
        for device in self._manager.inventory.devices():
            vram.add_metric([node, str(device.index)], device.vram_used_bytes)
            util.add_metric([node, str(device.index)], device.utilization_pct / 100)
        yield vram
        yield util
        cache = self._manager.staging
        hits = CounterMetricFamily(
            "model_cache_hits",
            "Model loads served from the RAM staging cache.",
            labels=["node_id"],
        )
        misses = CounterMetricFamily(
            "model_cache_misses",
            "Model loads that had to read the model store.",
            labels=["node_id"],
        )
        hits.add_metric([node], cache.hits if cache else 0)
        misses.add_metric([node], cache.misses if cache else 0)
        yield hits
        yield misses
        ready = GaugeMetricFamily(
            "pool_ready", "1 when a pool is ready to serve.", labels=["node_id", "pool", "model_id"]
        )
        labels = ["node_id", "pool"]  # counters of the pool, whichever model it runs
        hit = CounterMetricFamily(
            "prefix_cache_hit_tokens",
            "Prompt tokens whose KV cells came from the worker's prefix cache.",
            labels=labels,
        )
        lookup = CounterMetricFamily(
            "prefix_cache_lookup_tokens",
            "Prompt tokens of finished executions (what the prefix cache was asked for).",
            labels=labels,
        )
        entries = GaugeMetricFamily(
            "prefix_cache_entries", "Finished sequences resident in the KV cache.", labels=labels
        )
        for pool in self._manager.pools.values():
            values = [node, pool.settings.pool_id]
            is_ready = 1.0 if pool.state is PoolState.READY else 0.0
            ready.add_metric([*values, pool.model_id], is_ready)
            hit.add_metric(values, pool.prefix_hit_tokens)
            lookup.add_metric(values, pool.prefix_lookup_tokens)
            worker = pool.worker
            entries.add_metric(values, worker.cache.entries if worker is not None else 0)
        yield ready
        yield hit
        yield lookup
        yield entries


def pool_manager_registry(manager: PoolManager) -> CollectorRegistry:
    """The pool manager's metrics, in their own registry."""
    registry = CollectorRegistry(auto_describe=False)  # collecting reads NVML: not at import
    registry.register(_NodeCollector(manager))
    return registry

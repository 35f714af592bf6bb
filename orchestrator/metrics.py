"""The orchestrator's metrics, named by the seed's metric contract.

Labels are bounded: model ids come from the catalog, pools from the fleet, priorities, reasons
and outcomes from fixed sets. Never a task id, tenant, prompt or key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.placement import PoolKey, pool_key
from orchestrator.tasks import Failed, Finished, Started, Task, TaskEvent

_MS_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000)


class _QueueDepth(Collector):
    def __init__(self, depth: Callable[[], Mapping[str, int]]) -> None:
        self._depth = depth

    def describe(self) -> Iterable[Any]:
        """What ``collect`` yields, without reading the queue (registration calls this)."""
        yield self._family()

    def collect(self) -> Iterable[Any]:
        gauge = self._family()
        for priority, count in sorted(self._depth().items()):
            gauge.add_metric([priority], count)
        yield gauge

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "queue_depth", "Tasks waiting in the admission queue.", labels=["priority"]
        )


class OrchestratorMetrics:
    """Counters and histograms of admission, placement and tasks, in their own registry."""

    def __init__(self, queue_depth: Callable[[], Mapping[str, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.enqueued = Counter(
            "tasks_enqueued", "Tasks admitted.", ["model_id", "priority"], registry=r
        )
        self.started = Counter(
            "tasks_started", "Tasks that started on a pool.", ["model_id", "pool"], registry=r
        )
        self.canceled = Counter("tasks_canceled", "Tasks cancelled.", ["model_id"], registry=r)
        self.failed = Counter(
            "tasks_failed", "Tasks that ended with an error.", ["model_id", "reason"], registry=r
        )
        self.rejected = Counter(
            "tasks_rejected", "Submissions refused at admission.", ["reason"], registry=r
        )
        self.backpressure = Counter(
            "admission_backpressure_events",
            "A full queue refused a task (queue_full) or dropped one (dropped).",
            ["kind"],
            registry=r,
        )
        self.first_token = Histogram(
            "latency_first_token_ms",
            "From a task's start on a pool to its first token, in ms.",
            ["model_id"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            "latency_decode_ms",
            "From a task's first token to its last, in ms.",
            ["model_id"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.tokens_in = Counter("tokens_in", "Prompt tokens read.", ["model_id"], registry=r)
        self.tokens_out = Counter("tokens_out", "Tokens generated.", ["model_id"], registry=r)
        self.decisions = Counter(
            "placement_decisions",
            "Placement decisions by outcome (assign, wait, reject).",
            ["outcome"],
            registry=r,
        )
        r.register(_QueueDepth(queue_depth))
        self.per_pool: dict[PoolKey, tuple[int, int]] = {}
        """node/pool → (tasks finished, tokens generated), for ListPools and `llorch top`."""

    def on_event(self, task: Task, event: TaskEvent) -> None:
        """A task's event (the Tokens events are not looked at: the token path stays bare)."""
        model = task.spec.model_id
        if isinstance(event, Started):
            self.started.labels(model, pool_key(event.node_id, event.pool_id)).inc()
        elif isinstance(event, Finished):
            pool = pool_key(task.node_id, task.pool_id)
            finished, tokens = self.per_pool.get(pool, (0, 0))
            self.per_pool[pool] = (finished + 1, tokens + event.tokens_out)
            self.tokens_in.labels(model).inc(event.tokens_in)
            self.tokens_out.labels(model).inc(event.tokens_out)
            self.first_token.labels(model).observe(event.ttft_ms)
            self.decode.labels(model).observe(event.decode_ms)
        elif isinstance(event, Failed):
            if event.error.reason == "TASK_CANCELLED":
                self.canceled.labels(model).inc()
            else:
                self.failed.labels(model, event.error.reason).inc()

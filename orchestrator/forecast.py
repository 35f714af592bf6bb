"""Start-time predictions: measured service times, when slots free, queue positions.

The forecaster owns what it measures (service times per pool and model, how fast the queue
drains) and the slot simulation of the last publication. Placement never waits for it: it
publishes Queued updates (position, predicted start) at most once per ``position_interval_s``,
and a task admitted at the tail continues the last simulation instead of replaying the queue.
A publication replays the whole queue, so a deep queue publishes less often than that: the
publications take at most ``PUBLISH_SHARE`` of the orchestrator's time.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from mesh.prefix import BYTES_PER_TOKEN
from mesh.settings import OrchestratorSettings
from orchestrator.admission import AdmissionQueue, DrainMeter
from orchestrator.placement import PoolKey, PoolView, pool_key
from orchestrator.tasks import Task, TaskSpec

# Until a model has measured service times, predictions assume this much per task.
_DEFAULT_SERVICE_MS = 1000.0
_EWMA_WEIGHT = 0.3
_ANY_POOL = PoolKey("")
PUBLISH_SHARE = 0.1
"""Most share of the event loop's time that publishing positions may take: after a publication
that took d seconds, the next comes d / PUBLISH_SHARE later at the soonest. Replaying 10,000
queued tasks took 50-100 ms, longer than the 50 ms interval: publishing had taken 80% of the
loop, and the queue drained at a tenth of the rate it had once shorter (bench/load.py)."""


@dataclass(frozen=True)
class ServiceTime:
    """How long executions take on a pool: fixed part, per token, and the share of max_tokens
    they really produce."""

    fixed_ms: float
    per_token_ms: float
    fill: float

    def blend(self, sample: ServiceTime, weight: float) -> ServiceTime:
        """The moving average after one more sample."""
        return ServiceTime(
            self.fixed_ms + weight * (sample.fixed_ms - self.fixed_ms),
            self.per_token_ms + weight * (sample.per_token_ms - self.per_token_ms),
            self.fill + weight * (sample.fill - self.fill),
        )


class Forecaster:
    """Service times, slot ETAs and the queue's published positions."""

    def __init__(
        self,
        settings: OrchestratorSettings,
        queue: AdmissionQueue,
        clock: Callable[[], float],
        views: Callable[[], Iterable[PoolView]],
        running: Callable[[], Iterable[Task]],
    ) -> None:
        """``views``: the pools now; ``running``: the tasks executing now."""
        self._settings = settings
        self._queue = queue
        self._clock = clock
        self._views = views
        self._running = running
        self._drain = DrainMeter()
        self._bytes_per_token: dict[str, float] = {}
        # Measured service times, EWMA: by (pool key, model) and by ("", model).
        self._service: dict[tuple[PoolKey, str], ServiceTime] = {}
        # The prediction simulation per model as the last publication left it, and when.
        self._tails: dict[str, list[tuple[float, PoolKey]]] = {}
        self._tails_at = 0.0
        self._positions_at = -math.inf
        self._positions_interval_s = settings.position_interval_s
        self._positions_timer: asyncio.TimerHandle | None = None

    def stop(self) -> None:
        """Cancels a pending publication."""
        if self._positions_timer is not None:
            self._positions_timer.cancel()
            self._positions_timer = None

    def service_time(self, key: PoolKey, model_id: str) -> ServiceTime | None:
        """The measured service time of ``model_id`` on a pool (``PoolKey("")``: any pool)."""
        return self._service.get((key, model_id))

    # --- measuring ---------------------------------------------------------------------------

    def started(self, now: float) -> None:
        """A task left the queue for a pool."""
        self._drain.record(now)

    def finished(
        self,
        key: PoolKey,
        spec: TaskSpec,
        total_ms: float,
        tokens_out: int,
        decode_ms: float,
        tokens_in: int = 0,
    ) -> None:
        """Folds one finished execution into the pool's and the model's service averages, and
        its prompt's bytes per token into the model's."""
        if tokens_in > 0 and spec.prompt:
            ratio = len(spec.prompt.encode()) / tokens_in
            old_ratio = self._bytes_per_token.get(spec.model_id)
            self._bytes_per_token[spec.model_id] = (
                ratio if old_ratio is None else old_ratio + _EWMA_WEIGHT * (ratio - old_ratio)
            )
        sample = ServiceTime(
            fixed_ms=max(0.0, total_ms - decode_ms),
            per_token_ms=decode_ms / max(1, tokens_out - 1),
            fill=min(1.0, tokens_out / max(1, spec.sampling.max_tokens)),
        )
        for k in ((key, spec.model_id), (_ANY_POOL, spec.model_id)):
            old = self._service.get(k)
            self._service[k] = sample if old is None else old.blend(sample, _EWMA_WEIGHT)

    # --- predicting --------------------------------------------------------------------------

    def bytes_per_token(self, model_id: str) -> float:
        """Bytes of prompt text per token of the model's tokenizer, as measured (BYTES_PER_TOKEN
        before the first finished task)."""
        return self._bytes_per_token.get(model_id, BYTES_PER_TOKEN)

    def estimate_ms(self, key: PoolKey, model_id: str, max_tokens: int) -> float:
        """How long a task of ``model_id`` asking for ``max_tokens`` holds a slot of the pool:
        the pool's measured fixed time (prompt, hops) plus its measured time per token times
        the tokens such tasks really produce (they may stop before max_tokens)."""
        measured = self._service.get((key, model_id)) or self._service.get((_ANY_POOL, model_id))
        if measured is None:
            return _DEFAULT_SERVICE_MS
        tokens = max(1.0, max_tokens * measured.fill)
        return measured.fixed_ms + measured.per_token_ms * (tokens - 1)

    def retry_delay_s(self, model_id: str, now: float) -> float:
        """When a refused client should retry: the time for one place to free up, measured
        from how fast the queue drains (before any drained: one predicted service time)."""
        rate = self._drain.rate(now)
        delay = (
            1.0 / rate
            if rate
            else self.estimate_ms(_ANY_POOL, model_id, self._settings.default_max_tokens) / 1000
        )
        return min(60.0, max(0.05, delay))

    def predict_next(self, task: Task, now: float) -> int:
        """Predicted start of a task just added at the end of the queue."""
        model = task.spec.model_id
        heap = self._tails.get(model)
        if heap is None:
            heap = self._tails[model] = self._slot_heap(
                model, self._views(), self._running_left_ms(now)
            )
        # The simulation ran at _tails_at; the time since then has passed for every slot.
        elapsed_ms = (now - self._tails_at) * 1000
        return max(0, self._pop_slot(heap, task) - round(elapsed_ms))

    def schedule_positions(self, now: float) -> None:
        """Publishes positions now, or once ``position_interval_s`` after the last time.

        Placement never waits for this; only the Queued updates are coalesced, so a queue of
        thousands costs one pass over it per interval instead of one per task that starts, and
        the interval grows with what a pass costs (``PUBLISH_SHARE``).
        """
        if self._positions_timer is not None:
            return
        delay = self._positions_at + self._positions_interval_s - now
        if delay <= 0:
            self._publish_positions(now)
            return
        self._positions_timer = asyncio.get_running_loop().call_later(
            delay, self._publish_positions_later
        )

    def _publish_positions_later(self) -> None:
        self._positions_timer = None
        self._publish_positions(self._clock())

    def _publish_positions(self, now: float) -> None:
        """Sends every queued task its position and predicted start (when they changed).

        The prediction replays the queue on the slots serving each model: a slot frees when its
        running task's measured service time is up, then serves the next task of its model in
        queue order for that pool's measured service time.
        """
        began = self._clock()
        views = self._views()
        running = self._running_left_ms(now)
        self._tails = {}
        for position, task in enumerate(self._queue):
            model = task.spec.model_id
            heap = self._tails.get(model)
            if heap is None:
                heap = self._tails[model] = self._slot_heap(model, views, running)
            task.set_queued(position, self._pop_slot(heap, task))
        self._tails_at = now
        self._positions_at = now
        self._positions_interval_s = max(
            self._settings.position_interval_s, (self._clock() - began) / PUBLISH_SHARE
        )

    def _running_left_ms(self, now: float) -> dict[PoolKey, list[float]]:
        """Per pool: how long each running task should still take, from measured times."""
        left: dict[PoolKey, list[float]] = {}
        for task in self._running():
            if task.started_at is None:
                continue
            key = pool_key(task.node_id, task.pool_id)
            expected = self.estimate_ms(key, task.spec.model_id, task.spec.sampling.max_tokens)
            left.setdefault(key, []).append(max(0.0, expected - (now - task.started_at) * 1000))
        return left

    @staticmethod
    def _slot_heap(
        model_id: str, views: Iterable[PoolView], running: Mapping[PoolKey, list[float]]
    ) -> list[tuple[float, PoolKey]]:
        """When each slot of the pools serving ``model_id`` frees, in ms from now, as a heap."""
        heap: list[tuple[float, PoolKey]] = []
        for v in views:
            if v.model_id != model_id or not v.reachable or v.failed or v.draining:
                continue
            times = sorted(running.get(v.key, ()))[: v.slots_total]
            times += [0.0] * (v.slots_total - len(times))
            heap.extend((t, v.key) for t in times)
        heapq.heapify(heap)
        return heap

    def _pop_slot(self, heap: list[tuple[float, PoolKey]], task: Task) -> int:
        """The next slot to free takes ``task``: when it starts, in ms from the simulation."""
        if not heap:
            return 0  # no pool serves the model now: nothing to predict from
        free_at, key = heapq.heappop(heap)
        busy_ms = self.estimate_ms(key, task.spec.model_id, task.spec.sampling.max_tokens)
        heapq.heappush(heap, (free_at + busy_ms, key))
        return round(free_at)

"""Orchestrator: admits tasks, queues them, places them on pools and relays their tokens.

A plain asyncio class; the servicer converts protobuf and calls it. One dispatcher loop owns the
queue: it wakes on every change (a task admitted, cancelled or finished, a pool's state changed),
places what it can, and publishes fresh queue positions. Each running task has one relay
coroutine that calls the pool manager's Execute and appends events to the task's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import grpc
from llorch.common.v1 import common_pb2
from llorch.poolmanager.v1 import poolmanager_pb2
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from catalog.client import CatalogClient
from mesh import logs, tracing
from mesh.common_types import FINISH_REASON_FROM_PB
from mesh.errors import CancelledError as TaskCancelledError
from mesh.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LlorchError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    error_from_dict,
    error_to_dict,
    from_rpc_error,
)
from mesh.ids import random_id
from mesh.interceptors import CORRELATION_HEADER
from mesh.settings import OrchestratorSettings
from orchestrator.admission import AdmissionQueue, DrainMeter, QueueFullError, WhenFull
from orchestrator.journal import Journal, TaskRow, spec_from_json, spec_to_json
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.placement import (
    Outcome,
    PlacementDecision,
    PlacementInput,
    PoolView,
    PreloadAction,
    choose_preload,
    decide,
    is_starving,
    preload_action,
)
from orchestrator.pools import NodeView, PoolRegistry
from orchestrator.tasks import (
    Failed,
    Finished,
    Metrics,
    Started,
    Task,
    TaskEvent,
    TaskSpec,
    TaskState,
    Tokens,
)
from orchestrator.tracing import TaskTrace

_log = logs.get_logger("orchestrator")

_VIEWS_FRESH_S = 0.005
"""How long pool views with their slot ETAs are reused while no pool changes (ETAs are
estimates in ms; 5 ms of age changes no decision)."""


class ExecuteCall(Protocol):
    """A pool manager's Execute stream: a grpc.aio call, or poolmanager.local's in-process twin."""

    def __aiter__(self) -> AsyncIterator[poolmanager_pb2.ExecuteResponse]: ...

    def cancel(self) -> bool: ...


# Until a model has measured service times, predictions assume this much per task.
_DEFAULT_SERVICE_MS = 1000.0
_EWMA_WEIGHT = 0.3


class Orchestrator:
    """The control plane of the mesh."""

    def __init__(
        self,
        settings: OrchestratorSettings,
        catalog: CatalogClient,
        registry: PoolRegistry,
        clock: Callable[[], float] = time.monotonic,
        journal: Journal | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._journal = journal
        self._wall_clock = wall_clock
        self._catalog = catalog
        self._registry = registry
        self._views_cache: tuple[tuple[PoolView, ...], float, list[PoolView]] | None = None
        self.metrics = OrchestratorMetrics(lambda: self._queue.depth_by_priority())
        self._clock = clock
        self._queue = AdmissionQueue(
            settings.queue_capacity,
            when_full=WhenFull(settings.queue_full_policy),
            batch_max_wait_s=settings.batch_max_wait_s,
            tenant_weights=settings.tenant_weights,
        )
        self._drain = DrainMeter()
        self._tasks: dict[str, Task] = {}
        # (tenant, request id) → task id: one tenant's idempotency keys never find another's.
        self._by_request_id: dict[tuple[str, str], str] = {}
        self._relays: dict[str, asyncio.Task[None]] = {}
        self._pass_started_ns = 0
        """Wall time (ns) the current dispatcher pass began, for placement spans."""
        # Measured service times, EWMA: by (pool key, model) and by ("", model).
        self._service: dict[tuple[str, str], _ServiceTime] = {}
        # The prediction simulation per model as the last pass left it, and when it ran.
        self._tails: dict[str, list[tuple[float, str]]] = {}
        self._tails_at = 0.0
        self._timer_at: float | None = None
        # Timers that end the work left on drained pools, by node/pool key.
        self._drain_timers: dict[str, asyncio.TimerHandle] = {}
        # Placements so far of tasks that failed over (absent: 1), and why relays were stopped.
        self._attempts: dict[str, int] = {}
        self._lost_executions: dict[str, LlorchError] = {}
        self._positions_at = -math.inf
        self._positions_timer: asyncio.TimerHandle | None = None
        # Deadlines of queued tasks (deadline, arrival number, task); stale entries are skipped.
        self._deadlines: list[tuple[float, int, Task]] = []
        self._arrivals = 0
        # Placement decisions of the last pass, per (model, context, pins, avoids).
        self._memo: dict[tuple[object, ...], PlacementDecision] = {}
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._last_sweep = 0.0
        self._deadline_timer: asyncio.TimerHandle | None = None
        # Models being loaded into pools on demand, by pool key; and loads that failed:
        # (pool key, model) → (until when the pool is not tried again for the model, error).
        self._swaps: dict[str, asyncio.Task[None]] = {}
        self._failed_loads: dict[tuple[str, str], tuple[float, str]] = {}

    async def start(self) -> None:
        """Recovers journaled tasks, connects to the pool managers and starts dispatching."""
        if self._journal is not None:
            self._recover(self._journal)
        await self._registry.start(self._wake.set)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="dispatcher")

    async def stop(self) -> None:
        """Stops dispatching; queued and running tasks end UNAVAILABLE (retriable)."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for timer in (self._positions_timer, self._deadline_timer, *self._drain_timers.values()):
            if timer is not None:
                timer.cancel()
        shutdown = UnavailableError(
            "the orchestrator is shutting down", reason="SHUTDOWN", retry_delay_s=1.0
        )
        # Connected readers learn of the shutdown; the journal does not: queued tasks stay
        # queued and run after a restart, running ones are settled then.
        for task in self._tasks.values():
            task.observer = None
            if task.trace is not None and not task.terminal:
                task.trace.ended(None, shutdown)  # the observer that would have is gone
        for task in list(self._tasks.values()):
            self._end(task, shutdown)
        relays = list(self._relays.values()) + list(self._swaps.values())
        for relay in relays:
            relay.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await self._registry.stop()
        if self._journal is not None:
            await asyncio.to_thread(self._journal.close)

    # --- client operations -------------------------------------------------------------------

    async def submit(
        self,
        spec: TaskSpec,
        *,
        correlation_id: str,
        timeout_s: float | None,
        durable: bool = False,
    ) -> Task:
        """Admits a task: checks it against the model and the queue, then enqueues it.

        ``durable``: return only once the task is journaled, so a restart would not lose it.

        Raises:
            NotFoundError: the model is not in the catalog.
            FailedPreconditionError: the model is retired, or no pool serves it.
            InvalidArgumentError: max_tokens exceeds the model's context.
            ResourceExhaustedError: the queue is full (retriable, with a delay).
        """
        try:
            task, committed = await self._admit(
                spec, correlation_id=correlation_id, timeout_s=timeout_s, commit_now=durable
            )
        except LlorchError as err:
            self.metrics.rejected.labels(err.reason).inc()
            raise
        if durable and committed is not None:
            # The caller is told the task exists only once a restart would not lose it.
            await committed
        return task

    async def submit_many(
        self, specs: list[TaskSpec | LlorchError], *, correlation_id: str
    ) -> list[Task | LlorchError]:
        """Admits tasks in order, each as a durable ``submit`` without a deadline would.

        An entry of ``specs`` may already be the error that refused its request (a bad field);
        it is passed through. Each result is the admitted task or the error that refused it.
        Returns once every admitted task is journaled: all of them in as few commits as the
        journal needs, rather than one commit wait per task.
        """
        results: list[Task | LlorchError] = []
        commits: list[asyncio.Future[None]] = []
        for spec in specs:
            if isinstance(spec, LlorchError):
                results.append(spec)
                continue
            try:
                task, committed = await self._admit(
                    spec, correlation_id=correlation_id, timeout_s=None, commit_now=False
                )
            except LlorchError as err:
                self.metrics.rejected.labels(err.reason).inc()
                results.append(err)
                continue
            results.append(task)
            if committed is not None:
                commits.append(committed)
        if commits and self._journal is not None:
            self._journal.commit_now()
            await asyncio.gather(*commits)
        return results

    async def _admit(
        self,
        spec: TaskSpec,
        *,
        correlation_id: str,
        timeout_s: float | None,
        commit_now: bool,
    ) -> tuple[Task, asyncio.Future[None] | None]:
        """Admits a task (see ``submit``); returns it and the future of its journal commit
        (None without a journal, or when an earlier submission with its request id is returned).
        ``commit_now``: commit at once rather than within the journal's flush interval.
        """
        admission_started_ns = time.time_ns()
        request_key = (spec.tenant, spec.request_id)
        if spec.request_id and request_key in self._by_request_id:
            existing = self._tasks.get(self._by_request_id[request_key])
            if existing is not None:
                return existing, None
        info = await self._catalog.model_info(spec.model_id)
        if not info.active:
            raise FailedPreconditionError(
                f"model {spec.model_id} is retired", reason="MODEL_RETIRED"
            )
        all_views = self._registry.views()
        views = [v for v in all_views if v.model_id == spec.model_id]
        if all_views and not views and not any(v.can_load for v in all_views):
            raise FailedPreconditionError(
                f"no pool serves model {spec.model_id}", reason="NO_POOL_FOR_MODEL"
            )
        # The context a task can have: the model's, or less when its pools run smaller.
        limit = min([info.context_length, *(v.n_ctx for v in views if v.n_ctx)])
        if spec.sampling.max_tokens >= limit:
            if not spec.max_tokens_defaulted:
                raise InvalidArgumentError(
                    "sampling.max_tokens",
                    f"must be below {limit} tokens, the context of model {spec.model_id} "
                    "and its pools",
                )
            spec = replace(spec, sampling=replace(spec.sampling, max_tokens=max(1, limit - 1)))
        if spec.request_id and request_key in self._by_request_id:
            # A submission with the same key won the race while the catalog answered.
            return self.get(self._by_request_id[request_key]), None
        now = self._clock()
        task = Task(
            random_id(),
            spec,
            correlation_id=correlation_id,
            created=now,
            deadline=None if timeout_s is None else now + timeout_s,
        )
        try:
            admitted = self._queue.push(task, now)
        except QueueFullError:
            self.metrics.backpressure.labels("queue_full").inc()
            raise ResourceExhaustedError(
                f"the queue is full ({self._queue.capacity} tasks)",
                reason="QUEUE_FULL",
                retry_delay_s=self._retry_delay_s(spec.model_id, now),
            ) from None
        position = admitted.position
        if tracing.enabled():
            task.trace = TaskTrace(task.task_id, spec, admission_started_ns)
            task.trace.admitted(position)
        self.metrics.enqueued.labels(spec.model_id, spec.priority.name.lower()).inc()
        if admitted.dropped is not None:
            self.metrics.backpressure.labels("dropped").inc()
            self._end(
                admitted.dropped,
                ResourceExhaustedError(
                    "the queue was full and this BATCH task, the longest waiting, was dropped "
                    "to make room",
                    reason="QUEUE_DROPPED",
                    retry_delay_s=self._retry_delay_s(admitted.dropped.spec.model_id, now),
                ),
            )
            _log.warning(
                "task dropped from the full queue", extra={"task_id": admitted.dropped.task_id}
            )
        self._tasks[task.task_id] = task
        committed = self._journal_new(task, urgent=commit_now)
        if task.deadline is not None:
            self._arrivals += 1
            heapq.heappush(self._deadlines, (task.deadline, self._arrivals, task))
        if spec.request_id:
            self._by_request_id[request_key] = task.task_id
        # Every task's stream begins with Queued, even one placed in this same call. Last in
        # line, its prediction continues the slot simulation of the last pass (no pass over the
        # whole queue per submit); otherwise the pass below corrects it.
        task.set_queued(position, self._predict_next(task, now))
        open_models = self._open_models(self._registry.views())
        alone = self._decide_alone(task, now) if open_models is None else None
        if (open_models is not None and spec.model_id in open_models) or (
            alone is not None and alone.outcome is not Outcome.WAIT
        ):
            # Place (or refuse) it now rather than on the dispatcher's next turn: one loop
            # iteration less before the first token when a slot is free.
            self._dispatch_once()
        else:
            self._note_waiting(task, now, alone)
            if position != len(self._queue) - 1:
                # It went ahead of others: their positions changed.
                self._schedule_positions(now)
            self._arm_timer_for(task)
        _log.info(
            "task admitted",
            extra={
                "task_id": task.task_id,
                "model_id": spec.model_id,
                "priority": spec.priority.name,
                "position": position,
            },
        )
        return task, committed

    def tasks(self) -> list[Task]:
        """Every task held: queued, running, and finished within their retention."""
        return list(self._tasks.values())

    def get(self, task_id: str) -> Task:
        """A task by id; NotFoundError when unknown or expired."""
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFoundError(f"task {task_id} does not exist", reason="TASK_NOT_FOUND")
        if task in self._queue:
            task.queue_position = self._queue.position(task)  # exact, between publications
        return task

    def cancel(self, task_id: str) -> Task:
        """Cancels a task. After this returns no token of it reaches any reader."""
        task = self.get(task_id)
        if not task.terminal:
            self._end(
                task, TaskCancelledError(f"task {task_id} was cancelled", reason="TASK_CANCELLED")
            )
            _log.info("task cancelled", extra={"task_id": task_id})
        return task

    # --- operator operations ---------------------------------------------------------------------

    def pool_views(self) -> list[PoolView]:
        """Every pool as placement sees it now (drained pools show as draining)."""
        return self._views(self._clock())

    def registry_nodes(self) -> list[NodeView]:
        """Every node the registry knows, by node id."""
        return self._registry.nodes()

    def registry_pools(self) -> list[tuple[str, bool, poolmanager_pb2.Pool]]:
        """Every pool as its pool manager reported it: (node id, node reachable, pool)."""
        return self._registry.pools()

    def queued_count(self, model_id: str) -> int:
        """Queued tasks of a model."""
        return self._queue.count(model_id)

    def is_drained(self, key: str) -> bool:
        """Whether an operator drained the pool ``node/pool``."""
        return self._registry.is_drained(key)

    def drain(self, node_id: str, pool_id: str, deadline_s: float) -> None:
        """Takes a pool out of placement; what still runs on it after ``deadline_s`` is
        cancelled with UNAVAILABLE (POOL_DRAINED, retriable).

        Raises:
            NotFoundError: no such pool.
        """
        key = self._pool_key(node_id, pool_id)
        self._registry.set_drained(key, True)
        timer = self._drain_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._drain_timers[key] = asyncio.get_running_loop().call_later(
            deadline_s, self._end_drained, key
        )
        _log.info("pool drained", extra={"pool": key, "deadline_s": deadline_s})
        self._wake.set()

    def resume(self, node_id: str, pool_id: str) -> None:
        """Puts a drained pool back into placement.

        Raises:
            NotFoundError: no such pool.
        """
        key = self._pool_key(node_id, pool_id)
        self._registry.set_drained(key, False)
        timer = self._drain_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        _log.info("pool resumed", extra={"pool": key})
        self._wake.set()

    async def reload_pool(
        self, node_id: str, pool_id: str, model_id: str, deadline_s: float | None
    ) -> poolmanager_pb2.ReloadPoolResponse:
        """Changes a pool's model through its pool manager (drain → load → health check →
        ready, or rollback); the pool takes no new work from this orchestrator meanwhile.

        Raises:
            NotFoundError: no such pool, or no such model.
            FailedPreconditionError: the model is retired; the load failed and was rolled back.
            UnavailableError: the pool manager is unreachable.
        """
        key = self._pool_key(node_id, pool_id)
        await self._check_loadable(model_id)
        request = poolmanager_pb2.ReloadPoolRequest(pool_id=pool_id, model_id=model_id)
        if deadline_s is not None:
            request.deadline_ms = round(deadline_s * 1000)
        _log.info("pool reload", extra={"pool": key, "model": model_id})
        response: poolmanager_pb2.ReloadPoolResponse = await self._pool_call(
            node_id, pool_id, "ReloadPool", request
        )
        return response

    async def preload_model(
        self, model_id: str, node_id: str = "", pool_id: str = ""
    ) -> tuple[PoolView, PreloadAction, str]:
        """Makes a model ready on the named pool, or on one ``choose_preload`` picks; returns
        the pool, what it took, and the model the pool held before.

        Raises:
            NotFoundError: no such pool, or no such model.
            FailedPreconditionError: the model is retired; no pool can take it now; the named
                pool is changing state; the load failed (the pool manager says why).
            UnavailableError: the pool manager is unreachable.
        """
        await self._check_loadable(model_id)
        views = self._registry.views()
        if pool_id:
            key = self._pool_key(node_id, pool_id)
            view = next(v for v in views if v.key == key)
            # An operator may preload a pool it drained here; only the node's own state counts.
            own = next(p for n, _, p in self._registry.pools() if f"{n}/{p.pool_id}" == key)
            named = replace(view, draining=own.state == poolmanager_pb2.POOL_STATE_DRAINING)
            action = preload_action(named, model_id) if view.reachable else None
            if action is None:
                raise FailedPreconditionError(
                    f"pool {key} is "
                    + ("unreachable" if not view.reachable else "changing state")
                    + "; try again when it is ready, unloaded or failed",
                    reason="POOL_BUSY",
                )
        else:
            choice = choose_preload(
                model_id, views, {m: self._queue.count(m) for m in self._queue.models()}
            )
            if choice.pool is None:
                raise FailedPreconditionError(
                    f"{choice.reason}: "
                    + "; ".join(f"{k}: {r}" for k, r in sorted(choice.excluded.items())),
                    reason="NO_POOL_FOR_PRELOAD",
                )
            view, action = choice.pool, choice.action
            if action is PreloadAction.LOADING:
                raise UnavailableError(
                    f"model {model_id} is loading on pool {view.key} already; ask again shortly",
                    reason="MODEL_LOADING",
                    retry_delay_s=1.0,
                )
        previous = view.model_id if action is PreloadAction.SWAP else ""
        _log.info(
            "model preload",
            extra={"pool": view.key, "model": model_id, "action": action.value},
        )
        if action is not PreloadAction.NONE:
            # An unloaded or failed pool is loaded; one holding another model is reloaded.
            load = action is PreloadAction.LOAD
            request_type = (
                poolmanager_pb2.PreloadPoolRequest if load else poolmanager_pb2.ReloadPoolRequest
            )
            await self._pool_call(
                view.node_id,
                view.pool_id,
                "PreloadPool" if load else "ReloadPool",
                request_type(pool_id=view.pool_id, model_id=model_id),
            )
        return view, action, previous

    def _swap(self, pool: PoolView, model_id: str) -> None:
        """Loads ``model_id`` into an idle pool on demand (ReloadPool through its manager)."""
        key = pool.key
        self._registry.set_changing(key, model_id)
        _log.info(
            "loading a model on demand",
            extra={"pool": key, "model": model_id, "replaces": pool.model_id},
        )
        request = poolmanager_pb2.ReloadPoolRequest(
            pool_id=pool.pool_id, model_id=model_id, deadline_ms=0
        )
        swap = asyncio.get_running_loop().create_task(
            self._run_swap(pool, model_id, request), name=f"swap-{key}"
        )
        self._swaps[key] = swap

        def forget(done: asyncio.Task[None]) -> None:
            if self._swaps.get(key) is done:
                del self._swaps[key]

        swap.add_done_callback(forget)

    async def _run_swap(
        self, pool: PoolView, model_id: str, request: poolmanager_pb2.ReloadPoolRequest
    ) -> None:
        # The swap task copied the context of whichever call ran the dispatcher; a model load
        # is no part of that call's trace.
        otel_context.attach(Context())
        try:
            await self._pool_call(pool.node_id, pool.pool_id, "ReloadPool", request, marked=True)
        except LlorchError as exc:
            _log.warning(
                "loading a model on demand failed: %s",
                exc.message,
                extra={"pool": pool.key, "model": model_id, "reason": exc.reason},
            )
            if not exc.retriable:  # the model cannot load there; a lost node is not that
                now = self._clock()
                self._failed_loads = {k: v for k, v in self._failed_loads.items() if v[0] > now}
                cooldown = self._settings.swap_failure_cooldown_s
                self._failed_loads[(pool.key, model_id)] = (now + cooldown, exc.message)
        except Exception:  # a bug: log it; the pool's mark is cleared by _pool_call
            _log.exception("loading a model on demand failed", extra={"pool": pool.key})
        self._wake.set()

    async def delete_model(self, model_id: str, drain: bool) -> tuple[list[str], int, list[str]]:
        """Deletes a model from the catalog: refused while pools hold it or tasks want it,
        unless ``drain`` (then its tasks end MODEL_DELETED and its pools are unloaded first).
        Then asks every reachable pool manager to collect its model store. Returns the pools
        drained, the tasks ended and the files whose records went (node:path).

        Raises:
            NotFoundError: no such model.
            FailedPreconditionError: in use and not ``drain`` (MODEL_IN_USE, saying where).
        """
        await self._catalog.model_info(model_id)  # NOT_FOUND before anything else
        holding = [
            (node_id, pool)
            for node_id, _, pool in self._registry.pools()
            if pool.model_id == model_id and pool.state != poolmanager_pb2.POOL_STATE_UNLOADED
        ]
        tasks = [
            t
            for t in self._tasks.values()
            if t.spec.model_id == model_id and t.state in (TaskState.QUEUED, TaskState.RUNNING)
        ]
        if (holding or tasks) and not drain:
            where = ", ".join(f"{n}/{p.pool_id}" for n, p in holding) or "no pool"
            raise FailedPreconditionError(
                f"model {model_id} is in use: held by {where}; {len(tasks)} tasks queued or "
                "running; delete with drain to unload it and end its tasks",
                reason="MODEL_IN_USE",
            )
        deleted = FailedPreconditionError(
            f"model {model_id} was deleted by an operator", reason="MODEL_DELETED"
        )
        for task in tasks:
            self._end(task, deleted)
        drained = []
        for node_id, pool in holding:
            try:
                async with asyncio.timeout(60):
                    await self._registry.stub(node_id).DrainPool(
                        poolmanager_pb2.DrainPoolRequest(pool_id=pool.pool_id, deadline_ms=0)
                    )
            except (grpc.aio.AioRpcError, LlorchError, TimeoutError) as err:
                why = "no answer in 60 s" if isinstance(err, TimeoutError) else _message(err)
                raise UnavailableError(
                    f"pool {node_id}/{pool.pool_id} could not be unloaded; model {model_id} was "
                    f"not deleted: {why}",
                    reason="DRAIN_FAILED",
                    retry_delay_s=1.0,
                ) from None
            drained.append(f"{node_id}/{pool.pool_id}")
        locations = await self._catalog.delete_model(model_id)
        _log.info(
            "model deleted",
            extra={"model": model_id, "drained": drained, "tasks_ended": len(tasks)},
        )
        for node_id in sorted({node for node, reachable, _ in self._registry.pools() if reachable}):
            try:  # its files go now (those past the store's grace period)
                async with asyncio.timeout(60):
                    await self._registry.stub(node_id).CollectGarbage(
                        poolmanager_pb2.CollectGarbageRequest()
                    )
            except (grpc.aio.AioRpcError, LlorchError, TimeoutError) as err:
                why = str(err) if isinstance(err, TimeoutError) else _message(err)
                _log.info("garbage collection on %s after a deletion: %s", node_id, why)
        self._wake.set()
        return drained, len(tasks), [f"{loc.node_id}:{loc.path}" for loc in locations]

    async def _check_loadable(self, model_id: str) -> None:
        info = await self._catalog.model_info(model_id)
        if not info.active:
            raise FailedPreconditionError(f"model {model_id} is retired", reason="MODEL_RETIRED")

    async def _pool_call(
        self,
        node_id: str,
        pool_id: str,
        method: str,
        request: poolmanager_pb2.ReloadPoolRequest | poolmanager_pb2.PreloadPoolRequest,
        *,
        marked: bool = False,
    ) -> Any:
        """Calls a lifecycle RPC of a pool's manager with the pool out of placement meanwhile,
        and takes the pool state it answers with. One change of a pool at a time: while one
        runs (an operator's, or an on-demand load, which marks the pool itself: ``marked``),
        another is refused. A caller that goes away does not stop the change half-way: the
        call runs to its end and the pool stays out of placement until then.

        Raises:
            FailedPreconditionError: the pool is already changing (POOL_BUSY), or the pool
                manager refused or rolled back the change.
            UnavailableError: the pool manager is unreachable.
        """
        key = f"{node_id}/{pool_id}"
        if not marked:
            if self._registry.changing(key):
                raise FailedPreconditionError(
                    f"pool {key} is already changing its model; try again when it is ready",
                    reason="POOL_BUSY",
                )
            self._registry.set_changing(key, request.model_id)
        try:
            call = asyncio.ensure_future(getattr(self._registry.stub(node_id), method)(request))
        except BaseException:  # e.g. the node is gone from the registry
            self._registry.set_changing(key, None)
            raise

        def settle(done: asyncio.Future[Any]) -> None:
            if not done.cancelled():
                done.exception()  # retrieved: a caller that left cannot see it
            self._registry.set_changing(key, None)
            self._wake.set()

        call.add_done_callback(settle)
        try:
            response = await asyncio.shield(call)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE and not _has_details(err):
                raise UnavailableError(
                    f"pool manager of {key} is unreachable",
                    reason="NODE_UNREACHABLE",
                    retry_delay_s=1.0,
                ) from None
            raise from_rpc_error(err) from None
        self._registry.update_pool(node_id, response.pool)
        return response

    def _pool_key(self, node_id: str, pool_id: str) -> str:
        key = f"{node_id}/{pool_id}"
        if not any(v.key == key for v in self._registry.views()):
            raise NotFoundError(f"pool {key} does not exist", reason="POOL_NOT_FOUND")
        return key

    def _end_drained(self, key: str) -> None:
        self._drain_timers.pop(key, None)
        for task in list(self._tasks.values()):
            if task.state is TaskState.RUNNING and f"{task.node_id}/{task.pool_id}" == key:
                self._end(
                    task,
                    UnavailableError(
                        f"pool {key} was drained and task {task.task_id} had not finished",
                        reason="POOL_DRAINED",
                        retry_delay_s=1.0,
                    ),
                )

    # --- dispatch ------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self._dispatch_once()
            except Exception:  # a bug must not stop dispatching for every later task
                _log.exception("dispatch pass failed")

    def _views(self, now: float) -> list[PoolView]:
        """Every pool with the ETA of its next free slot. Reused while no pool changed and for
        at most ``_VIEWS_FRESH_S``: a batch of submissions would otherwise build it per task.
        Callers must not modify the list."""
        pools = self._registry.views()
        cached = self._views_cache
        if cached is not None and cached[0] is pools and 0 <= now - cached[1] < _VIEWS_FRESH_S:
            return cached[2]
        etas = self._pool_etas_ms(now)
        views = [replace(v, eta_free_ms=etas.get(v.key, 0)) for v in pools]
        self._views_cache = (pools, now, views)
        return views

    @staticmethod
    def _open_models(views: Iterable[PoolView]) -> set[str] | None:
        """Models that have a pool with a free slot now; None when an idle pool could load
        any model (then every task may be placeable)."""
        open_models: set[str] = set()
        for v in views:
            if not v.ready or not v.reachable or v.failed or v.draining:  # drained included
                continue
            if v.can_load and v.in_flight == 0:
                return None
            if v.slots_free > 0:
                open_models.add(v.model_id)
        return open_models

    def _dispatch_once(self) -> None:
        """One pass: expire what is overdue, place what can start, publish positions.

        Only tasks of models with a free slot are looked at (in service order, in windows),
        and tasks alike share one decision, so a long queue of work that cannot start yet costs
        a pass almost nothing.
        """
        now = self._clock()
        self._pass_started_ns = time.time_ns()
        self._queue.age(now)
        self._expire(now)
        self._fail_over_lost_nodes()
        views = self._views(now)
        open_models = self._open_models(views)
        swaps = open_models is None
        demand: Counter[str] = Counter(self._demand() if swaps else {})
        # A decision depends only on the task's model and context, and where swaps are
        # possible on whether the task waited past the swap starvation bound: tasks alike share
        # one decision until an assignment or a swap changes the pools (kept for submits
        # between passes).
        memo = self._memo = {}

        def still_open(model_id: str) -> bool:
            return open_models is None or model_id in open_models

        for task in self._placeable(open_models, still_open):
            key = _placement_key(task)
            if swaps:
                key = (*key, is_starving(task.spec.priority, now - task.created))
            decision = memo.get(key)
            if decision is None:
                decision = self._decide(self._placement_input(task, views, demand, now))
                memo[key] = decision
            self._note_placement(task, decision)
            if decision.outcome is Outcome.REJECT and views:
                self._end(
                    task, FailedPreconditionError(decision.reason, reason=decision.error_reason)
                )
            elif decision.outcome is Outcome.ASSIGN and decision.load and decision.pool:
                # The task stays queued; once the pool is ready with its model it is placed.
                model_id = task.spec.model_id
                self._swap(decision.pool, model_id)
                views = [
                    replace(v, model_id=model_id, ready=False) if v.key == decision.pool.key else v
                    for v in views
                ]
                memo.clear()
                open_models = self._open_models(views)
            elif decision.outcome is Outcome.ASSIGN and decision.pool is not None:
                pool = decision.pool
                self._start(task, pool, now)
                views = [
                    replace(v, in_flight=v.in_flight + 1) if v.key == pool.key else v for v in views
                ]
                demand[task.spec.model_id] -= 1
                memo.clear()
                open_models = self._open_models(views)
        if open_models is not None:
            self._reject_unservable(views, open_models, now)
        self._schedule_positions(now)
        self._sweep(now)
        self._arm_deadline_timer(now)

    def _placeable(
        self, open_models: set[str] | None, still_open: Callable[[str], bool]
    ) -> Iterator[Task]:
        """Queued tasks to try, in service order (per model when no swap is possible), read in
        windows; a model whose pools filled up is left at once."""
        scopes: list[str | None] = [None]
        if open_models is not None:
            scopes = [*sorted(open_models)]
        for model in scopes:
            index = 0
            while model is None or still_open(model):
                window = self._queue.window(index, index + 64, model)
                if not window:
                    break
                for task in window:
                    if model is not None and not still_open(model):
                        break
                    yield task
                    if task in self._queue:
                        index += 1  # still waiting; a task that left shifted the rest forward

    def _reject_unservable(self, views: list[PoolView], open_models: set[str], now: float) -> None:
        """Ends queued tasks of models that no pool can ever serve (e.g. every pool serving
        the model failed); the placement loop looks only at models with a free slot."""
        if not views:
            return  # no pool manager answered yet: wait rather than refuse
        for model in self._queue.models():
            if model in open_models:
                continue
            head = self._queue.window(0, 1, model)[0]
            if (
                self._decide(self._placement_input(head, views, {}, now)).outcome
                is not Outcome.REJECT
            ):
                continue
            for task in self._queue.window(0, self._queue.count(model), model):
                decision = self._decide(self._placement_input(task, views, {}, now))
                if decision.outcome is Outcome.REJECT:
                    self._note_placement(task, decision)
                    self._end(
                        task,
                        FailedPreconditionError(decision.reason, reason=decision.error_reason),
                    )

    def _expire(self, now: float) -> None:
        """Fails queued tasks whose deadline has passed (they could not start in time)."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, task = heapq.heappop(self._deadlines)
            if task in self._queue:
                self._end(
                    task,
                    DeadlineExceededError(
                        f"task {task.task_id} could not start before its deadline",
                        reason="DEADLINE_BEFORE_START",
                    ),
                )

    def _demand(self) -> dict[str, int]:
        """Queued tasks per model."""
        return {m: self._queue.count(m) for m in self._queue.models()}

    def _decide_alone(self, task: Task, now: float) -> PlacementDecision:
        """Placement of this one task now, where an idle pool could swap models. Then every
        task is placeable, and a whole pass per submission would cost a pass over the queue
        each time; a task that must wait changes nothing for the others, so only one that can
        start (or must be refused) runs the pass."""
        return self._decide(self._placement_input(task, self._views(now), self._demand(), now))

    def _decide(self, inp: PlacementInput) -> PlacementDecision:
        """``placement.decide``, counted by outcome."""
        decision = decide(inp)
        self.metrics.decisions.labels(decision.outcome.name.lower()).inc()
        return decision

    def _placement_input(
        self, task: Task, views: list[PoolView], demand: Mapping[str, int], now: float
    ) -> PlacementInput:
        model_id = task.spec.model_id
        failed_loads = {
            key: error
            for (key, model), (until, error) in self._failed_loads.items()
            if model == model_id and until > now
        }
        return PlacementInput(
            failed_loads=failed_loads,
            model_id=task.spec.model_id,
            tokens_needed=task.spec.sampling.max_tokens + 1,
            pools=tuple(views),
            priority=task.spec.priority,
            waited_s=now - task.created,
            demand=demand,
        )

    def _note_waiting(
        self, task: Task, now: float, decision: PlacementDecision | None = None
    ) -> None:
        """Placement reasons for a task queued while no pool could take it."""
        key = _placement_key(task)
        decision = decision or self._memo.get(key)
        if decision is None:
            views = self._views(now)
            decision = self._decide(self._placement_input(task, views, {}, now))
            self._memo[key] = decision
        self._note_placement(task, decision)

    def _note_placement(self, task: Task, decision: PlacementDecision) -> None:
        """Keeps a task's placement reasons for GetTask, and logs them when they change."""
        wait_reason = decision.reason if decision.outcome is Outcome.WAIT else ""
        if decision.excluded != task.excluded or wait_reason != task.wait_reason:
            _log.info(
                "placement: %s%s",
                decision.outcome.value,
                f" ({decision.reason})" if decision.reason else "",
                extra={
                    "task_id": task.task_id,
                    "excluded": "; ".join(f"{k}: {v}" for k, v in decision.excluded.items()),
                },
            )
            task.excluded = dict(decision.excluded)
        task.wait_reason = wait_reason

    def _start(self, task: Task, pool: PoolView, now: float) -> None:
        """Takes a task off the queue and starts its execution on ``pool``."""
        self._queue.take(task)
        self._drain.record(now)
        self._registry.acquire(pool)
        if task.trace is not None:
            task.trace.placed(pool.node_id, pool.pool_id, self._pass_started_ns)
        task.start(
            Started(
                pool.pool_id,
                pool.node_id,
                pool.model_id,
                pool.engine_version,
                (now - task.created) * 1000,
            ),
            now,
        )
        # The Execute call starts now, before this turn's Queued and Started messages are
        # written to the clients: the first token's path begins here.
        relay = asyncio.create_task(
            self._relay(task, pool, self._execute(task, pool)), name=f"relay-{task.task_id}"
        )
        self._relays[task.task_id] = relay
        # A relay cancelled before its first step never runs its own finally.
        relay.add_done_callback(functools.partial(self._relay_done, task, pool))

    # --- predictions -----------------------------------------------------------------------

    def _service_estimate_ms(self, pool_key: str, model_id: str, max_tokens: int) -> float:
        """How long a task of ``model_id`` asking for ``max_tokens`` holds a slot of the pool:
        the pool's measured fixed time (prompt, hops) plus its measured time per token times
        the tokens such tasks really produce (they may stop before max_tokens)."""
        measured = self._service.get((pool_key, model_id)) or self._service.get(("", model_id))
        if measured is None:
            return _DEFAULT_SERVICE_MS
        tokens = max(1.0, max_tokens * measured.fill)
        return measured.fixed_ms + measured.per_token_ms * (tokens - 1)

    def _running_left_ms(self, now: float) -> dict[str, list[float]]:
        """Per pool: how long each running task should still take, from measured times."""
        left: dict[str, list[float]] = {}
        for task_id in self._relays:
            task = self._tasks.get(task_id)
            if task is None or task.started_at is None:
                continue
            key = f"{task.node_id}/{task.pool_id}"
            expected = self._service_estimate_ms(
                key, task.spec.model_id, task.spec.sampling.max_tokens
            )
            left.setdefault(key, []).append(max(0.0, expected - (now - task.started_at) * 1000))
        return left

    def _pool_etas_ms(self, now: float) -> dict[str, int]:
        """Per pool: when its earliest running task should end."""
        return {k: max(1, round(min(v))) for k, v in self._running_left_ms(now).items() if v}

    def _slot_heap(
        self, model_id: str, views: Iterable[PoolView], running: Mapping[str, list[float]]
    ) -> list[tuple[float, str]]:
        """When each slot of the pools serving ``model_id`` frees, in ms from now, as a heap."""
        heap: list[tuple[float, str]] = []
        for v in views:
            if v.model_id != model_id or not v.reachable or v.failed or v.draining:
                continue
            times = sorted(running.get(v.key, ()))[: v.slots_total]
            times += [0.0] * (v.slots_total - len(times))
            heap.extend((t, v.key) for t in times)
        heapq.heapify(heap)
        return heap

    def _schedule_positions(self, now: float) -> None:
        """Publishes positions now, or once ``position_interval_s`` after the last time.

        Placement never waits for this; only the Queued updates are coalesced, so a queue of
        thousands costs one pass over it per interval instead of one per task that starts.
        """
        if self._positions_timer is not None:
            return
        delay = self._positions_at + self._settings.position_interval_s - now
        if delay <= 0:
            self._publish_positions(now, self._views(now))
            return
        self._positions_timer = asyncio.get_running_loop().call_later(
            delay, self._publish_positions_later
        )

    def _publish_positions_later(self) -> None:
        self._positions_timer = None
        now = self._clock()
        self._publish_positions(now, self._views(now))

    def _publish_positions(self, now: float, views: list[PoolView]) -> None:
        """Sends every queued task its position and predicted start (when they changed).

        The prediction replays the queue on the slots serving each model: a slot frees when its
        running task's measured service time is up, then serves the next task of its model in
        queue order for that pool's measured service time.
        """
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

    def _predict_next(self, task: Task, now: float) -> int:
        """Predicted start of a task just added at the end of the queue."""
        model = task.spec.model_id
        heap = self._tails.get(model)
        if heap is None:
            views = self._views(now)
            heap = self._tails[model] = self._slot_heap(model, views, self._running_left_ms(now))
        # The simulation ran at _tails_at; the time since then has passed for every slot.
        elapsed_ms = (now - self._tails_at) * 1000
        return max(0, self._pop_slot(heap, task) - round(elapsed_ms))

    def _pop_slot(self, heap: list[tuple[float, str]], task: Task) -> int:
        """The next slot to free takes ``task``: when it starts, in ms from the simulation."""
        if not heap:
            return 0  # no pool serves the model now: nothing to predict from
        free_at, key = heapq.heappop(heap)
        busy_ms = self._service_estimate_ms(key, task.spec.model_id, task.spec.sampling.max_tokens)
        heapq.heappush(heap, (free_at + busy_ms, key))
        return round(free_at)

    def _arm_timer_for(self, task: Task) -> None:
        """Re-arms the timer if a newly queued task needs it earlier."""
        due = [t for t in (task.deadline, self._queue.next_aging_at()) if t is not None]
        if due and (self._timer_at is None or min(due) < self._timer_at):
            self._arm_deadline_timer(self._clock())

    def _retry_delay_s(self, model_id: str, now: float) -> float:
        """When a refused client should retry: the time for one place to free up, measured
        from how fast the queue drains (before any drained: one predicted service time)."""
        rate = self._drain.rate(now)
        delay = (
            1.0 / rate
            if rate
            else self._service_estimate_ms("", model_id, self._settings.default_max_tokens) / 1000
        )
        return min(60.0, max(0.05, delay))

    def _arm_deadline_timer(self, now: float) -> None:
        """One timer, at the earliest deadline of a queued task or the next BATCH aging."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
            self._timer_at = None
        while self._deadlines and self._deadlines[0][2] not in self._queue:
            heapq.heappop(self._deadlines)  # started, cancelled or expired: no longer due
        deadlines = [self._deadlines[0][0]] if self._deadlines else []
        aging = self._queue.next_aging_at()
        if aging is not None:
            deadlines.append(aging)
        if deadlines:
            self._timer_at = min(deadlines)
            delay = max(0.0, self._timer_at - now)
            self._deadline_timer = asyncio.get_running_loop().call_later(
                delay + 0.001, self._wake.set
            )

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < 10:
            return
        self._last_sweep = now
        ttl = self._settings.finished_task_ttl_s
        expired = []
        for task_id, task in list(self._tasks.items()):
            if task.terminal and task.ended_at is not None and now - task.ended_at > ttl:
                del self._tasks[task_id]
                expired.append(task_id)
                if task.spec.request_id:
                    self._by_request_id.pop((task.spec.tenant, task.spec.request_id), None)
        if expired and self._journal is not None:
            self._journal.forget(expired)

    # --- journal ---------------------------------------------------------------------------

    def _journal_new(self, task: Task, urgent: bool) -> asyncio.Future[None] | None:
        """Journals a new task and everything that happens to it from now on (and counts it in
        the metrics, journal or not)."""
        task.observer = self._on_event
        if self._journal is None:
            return None
        now, wall = self._clock(), self._wall_clock()
        committed = self._journal.record_task(
            TaskRow(
                task_id=task.task_id,
                seq=0,
                spec=spec_to_json(task.spec),
                correlation_id=task.correlation_id,
                created_unix_s=wall - (now - task.created),
                deadline_unix_s=None if task.deadline is None else wall + task.deadline - now,
                state=TaskState.QUEUED.value,
                pool_id="",
                node_id="",
                outcome=None,
                ended_unix_s=None,
                tokens=[],
            ),
            urgent=urgent,
        )
        return committed

    def _on_event(self, task: Task, event: TaskEvent) -> None:
        if not isinstance(event, Tokens):
            self.metrics.on_event(task, event)
        if task.trace is not None:
            if isinstance(event, Tokens) and event.index == 0:
                task.trace.first_token()
            elif isinstance(event, Finished):
                task.trace.ended(event, None)
            elif isinstance(event, Failed):
                task.trace.ended(None, event.error)
        journal = self._journal
        if journal is None:
            return
        if isinstance(event, Tokens):
            journal.record_tokens(task.task_id, event.index, event.token_ids, event.text)
        elif isinstance(event, Started):
            journal.record_start(task.task_id, event.pool_id, event.node_id)
        elif isinstance(event, Finished):
            journal.record_end(
                task.task_id, task.state.value, {"finished": asdict(event)}, self._wall_clock()
            )
        elif isinstance(event, Failed):
            journal.record_end(
                task.task_id,
                task.state.value,
                {"error": error_to_dict(event.error)},
                self._wall_clock(),
            )

    def _recover(self, journal: Journal) -> None:
        """Rebuilds the tasks a previous run journaled.

        Queued tasks queue again in their old order. A running task that had emitted nothing
        queues again too; one that had emitted tokens ends UNAVAILABLE (retriable) with its
        tokens readable, because the rest of its stream is lost with the previous run.
        Finished tasks stay readable until their retention ends.
        """
        now, wall = self._clock(), self._wall_clock()
        requeued = failed = kept = 0
        for row in journal.load():
            spec = spec_from_json(row.spec)
            created = now - max(0.0, wall - row.created_unix_s)
            deadline = None if row.deadline_unix_s is None else now + row.deadline_unix_s - wall
            task = Task(
                row.task_id,
                spec,
                correlation_id=row.correlation_id,
                created=created,
                deadline=deadline,
            )
            ended = None if row.ended_unix_s is None else now - max(0.0, wall - row.ended_unix_s)
            if ended is not None and now - ended > self._settings.finished_task_ttl_s:
                journal.forget([row.task_id])
                continue
            self._tasks[task.task_id] = task
            if spec.request_id:
                self._by_request_id[(spec.tenant, spec.request_id)] = task.task_id
            if row.state == TaskState.QUEUED.value or (
                row.state == TaskState.RUNNING.value and not row.tokens
            ):
                if row.state == TaskState.RUNNING.value:
                    journal.record_requeue(task.task_id)
                try:
                    self._queue.push(task, created)
                except QueueFullError:
                    task.fail(
                        ResourceExhaustedError(
                            "the queue was full when the orchestrator restarted",
                            reason="QUEUE_FULL",
                            retry_delay_s=1.0,
                        ),
                        now,
                    )
                    journal.record_end(
                        task.task_id,
                        task.state.value,
                        {"error": error_to_dict(task.error)} if task.error else {},
                        wall,
                    )
                    continue
                task.set_queued(len(self._queue) - 1, 0)
                if deadline is not None:
                    self._arrivals += 1
                    heapq.heappush(self._deadlines, (deadline, self._arrivals, task))
                task.observer = self._on_event
                if tracing.enabled():
                    # Its admitting call is gone: a trace of its own, not whoever is current.
                    task.trace = TaskTrace.recovered(task.task_id, spec, len(self._queue) - 1)
                requeued += 1
                continue
            task.set_queued(0, 0)
            if row.pool_id:
                task.start(Started(row.pool_id, row.node_id, spec.model_id, "", 0.0), created)
                for index, ids, text in row.tokens:
                    task.add_tokens(Tokens(index, tuple(ids), text))
            outcome = row.outcome or {}
            if row.state == TaskState.SUCCEEDED.value and "finished" in outcome:
                task.succeed(Finished(**outcome["finished"]), None, ended or now)
            elif "error" in outcome:
                task.fail(error_from_dict(outcome["error"]), ended or now)
            else:  # it was running when the previous run ended
                task.observer = self._on_event
                task.fail(
                    UnavailableError(
                        f"the orchestrator restarted while task {task.task_id} ran; "
                        f"{task.tokens_out} tokens were emitted",
                        reason="ORCHESTRATOR_RESTARTED",
                        retry_delay_s=1.0,
                    ),
                    now,
                )
                failed += 1
                continue
            kept += 1
        if requeued or failed or kept:
            _log.info(
                "journal recovered: %d tasks queued again, %d running tasks failed, "
                "%d finished tasks readable",
                requeued,
                failed,
                kept,
            )

    def _end(self, task: Task, error: LlorchError) -> None:
        """Ends a task with an error wherever it is (queue or relay)."""
        if task.terminal:
            return
        self._queue.remove(task)
        task.fail(error, self._clock())
        relay = self._relays.get(task.task_id)
        if relay is not None:
            relay.cancel()
        self._wake.set()

    # --- relay ---------------------------------------------------------------------------------

    def _execute(self, task: Task, pool: PoolView) -> ExecuteCall:
        """Starts the pool manager's Execute call for a task (its request goes out at once)."""
        spec = task.spec
        s = spec.sampling
        request = poolmanager_pb2.ExecuteRequest(
            execution_id=random_id(),
            task_id=task.task_id,
            pool_id=pool.pool_id,
            model_id=spec.model_id,
            prompt=spec.prompt,
            sampling=common_pb2.SamplingParams(
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                seed=s.seed,
                stop=list(s.stop),
                ignore_eos=s.ignore_eos,
            ),
            max_tokens_defaulted=spec.max_tokens_defaulted,
        )
        timeout = None if task.deadline is None else max(0.001, task.deadline - self._clock())
        # The call carries the task's trace context (dispatch_metadata), never that of the call
        # that happens to be running the dispatcher, which the client interceptor would add.
        token = otel_context.attach(Context()) if tracing.enabled() else None
        try:
            call: ExecuteCall = self._registry.stub(pool.node_id).Execute(
                request,
                timeout=timeout,
                metadata=(
                    (CORRELATION_HEADER, task.correlation_id),
                    *(task.trace.dispatch_metadata() if task.trace is not None else ()),
                ),
            )
        finally:
            if token is not None:
                otel_context.detach(token)
        return call

    async def _relay(self, task: Task, pool: PoolView, call: ExecuteCall) -> None:
        logs.correlation_id.set(task.correlation_id)
        logs.task_id.set(task.task_id)
        logs.pool_id.set(pool.pool_id)
        logs.node_id.set(pool.node_id)
        if task.trace is not None:
            # The relay task copied whichever context created it; the task's is the right one.
            otel_context.attach(task.trace.context)
        spec = task.spec
        _log.info("task dispatched")
        try:
            async for response in call:
                if task.trace is not None:
                    task.trace.dispatched()
                kind = response.WhichOneof("kind")
                if kind == "token":
                    t = response.token
                    task.add_tokens(Tokens(t.index, tuple(t.token_ids), t.text))
                elif kind == "finished":
                    f = response.finished
                    now = self._clock()
                    self._record_service(
                        pool.key,
                        spec,
                        (now - (task.started_at or now)) * 1000,
                        f.tokens_out,
                        f.decode_ms,
                    )
                    tps = (f.tokens_out - 1) / (f.decode_ms / 1000) if f.decode_ms > 0 else 0.0
                    task.succeed(
                        Finished(
                            FINISH_REASON_FROM_PB.get(f.finish_reason, "stop"),
                            f.tokens_in,
                            f.tokens_out,
                            f.ttft_ms,
                            f.decode_ms,
                        ),
                        Metrics(tps, (now - task.created) * 1000),
                        now,
                    )
            if not task.terminal:
                self._execution_failed(
                    task,
                    pool,
                    UnavailableError(
                        "the pool ended the execution without finishing it",
                        reason="EXECUTION_TRUNCATED",
                        retry_delay_s=1.0,
                    ),
                )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                error: LlorchError = DeadlineExceededError(
                    "the task's deadline passed while it ran", reason="DEADLINE_WHILE_RUNNING"
                )
            elif err.code() == grpc.StatusCode.UNAVAILABLE and not _has_details(err):
                error = UnavailableError(
                    f"pool manager of {pool.key} is unreachable",
                    reason="NODE_UNREACHABLE",
                    retry_delay_s=1.0,
                )
            else:
                error = from_rpc_error(err)
            self._execution_failed(task, pool, error)
        except LlorchError as error:  # raised directly by a pool manager in this process
            self._execution_failed(task, pool, error)
        except asyncio.CancelledError:
            lost = self._lost_executions.pop(task.task_id, None)
            if lost is None:
                raise
            self._execution_failed(task, pool, lost)
        except ValueError as exc:  # non-contiguous token indexes from the pool: never relay them
            task.fail(
                UnavailableError(
                    f"pool {pool.key} broke the token order: {exc}",
                    reason="EXECUTION_CORRUPT",
                    retry_delay_s=1.0,
                ),
                self._clock(),
            )
        except Exception:  # a bug: the task must still end, or its readers wait forever
            _log.exception("relay failed")
            task.fail(InternalError(f"internal error relaying task {task.task_id}"), self._clock())
        finally:
            call.cancel()
            _log.info(
                "task ended", extra={"state": task.state.value, "tokens_out": task.tokens_out}
            )

    def _relay_done(self, task: Task, pool: PoolView, relay: asyncio.Task[None]) -> None:
        """Frees the relay's slot, however the relay ended (even cancelled before it ran)."""
        self._registry.release(pool)
        if self._relays.get(task.task_id) is relay:  # a requeued task may have a new relay
            del self._relays[task.task_id]
            lost = self._lost_executions.pop(task.task_id, None)
            if task.state is TaskState.RUNNING and lost is not None:
                self._execution_failed(task, pool, lost)  # stopped before its first step
            elif task.state is TaskState.RUNNING:  # only if cancelled from outside
                task.fail(UnavailableError("the relay stopped", reason="SHUTDOWN"), self._clock())
        if task.terminal:
            self._attempts.pop(task.task_id, None)
        self._wake.set()

    def _execution_failed(self, task: Task, pool: PoolView, error: LlorchError) -> None:
        """Fails a task whose execution broke, or places it again if nothing was emitted.

        A retriable failure before the first token (a worker crash, a lost node, a pool that
        was not ready) costs the client only a longer wait: the task goes back to the front of
        the queue, up to ``max_attempts`` placements. After a token, the stream cannot be
        continued elsewhere without repeating or skipping tokens, so the task ends with the
        (retriable) error and the journal keeps what it emitted.
        """
        _log.warning("execution failed: %s", error.message, extra={"reason": error.reason})
        if task.terminal:
            return
        now = self._clock()
        attempts = self._attempts.get(task.task_id, 1)
        if error.retriable and attempts < self._settings.max_attempts and task.requeue():
            self._attempts[task.task_id] = attempts + 1
            if task.trace is not None:
                task.trace.requeued(error)
            position = self._queue.push_front(task, task.created)
            task.set_queued(position, 0)
            if self._journal is not None:
                self._journal.record_requeue(task.task_id)
            _log.info(
                "task placed again after its pool failed before the first token",
                extra={"pool": pool.key, "attempt": attempts + 1},
            )
            self._wake.set()
            return
        self._attempts.pop(task.task_id, None)
        task.fail(error, now)

    def _fail_over_lost_nodes(self) -> None:
        """Stops relays on nodes found unreachable; their tasks fail over as above."""
        for task_id, relay in list(self._relays.items()):
            task = self._tasks.get(task_id)
            if task is None or task.state is not TaskState.RUNNING:
                continue
            if task.node_id and not self._registry.reachable(task.node_id):
                self._lost_executions[task_id] = UnavailableError(
                    f"node {task.node_id} was lost while task {task_id} ran",
                    reason="NODE_UNREACHABLE",
                    retry_delay_s=1.0,
                )
                relay.cancel()

    def _record_service(
        self, pool_key: str, spec: TaskSpec, total_ms: float, tokens_out: int, decode_ms: float
    ) -> None:
        """Folds one finished execution into the pool's and the model's service averages."""
        sample = _ServiceTime(
            fixed_ms=max(0.0, total_ms - decode_ms),
            per_token_ms=decode_ms / max(1, tokens_out - 1),
            fill=min(1.0, tokens_out / max(1, spec.sampling.max_tokens)),
        )
        for key in ((pool_key, spec.model_id), ("", spec.model_id)):
            old = self._service.get(key)
            self._service[key] = sample if old is None else old.blend(sample, _EWMA_WEIGHT)


@dataclass(frozen=True)
class _ServiceTime:
    """How long executions take on a pool: fixed part, per token, and the share of max_tokens
    they really produce."""

    fixed_ms: float
    per_token_ms: float
    fill: float

    def blend(self, sample: _ServiceTime, weight: float) -> _ServiceTime:
        return _ServiceTime(
            self.fixed_ms + weight * (sample.fixed_ms - self.fixed_ms),
            self.per_token_ms + weight * (sample.per_token_ms - self.per_token_ms),
            self.fill + weight * (sample.fill - self.fill),
        )


def _placement_key(task: Task) -> tuple[object, ...]:
    """What a placement decision depends on when no pool can swap models."""
    return (task.spec.model_id, task.spec.sampling.max_tokens + 1)


def _message(err: grpc.aio.AioRpcError | LlorchError) -> str:
    return err.message if isinstance(err, LlorchError) else str(err.details())


def _has_details(err: grpc.aio.AioRpcError) -> bool:
    return any(k == "grpc-status-details-bin" for k, _ in (err.trailing_metadata() or ()))

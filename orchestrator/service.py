"""Orchestrator: admits tasks, queues them, places them on pools and relays their tokens.

A small facade over collaborators that each own their state (see docs/architecture.md):

- ``TaskTable`` (table.py): every task held, by id and idempotency key;
- ``Dispatcher`` (dispatch.py): the loop and the placement pass, deadlines;
- ``Relay`` (relay.py): executions in flight, their events, failover;
- ``Forecaster`` (forecast.py): service times, predicted starts, queue positions;
- ``PoolLifecycle`` (lifecycle.py): drain, resume, reload, preload, delete, swaps;
- ``TaskRecorder`` (recovery.py): metrics, traces, the journal, recovery at start.

The servicers (servicer.py, control.py) convert protobuf and call the methods here; the pool
managers are reached through ``PoolClient`` (pool_client.py) from the ``PoolRegistry``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

from llorch.poolmanager.v1 import poolmanager_pb2

from catalog.client import ModelInfo
from mesh import logs, tracing
from mesh.errors import CancelledError as TaskCancelledError
from mesh.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LlorchError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from mesh.ids import random_id
from mesh.settings import OrchestratorSettings
from orchestrator.admission import AdmissionQueue, QueueFullError, WhenFull
from orchestrator.chat import ChatTemplate, render
from orchestrator.dispatch import Dispatcher
from orchestrator.forecast import Forecaster
from orchestrator.journal import Journal
from orchestrator.lifecycle import ModelCatalog, PoolLifecycle
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.placement import PoolView, PreloadAction, pool_key
from orchestrator.pools import NodeView, PoolRegistry
from orchestrator.recovery import TaskRecorder
from orchestrator.relay import Relay
from orchestrator.table import TaskTable
from orchestrator.tasks import Task, TaskSpec
from orchestrator.tracing import TaskTrace

_log = logs.get_logger("orchestrator")


class Orchestrator:
    """The control plane of the mesh."""

    def __init__(
        self,
        settings: OrchestratorSettings,
        catalog: ModelCatalog,
        registry: PoolRegistry,
        clock: Callable[[], float] = time.monotonic,
        journal: Journal | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._registry = registry
        self._clock = clock
        self._queue = AdmissionQueue(
            settings.queue_capacity,
            when_full=WhenFull(settings.queue_full_policy),
            batch_max_wait_s=settings.batch_max_wait_s,
            tenant_weights=settings.tenant_weights,
        )
        self.metrics = OrchestratorMetrics(self._queue.depth_by_priority)
        self._table = TaskTable(settings.finished_task_ttl_s)
        self._recorder = TaskRecorder(journal, self.metrics, clock, wall_clock)
        self._forecaster = Forecaster(
            settings, self._queue, clock, registry.views, lambda: self._relay.tasks()
        )
        self._relay = Relay(
            registry,
            self._queue,
            self._forecaster,
            journal,
            clock,
            lambda: self._dispatcher.wake(),
            settings.max_attempts,
        )
        self._lifecycle = PoolLifecycle(
            settings,
            catalog,
            registry,
            self._queue,
            self._table,
            clock,
            self._end,
            self._relay.on_pool,
            lambda: self._dispatcher.wake(),
        )
        self._dispatcher = Dispatcher(
            self._queue,
            registry,
            self._forecaster,
            self._relay,
            self._lifecycle,
            self.metrics,
            clock,
            self._end,
            self._sweep,
        )
        self._dispatcher.prefix_affinity = settings.prefix_affinity
        self._dispatcher.prefix_wait_s = settings.prefix_wait_s

    @property
    def registry(self) -> PoolRegistry:
        """The pool managers and their pools, as this orchestrator sees them."""
        return self._registry

    async def start(self) -> None:
        """Recovers journaled tasks, connects to the pool managers and starts dispatching."""
        self._recorder.recover(
            self._table,
            self._queue,
            self._settings.finished_task_ttl_s,
            self._dispatcher.add_deadline,
        )
        await self._registry.start(self._dispatcher.wake)
        self._dispatcher.start()

    async def stop(self) -> None:
        """Stops dispatching; queued and running tasks end UNAVAILABLE (retriable)."""
        await self._dispatcher.stop()
        self._forecaster.stop()
        shutdown = UnavailableError(
            "the orchestrator is shutting down", reason="SHUTDOWN", retry_delay_s=1.0
        )
        # Connected readers learn of the shutdown; the journal does not: queued tasks stay
        # queued and run after a restart, running ones are settled then.
        tasks = list(self._table)
        for task in tasks:
            task.observer = None
            if task.trace is not None and not task.terminal:
                task.trace.ended(None, shutdown)  # the observer that would have is gone
        for task in tasks:
            self._end(task, shutdown)
        await self._relay.shutdown()
        await self._lifecycle.stop()
        await self._registry.stop()
        await self._recorder.close()

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
            except Exception:  # a bug: this entry fails, and the tasks admitted before it stand
                _log.exception("admitting entry %d of a batch failed", len(results))
                self.metrics.rejected.labels("INTERNAL").inc()
                results.append(InternalError("admission failed; the orchestrator's log says why"))
                continue
            results.append(task)
            if committed is not None:
                commits.append(committed)
        journal = self._recorder.journal
        if commits and journal is not None:
            journal.commit_now()
            await asyncio.gather(*commits)
        return results

    def _rendered(self, spec: TaskSpec, info: ModelInfo) -> TaskSpec:
        """The task with its messages rendered into its prompt: once, before it is queued (and
        journaled), so the text that counts against the size limit and the context is the
        text that runs, on this or any later attempt.

        Raises:
            FailedPreconditionError: the model has no chat template.
            InvalidArgumentError: naming ``messages``: the template refused them, or what it
                rendered is above the prompt size limit.
        """
        template = ChatTemplate(
            info.model_id, info.chat_template, info.bos_token, info.eos_token, info.control_tokens
        )
        prompt = render(template, spec.messages)
        size = len(prompt.encode("utf-8"))
        if size > self._settings.max_prompt_bytes:
            raise InvalidArgumentError(
                "messages",
                f"render to a prompt of {size} bytes; the limit is "
                f"{self._settings.max_prompt_bytes} bytes",
            )
        if not prompt:
            raise InvalidArgumentError("messages", "render to an empty prompt")
        return replace(spec, prompt=prompt, messages=(), templated=True)

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
        if spec.request_id:
            existing = self._table.by_request(spec.tenant, spec.request_id)
            if existing is not None:
                return existing, None
        info = await self._catalog.model_info(spec.model_id)
        if not info.active:
            raise FailedPreconditionError(
                f"model {spec.model_id} is retired", reason="MODEL_RETIRED"
            )
        if spec.messages:
            spec = self._rendered(spec, info)
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
        if spec.request_id and self._table.has_request(spec.tenant, spec.request_id):
            # A submission with the same key won the race while the catalog answered.
            won = self._table.by_request(spec.tenant, spec.request_id)
            if won is not None:
                return won, None
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
                retry_delay_s=self._forecaster.retry_delay_s(spec.model_id, now),
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
                    retry_delay_s=self._forecaster.retry_delay_s(
                        admitted.dropped.spec.model_id, now
                    ),
                ),
            )
            _log.warning(
                "task dropped from the full queue", extra={"task_id": admitted.dropped.task_id}
            )
        self._table.add(task)
        committed = self._recorder.record_new(task, urgent=commit_now)
        self._dispatcher.add_deadline(task)
        self._dispatcher.learn_model(info.model_id, info.size_bytes)
        # Every task's stream begins with Queued, even one placed in this same call. Last in
        # line, its prediction continues the slot simulation of the last pass (no pass over the
        # whole queue per submit); otherwise the pass corrects it.
        task.set_queued(position, self._forecaster.predict_next(task, now))
        self._dispatcher.admitted(task, now)
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

    async def models(self) -> list[ModelInfo]:
        """The catalog's active models, newest first (UnavailableError: the catalog is
        unreachable)."""
        models = await self._catalog.active_models()
        return sorted(models, key=lambda m: (-m.created_unix_ms, m.model_id))

    def tasks(self) -> list[Task]:
        """Every task held: queued, running, and finished within their retention."""
        return list(self._table)

    def get(self, task_id: str) -> Task:
        """A task by id; NotFoundError when unknown or expired."""
        task = self._table.get(task_id)
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

    # --- operator operations -----------------------------------------------------------------

    def pool_views(self) -> list[PoolView]:
        """Every pool as placement sees it now (drained pools show as draining)."""
        return list(self._registry.views())

    def registry_nodes(self) -> list[NodeView]:
        """Every node the registry knows, by node id."""
        return self._registry.nodes()

    def registry_pools(self) -> list[tuple[str, bool, poolmanager_pb2.Pool]]:
        """Every pool as its pool manager reported it: (node id, node reachable, pool)."""
        return self._registry.pools()

    def queued_count(self, model_id: str) -> int:
        """Queued tasks of a model."""
        return self._queue.count(model_id)

    def is_drained(self, node_id: str, pool_id: str) -> bool:
        """Whether an operator drained the pool."""
        return self._registry.is_drained(pool_key(node_id, pool_id))

    def drain(self, node_id: str, pool_id: str, deadline_s: float) -> None:
        """See ``PoolLifecycle.drain``."""
        self._lifecycle.drain(node_id, pool_id, deadline_s)

    def resume(self, node_id: str, pool_id: str) -> None:
        """See ``PoolLifecycle.resume``."""
        self._lifecycle.resume(node_id, pool_id)

    async def reload_pool(
        self, node_id: str, pool_id: str, model_id: str, deadline_s: float | None
    ) -> poolmanager_pb2.ReloadPoolResponse:
        """See ``PoolLifecycle.reload_pool``."""
        return await self._lifecycle.reload_pool(node_id, pool_id, model_id, deadline_s)

    async def preload_model(
        self, model_id: str, node_id: str = "", pool_id: str = ""
    ) -> tuple[PoolView, PreloadAction, str]:
        """See ``PoolLifecycle.preload_model``."""
        return await self._lifecycle.preload_model(model_id, node_id, pool_id)

    async def delete_model(self, model_id: str, drain: bool) -> tuple[list[str], int, list[str]]:
        """See ``PoolLifecycle.delete_model``."""
        return await self._lifecycle.delete_model(model_id, drain)

    # --- shared by the collaborators ---------------------------------------------------------

    def _end(self, task: Task, error: LlorchError) -> None:
        """Ends a task with an error wherever it is (queue or relay)."""
        if task.terminal:
            return
        self._queue.remove(task)
        task.fail(error, self._clock())
        self._relay.cancel(task.task_id)
        self._dispatcher.wake()

    def _sweep(self, now: float) -> None:
        """Forgets finished tasks past their retention, in memory and in the journal."""
        self._recorder.forget(self._table.sweep(now))

"""The relay: one coroutine per running task that calls Execute on its pool and appends the
events to the task; failover when an execution breaks before its first token.

A relay stops in one of three ways: its stream ends (finished, or truncated), the task ends
from outside (cancelled, drained, shut down: the task is terminal first), or the relay is
stopped with a reason (``stop``: its node was lost), which ``Running.stopped_by`` carries to
the failover decision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from llorch.common.v1 import common_pb2
from llorch.poolmanager.v1 import poolmanager_pb2
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from mesh import logs, tracing
from mesh.common_types import FINISH_REASON_FROM_PB
from mesh.errors import (
    DeadlineExceededError,
    InternalError,
    LlorchError,
    UnavailableError,
)
from mesh.ids import random_id
from mesh.interceptors import CORRELATION_HEADER
from orchestrator.admission import AdmissionQueue
from orchestrator.forecast import Forecaster
from orchestrator.journal import Journal
from orchestrator.placement import PoolKey, PoolView
from orchestrator.pool_client import ExecuteCall, pool_error
from orchestrator.pools import PoolRegistry
from orchestrator.tasks import Finished, Metrics, Started, Task, TaskState, Tokens

_log = logs.get_logger("orchestrator")


_POOL_UNFIT = frozenset({"POOL_NOT_READY", "WORKER_CRASHED"})
"""Failures that say the pool itself cannot run work now, whatever its last report said."""


@dataclass
class Running:
    """One task's execution on a pool, and why it was stopped (None: not stopped)."""

    task: Task
    pool: PoolView
    job: asyncio.Task[None]
    stopped_by: LlorchError | None = None


class Relay:
    """Executions in flight: starts them, relays their events, fails them over."""

    def __init__(
        self,
        registry: PoolRegistry,
        queue: AdmissionQueue,
        forecaster: Forecaster,
        journal: Journal | None,
        clock: Callable[[], float],
        wake: Callable[[], None],
        max_attempts: int,
    ) -> None:
        self._registry = registry
        self._queue = queue
        self._forecaster = forecaster
        self._journal = journal
        self._clock = clock
        self._wake = wake
        self._max_attempts = max_attempts
        self._running: dict[str, Running] = {}
        # Placements so far of tasks that failed over (absent: 1).
        self._attempts: dict[str, int] = {}

    def tasks(self) -> Iterator[Task]:
        """The tasks executing now."""
        return (r.task for r in self._running.values())

    def on_pool(self, key: PoolKey) -> list[Task]:
        """The tasks executing on a pool now."""
        return [r.task for r in self._running.values() if r.pool.key == key]

    def start(self, task: Task, pool: PoolView, now: float, placed_ns: int) -> None:
        """Starts a task (already off the queue) on ``pool``; ``placed_ns``: wall time of the
        placement pass, for its span."""
        self._registry.acquire(pool)
        if task.trace is not None:
            task.trace.placed(pool.node_id, pool.pool_id, placed_ns)
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
        job = asyncio.create_task(
            self._relay(task, pool, self._execute(task, pool)), name=f"relay-{task.task_id}"
        )
        running = Running(task, pool, job)
        self._running[task.task_id] = running
        # A relay cancelled before its first step never runs its own finally.
        job.add_done_callback(lambda _: self._relay_done(running))

    def cancel(self, task_id: str) -> None:
        """Stops a task's relay, if it has one; the task has ended already."""
        running = self._running.get(task_id)
        if running is not None:
            running.job.cancel()

    def stop(self, task_id: str, reason: LlorchError) -> None:
        """Stops a running task's relay for ``reason``: it fails over (or fails) as if its
        execution had broken with that error."""
        running = self._running.get(task_id)
        if running is not None and running.stopped_by is None:
            running.stopped_by = reason
            running.job.cancel()

    def fail_over_lost_nodes(self) -> None:
        """Stops relays on nodes found unreachable; their tasks fail over."""
        for task_id, running in list(self._running.items()):
            task = running.task
            if task.state is not TaskState.RUNNING or not task.node_id:
                continue
            if not self._registry.reachable(task.node_id):
                self.stop(
                    task_id,
                    UnavailableError(
                        f"node {task.node_id} was lost while task {task_id} ran",
                        reason="NODE_UNREACHABLE",
                        retry_delay_s=1.0,
                    ),
                )

    async def shutdown(self) -> None:
        """Stops every relay and waits for them."""
        jobs = [r.job for r in self._running.values()]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

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
            templated=spec.templated,
            grammar=spec.grammar,
        )
        timeout = None if task.deadline is None else max(0.001, task.deadline - self._clock())
        # The call carries the task's trace context (dispatch_metadata), never that of the call
        # that happens to be running the dispatcher, which the client interceptor would add.
        token = otel_context.attach(Context()) if tracing.enabled() else None
        try:
            return self._registry.client(pool.node_id).execute(
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
                    self._forecaster.finished(
                        pool.key,
                        spec,
                        (now - (task.started_at or now)) * 1000,
                        f.tokens_out,
                        f.decode_ms,
                        f.tokens_in,
                    )
                    tps = (f.tokens_out - 1) / (f.decode_ms / 1000) if f.decode_ms > 0 else 0.0
                    task.succeed(
                        Finished(
                            FINISH_REASON_FROM_PB.get(f.finish_reason, "stop"),
                            f.tokens_in,
                            f.tokens_out,
                            f.ttft_ms,
                            f.decode_ms,
                            f.tokens_cached,
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
            else:
                error = pool_error(err, pool.key)
            self._execution_failed(task, pool, error)
        except LlorchError as error:  # raised directly by a pool manager in this process
            self._execution_failed(task, pool, error)
        except asyncio.CancelledError:
            running = self._running.get(task.task_id)
            if running is None or running.stopped_by is None:
                raise
            self._execution_failed(task, pool, running.stopped_by)
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

    def _relay_done(self, running: Running) -> None:
        """Frees the relay's slot, however the relay ended (even cancelled before it ran)."""
        task, pool = running.task, running.pool
        self._registry.release(pool)
        if self._running.get(task.task_id) is running:  # a requeued task may have a new relay
            del self._running[task.task_id]
            if task.state is TaskState.RUNNING and running.stopped_by is not None:
                self._execution_failed(task, pool, running.stopped_by)  # before its first step
            elif task.state is TaskState.RUNNING:  # only if cancelled from outside
                task.fail(UnavailableError("the relay stopped", reason="SHUTDOWN"), self._clock())
        if task.terminal:
            self._attempts.pop(task.task_id, None)
        self._wake()

    def _execution_failed(self, task: Task, pool: PoolView, error: LlorchError) -> None:
        """Fails a task whose execution broke, or places it again if nothing was emitted.

        A retriable failure before the first token (a worker crash, a lost node, a pool that
        was not ready) costs the client only a longer wait: the task goes back to the front of
        the queue, up to ``max_attempts`` placements. After a token, the stream cannot be
        continued elsewhere without repeating or skipping tokens, so the task ends with the
        (retriable) error and the journal keeps what it emitted.
        """
        _log.warning("execution failed: %s", error.message, extra={"reason": error.reason})
        if error.reason in _POOL_UNFIT:
            self._registry.hold(pool.key)
        if task.terminal:
            return
        attempts = self._attempts.get(task.task_id, 1)
        if error.retriable and attempts < self._max_attempts and task.requeue():
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
            self._wake()
            return
        self._attempts.pop(task.task_id, None)
        task.fail(error, self._clock())

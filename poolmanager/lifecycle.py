"""Pool lifecycle: the operators' ``preload``, ``drain`` (which ends Unloaded) and ``reload``
(drain, load the new model, health-check, ready — or roll back to the previous model), and the
supervisor task per pool that restarts a crashed worker with exponential backoff and jitter and
opens the pool's circuit breaker (state FAILED, with the reason) after ``breaker_crashes``
crashes within ``breaker_window_s``. It owns the supervisor tasks and the lifecycle operations
under way; loads go through the ``Loader``, in-flight work through ``Executions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from mesh import logs
from mesh.errors import FailedPreconditionError, UnavailableError
from mesh.settings import PoolManagerSettings
from poolmanager.changes import ChangeFeed
from poolmanager.execution import Executions
from poolmanager.loader import Loader, LoadError
from poolmanager.pool import Backoff, BreakerPolicy, Pool, PoolState
from poolmanager.worker_process import WorkerProcess

_log = logs.get_logger("poolmanager")

_T = TypeVar("_T")


@dataclass(frozen=True)
class DrainReport:
    """How a drain ended."""

    finished: int
    """Executions that ended by themselves before the deadline."""
    cancelled: int
    """Executions still running at the deadline, ended with a retriable status."""


class Lifecycle:
    """Moves the node's pools between states and supervises their workers."""

    def __init__(
        self,
        settings: PoolManagerSettings,
        loader: Loader,
        executions: Executions,
        changes: ChangeFeed,
    ) -> None:
        self._settings = settings
        self._node_id = settings.node_id
        self._loader = loader
        self._executions = executions
        self._changes = changes
        self._breaker = BreakerPolicy(settings.breaker_crashes, settings.breaker_window_s)
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self._operations: set[asyncio.Task[Any]] = set()
        self._stopping = False

    def _cache_changed(self) -> None:
        """A worker's prefix cache changed: the node's state did (WatchNode carries it)."""
        if self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._changes.changed())
        self._operations.add(task)
        task.add_done_callback(self._operations.discard)

    def start(self, pool: Pool) -> None:
        """Marks the pool LOADING and starts its supervisor, which loads its model."""
        if pool.cpu_only:
            _log.info(
                "pool %s runs on the CPU: for development and CI only",
                pool.pool_id,
                extra={"pool_id": pool.pool_id, "node_id": self._node_id},
            )
        pool.state = PoolState.LOADING
        self._spawn_supervisor(pool, None)

    async def preload(self, pool: Pool, model_id: str = "") -> Pool:
        """Loads a model on an UNLOADED or FAILED pool (resetting its breaker); waits until it
        is READY. A READY pool that holds the model already is left as it is.

        Raises:
            FailedPreconditionError: the pool holds another model or is busy changing state, or
                the load failed or was refused (VRAM); the message says why.
        """
        async with pool.lock:
            wanted = model_id or pool.model_id
            if pool.state is PoolState.READY and pool.model_id == wanted:
                return pool
            if pool.state not in (PoolState.UNLOADED, PoolState.FAILED):
                raise FailedPreconditionError(
                    f"pool {pool.pool_id} is {pool.state.value} with {pool.model_id}; "
                    "use ReloadPool to change its model",
                    reason="POOL_BUSY",
                )
            await self._stop_supervisor(pool)
            pool.reset_breaker()
            pool.model_id = wanted
            try:
                await self._bring_up(pool)
            except LoadError as exc:
                await self._fail(pool, str(exc))
                raise exc.to_error() from None
            return pool

    async def drain(self, pool: Pool, deadline_s: float | None = None) -> DrainReport:
        """Drains a pool and unloads it: new work is refused at once, in-flight work gets until
        the deadline, what is left then ends UNAVAILABLE (retriable, reason POOL_DRAINED). The
        model stays staged in RAM, so a later preload is quick."""
        async with pool.lock:
            report = await self._halt(pool, self._deadline(deadline_s))
            await self._loader.drop_spare(pool)  # an unloaded pool frees its GPUs wholly
            pool.state = PoolState.UNLOADED
            await self._changes.changed()
            return report

    async def reload(
        self, pool: Pool, model_id: str, deadline_s: float | None = None
    ) -> DrainReport:
        """Drain → load ``model_id`` → health check → READY; on failure rolls back to the
        previous model.

        Raises:
            FailedPreconditionError: the new model failed (reason RELOAD_ROLLED_BACK: the pool
                serves the previous model again; RELOAD_FAILED: the rollback failed too and the
                pool is FAILED), or it cannot fit the GPUs (VRAM_INSUFFICIENT, nothing drained).
                The message says why.
        """
        async with pool.lock:
            previous = pool.model_id
            had_model = pool.state in (PoolState.READY, PoolState.DRAINING, PoolState.LOADING)
            if pool.state is PoolState.READY and not pool.cpu_only:
                await self._loader.check_reload_fits(pool, model_id)
            pool.rollback_model_id = previous
            try:
                return await self._reload_locked(pool, previous, had_model, model_id, deadline_s)
            finally:
                pool.rollback_model_id = ""

    async def to_the_end(self, operation: Coroutine[Any, Any, _T]) -> _T:
        """Runs a lifecycle operation to its end even when its caller goes away (a cancelled
        RPC): stopped half-way, a pool would stay DRAINING or LOADING with nothing to serve
        it. Only ``cancel()`` (the node's stop) cancels it."""
        task = asyncio.ensure_future(operation)
        self._operations.add(task)
        task.add_done_callback(self._operations.discard)
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    def cancel(self) -> tuple[list[asyncio.Task[None]], list[asyncio.Task[Any]]]:
        """Stops supervising: cancels every supervisor and lifecycle operation under way, and
        returns both (supervisors, operations) for the caller to await."""
        self._stopping = True
        supervisors = list(self._supervisors.values())
        operations = list(self._operations)
        for task in supervisors + operations:
            task.cancel()
        return supervisors, operations

    async def _reload_locked(
        self,
        pool: Pool,
        previous: str,
        had_model: bool,
        model_id: str,
        deadline_s: float | None,
    ) -> DrainReport:
        """The body of ``reload()``, under the pool's lock."""
        pool_id = pool.pool_id
        report = await self._halt(pool, self._deadline(deadline_s))
        pool.model_id = model_id
        pool.reset_breaker()
        try:
            await self._bring_up(pool)
        except LoadError as exc:
            failure = f"reload of pool {pool_id} to {model_id} failed: {exc}"
            _log.error("%s", failure, extra={"pool_id": pool_id, "node_id": self._node_id})
            pool.model_id = previous
            if not had_model:
                await self._fail(pool, failure)
                raise FailedPreconditionError(failure, reason="RELOAD_FAILED") from None
            try:
                await self._bring_up(pool)
            except LoadError as rollback:
                await self._fail(pool, f"{failure}; rollback to {previous} failed: {rollback}")
                raise FailedPreconditionError(pool.last_error, reason="RELOAD_FAILED") from None
            pool.last_error = f"{failure}; rolled back to {previous}"
            await self._changes.changed()
            raise FailedPreconditionError(pool.last_error, reason="RELOAD_ROLLED_BACK") from None
        return report

    def _deadline(self, deadline_s: float | None) -> float:
        return self._settings.drain_deadline_s if deadline_s is None else deadline_s

    async def _halt(self, pool: Pool, deadline_s: float) -> DrainReport:
        """Refuses new work, lets in-flight work finish until the deadline, ends the rest
        retriably, and stops the worker. Leaves the state to the caller."""
        pool_log = {"pool_id": pool.pool_id, "node_id": self._node_id}
        await self._stop_supervisor(pool)
        pool.state = PoolState.DRAINING
        await self._changes.changed()
        in_flight = len(pool.active)
        _log.info("draining", extra={**pool_log, "in_flight": in_flight, "deadline_s": deadline_s})
        end = time.monotonic() + deadline_s
        while pool.active and time.monotonic() < end:
            await self._changes.wait(self._changes.version, end - time.monotonic())
        left = self._executions.on_pool(pool)
        for execution in left:
            execution.interrupt(
                UnavailableError(
                    f"pool {pool.pool_id} was drained before execution "
                    f"{execution.spec.execution_id} finished",
                    reason="POOL_DRAINED",
                    retry_delay_s=1.0,
                )
            )
        worker, pool.worker = pool.worker, None
        if worker is not None:
            await worker.stop(self._settings.stop_grace_s)
        report = DrainReport(finished=in_flight - len(left), cancelled=len(left))
        _log.info(
            "drained",
            extra={**pool_log, "finished": report.finished, "cancelled": report.cancelled},
        )
        return report

    async def _stop_supervisor(self, pool: Pool) -> None:
        task = self._supervisors.pop(pool.pool_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _bring_up(self, pool: Pool) -> None:
        """Loads ``pool.model_id`` (raising LoadError), marks the pool READY and supervises it."""
        pool.state = PoolState.LOADING
        await self._changes.changed()
        worker = await self._loader.load(pool)
        await self._ready(pool, worker)
        self._spawn_supervisor(pool, worker)

    async def _fail(self, pool: Pool, reason: str) -> None:
        await self._loader.drop_spare(pool)
        pool.state = PoolState.FAILED
        pool.last_error = reason
        _log.error("pool failed: %s", reason, extra={"pool_id": pool.pool_id})
        await self._changes.changed()

    def _spawn_supervisor(self, pool: Pool, worker: WorkerProcess | None) -> None:
        self._supervisors[pool.pool_id] = asyncio.create_task(
            self._supervise(pool, worker), name=f"pool-{pool.pool_id}"
        )

    async def _supervise(self, pool: Pool, worker: WorkerProcess | None) -> None:
        """Keeps the pool's model running; restarts a crashed worker with backoff and jitter
        until the breaker opens. Cancelled by every lifecycle operation."""
        settings = self._settings
        backoff = Backoff(settings.restart_backoff_s, settings.restart_backoff_max_s)
        pool_log = {"pool_id": pool.pool_id, "node_id": self._node_id}
        while not self._stopping:
            if worker is None:
                pool.state = PoolState.LOADING
                await self._changes.changed()
                try:
                    worker = await self._loader.load(pool)
                except LoadError as exc:
                    if exc.reason == "CATALOG_UNAVAILABLE":  # not the pool's fault: no count
                        pool.last_error = str(exc)
                        _log.warning("%s; retrying", exc, extra=pool_log)
                    elif exc.permanent or pool.count_crash(
                        f"start failed: {exc}", self._breaker, time.monotonic()
                    ):
                        await self._fail(pool, pool.last_error if not exc.permanent else str(exc))
                        return
                    await asyncio.sleep(backoff.next_delay_s())
                    continue
                await self._ready(pool, worker)
            started = time.monotonic()
            await worker.exited.wait()
            pool.worker = None
            if self._stopping:
                return
            if time.monotonic() - started > settings.breaker_window_s:
                backoff.reset()  # it ran a long while: a fresh start
            returncode = worker.returncode
            _log.error(
                "worker died; restarting",
                extra={**pool_log, "pid": worker.pid, "returncode": returncode},
            )
            what = f"worker {worker.pid} exited with code {returncode}"
            if pool.count_crash(what, self._breaker, time.monotonic()):
                await self._fail(pool, pool.last_error)
                return
            worker = None
            pool.state = PoolState.LOADING
            await self._changes.changed()
            await asyncio.sleep(backoff.next_delay_s())

    async def _ready(self, pool: Pool, worker: WorkerProcess) -> None:
        pool.worker = worker
        worker.on_cache = self._cache_changed
        self._loader.replenish_spare(pool)
        pool.engine_version = worker.ready.engine_version
        pool.n_ctx = worker.ready.n_ctx
        if not pool.breaker_open and not pool.last_error.startswith("reload"):
            pool.last_error = ""
        pool.state = PoolState.READY
        _log.info(
            "pool ready",
            extra={
                "pool_id": pool.pool_id,
                "node_id": self._node_id,
                "pid": worker.pid,
                "model_id": pool.model_id,
                "load_ms": round(pool.load_ms, 1),
                "loaded_from": pool.loaded_from,
                "spare": pool.loaded_in_spare,
                "vram_estimate_bytes": pool.vram_estimate_bytes,
                "vram_measured_bytes": pool.vram_measured_bytes,
            },
        )
        await self._changes.changed()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Marks a finished operation's error as seen (its caller may have gone)."""
    if not task.cancelled():
        task.exception()

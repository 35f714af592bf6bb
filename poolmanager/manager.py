"""PoolManager: the pools of one machine, their workers, and the executions running on them.

Plain asyncio class; the servicer converts protobuf and calls it. Each pool runs one worker
process for its current model. A supervisor task per pool restarts a crashed worker with
exponential backoff and jitter, and opens the pool's circuit breaker (state FAILED, with the
reason) after ``breaker_crashes`` crashes within ``breaker_window_s``. Operators move a pool
through its lifecycle with ``preload``, ``drain`` (which ends Unloaded) and ``reload`` (drain,
load the new model, health-check, ready — or roll back to the previous model).

The VRAM-only rule: before a GPU pool starts a worker, the model's VRAM need (``poolmanager.vram``)
is compared with its GPUs' free VRAM and a model that does not fit whole is refused; the worker
itself refuses a load that left any layer on the CPU.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span

from mesh import logs, tracing
from mesh.errors import CancelledError as ExecutionCancelledError
from mesh.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LlorchError,
    NotFoundError,
    UnavailableError,
)
from mesh.settings import PoolManagerSettings, PoolSettings
from poolmanager.devices import DeviceInventory, GpuDevice
from poolmanager.staging import StagingCache, remove_stale_dirs
from poolmanager.vram import VramEstimate, estimate_vram
from poolmanager.worker.protocol import (
    Cancelled,
    Done,
    Event,
    Execute,
    Failed,
    LoadSpec,
    Tokens,
)
from poolmanager.worker_process import (
    ExecutionQueue,
    Interrupted,
    SpareWorker,
    WorkerExited,
    WorkerProcess,
    WorkerStartError,
)
from provisioners.gguf_facts import NotAGgufError, read_model_shape

_log = logs.get_logger("poolmanager")

ModelLocator = Callable[[str], Awaitable[str]]
"""Returns the local path of a model id (through the catalog)."""

_T = TypeVar("_T")
_HEALTH_PROMPT = "Hi"  # short: a forward pass and a sampled token, little else


class PoolState(enum.Enum):
    """Lifecycle of a pool."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class Pool:
    """One pool, its current model and worker, and what its supervisor has seen."""

    settings: PoolSettings
    model_id: str = ""
    """The model the pool runs (or loads); starts as the settings' model, changes on a reload."""
    state: PoolState = PoolState.UNLOADED
    engine_version: str = ""
    n_ctx: int = 0
    last_error: str = ""
    worker: WorkerProcess | None = None
    active: set[str] = field(default_factory=set)
    vram_estimate_bytes: int = 0
    vram_measured_bytes: int = 0
    load_ms: float = 0.0
    loaded_from: str = ""
    """Where the running model was read from: ``disk`` or ``staging`` (RAM)."""
    restarts: int = 0
    """Crashes and failed starts since the pool manager started."""
    breaker_open: bool = False
    crash_times: collections.deque[float] = field(default_factory=collections.deque)
    supervisor: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    spare: SpareWorker | None = None
    """A warm worker process without a model, for the next load (see ``spare_workers``)."""
    spare_task: asyncio.Task[None] | None = None
    rollback_model_id: str = ""
    """During a reload, the model it rolls back to if the new one fails (kept on disk)."""
    loaded_in_spare: bool = False
    """The running worker was a spare: its load did not wait for a process to start."""

    @property
    def spare_ready(self) -> bool:
        """Whether a spare is warm for the next load."""
        return self.spare is not None and self.spare.alive

    def __post_init__(self) -> None:
        self.model_id = self.model_id or self.settings.model_id

    @property
    def pool_id(self) -> str:
        """Id of the pool."""
        return self.settings.pool_id

    @property
    def cpu_only(self) -> bool:
        """A development pool on the CPU (never a fallback for a GPU pool)."""
        return self.settings.devices == ["cpu"]

    @property
    def slots_free(self) -> int:
        """Slots not executing anything."""
        return max(0, self.settings.slots - len(self.active))


@dataclass(frozen=True)
class DrainReport:
    """How a drain ended."""

    finished: int
    """Executions that ended by themselves before the deadline."""
    cancelled: int
    """Executions still running at the deadline, ended with a retriable status."""


class LoadError(Exception):
    """A model could not be brought up on a pool."""

    def __init__(self, message: str, *, reason: str, permanent: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent
        """Retrying cannot help (a model too large for the VRAM, a GPU missing)."""

    def to_error(self) -> FailedPreconditionError:
        """The status an operator's request ends with."""
        return FailedPreconditionError(str(self), reason=self.reason)


@dataclass(frozen=True)
class ExecutionSpec:
    """One generation, sampling fully resolved."""

    execution_id: str
    task_id: str
    pool_id: str
    model_id: str
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    ignore_eos: bool
    max_tokens_defaulted: bool = False


@dataclass(frozen=True)
class ExecStarted:
    """The worker accepted the execution."""

    engine_version: str
    tokens_in: int


@dataclass(frozen=True)
class ExecTokens:
    """Consecutive tokens starting at ``index``."""

    index: int
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class ExecFinished:
    """Generation ended normally."""

    reason: str
    tokens_in: int
    tokens_out: int
    ttft_ms: float
    decode_ms: float
    started_ns: int = 0
    """Wall times (ns, the worker's clock) the prompt began, the first token came, it ended;
    0 from a worker that did not say."""
    first_token_ns: int = 0
    ended_ns: int = 0


ExecEvent = ExecStarted | ExecTokens | ExecFinished


class PoolManager:
    """Owns the pools of one node."""

    def __init__(
        self,
        settings: PoolManagerSettings,
        locate_model: ModelLocator,
        base_env: Mapping[str, str],
        on_change: Callable[[], Awaitable[None]] | None = None,
        log_level: str = "INFO",
        *,
        inventory: DeviceInventory | None = None,
        staging_dir: Path | None = None,
    ) -> None:
        self.node_id = settings.node_id
        self._settings = settings
        self._locate_model = locate_model
        self._base_env = dict(base_env)
        self._on_change = on_change
        self._log_level = log_level
        self.inventory = inventory or DeviceInventory()
        self.pools: dict[str, Pool] = {p.pool_id: Pool(p) for p in settings.pools}
        directory = staging_dir or settings.staging_dir or _default_staging_dir(self.node_id)
        self.staging: StagingCache | None = (
            StagingCache(directory, settings.staging_budget_bytes, self.model_in_use)
            if settings.staging_budget_bytes > 0
            else None
        )
        self._executions: dict[str, Execution] = {}
        self._used: set[str] = set()  # models asked for since the last take_used()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.version = 0
        self.stored_models: frozenset[str] = frozenset()
        """Models the catalog records in this node's store (see ``set_stored_models``)."""
        """Counts changes of the node's state (pool states, slots in use)."""
        self._change = asyncio.Event()

    async def start(self) -> None:
        """Reads the GPUs and starts every pool's supervisor; returns at once."""
        self.inventory.open()
        gpus = self.inventory.devices()
        _log.info(
            "devices",
            extra={
                "node_id": self.node_id,
                "gpus": [f"{d.index}:{d.name}:{d.vram_total_bytes}" for d in gpus],
            },
        )
        if self.staging is not None:
            self.staging.open()
        for pool in self.pools.values():
            if pool.cpu_only:
                _log.info(
                    "pool %s runs on the CPU: for development and CI only",
                    pool.pool_id,
                    extra={"pool_id": pool.pool_id, "node_id": self.node_id},
                )
            pool.state = PoolState.LOADING
            pool.supervisor = self._spawn_supervisor(pool, None)

    async def wait_ready(self, timeout_s: float) -> bool:
        """Waits until no pool is LOADING; True when every pool is READY."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = {p.state for p in self.pools.values()}
            if PoolState.LOADING not in states:
                return states <= {PoolState.READY}
            await self.wait_change(self.version, min(0.5, deadline - time.monotonic()))
        return False

    def all_ready(self) -> bool:
        """Whether every pool serves (READY) or was unloaded on purpose (UNLOADED)."""
        return all(p.state in (PoolState.READY, PoolState.UNLOADED) for p in self.pools.values())

    async def stop(self) -> None:
        """Stops supervisors and workers; open executions end UNAVAILABLE."""
        self._stopping = True
        tasks = [p.supervisor for p in self.pools.values() if p.supervisor]
        tasks += [p.spare_task for p in self.pools.values() if p.spare_task]
        background = list(self._background)
        for task in tasks + background:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Lifecycle operations and staging copies: each cleans up (kills what it started).
        await asyncio.gather(*background, return_exceptions=True)
        grace = self._settings.stop_grace_s
        await asyncio.gather(
            *(p.worker.stop(grace) for p in self.pools.values() if p.worker),
            *(p.spare.stop(grace) for p in self.pools.values() if p.spare),
        )
        if self.staging is not None:
            self.staging.close()
        self.inventory.close()

    def pool(self, pool_id: str) -> Pool:
        """A pool by id.

        Raises:
            NotFoundError: no such pool on this node.
        """
        pool = self.pools.get(pool_id)
        if pool is None:
            raise NotFoundError(
                f"pool {pool_id} is not on node {self.node_id}", reason="POOL_NOT_FOUND"
            )
        return pool

    # ----- executions -------------------------------------------------------------------------

    def begin(self, spec: ExecutionSpec) -> Execution:
        """Checks an execution and hands it to its pool's worker at once, without awaiting.

        Read it with ``Execution.events()``; one that is never read must be ``abandon()``-ed.

        Raises:
            NotFoundError: unknown pool.
            FailedPreconditionError: the pool holds another model.
            UnavailableError: the pool is not ready (draining, loading) or its worker died
                (retriable).
        """
        pool = self.pool(spec.pool_id)
        self._used.add(spec.model_id)
        if pool.model_id != spec.model_id:
            raise FailedPreconditionError(
                f"pool {spec.pool_id} holds {pool.model_id}, not {spec.model_id}",
                reason="MODEL_NOT_LOADED",
            )
        if pool.state is not PoolState.READY or pool.worker is None:
            raise UnavailableError(
                f"pool {spec.pool_id} is {pool.state.value}",
                reason="POOL_DRAINING" if pool.state is PoolState.DRAINING else "POOL_NOT_READY",
                retry_delay_s=1.0,
            )
        if spec.execution_id in self._executions:
            raise FailedPreconditionError(
                f"execution {spec.execution_id} already exists", reason="EXECUTION_EXISTS"
            )
        # No refusal when every slot is taken: the orchestrator owns admission, and a slot
        # freed by a cancel may not be released here yet when the next execution arrives.
        # The worker runs executions beyond its slots in arrival order.
        worker = pool.worker
        pool.active.add(spec.execution_id)
        traceparent = ""
        span = None
        if tracing.enabled():
            # The worker's part of the trace: it logs under this span's id, and its phases
            # come back with its result as child spans (the worker has no exporter).
            span = tracing.tracer("llorch.poolmanager").start_span(
                "llorch.worker",
                attributes={
                    "llorch.task_id": spec.task_id,
                    "llorch.execution_id": spec.execution_id,
                    "llorch.pool_id": spec.pool_id,
                    "llorch.node_id": self.node_id,
                    "llorch.model_id": spec.model_id,
                },
            )
            traceparent = tracing.traceparent(span)
        events = worker.submit(_execute_command(spec, traceparent))
        execution = Execution(self, spec, pool, worker, events, span)
        self._executions[spec.execution_id] = execution
        return execution

    def _forget(self, execution: Execution, finished: bool) -> None:
        """Drops an execution's bookkeeping; cancels it in the worker unless it finished."""
        spec = execution.spec
        if not finished:
            execution.worker.cancel(spec.execution_id)
        execution.worker.forget(spec.execution_id)
        execution.pool.active.discard(spec.execution_id)
        self._executions.pop(spec.execution_id, None)

    def cancel(self, execution_id: str) -> bool:
        """Stops an execution; its stream ends CANCELLED. False when it is not running."""
        execution = self._executions.get(execution_id)
        if execution is None:
            return False
        execution.worker.cancel(execution_id)
        return True

    # ----- lifecycle --------------------------------------------------------------------------

    async def preload(self, pool_id: str, model_id: str = "") -> Pool:
        """Loads a model on an UNLOADED or FAILED pool (resetting its breaker); waits until it
        is READY. A READY pool that holds the model already is left as it is.

        Raises:
            FailedPreconditionError: the pool holds another model or is busy changing state, or
                the load failed or was refused (VRAM); the message says why.
        """
        pool = self.pool(pool_id)
        async with pool.lock:
            wanted = model_id or pool.model_id
            if pool.state is PoolState.READY and pool.model_id == wanted:
                return pool
            if pool.state not in (PoolState.UNLOADED, PoolState.FAILED):
                raise FailedPreconditionError(
                    f"pool {pool_id} is {pool.state.value} with {pool.model_id}; "
                    "use ReloadPool to change its model",
                    reason="POOL_BUSY",
                )
            await self._stop_supervisor(pool)
            pool.crash_times.clear()
            pool.breaker_open = False
            pool.model_id = wanted
            try:
                await self._bring_up(pool)
            except LoadError as exc:
                await self._fail(pool, str(exc))
                raise exc.to_error() from None
            return pool

    async def drain(self, pool_id: str, deadline_s: float | None = None) -> DrainReport:
        """Drains a pool and unloads it: new work is refused at once, in-flight work gets until
        the deadline, what is left then ends UNAVAILABLE (retriable, reason POOL_DRAINED). The
        model stays staged in RAM, so a later preload is quick."""
        pool = self.pool(pool_id)
        async with pool.lock:
            report = await self._halt(pool, self._deadline(deadline_s))
            await self._drop_spare(pool)  # an unloaded pool frees its GPUs wholly
            pool.state = PoolState.UNLOADED
            await self._changed()
            return report

    async def reload(
        self, pool_id: str, model_id: str, deadline_s: float | None = None
    ) -> DrainReport:
        """Drain → load ``model_id`` → health check → READY; on failure rolls back to the
        previous model.

        Raises:
            FailedPreconditionError: the new model failed (reason RELOAD_ROLLED_BACK: the pool
                serves the previous model again; RELOAD_FAILED: the rollback failed too and the
                pool is FAILED). The message says why.
        """
        pool = self.pool(pool_id)
        async with pool.lock:
            previous = pool.model_id
            had_model = pool.state in (PoolState.READY, PoolState.DRAINING, PoolState.LOADING)
            if pool.state is PoolState.READY and not pool.cpu_only:
                await self._check_reload_fits(pool, model_id)
            pool.rollback_model_id = previous
            try:
                return await self._reload_locked(pool, previous, had_model, model_id, deadline_s)
            finally:
                pool.rollback_model_id = ""

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
        pool.crash_times.clear()
        pool.breaker_open = False
        try:
            await self._bring_up(pool)
        except LoadError as exc:
            failure = f"reload of pool {pool_id} to {model_id} failed: {exc}"
            _log.error("%s", failure, extra={"pool_id": pool_id, "node_id": self.node_id})
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
            await self._changed()
            raise FailedPreconditionError(pool.last_error, reason="RELOAD_ROLLED_BACK") from None
        return report

    async def stage(self, model_id: str) -> None:
        """Copies a model into the RAM staging cache.

        Raises:
            FailedPreconditionError: staging is off.
            ResourceExhaustedError: it does not fit the budget beside the models in use.
        """
        if self.staging is None:
            raise FailedPreconditionError(
                "staging is off on this node (staging_budget_bytes = 0)", reason="STAGING_OFF"
            )
        path = Path(await self._locate_model(model_id))
        await self.staging.stage(model_id, path)
        await self._changed()

    async def unstage(self, model_id: str) -> bool:
        """Removes a model from RAM; False when it was not staged.

        Raises:
            FailedPreconditionError: a pool has it loaded or is loading it.
        """
        if self.staging is None:
            return False
        removed = self.staging.unstage(model_id)
        await self._changed()
        return removed

    def take_used(self) -> set[str]:
        """Models executions asked for since the last call (for the catalog's last-used
        times); the caller gives them back with ``give_back_used`` if it could not report."""
        used, self._used = self._used, set()
        return used

    def give_back_used(self, models: set[str]) -> None:
        """Puts back what ``take_used`` returned when the report failed."""
        self._used |= models

    def models_in_use(self) -> dict[str, str]:
        """Models this node must keep on disk now, with why: loaded or loading in a pool (or
        held by a pool that may reload it), or staged in RAM."""
        out: dict[str, str] = {}
        for pool in self.pools.values():
            if pool.worker is not None or pool.state is not PoolState.UNLOADED:
                out[pool.model_id] = f"pool {pool.pool_id} is {pool.state.value} with it"
            if pool.rollback_model_id:
                out.setdefault(
                    pool.rollback_model_id,
                    f"pool {pool.pool_id} rolls back to it if its reload fails",
                )
        if self.staging is not None:
            for staged in self.staging.models():
                out.setdefault(staged.model_id, "staged in RAM")
        return out

    def model_in_use(self, model_id: str) -> bool:
        """Whether a pool has the model loaded or is loading it."""
        return any(
            p.model_id == model_id and (p.worker is not None or p.state is PoolState.LOADING)
            for p in self.pools.values()
        )

    def _deadline(self, deadline_s: float | None) -> float:
        return self._settings.drain_deadline_s if deadline_s is None else deadline_s

    async def _halt(self, pool: Pool, deadline_s: float) -> DrainReport:
        """Refuses new work, lets in-flight work finish until the deadline, ends the rest
        retriably, and stops the worker. Leaves the state to the caller."""
        pool_log = {"pool_id": pool.pool_id, "node_id": self.node_id}
        await self._stop_supervisor(pool)
        pool.state = PoolState.DRAINING
        await self._changed()
        in_flight = len(pool.active)
        _log.info("draining", extra={**pool_log, "in_flight": in_flight, "deadline_s": deadline_s})
        end = time.monotonic() + deadline_s
        while pool.active and time.monotonic() < end:
            await self.wait_change(self.version, end - time.monotonic())
        left = [e for e in self._executions.values() if e.pool is pool]
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
        task, pool.supervisor = pool.supervisor, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _bring_up(self, pool: Pool) -> None:
        """Loads ``pool.model_id`` (raising LoadError), marks the pool READY and supervises it."""
        pool.state = PoolState.LOADING
        await self._changed()
        worker = await self._load(pool)
        await self._ready(pool, worker)
        pool.supervisor = self._spawn_supervisor(pool, worker)

    async def _fail(self, pool: Pool, reason: str) -> None:
        await self._drop_spare(pool)
        pool.state = PoolState.FAILED
        pool.last_error = reason
        _log.error("pool failed: %s", reason, extra={"pool_id": pool.pool_id})
        await self._changed()

    def _spawn_supervisor(self, pool: Pool, worker: WorkerProcess | None) -> asyncio.Task[None]:
        return asyncio.create_task(self._supervise(pool, worker), name=f"pool-{pool.pool_id}")

    async def _supervise(self, pool: Pool, worker: WorkerProcess | None) -> None:
        """Keeps the pool's model running; restarts a crashed worker with backoff and jitter
        until the breaker opens. Cancelled by every lifecycle operation."""
        settings = self._settings
        backoff = settings.restart_backoff_s
        pool_log = {"pool_id": pool.pool_id, "node_id": self.node_id}
        while not self._stopping:
            if worker is None:
                pool.state = PoolState.LOADING
                await self._changed()
                try:
                    worker = await self._load(pool)
                except LoadError as exc:
                    if exc.reason == "CATALOG_UNAVAILABLE":  # not the pool's fault: no count
                        pool.last_error = str(exc)
                        _log.warning("%s; retrying", exc, extra=pool_log)
                    elif exc.permanent or self._crashed(pool, f"start failed: {exc}"):
                        await self._fail(pool, pool.last_error if not exc.permanent else str(exc))
                        return
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(backoff * 2, settings.restart_backoff_max_s)
                    continue
                await self._ready(pool, worker)
            started = time.monotonic()
            await worker.exited.wait()
            pool.worker = None
            if self._stopping:
                return
            if time.monotonic() - started > settings.breaker_window_s:
                backoff = settings.restart_backoff_s  # it ran a long while: a fresh start
            returncode = worker.returncode
            _log.error(
                "worker died; restarting",
                extra={**pool_log, "pid": worker.pid, "returncode": returncode},
            )
            if self._crashed(pool, f"worker {worker.pid} exited with code {returncode}"):
                await self._fail(pool, pool.last_error)
                return
            worker = None
            pool.state = PoolState.LOADING
            await self._changed()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, settings.restart_backoff_max_s)

    def _crashed(self, pool: Pool, what: str) -> bool:
        """Counts a crash; True when the breaker opens (last_error then says why)."""
        now = time.monotonic()
        pool.restarts += 1
        pool.crash_times.append(now)
        window = self._settings.breaker_window_s
        while pool.crash_times and pool.crash_times[0] < now - window:
            pool.crash_times.popleft()
        pool.last_error = what
        if len(pool.crash_times) >= self._settings.breaker_crashes:
            pool.breaker_open = True
            pool.last_error = (
                f"circuit breaker open: {len(pool.crash_times)} crashes within {window:g}s; "
                f"last: {what}; PreloadPool or ReloadPool resets it"
            )
            return True
        return False

    async def _ready(self, pool: Pool, worker: WorkerProcess) -> None:
        pool.worker = worker
        self._replenish_spare(pool)
        pool.engine_version = worker.ready.engine_version
        pool.n_ctx = worker.ready.n_ctx
        if not pool.breaker_open and not pool.last_error.startswith("reload"):
            pool.last_error = ""
        pool.state = PoolState.READY
        _log.info(
            "pool ready",
            extra={
                "pool_id": pool.pool_id,
                "node_id": self.node_id,
                "pid": worker.pid,
                "model_id": pool.model_id,
                "load_ms": round(pool.load_ms, 1),
                "loaded_from": pool.loaded_from,
                "spare": pool.loaded_in_spare,
                "vram_estimate_bytes": pool.vram_estimate_bytes,
                "vram_measured_bytes": pool.vram_measured_bytes,
            },
        )
        await self._changed()

    async def _load(self, pool: Pool) -> WorkerProcess:
        """Starts a worker for ``pool.model_id``: locate, VRAM check, spawn (from the staged
        copy when there is one), health check, VRAM measurement.

        Raises:
            LoadError: why it failed, and whether a retry could help.
        """
        started = time.monotonic()
        model_id = pool.model_id
        try:
            disk_path = Path(await self._locate_model(model_id))
        except UnavailableError as exc:
            raise LoadError(
                f"the catalog cannot be reached: {exc.message}",
                reason="CATALOG_UNAVAILABLE",
                permanent=False,
            ) from None
        except LlorchError as exc:
            raise LoadError(
                f"cannot locate model {model_id}: {exc.message}",
                reason="MODEL_NOT_LOCATED",
                permanent=False,
            ) from None
        gpus: list[GpuDevice] = []
        split: list[float] | None = None
        spare = pool.spare if pool.spare_ready else None
        if not pool.cpu_only:
            _, gpus = await self._check_vram(pool, model_id, disk_path, spare)
            free = sum(d.vram_free_bytes for d in gpus)
            split = [d.vram_free_bytes / free for d in gpus]
        else:
            pool.vram_estimate_bytes = 0
        staged = self.staging.lookup(model_id) if self.staging is not None else None
        path = staged or disk_path
        pool.spare = None  # taken now: from here on the load owns the process
        pool.loaded_in_spare = spare is not None
        settings = pool.settings
        load = LoadSpec(
            model=str(path),
            n_ctx=settings.n_ctx,
            slots=settings.slots,
            kv_cache_tokens=settings.kv_cache_tokens,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            n_threads=settings.n_threads,
            gpu=not pool.cpu_only,
            tensor_split=tuple(split) if split and len(split) > 1 else (),
            cache_type=settings.cache_type,
            log_level=self._log_level,  # type: ignore[arg-type]
            token_batch_ms=settings.token_batch_ms,
        )
        try:
            worker = await WorkerProcess.spawn(
                load,
                gpu_devices=[] if pool.cpu_only else settings.devices,
                env=self._base_env,
                start_timeout_s=self._settings.worker_start_timeout_s,
                spare=spare,
            )
        except WorkerStartError as exc:
            raise LoadError(
                str(exc),
                reason="VRAM_ONLY_REFUSED" if exc.refused else "LOAD_FAILED",
                permanent=exc.refused,
            ) from None
        except OSError as exc:
            raise LoadError(
                f"cannot start a worker: {exc}", reason="LOAD_FAILED", permanent=False
            ) from None
        try:
            problem = await self._health_check(worker)
        except BaseException:  # cancelled by a lifecycle operation or shutdown: no orphan
            worker.kill()
            raise
        if problem:
            await worker.stop(self._settings.stop_grace_s)
            raise LoadError(
                f"model {model_id} failed its health check: {problem}",
                reason="HEALTH_CHECK_FAILED",
                permanent=False,
            )
        pool.vram_measured_bytes = sum(
            self.inventory.process_vram_bytes(d.index, worker.pid) or 0 for d in gpus
        )
        pool.load_ms = (time.monotonic() - started) * 1000
        pool.loaded_from = "staging" if staged else "disk"
        if staged is None and self.staging is not None and self._settings.auto_stage:
            self._in_background(self._auto_stage(model_id, disk_path))
        return worker

    async def _check_reload_fits(self, pool: Pool, model_id: str) -> None:
        """Refuses a reload whose model cannot fit even once the running one is unloaded,
        before anything is drained: the pool keeps serving its model.

        Raises:
            FailedPreconditionError: VRAM_INSUFFICIENT, with the figures.
        """
        try:
            path = Path(await self._locate_model(model_id))
        except LlorchError:
            return  # the load reports it, and the pool rolls back
        running = pool.vram_estimate_bytes
        try:
            await self._check_vram(
                pool,
                model_id,
                path,
                pool.spare if pool.spare_ready else None,
                freed_bytes=pool.vram_measured_bytes or running,
            )
        except LoadError as exc:
            if exc.reason == "VRAM_INSUFFICIENT":
                raise FailedPreconditionError(
                    f"reload of pool {pool.pool_id} to {model_id} refused before draining: "
                    f"{exc}; the pool keeps serving {pool.model_id}",
                    reason="VRAM_INSUFFICIENT",
                ) from None
        finally:
            pool.vram_estimate_bytes = running  # the running model's, until the swap

    async def _check_vram(
        self,
        pool: Pool,
        model_id: str,
        path: Path,
        spare: SpareWorker | None = None,
        freed_bytes: int = 0,
    ) -> tuple[VramEstimate, list[GpuDevice]]:
        """The VRAM-only rule, before any load: the whole model must fit the pool's GPUs.

        A spare that will take the load already holds its CUDA contexts, part of what the
        estimate counts as overhead: what it holds counts as free for this load, and so do
        ``freed_bytes`` (what the running worker holds, when it will be stopped first)."""
        if not self.inventory.available:
            raise LoadError(
                f"pool {pool.pool_id} is configured on GPUs {pool.settings.devices}, but "
                f"{self.inventory.unavailable_reason or 'NVML is not open'}",
                reason="NO_GPU",
                permanent=True,
            )
        gpus = []
        for index in pool.settings.devices:
            device = self.inventory.device(int(index))
            if device is None:
                raise LoadError(
                    f"GPU {index} of pool {pool.pool_id} is not present (NVML)",
                    reason="GPU_MISSING",
                    permanent=True,
                )
            gpus.append(device)
        try:
            shape = await asyncio.to_thread(read_model_shape, path)
        except NotAGgufError as exc:
            raise LoadError(str(exc), reason="LOAD_FAILED", permanent=True) from None
        estimate = estimate_vram(
            shape,
            n_ctx=pool.settings.n_ctx,
            slots=pool.settings.slots,
            kv_cache_tokens=pool.settings.kv_cache_tokens,
            cache_type=pool.settings.cache_type,
            n_devices=len(gpus),
            overhead_bytes_per_device=self._settings.vram_overhead_bytes,
        )
        pool.vram_estimate_bytes = estimate.total_bytes
        free = sum(d.vram_free_bytes for d in gpus) + freed_bytes
        if spare is not None:
            free += sum(self.inventory.process_vram_bytes(d.index, spare.pid) or 0 for d in gpus)
        if estimate.total_bytes > free:
            raise LoadError(
                f"model {model_id} needs {estimate.total_bytes} bytes of VRAM (weights "
                f"{estimate.weights_bytes}, KV cache {estimate.kv_bytes} for "
                f"{estimate.kv_cells} tokens of {pool.settings.slots} slots, compute "
                f"{estimate.compute_bytes}, overhead {estimate.overhead_bytes}) but GPUs "
                f"{','.join(pool.settings.devices)} of pool {pool.pool_id} have {free} bytes "
                "free; not loaded (VRAM-only: never split between VRAM and RAM; fewer slots, "
                "a smaller n_ctx or kv_cache_tokens shrink the KV cache)",
                reason="VRAM_INSUFFICIENT",
                permanent=True,
            )
        return estimate, gpus

    async def _drop_spare(self, pool: Pool) -> None:
        """Stops the pool's spare, and one that is starting."""
        task, pool.spare_task = pool.spare_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        spare, pool.spare = pool.spare, None
        if spare is not None:
            await spare.stop(self._settings.stop_grace_s)

    def _replenish_spare(self, pool: Pool) -> None:
        """Starts a spare for the pool's next load unless one is warm or starting."""
        if not self._settings.spare_workers or self._stopping or pool.spare_ready:
            return
        if pool.spare_task is not None and not pool.spare_task.done():
            return
        pool.spare_task = asyncio.create_task(self._start_spare(pool), name=f"spare-{pool.pool_id}")

    async def _start_spare(self, pool: Pool) -> None:
        try:
            spare = await SpareWorker.spawn(
                gpu_devices=[] if pool.cpu_only else pool.settings.devices,
                env=self._base_env,
                start_timeout_s=self._settings.worker_start_timeout_s,
                log_level=self._log_level,
            )
        except (WorkerStartError, OSError) as exc:
            _log.warning("spare worker did not start: %s", exc, extra={"pool_id": pool.pool_id})
            return
        if self._stopping:
            await spare.stop(0)
            return
        pool.spare = spare
        _log.info(
            "spare worker ready",
            extra={"pool_id": pool.pool_id, "pid": spare.pid, "warm_ms": round(spare.warm_ms)},
        )
        await self._changed()

    async def _health_check(self, worker: WorkerProcess) -> str:
        """Generates one token; returns the problem, empty when healthy."""
        exec_id = f"health-{worker.pid}-{time.monotonic_ns()}"
        events = worker.submit(
            Execute(id=exec_id, prompt=_HEALTH_PROMPT, max_tokens=1, ignore_eos=True)
        )
        try:
            async with asyncio.timeout(self._settings.health_check_timeout_s):
                while True:
                    event = await events.get()
                    if isinstance(event, WorkerExited):
                        return f"the worker exited with code {event.returncode}"
                    if isinstance(event, Done):
                        return ""
                    if isinstance(event, Failed):
                        return event.message
                    if isinstance(event, Cancelled):
                        return "cancelled"
        except TimeoutError:
            return f"no token within {self._settings.health_check_timeout_s:g}s"
        finally:
            worker.forget(exec_id)

    async def _auto_stage(self, model_id: str, path: Path) -> None:
        assert self.staging is not None
        try:
            await self.staging.stage(model_id, path)
        except LlorchError as exc:
            _log.info("not staged automatically: %s", exc.message)
        except OSError as exc:
            _log.warning("staging %s failed: %s", model_id, exc)
        await self._changed()

    async def to_the_end(self, operation: Coroutine[Any, Any, _T]) -> _T:
        """Runs a lifecycle operation to its end even when its caller goes away (a cancelled
        RPC): stopped half-way, a pool would stay DRAINING or LOADING with nothing to serve
        it. Only ``stop()`` cancels it."""
        task = asyncio.ensure_future(operation)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    def _in_background(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _changed(self) -> None:
        self.version += 1
        self._change.set()
        self._change = asyncio.Event()
        if self._on_change is not None:
            await self._on_change()

    async def set_stored_models(self, models: Iterable[str]) -> None:
        """What the node's store holds, by the catalog; a change is pushed to watchers."""
        stored = frozenset(models)
        if stored != self.stored_models:
            self.stored_models = stored
            await self._changed()

    async def wait_change(self, version: int, timeout_s: float) -> None:
        """Returns once the state moved past ``version``, or after ``timeout_s``."""
        if self.version != version:
            return
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the event fires, and a watcher cancelled that way never stops.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._change.wait()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Marks a finished operation's error as seen (its caller may have gone)."""
    if not task.cancelled():
        task.exception()


def _default_staging_dir(node_id: str) -> Path:
    """``/dev/shm/llorch-staging-<node>-<pid>``: one per process, so pool managers sharing a
    machine (tests, several nodes on one host) never share a cache; dirs of dead processes are
    removed at start."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else Path(tempfile.gettempdir())
    remove_stale_dirs(base, f"llorch-staging-{node_id}-")
    return base / f"llorch-staging-{node_id}-{os.getpid()}"


class Execution:
    """One execution handed to a worker; its events are read once, with ``events()``."""

    def __init__(
        self,
        manager: PoolManager,
        spec: ExecutionSpec,
        pool: Pool,
        worker: WorkerProcess,
        queue: ExecutionQueue,
        span: Span | None = None,
    ) -> None:
        self._manager = manager
        self.spec = spec
        self.pool = pool
        self.worker = worker
        self._queue = queue
        self._read = False
        self._span = span

    async def events(self) -> AsyncIterator[list[ExecEvent]]:
        """Batches of events until the execution ends (a slow reader gets larger batches).

        Closing the iterator early (the caller went away) cancels the execution in the worker.

        Raises:
            UnavailableError: the worker died (retriable).
            InvalidArgumentError: the prompt and max_tokens do not fit the context.
        """
        if self._read:
            raise RuntimeError("an execution's events are read once")
        self._read = True
        spec, events = self.spec, self._queue
        finished = False
        failure: BaseException | None = None
        try:
            # Sent while the worker reads the prompt, so it is off the first token's path;
            # the prompt's token count arrives with the end of the execution.
            yield [ExecStarted(self.pool.engine_version, 0)]
            await self._manager._changed()
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                out: list[ExecEvent] = []
                for raw in batch:
                    event = _convert(raw, spec)
                    if event is None:
                        continue
                    if isinstance(event, ExecTokens) and out and isinstance(out[-1], ExecTokens):
                        prev = out[-1]
                        event = ExecTokens(
                            prev.index, prev.token_ids + event.token_ids, prev.text + event.text
                        )
                        out[-1] = event
                    else:
                        out.append(event)
                    if isinstance(event, ExecFinished):
                        finished = True
                        self._trace_phases(event)
                if out:
                    yield out
                if finished:
                    return
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if self._span is not None:
                self._span.set_attribute("llorch.finished", finished)
                tracing.end_rpc_span(self._span, None if finished else failure or GeneratorExit())
            self._manager._forget(self, finished)
            await self._manager._changed()

    def _trace_phases(self, event: ExecFinished) -> None:
        """The worker's prompt and decode phases, as children of the execution's span."""
        if self._span is None or not event.started_ns:
            return
        self._span.set_attributes(
            {"llorch.tokens_in": event.tokens_in, "llorch.tokens_out": event.tokens_out}
        )
        tracer = tracing.tracer("llorch.worker")
        parent = trace.set_span_in_context(self._span)
        first = event.first_token_ns or event.ended_ns
        tracer.start_span(
            "llorch.worker.prompt",
            context=parent,
            start_time=event.started_ns,
            attributes={"llorch.tokens_in": event.tokens_in},
        ).end(first)
        tracer.start_span(
            "llorch.worker.decode",
            context=parent,
            start_time=first,
            attributes={"llorch.tokens_out": event.tokens_out},
        ).end(event.ended_ns)

    def interrupt(self, error: LlorchError) -> None:
        """Ends the execution's events with ``error`` (after what is already queued)."""
        self._queue.put_nowait(Interrupted(error))
        self.worker.cancel(self.spec.execution_id)

    def abandon(self) -> None:
        """Cancels an execution whose events will never be read (no-op once reading began)."""
        if not self._read:
            self._read = True
            if self._span is not None:
                tracing.end_rpc_span(self._span, GeneratorExit())
            self._manager._forget(self, finished=False)


def _execute_command(spec: ExecutionSpec, traceparent: str) -> Execute:
    return Execute(
        id=spec.execution_id,
        prompt=spec.prompt,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        seed=spec.seed,
        stop=spec.stop,
        ignore_eos=spec.ignore_eos,
        max_tokens_defaulted=spec.max_tokens_defaulted,
        correlation_id=logs.correlation_id.get() or "",
        traceparent=traceparent,
    )


def _convert(raw: Event | WorkerExited | Interrupted, spec: ExecutionSpec) -> ExecEvent | None:
    if isinstance(raw, Interrupted):
        raise raw.error
    if isinstance(raw, WorkerExited):
        raise UnavailableError(
            f"worker of pool {spec.pool_id} exited (code {raw.returncode}) during the execution",
            reason="WORKER_CRASHED",
            retry_delay_s=1.0,
        )
    if isinstance(raw, Tokens):
        return ExecTokens(raw.index, list(raw.ids), raw.text)
    if isinstance(raw, Done):
        return ExecFinished(
            raw.reason,
            raw.tokens_in,
            raw.tokens_out,
            raw.ttft_ms,
            raw.decode_ms,
            raw.started_ns,
            raw.first_token_ns,
            raw.ended_ns,
        )
    if isinstance(raw, Cancelled):
        raise ExecutionCancelledError(f"execution {spec.execution_id} was cancelled")
    if isinstance(raw, Failed):
        if raw.code == "INVALID_ARGUMENT":
            raise InvalidArgumentError(raw.field or "prompt", raw.message)
        if raw.code == "UNAVAILABLE":
            raise UnavailableError(
                f"pool {spec.pool_id}: {raw.message}",
                reason=raw.reason or "WORKER_UNAVAILABLE",
                retry_delay_s=1.0,
            )
        raise InternalError(raw.message)
    return None

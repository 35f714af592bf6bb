"""PoolManager: the pools of one machine, their workers, and the executions running on them.

Plain asyncio class; the servicer converts protobuf and calls it. Each pool has a supervisor
task that starts its worker, restarts it with exponential backoff and jitter when it dies, and
gives up (state FAILED, with the reason) after repeated failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh import logs
from mesh.errors import CancelledError as ExecutionCancelledError
from mesh.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from mesh.settings import PoolManagerSettings, PoolSettings
from poolmanager.worker_process import WorkerExited, WorkerProcess, WorkerStartError

_log = logs.get_logger("poolmanager")

# Restart policy of a crashed worker (a full circuit breaker arrives with the lifecycle work).
_BACKOFF_INITIAL_S = 0.5
_BACKOFF_MAX_S = 30.0
_MAX_CONSECUTIVE_FAILURES = 5

ModelLocator = Callable[[str], Awaitable[str]]
"""Returns the local path of a model id (through the catalog)."""


class PoolState(enum.Enum):
    """Lifecycle of a pool."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class Pool:
    """One pool and its current worker."""

    settings: PoolSettings
    state: PoolState = PoolState.UNLOADED
    engine_version: str = ""
    n_ctx: int = 0
    last_error: str = ""
    worker: WorkerProcess | None = None
    active: set[str] = field(default_factory=set)

    @property
    def slots_free(self) -> int:
        """Slots not executing anything."""
        return max(0, self.settings.slots - len(self.active))


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
    ) -> None:
        self.node_id = settings.node_id
        self._settings = settings
        self._locate_model = locate_model
        self._base_env = dict(base_env)
        self._on_change = on_change
        self._log_level = log_level
        self.pools: dict[str, Pool] = {p.pool_id: Pool(p) for p in settings.pools}
        self._supervisors: list[asyncio.Task[None]] = []
        self._exec_pool: dict[str, Pool] = {}
        self._stopping = False
        self.version = 0
        """Counts changes of the node's state (pool states, slots in use)."""
        self._change = asyncio.Event()

    async def start(self) -> None:
        """Starts every pool's supervisor; returns at once (readiness comes later)."""
        for pool in self.pools.values():
            self._supervisors.append(
                asyncio.create_task(self._supervise(pool), name=f"pool-{pool.settings.pool_id}")
            )

    async def wait_ready(self, timeout_s: float) -> bool:
        """Waits until every pool is READY or FAILED; True when all are READY."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = {p.state for p in self.pools.values()}
            if states <= {PoolState.READY, PoolState.FAILED}:
                return states <= {PoolState.READY}
            await asyncio.sleep(0.02)
        return False

    def all_ready(self) -> bool:
        """Whether every pool is READY."""
        return all(p.state is PoolState.READY for p in self.pools.values())

    async def stop(self) -> None:
        """Stops supervisors and workers; open executions end UNAVAILABLE."""
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        for task in self._supervisors:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(
            *(p.worker.stop(self._settings.stop_grace_s) for p in self.pools.values() if p.worker)
        )

    def begin(self, spec: ExecutionSpec) -> Execution:
        """Checks an execution and hands it to its pool's worker at once, without awaiting.

        Read it with ``Execution.events()``; one that is never read must be ``abandon()``-ed.

        Raises:
            NotFoundError: unknown pool.
            FailedPreconditionError: the pool holds another model.
            UnavailableError: the pool is not ready or busy, or its worker died (retriable).
        """
        pool = self.pools.get(spec.pool_id)
        if pool is None:
            raise NotFoundError(
                f"pool {spec.pool_id} is not on node {self.node_id}", reason="POOL_NOT_FOUND"
            )
        if pool.settings.model_id != spec.model_id:
            raise FailedPreconditionError(
                f"pool {spec.pool_id} holds {pool.settings.model_id}, not {spec.model_id}",
                reason="MODEL_NOT_LOADED",
            )
        if pool.state is not PoolState.READY or pool.worker is None:
            raise UnavailableError(
                f"pool {spec.pool_id} is {pool.state.value}",
                reason="POOL_NOT_READY",
                retry_delay_s=1.0,
            )
        if spec.execution_id in self._exec_pool:
            raise FailedPreconditionError(
                f"execution {spec.execution_id} already exists", reason="EXECUTION_EXISTS"
            )
        # No refusal when every slot is taken: the orchestrator owns admission, and a slot
        # freed by a cancel may not be released here yet when the next execution arrives.
        # The worker runs executions beyond its slots in arrival order.
        worker = pool.worker
        pool.active.add(spec.execution_id)
        self._exec_pool[spec.execution_id] = pool
        return Execution(self, spec, pool, worker, worker.submit(spec.execution_id, _job(spec)))

    def _forget(self, execution: Execution, finished: bool) -> None:
        """Drops an execution's bookkeeping; cancels it in the worker unless it finished."""
        spec = execution.spec
        if not finished:
            execution.worker.cancel(spec.execution_id)
        execution.worker.forget(spec.execution_id)
        execution.pool.active.discard(spec.execution_id)
        self._exec_pool.pop(spec.execution_id, None)

    def cancel(self, execution_id: str) -> bool:
        """Stops an execution; its stream ends CANCELLED. False when it is not running."""
        pool = self._exec_pool.get(execution_id)
        if pool is None or pool.worker is None:
            return False
        pool.worker.cancel(execution_id)
        return True

    async def _supervise(self, pool: Pool) -> None:
        failures = 0
        backoff = _BACKOFF_INITIAL_S
        pool_log = {"pool_id": pool.settings.pool_id, "node_id": self.node_id}
        while not self._stopping:
            pool.state = PoolState.LOADING
            await self._changed()
            started = time.monotonic()
            try:
                path = await self._locate_model(pool.settings.model_id)
            except UnavailableError as exc:
                # The catalog is down: not the pool's fault, keep trying without counting.
                pool.last_error = str(exc)
                _log.warning("cannot locate the model: %s", exc, extra=pool_log)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            except Exception as exc:  # NOT_FOUND, a bad answer: counts as a failed start
                failures += 1
                pool.last_error = f"cannot locate model {pool.settings.model_id}: {exc}"
                _log.error("%s", pool.last_error, extra=pool_log)
            else:
                worker = await self._start_worker(pool, path, pool_log)
                if worker is None:
                    failures += 1
                else:
                    await worker.exited.wait()
                    pool.worker = None
                    if self._stopping:
                        break
                    if time.monotonic() - started > 60:  # it ran a while: a fresh start
                        failures, backoff = 0, _BACKOFF_INITIAL_S
                    failures += 1
                    pool.last_error = "worker exited unexpectedly"
                    _log.error("worker died; restarting", extra={**pool_log, "pid": worker.pid})
            if failures >= _MAX_CONSECUTIVE_FAILURES:
                pool.state = PoolState.FAILED
                pool.last_error = f"{failures} consecutive failures; last: {pool.last_error}"
                _log.error("pool gave up: %s", pool.last_error, extra=pool_log)
                await self._changed()
                return
            pool.state = PoolState.LOADING
            await self._changed()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, _BACKOFF_MAX_S)
        pool.state = PoolState.UNLOADED

    async def _start_worker(
        self, pool: Pool, path: str, pool_log: dict[str, str]
    ) -> WorkerProcess | None:
        """Starts the pool's worker and marks the pool READY; None when the start failed."""
        started = time.monotonic()
        gpus = [] if pool.settings.devices == ["cpu"] else pool.settings.devices
        try:
            worker = await WorkerProcess.spawn(
                path,
                n_ctx=pool.settings.n_ctx,
                n_threads=pool.settings.n_threads,
                gpu_devices=gpus,
                env=self._base_env,
                start_timeout_s=self._settings.worker_start_timeout_s,
                log_level=self._log_level,
                token_batch_ms=pool.settings.token_batch_ms,
            )
        except (WorkerStartError, OSError) as exc:
            pool.last_error = str(exc)
            _log.error("pool failed to start: %s", exc, extra=pool_log)
            return None
        pool.worker = worker
        pool.engine_version = worker.ready.engine_version
        pool.n_ctx = worker.ready.n_ctx
        pool.last_error = ""
        pool.state = PoolState.READY
        _log.info(
            "pool ready",
            extra={
                **pool_log,
                "pid": worker.pid,
                "model_id": pool.settings.model_id,
                "load_ms": round(worker.ready.load_ms, 1),
                "start_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        await self._changed()
        return worker

    async def _changed(self) -> None:
        self.version += 1
        self._change.set()
        self._change = asyncio.Event()
        if self._on_change is not None:
            await self._on_change()

    async def wait_change(self, version: int, timeout_s: float) -> None:
        """Returns once the state moved past ``version``, or after ``timeout_s``."""
        if self.version != version:
            return
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the event fires, and a watcher cancelled that way never stops.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._change.wait()


class Execution:
    """One execution handed to a worker; its events are read once, with ``events()``."""

    def __init__(
        self,
        manager: PoolManager,
        spec: ExecutionSpec,
        pool: Pool,
        worker: WorkerProcess,
        queue: asyncio.Queue[dict[str, Any] | WorkerExited],
    ) -> None:
        self._manager = manager
        self.spec = spec
        self.pool = pool
        self.worker = worker
        self._queue = queue
        self._read = False

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
                if out:
                    yield out
                if finished:
                    return
        finally:
            self._manager._forget(self, finished)
            await self._manager._changed()

    def abandon(self) -> None:
        """Cancels an execution whose events will never be read (no-op once reading began)."""
        if not self._read:
            self._read = True
            self._manager._forget(self, finished=False)


def _job(spec: ExecutionSpec) -> dict[str, Any]:
    return {
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "top_k": spec.top_k,
        "seed": spec.seed,
        "stop": list(spec.stop),
        "ignore_eos": spec.ignore_eos,
        "max_tokens_defaulted": spec.max_tokens_defaulted,
        "cid": logs.correlation_id.get(),
    }


def _convert(raw: dict[str, Any] | WorkerExited, spec: ExecutionSpec) -> ExecEvent | None:
    if isinstance(raw, WorkerExited):
        raise UnavailableError(
            f"worker of pool {spec.pool_id} exited (code {raw.returncode}) during the execution",
            reason="WORKER_CRASHED",
            retry_delay_s=1.0,
        )
    kind = raw.get("ev")
    if kind == "tok":
        return ExecTokens(int(raw["i"]), [int(t) for t in raw["ids"]], str(raw["text"]))
    if kind == "done":
        return ExecFinished(
            str(raw["reason"]),
            int(raw["tokens_in"]),
            int(raw["tokens_out"]),
            float(raw["ttft_ms"]),
            float(raw["decode_ms"]),
        )
    if kind == "cancelled":
        raise ExecutionCancelledError(f"execution {spec.execution_id} was cancelled")
    if kind == "error":
        if raw.get("code") == "INVALID_ARGUMENT":
            raise InvalidArgumentError(str(raw.get("field") or "prompt"), str(raw["message"]))
        raise InternalError(str(raw.get("message")))
    return None

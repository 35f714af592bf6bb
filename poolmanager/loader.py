"""The loader: brings a pool's model up in a worker process — locate the file, apply the VRAM-only
rule, start a fresh worker or take the pool's warm spare, health-check it, measure its VRAM — and
stages loaded models in the host-RAM staging cache. It starts and stops each pool's spare and owns
the staging copies it starts; what a load measured is written on the pool's record.

The VRAM-only rule: before a GPU pool starts a worker, the model's VRAM need (``poolmanager.vram``)
is compared with its GPUs' free VRAM and a model that does not fit whole is refused; the worker
itself refuses a load that left any layer on the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from mesh import logs
from mesh.errors import FailedPreconditionError, LlorchError, UnavailableError
from mesh.settings import PoolManagerSettings
from poolmanager.changes import Notify
from poolmanager.devices import DeviceInventory, GpuDevice
from poolmanager.pool import Pool
from poolmanager.staging import StagingCache
from poolmanager.vram import VramEstimate, estimate_vram
from poolmanager.worker.protocol import Cancelled, Done, Execute, Failed, LoadSpec
from poolmanager.worker_process import SpareWorker, WorkerExited, WorkerProcess, WorkerStartError
from provisioners.gguf_facts import NotAGgufError, read_model_shape

_log = logs.get_logger("poolmanager")

ModelLocator = Callable[[str], Awaitable[str]]
"""Returns the local path of a model id (through the catalog)."""

_HEALTH_PROMPT = "Hi"  # short: a forward pass and a sampled token, little else


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


class Loader:
    """Starts the workers of a node's pools and keeps a spare warm for each pool's next load."""

    def __init__(
        self,
        settings: PoolManagerSettings,
        locate_model: ModelLocator,
        base_env: Mapping[str, str],
        log_level: str,
        inventory: DeviceInventory,
        staging: StagingCache | None,
        notify: Notify,
    ) -> None:
        self._settings = settings
        self._locate_model = locate_model
        self._base_env = dict(base_env)
        self._log_level = log_level
        self._inventory = inventory
        self._staging = staging
        self._notify = notify
        self._copies: set[asyncio.Task[None]] = set()  # automatic staging copies under way
        self._stopping = False

    async def load(self, pool: Pool) -> WorkerProcess:
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
        staged = self._staging.lookup(model_id) if self._staging is not None else None
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
            prefix_cache_entries=settings.prefix_cache_entries,
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
            self._inventory.process_vram_bytes(d.index, worker.pid) or 0 for d in gpus
        )
        pool.load_ms = (time.monotonic() - started) * 1000
        pool.loaded_from = "staging" if staged else "disk"
        if staged is None and self._staging is not None and self._settings.auto_stage:
            self._copy_in_background(self._auto_stage(model_id, disk_path))
        return worker

    async def check_reload_fits(self, pool: Pool, model_id: str) -> None:
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
        if not self._inventory.available:
            raise LoadError(
                f"pool {pool.pool_id} is configured on GPUs {pool.settings.devices}, but "
                f"{self._inventory.unavailable_reason or 'NVML is not open'}",
                reason="NO_GPU",
                permanent=True,
            )
        gpus = []
        for index in pool.settings.devices:
            device = self._inventory.device(int(index))
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
            free += sum(self._inventory.process_vram_bytes(d.index, spare.pid) or 0 for d in gpus)
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

    # ----- spares -----------------------------------------------------------------------------

    async def drop_spare(self, pool: Pool) -> None:
        """Stops the pool's spare, and one that is starting."""
        task, pool.spare_task = pool.spare_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        spare, pool.spare = pool.spare, None
        if spare is not None:
            await spare.stop(self._settings.stop_grace_s)

    def replenish_spare(self, pool: Pool) -> None:
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
        await self._notify()

    # ----- staging ----------------------------------------------------------------------------

    async def stage(self, model_id: str) -> None:
        """Copies a model into the RAM staging cache.

        Raises:
            FailedPreconditionError: staging is off.
            ResourceExhaustedError: it does not fit the budget beside the models in use.
        """
        if self._staging is None:
            raise FailedPreconditionError(
                "staging is off on this node (staging_budget_bytes = 0)", reason="STAGING_OFF"
            )
        path = Path(await self._locate_model(model_id))
        await self._staging.stage(model_id, path)
        await self._notify()

    async def _auto_stage(self, model_id: str, path: Path) -> None:
        assert self._staging is not None
        try:
            await self._staging.stage(model_id, path)
        except LlorchError as exc:
            _log.info("not staged automatically: %s", exc.message)
        except OSError as exc:
            _log.warning("staging %s failed: %s", model_id, exc)
        await self._notify()

    def _copy_in_background(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)

    def cancel(
        self, pools: Iterable[Pool]
    ) -> tuple[list[asyncio.Task[None]], list[asyncio.Task[None]]]:
        """Starts no more spares; cancels the spares starting and the staging copies under way,
        and returns both (spares, copies) for the caller to await."""
        self._stopping = True
        spares = [p.spare_task for p in pools if p.spare_task]
        copies = list(self._copies)
        for task in spares + copies:
            task.cancel()
        return spares, copies

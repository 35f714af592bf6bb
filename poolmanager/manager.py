"""PoolManager: the facade over the pools of one machine, their workers, and the executions
running on them.

Plain asyncio class; the servicer converts protobuf and calls it. It holds the pool records
(``poolmanager.pool``) and wires the collaborators that each own their part: ``Executions``
(``poolmanager.execution``), the ``Loader`` (``poolmanager.loader``: the VRAM-only rule, spares,
staging), the ``Lifecycle`` (``poolmanager.lifecycle``: preload, drain, reload, supervision and
the breaker) and the ``ChangeFeed`` (``poolmanager.changes``: what WatchNode streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mesh import logs
from mesh.errors import NotFoundError
from mesh.settings import PoolManagerSettings
from poolmanager.changes import ChangeFeed, Notify
from poolmanager.devices import DeviceInventory
from poolmanager.execution import Execution, Executions, ExecutionSpec
from poolmanager.lifecycle import DrainReport, Lifecycle
from poolmanager.loader import Loader, ModelLocator
from poolmanager.pool import Pool, PoolState
from poolmanager.staging import StagingCache, remove_stale_dirs

__all__ = ["PoolManager", "PoolState"]  # PoolState: for bench/reload.py

_log = logs.get_logger("poolmanager")

_T = TypeVar("_T")


class PoolManager:
    """Owns the pools of one node."""

    def __init__(
        self,
        settings: PoolManagerSettings,
        locate_model: ModelLocator,
        base_env: Mapping[str, str],
        on_change: Notify | None = None,
        log_level: str = "INFO",
        *,
        inventory: DeviceInventory | None = None,
        staging_dir: Path | None = None,
    ) -> None:
        self.node_id = settings.node_id
        self._settings = settings
        self.inventory = inventory or DeviceInventory()
        self.pools: dict[str, Pool] = {p.pool_id: Pool(p) for p in settings.pools}
        directory = staging_dir or settings.staging_dir or _default_staging_dir(self.node_id)
        self.staging: StagingCache | None = (
            StagingCache(directory, settings.staging_budget_bytes, self.model_in_use)
            if settings.staging_budget_bytes > 0
            else None
        )
        self.stored_models: frozenset[str] = frozenset()
        """Models the catalog records in this node's store (see ``set_stored_models``)."""
        self._changes = ChangeFeed(on_change)
        self._executions = Executions(self.node_id, self._changes.changed)
        self._loader = Loader(
            settings,
            locate_model,
            base_env,
            log_level,
            self.inventory,
            self.staging,
            self._changes.changed,
        )
        self._lifecycle = Lifecycle(settings, self._loader, self._executions, self._changes)

    @property
    def version(self) -> int:
        """Counts changes of the node's state (pool states, slots in use)."""
        return self._changes.version

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
            self._lifecycle.start(pool)

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
        supervisors, operations = self._lifecycle.cancel()
        spares, copies = self._loader.cancel(self.pools.values())
        for task in [*supervisors, *spares]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Lifecycle operations and staging copies: each cleans up (kills what it started).
        await asyncio.gather(*operations, *copies, return_exceptions=True)
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
        return self._executions.begin(self.pool(spec.pool_id), spec)

    def cancel(self, execution_id: str) -> bool:
        """Stops an execution; its stream ends CANCELLED. False when it is not running."""
        return self._executions.cancel(execution_id)

    def take_used(self) -> set[str]:
        """Models executions asked for since the last call (for the catalog's last-used
        times); the caller gives them back with ``give_back_used`` if it could not report."""
        return self._executions.take_used()

    def give_back_used(self, models: set[str]) -> None:
        """Puts back what ``take_used`` returned when the report failed."""
        self._executions.give_back_used(models)

    # ----- lifecycle --------------------------------------------------------------------------

    async def preload(self, pool_id: str, model_id: str = "") -> Pool:
        """Loads a model on an UNLOADED or FAILED pool (resetting its breaker); waits until it
        is READY. A READY pool that holds the model already is left as it is.

        Raises:
            NotFoundError: no such pool.
            FailedPreconditionError: the pool holds another model or is busy changing state, or
                the load failed or was refused (VRAM); the message says why.
        """
        return await self._lifecycle.preload(self.pool(pool_id), model_id)

    async def drain(self, pool_id: str, deadline_s: float | None = None) -> DrainReport:
        """Drains a pool and unloads it: new work is refused at once, in-flight work gets until
        the deadline, what is left then ends UNAVAILABLE (retriable, reason POOL_DRAINED). The
        model stays staged in RAM, so a later preload is quick.

        Raises:
            NotFoundError: no such pool.
        """
        return await self._lifecycle.drain(self.pool(pool_id), deadline_s)

    async def reload(
        self, pool_id: str, model_id: str, deadline_s: float | None = None
    ) -> DrainReport:
        """Drain → load ``model_id`` → health check → READY; on failure rolls back to the
        previous model (see ``Lifecycle.reload``).

        Raises:
            NotFoundError: no such pool.
            FailedPreconditionError: RELOAD_ROLLED_BACK, RELOAD_FAILED or VRAM_INSUFFICIENT.
        """
        return await self._lifecycle.reload(self.pool(pool_id), model_id, deadline_s)

    async def to_the_end(self, operation: Coroutine[Any, Any, _T]) -> _T:
        """Runs a lifecycle operation to its end even when its caller goes away (a cancelled
        RPC); only ``stop()`` cancels it."""
        return await self._lifecycle.to_the_end(operation)

    # ----- staging and the store --------------------------------------------------------------

    async def stage(self, model_id: str) -> None:
        """Copies a model into the RAM staging cache.

        Raises:
            FailedPreconditionError: staging is off.
            ResourceExhaustedError: it does not fit the budget beside the models in use.
        """
        await self._loader.stage(model_id)

    async def unstage(self, model_id: str) -> bool:
        """Removes a model from RAM; False when it was not staged.

        Raises:
            FailedPreconditionError: a pool has it loaded or is loading it.
        """
        if self.staging is None:
            return False
        removed = self.staging.unstage(model_id)
        await self.mark_changed()
        return removed

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

    async def set_stored_models(self, models: Iterable[str]) -> None:
        """What the node's store holds, by the catalog; a change is pushed to watchers."""
        stored = frozenset(models)
        if stored != self.stored_models:
            self.stored_models = stored
            await self.mark_changed()

    # ----- the change feed --------------------------------------------------------------------

    async def mark_changed(self) -> None:
        """Counts a change of the node's state and wakes its watchers (``wait_change``)."""
        await self._changes.changed()

    async def wait_change(self, version: int, timeout_s: float) -> None:
        """Returns once the state moved past ``version``, or after ``timeout_s``."""
        await self._changes.wait(version, timeout_s)


def _default_staging_dir(node_id: str) -> Path:
    """``/dev/shm/llorch-staging-<node>-<pid>``: one per process, so pool managers sharing a
    machine (tests, several nodes on one host) never share a cache; dirs of dead processes are
    removed at start."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else Path(tempfile.gettempdir())
    remove_stale_dirs(base, f"llorch-staging-{node_id}-")
    return base / f"llorch-staging-{node_id}-{os.getpid()}"

"""Pool lifecycle from the orchestrator's side: drain, resume, reload, preload, delete a model,
on-demand swaps, and the cooldown of loads that failed.

One change of a pool at a time: while one runs (an operator's, or an on-demand load), the pool
is out of placement and another change is refused (POOL_BUSY).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol, TypeVar

from llorch.catalog.v1 import catalog_pb2
from llorch.poolmanager.v1 import poolmanager_pb2
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from catalog.client import ModelInfo
from mesh import logs
from mesh.errors import (
    FailedPreconditionError,
    LlorchError,
    NotFoundError,
    UnavailableError,
)
from mesh.settings import OrchestratorSettings
from orchestrator.admission import AdmissionQueue
from orchestrator.placement import (
    PoolKey,
    PoolView,
    PreloadAction,
    choose_preload,
    pool_key,
    preload_action,
)
from orchestrator.pool_client import PoolClient
from orchestrator.pools import PoolRegistry
from orchestrator.table import TaskTable
from orchestrator.tasks import Task

_log = logs.get_logger("orchestrator")

_NODE_CALL_TIMEOUT_S = 60.0

_Response = TypeVar(
    "_Response", poolmanager_pb2.ReloadPoolResponse, poolmanager_pb2.PreloadPoolResponse
)


class ModelCatalog(Protocol):
    """What the orchestrator asks of the catalog (catalog.client.CatalogClient)."""

    async def model_info(self, model_id: str) -> ModelInfo: ...

    async def active_models(self) -> list[ModelInfo]: ...

    async def delete_model(self, model_id: str) -> list[catalog_pb2.ModelLocation]: ...


class PoolLifecycle:
    """Changes of pools and models that operators ask for, and swaps placement asks for."""

    def __init__(
        self,
        settings: OrchestratorSettings,
        catalog: ModelCatalog,
        registry: PoolRegistry,
        queue: AdmissionQueue,
        tasks: TaskTable,
        clock: Callable[[], float],
        end: Callable[[Task, LlorchError], None],
        running_on: Callable[[PoolKey], list[Task]],
        wake: Callable[[], None],
    ) -> None:
        """``end``: ends a task wherever it is; ``running_on``: the tasks executing on a pool."""
        self._settings = settings
        self._catalog = catalog
        self._registry = registry
        self._queue = queue
        self._tasks = tasks
        self._clock = clock
        self._end = end
        self._running_on = running_on
        self._wake = wake
        # Timers that end the work left on drained pools.
        self._drain_timers: dict[PoolKey, asyncio.TimerHandle] = {}
        # Models being loaded into pools on demand; and loads that failed:
        # (pool, model) → (until when the pool is not tried again for the model, error).
        self._swaps: dict[PoolKey, asyncio.Task[None]] = {}
        self._failed_loads: dict[tuple[PoolKey, str], tuple[float, str]] = {}

    async def stop(self) -> None:
        """Cancels the drain timers and the on-demand loads in flight."""
        for timer in self._drain_timers.values():
            timer.cancel()
        swaps = list(self._swaps.values())
        for swap in swaps:
            swap.cancel()
        await asyncio.gather(*swaps, return_exceptions=True)

    def failed_loads(self, model_id: str, now: float) -> dict[str, str]:
        """Pools where loading ``model_id`` failed within the cooldown, with the error."""
        return {
            key: error
            for (key, model), (until, error) in self._failed_loads.items()
            if model == model_id and until > now
        }

    def check_pool(self, node_id: str, pool_id: str) -> PoolKey:
        """The key of a known pool.

        Raises:
            NotFoundError: no such pool.
        """
        key = pool_key(node_id, pool_id)
        if not any(v.key == key for v in self._registry.views()):
            raise NotFoundError(f"pool {key} does not exist", reason="POOL_NOT_FOUND")
        return key

    # --- drain and resume ---------------------------------------------------------------------

    def drain(self, node_id: str, pool_id: str, deadline_s: float) -> None:
        """Takes a pool out of placement; what still runs on it after ``deadline_s`` is
        cancelled with UNAVAILABLE (POOL_DRAINED, retriable).

        Raises:
            NotFoundError: no such pool.
        """
        key = self.check_pool(node_id, pool_id)
        self._registry.set_drained(key, True)
        timer = self._drain_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._drain_timers[key] = asyncio.get_running_loop().call_later(
            deadline_s, self._end_drained, key
        )
        _log.info("pool drained", extra={"pool": key, "deadline_s": deadline_s})
        self._wake()

    def resume(self, node_id: str, pool_id: str) -> None:
        """Puts a drained pool back into placement.

        Raises:
            NotFoundError: no such pool.
        """
        key = self.check_pool(node_id, pool_id)
        self._registry.set_drained(key, False)
        timer = self._drain_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        _log.info("pool resumed", extra={"pool": key})
        self._wake()

    def _end_drained(self, key: PoolKey) -> None:
        self._drain_timers.pop(key, None)
        for task in self._running_on(key):
            self._end(
                task,
                UnavailableError(
                    f"pool {key} was drained and task {task.task_id} had not finished",
                    reason="POOL_DRAINED",
                    retry_delay_s=1.0,
                ),
            )

    # --- reload and preload -------------------------------------------------------------------

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
        key = self.check_pool(node_id, pool_id)
        await self._check_loadable(model_id)
        request = poolmanager_pb2.ReloadPoolRequest(pool_id=pool_id, model_id=model_id)
        if deadline_s is not None:
            request.deadline_ms = round(deadline_s * 1000)
        _log.info("pool reload", extra={"pool": key, "model": model_id})
        return await self._change(node_id, key, model_id, lambda c: c.reload_pool(request))

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
            key = self.check_pool(node_id, pool_id)
            view = next(v for v in views if v.key == key)
            # An operator may preload a pool it drained here; only the node's own state counts.
            own = next(p for n, _, p in self._registry.pools() if pool_key(n, p.pool_id) == key)
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
        # An unloaded or failed pool is loaded; one holding another model is reloaded.
        if action is PreloadAction.LOAD:
            preload = poolmanager_pb2.PreloadPoolRequest(pool_id=view.pool_id, model_id=model_id)
            await self._change(view.node_id, view.key, model_id, lambda c: c.preload_pool(preload))
        elif action is PreloadAction.SWAP:
            reload = poolmanager_pb2.ReloadPoolRequest(pool_id=view.pool_id, model_id=model_id)
            await self._change(view.node_id, view.key, model_id, lambda c: c.reload_pool(reload))
        return view, action, previous

    # --- on-demand swaps ----------------------------------------------------------------------

    def swap(self, pool: PoolView, model_id: str) -> None:
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

        def cool_down(exc: LlorchError) -> None:
            if not exc.retriable:  # the model cannot load there; a lost node is not that
                now = self._clock()
                self._failed_loads = {k: v for k, v in self._failed_loads.items() if v[0] > now}
                cooldown = self._settings.swap_failure_cooldown_s
                self._failed_loads[(pool.key, model_id)] = (now + cooldown, exc.message)

        try:
            await self._change(
                pool.node_id,
                pool.key,
                model_id,
                lambda c: c.reload_pool(request),
                marked=True,
                failed=cool_down,
            )
        except LlorchError as exc:
            _log.warning(
                "loading a model on demand failed: %s",
                exc.message,
                extra={"pool": pool.key, "model": model_id, "reason": exc.reason},
            )
        except Exception:  # a bug: log it; the pool's mark is cleared by _change
            _log.exception("loading a model on demand failed", extra={"pool": pool.key})
        self._wake()

    # --- delete a model -----------------------------------------------------------------------

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
        tasks = self._tasks.active(model_id)
        if (holding or tasks) and not drain:
            where = ", ".join(pool_key(n, p.pool_id) for n, p in holding) or "no pool"
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
        drained: list[str] = []
        for node_id, pool in holding:
            key = pool_key(node_id, pool.pool_id)
            request = poolmanager_pb2.DrainPoolRequest(pool_id=pool.pool_id, deadline_ms=0)
            try:
                async with asyncio.timeout(_NODE_CALL_TIMEOUT_S):
                    await self._registry.client(node_id).drain_pool(request)
            except (LlorchError, TimeoutError) as err:
                why = _why(err)
                raise UnavailableError(
                    f"pool {key} could not be unloaded; model {model_id} was not deleted: {why}",
                    reason="DRAIN_FAILED",
                    retry_delay_s=1.0,
                ) from None
            drained.append(key)
        locations = await self._catalog.delete_model(model_id)
        _log.info(
            "model deleted",
            extra={"model": model_id, "drained": drained, "tasks_ended": len(tasks)},
        )
        collect = poolmanager_pb2.CollectGarbageRequest()
        for node_id in sorted({node for node, reachable, _ in self._registry.pools() if reachable}):
            try:  # its files go now (those past the store's grace period)
                async with asyncio.timeout(_NODE_CALL_TIMEOUT_S):
                    await self._registry.client(node_id).collect_garbage(collect)
            except (LlorchError, TimeoutError) as err:
                _log.info("garbage collection on %s after a deletion: %s", node_id, _why(err))
        self._wake()
        return drained, len(tasks), [f"{loc.node_id}:{loc.path}" for loc in locations]

    # --- calls to pool managers ---------------------------------------------------------------

    async def _check_loadable(self, model_id: str) -> None:
        info = await self._catalog.model_info(model_id)
        if not info.active:
            raise FailedPreconditionError(f"model {model_id} is retired", reason="MODEL_RETIRED")

    async def _change(
        self,
        node_id: str,
        key: PoolKey,
        model_id: str,
        call: Callable[[PoolClient], Awaitable[_Response]],
        *,
        marked: bool = False,
        failed: Callable[[LlorchError], None] | None = None,
    ) -> _Response:
        """Runs a lifecycle call of a pool's manager with the pool out of placement meanwhile,
        and takes the pool state it answers with. One change of a pool at a time: while one
        runs (an operator's, or an on-demand load, which marks the pool itself: ``marked``),
        another is refused. A caller that goes away does not stop the change half-way: the
        call runs to its end and the pool stays out of placement until then. ``failed`` hears
        of a refusal before the pool is back in placement.

        Raises:
            FailedPreconditionError: the pool is already changing (POOL_BUSY), or the pool
                manager refused or rolled back the change.
            UnavailableError: the pool manager is unreachable.
        """
        if not marked:
            if self._registry.changing(key):
                raise FailedPreconditionError(
                    f"pool {key} is already changing its model; try again when it is ready",
                    reason="POOL_BUSY",
                )
            self._registry.set_changing(key, model_id)
        try:
            running = asyncio.ensure_future(call(self._registry.client(node_id)))
        except BaseException:  # e.g. the node is gone from the registry
            self._registry.set_changing(key, None)
            raise

        def settle(done: asyncio.Future[_Response]) -> None:
            # The pool's new state lands before the mark goes: a pass in between would see
            # the old model idle again and swap it a second time.
            error = None if done.cancelled() else done.exception()
            if not done.cancelled() and error is None:
                self._registry.update_pool(node_id, done.result().pool)
            elif isinstance(error, LlorchError) and failed is not None:
                failed(error)
            self._registry.set_changing(key, None)
            self._wake()

        running.add_done_callback(settle)
        return await asyncio.shield(running)


def _why(err: LlorchError | TimeoutError) -> str:
    if isinstance(err, TimeoutError):
        return f"no answer in {_NODE_CALL_TIMEOUT_S:.0f} s"
    return err.message

"""In-process twins of the orchestrator's ports, for unit tests of the real ``Orchestrator``.

``FakePoolManager`` is a ``PoolClient``: a node whose pools' states the test sets, whose
WatchNode stream sends them on every change, and whose executions follow a ``Plan`` the test
queues per pool (tokens, an error before or after some of them, a gate to hold them running).
``FakeCatalog`` answers ``model_info`` from a dict. Nothing here is a mock: the orchestrator,
its registry, queue, placement and journal are the real ones.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llorch.catalog.v1 import catalog_pb2
from llorch.common.v1 import common_pb2
from llorch.poolmanager.v1 import poolmanager_pb2

from catalog.client import ModelInfo
from mesh.errors import LlorchError, NotFoundError
from mesh.settings import OrchestratorSettings
from orchestrator.pool_client import Metadata
from orchestrator.pools import PoolRegistry
from orchestrator.service import Orchestrator

READY = poolmanager_pb2.POOL_STATE_READY
LOADING = poolmanager_pb2.POOL_STATE_LOADING


@dataclass
class Plan:
    """How one execution goes: ``tokens`` tokens then Finished, unless ``error`` is raised
    after ``error_after`` tokens; ``gate``, when set, is awaited before the first token."""

    tokens: int = 3
    error: LlorchError | None = None
    error_after: int = 0
    gate: asyncio.Event | None = None


@dataclass
class Executed:
    """An Execute call the fake received."""

    request: poolmanager_pb2.ExecuteRequest
    cancelled: bool = False


@dataclass
class FakePoolManager:
    """One node's pool manager, in-process, as a ``PoolClient``."""

    node_id: str
    pools: dict[str, poolmanager_pb2.Pool] = field(default_factory=dict)
    plans: dict[str, deque[Plan]] = field(default_factory=dict)
    executed: list[Executed] = field(default_factory=list)
    reloads: list[poolmanager_pb2.ReloadPoolRequest] = field(default_factory=list)
    reload_error: LlorchError | None = None
    """Raised by the next ReloadPool instead of loading."""
    heartbeat_s: float = 0.05
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _lost: asyncio.Event = field(default_factory=asyncio.Event)

    def add_pool(
        self,
        pool_id: str,
        model_id: str,
        slots: int = 1,
        state: int = READY,
        can_load: bool = False,
    ) -> None:
        """Adds (or replaces) a pool."""
        self.pools[pool_id] = poolmanager_pb2.Pool(
            pool_id=pool_id,
            state=state,  # type: ignore[arg-type]
            model_id=model_id,
            slots_total=slots,
            slots_free=slots,
            n_ctx=4096,
            cpu_only=True,
            can_load=can_load,
            devices=["cpu"],
        )
        self._changed.set()

    def set_state(self, pool_id: str, state: int, model_id: str | None = None) -> None:
        """Changes a pool's state (and model) as its pool manager would report it."""
        pool = self.pools[pool_id]
        pool.state = state  # type: ignore[assignment]
        if model_id is not None:
            pool.model_id = model_id
        self._changed.set()

    def plan(self, pool_id: str, *plans: Plan) -> None:
        """Queues how the pool's next executions go (afterwards: ``Plan()``)."""
        self.plans.setdefault(pool_id, deque()).extend(plans)

    def lose(self) -> None:
        """Breaks the node's WatchNode stream, as a partition would."""
        self._lost.set()

    # --- PoolClient ---------------------------------------------------------------------------

    def watch_node(self, request: poolmanager_pb2.WatchNodeRequest) -> AsyncIterator[object]:
        return self._watch()

    async def _watch(self) -> AsyncIterator[poolmanager_pb2.WatchNodeResponse]:
        if self._lost.is_set():
            raise NotFoundError("the node is gone", reason="LOST")
        while True:
            self._changed.clear()
            yield poolmanager_pb2.WatchNodeResponse(
                node=poolmanager_pb2.Node(node_id=self.node_id, pools=list(self.pools.values()))
            )
            changed = asyncio.ensure_future(self._changed.wait())
            lost = asyncio.ensure_future(self._lost.wait())
            await asyncio.wait(
                {changed, lost}, timeout=self.heartbeat_s, return_when="FIRST_COMPLETED"
            )
            changed.cancel()
            lost.cancel()
            if self._lost.is_set():
                raise NotFoundError("the node is gone", reason="LOST")

    def execute(
        self,
        request: poolmanager_pb2.ExecuteRequest,
        *,
        timeout: float | None,
        metadata: Metadata,
    ) -> FakeCall:
        queued = self.plans.get(request.pool_id)
        plan = queued.popleft() if queued else Plan()
        executed = Executed(request)
        self.executed.append(executed)
        return FakeCall(plan, executed)

    async def preload_pool(
        self, request: poolmanager_pb2.PreloadPoolRequest
    ) -> poolmanager_pb2.PreloadPoolResponse:
        self.set_state(request.pool_id, READY, request.model_id)
        return poolmanager_pb2.PreloadPoolResponse(pool=self.pools[request.pool_id])

    async def reload_pool(
        self, request: poolmanager_pb2.ReloadPoolRequest
    ) -> poolmanager_pb2.ReloadPoolResponse:
        self.reloads.append(request)
        await asyncio.sleep(0)
        if self.reload_error is not None:
            error, self.reload_error = self.reload_error, None
            raise error
        self.set_state(request.pool_id, READY, request.model_id)
        return poolmanager_pb2.ReloadPoolResponse(pool=self.pools[request.pool_id])

    async def drain_pool(
        self, request: poolmanager_pb2.DrainPoolRequest
    ) -> poolmanager_pb2.DrainPoolResponse:
        self.set_state(request.pool_id, poolmanager_pb2.POOL_STATE_UNLOADED)
        return poolmanager_pb2.DrainPoolResponse(pool=self.pools[request.pool_id])

    async def collect_garbage(
        self, request: poolmanager_pb2.CollectGarbageRequest
    ) -> poolmanager_pb2.CollectGarbageResponse:
        return poolmanager_pb2.CollectGarbageResponse()


class FakeCall:
    """One execution's stream, following its plan."""

    def __init__(self, plan: Plan, executed: Executed) -> None:
        self._plan = plan
        self._executed = executed

    def __aiter__(self) -> AsyncIterator[poolmanager_pb2.ExecuteResponse]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[poolmanager_pb2.ExecuteResponse]:
        plan = self._plan
        if plan.gate is not None:
            await plan.gate.wait()
        for index in range(plan.tokens):
            if plan.error is not None and index == plan.error_after:
                raise plan.error
            yield poolmanager_pb2.ExecuteResponse(
                token=common_pb2.Token(index=index, text=f"t{index}", token_ids=[index])
            )
            await asyncio.sleep(0)
        if plan.error is not None:
            raise plan.error
        yield poolmanager_pb2.ExecuteResponse(
            finished=common_pb2.Finished(
                finish_reason=common_pb2.FINISH_REASON_LENGTH,
                tokens_in=2,
                tokens_out=plan.tokens,
                ttft_ms=1.0,
                decode_ms=float(plan.tokens),
            )
        )

    def cancel(self) -> bool:
        self._executed.cancelled = True
        return True


class FakeCatalog:
    """The catalog's answers for admission: active models with a context length."""

    def __init__(self, *model_ids: str, context_length: int = 4096) -> None:
        self.models = {
            m: ModelInfo(model_id=m, context_length=context_length, active=True) for m in model_ids
        }

    async def model_info(self, model_id: str) -> ModelInfo:
        info = self.models.get(model_id)
        if info is None:
            raise NotFoundError(f"model {model_id} does not exist", reason="MODEL_NOT_FOUND")
        return info

    async def active_models(self) -> list[ModelInfo]:
        return [info for _, info in sorted(self.models.items()) if info.active]

    async def delete_model(self, model_id: str) -> list[catalog_pb2.ModelLocation]:
        await self.model_info(model_id)
        del self.models[model_id]
        return []


def orchestrator_on(
    catalog: FakeCatalog,
    *nodes: FakePoolManager,
    journal: object | None = None,
    **settings: object,
) -> Orchestrator:
    """The real orchestrator over ``nodes`` (addresses ``fake:<node id>``)."""

    def no_channel(address: str) -> object:
        raise AssertionError(f"{address} would be dialled: every node here is in-process")

    registry = PoolRegistry(
        [f"fake:{n.node_id}" for n in nodes],
        heartbeat_s=0.05,
        lost_s=0.5,
        open_channel=no_channel,  # type: ignore[arg-type]
        local_clients={f"fake:{n.node_id}": n for n in nodes},  # type: ignore[misc]
    )
    return Orchestrator(
        OrchestratorSettings(
            catalog="fake",
            position_interval_s=0.0,
            **settings,  # type: ignore[arg-type]
        ),
        catalog,
        registry,
        journal=journal,  # type: ignore[arg-type]
    )

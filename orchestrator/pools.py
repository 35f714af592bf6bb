"""The orchestrator's view of the pool managers and their pools.

The orchestrator holds a ``WatchNode`` stream to each pool manager: the node's state arrives when
it changes and at least every heartbeat. A node whose stream breaks, or that sends nothing for
``lost_s``, is marked unreachable (its pools get no work) and is watched again with backoff.
With TLS, a node whose server certificate is on the denylist is taken out the same way
(checked before each watch and after each change of the denylist: mesh.tls.ServerCertificates).
Slots in flight are counted here, by the orchestrator itself, so placement never waits for a
pool manager to report its own load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import grpc
from llorch.poolmanager.v1 import poolmanager_pb2, poolmanager_pb2_grpc

from mesh import logs
from mesh.errors import LlorchError, PermissionDeniedError
from orchestrator.placement import PoolKey, PoolView, pool_key
from orchestrator.pool_client import PoolClient, StubPoolClient

_log = logs.get_logger("orchestrator.pools")


@dataclass(frozen=True)
class NodeView:
    """What the registry tells about one node (ControlService.ListNodes)."""

    node_id: str
    """The id it registered under, or the one expected of a configured address."""
    address: str
    reachable: bool
    registered: bool
    last_seen: float | None
    """Monotonic time of its last WatchNode message; None before the first."""
    pool_ids: tuple[str, ...]


@dataclass
class _Node:
    address: str
    channel: grpc.aio.Channel | None
    # Over the generated stub, or for a pool manager in this process its socket-free twin.
    client: PoolClient
    node_id: str = ""
    pools: tuple[poolmanager_pb2.Pool, ...] = ()
    gpus: tuple[poolmanager_pb2.Gpu, ...] = ()
    stored: frozenset[str] = frozenset()
    """Models in the node's store (placement prefers not to fetch)."""
    staged: frozenset[str] = frozenset()
    """Models in the node's RAM staging cache."""
    prefixes: dict[str, frozenset[int]] = field(default_factory=dict)
    """Each pool's prefix block hashes (mesh.prefix), made once per report of its pools."""
    reachable: bool = False
    conflict: bool = False
    registered: bool = False
    """It announced itself (NodeService.RegisterNode) rather than being in the settings."""
    expected_node_id: str = ""
    """The node id it registered under; its watch stream must report the same."""
    last_seen: float | None = None
    """When it last answered (time.monotonic)."""
    answered: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    poller: asyncio.Task[None] | None = field(default=None, repr=False)
    checked_generation: int = -1
    """The denylist generation its server certificate was last checked against."""


class ServerCheck(Protocol):
    """Whether a pool manager's server certificate is revoked (mesh.tls.ServerCertificates)."""

    def generation(self) -> int: ...

    async def revoked(self, address: str) -> str | None:
        """Why it may not be used, or None; OSError when it could not be reached."""


class _Revoked(Exception):
    """A watched node's certificate is on the denylist."""


class PoolRegistry:
    """Pool managers, their pools, and the slots this orchestrator has filled."""

    def __init__(
        self,
        addresses: list[str],
        heartbeat_s: float,
        lost_s: float,
        open_channel: Callable[[str], grpc.aio.Channel],
        local_clients: Mapping[str, PoolClient] | None = None,
        server_check: ServerCheck | None = None,
    ) -> None:
        """Pool managers at ``addresses``; those in ``local_clients`` are called through the
        client given (in-process), the others over a channel from ``open_channel``, and
        ``server_check`` says whether those may be used (TLS: their certificates)."""
        self._server_check = server_check
        self._heartbeat_s = heartbeat_s
        self._lost_s = lost_s
        self._open_channel = open_channel
        self._started = False
        self._nodes: list[_Node] = []
        self._local = dict(local_clients or {})
        for address in addresses:
            self._nodes.append(self._connect(address))
        self._in_flight: dict[PoolKey, int] = {}
        self._drained: set[PoolKey] = set()  # pools an operator took out of placement
        # Pools that just refused or lost an execution (not ready, worker crashed): kept out of
        # placement until their node reports them otherwise, or lost_s passes. Value: the
        # pool's report when it was held.
        self._held: dict[PoolKey, tuple[poolmanager_pb2.Pool, asyncio.TimerHandle]] = {}
        # Pools whose model is being changed (by an operator, or on demand), and to what.
        self._changing: dict[PoolKey, str] = {}
        self._views: tuple[PoolView, ...] | None = None  # built by views(); None when stale
        self._on_change: Callable[[], None] = lambda: None

    def _connect(self, address: str) -> _Node:
        local = self._local.get(address)
        if local is not None:
            return _Node(address, None, local)
        channel = self._open_channel(address)
        stub = poolmanager_pb2_grpc.PoolManagerServiceStub(channel)
        return _Node(address, channel, StubPoolClient(stub, address))

    async def start(self, on_change: Callable[[], None]) -> None:
        """Starts watching every node; returns once each has answered or been found lost."""
        self._on_change = on_change
        self._started = True
        for node in self._nodes:
            node.poller = asyncio.create_task(self._watch(node), name=f"watch-{node.address}")
        await asyncio.gather(*(self._first_answer(node) for node in self._nodes))

    async def register(self, node_id: str, address: str) -> None:
        """A pool manager announced itself: watch it from now on. The same node at the same
        address changes nothing; at a new address it replaces its old entry (a restarted pool
        manager on another port or host)."""
        for node in self._nodes:
            if node.address == address:
                owner = node.expected_node_id or node.node_id
                if owner and owner != node_id and node.reachable:
                    # Another live node answers there: taking its entry would take it out.
                    raise PermissionDeniedError(
                        f"{address} is node {owner}'s address", reason="ADDRESS_TAKEN"
                    )
                if node.registered:
                    node.expected_node_id = node_id
                return
        stale = [n for n in self._nodes if n.registered and n.expected_node_id == node_id]
        for node in stale:
            _log.info("node %s moved from %s to %s", node_id, node.address, address)
            self._nodes.remove(node)
            await self._close(node)
        node = self._connect(address)
        node.registered, node.expected_node_id = True, node_id
        self._nodes.append(node)
        _log.info("node %s registered at %s", node_id, address)
        if self._started:
            node.poller = asyncio.create_task(self._watch(node), name=f"watch-{address}")
        self._views = None
        self._on_change()

    def nodes(self) -> list[NodeView]:
        """Every node known, in order of node id (then address), as ListNodes shows them."""
        return [
            NodeView(
                node_id=n.node_id or n.expected_node_id,
                address=n.address,
                reachable=n.reachable,
                registered=n.registered,
                last_seen=n.last_seen,
                pool_ids=tuple(p.pool_id for p in n.pools),
            )
            for n in sorted(self._nodes, key=lambda n: (n.node_id or n.expected_node_id, n.address))
        ]

    @staticmethod
    async def _close(node: _Node) -> None:
        if node.poller is not None:
            node.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await node.poller
        if node.channel is not None:
            await node.channel.close()

    async def stop(self) -> None:
        """Stops watching and closes the channels."""
        for key in list(self._held):
            self._release(key, wake=False)
        for node in self._nodes:
            await self._close(node)

    def views(self) -> tuple[PoolView, ...]:
        """Every known pool, as placement sees it. Built again only after something changed:
        admission asks for it several times per task."""
        if self._views is None:
            self._views = self._build_views()
        return self._views

    def _build_views(self) -> tuple[PoolView, ...]:
        out: list[PoolView] = []
        for node in self._nodes:
            for pool in node.pools:
                key = pool_key(node.node_id, pool.pool_id)
                gpus = [g for g in node.gpus if str(g.index) in pool.devices]
                view = PoolView(
                    node_id=node.node_id,
                    pool_id=pool.pool_id,
                    model_id=pool.model_id,
                    ready=pool.state == poolmanager_pb2.POOL_STATE_READY,
                    reachable=node.reachable,
                    slots_total=pool.slots_total,
                    in_flight=self._in_flight.get(key, 0),
                    n_ctx=pool.n_ctx,
                    engine_version=pool.engine_version,
                    failed=pool.state == poolmanager_pb2.POOL_STATE_FAILED,
                    draining=pool.state == poolmanager_pb2.POOL_STATE_DRAINING
                    or key in self._drained,
                    unloaded=pool.state == poolmanager_pb2.POOL_STATE_UNLOADED,
                    can_load=pool.can_load,
                    gpu=any(d != "cpu" for d in pool.devices),
                    vram_total_bytes=sum(g.vram_total_bytes for g in gpus),
                    vram_free_bytes=sum(g.vram_free_bytes for g in gpus),
                    disk_models=node.stored,
                    staged_models=node.staged,
                    prefix_blocks=node.prefixes.get(pool.pool_id, frozenset()),
                    prefill_ms_per_token=pool.prefix_cache.prefill_ms_per_token,
                )
                held = self._held.get(key)
                if held is not None:
                    if held[0] == pool:  # no newer report than the failure's
                        view = replace(view, ready=False)
                    else:
                        held[1].cancel()
                        del self._held[key]
                target = self._changing.get(key)
                if target is not None:
                    # Loading the target: placement waits for it rather than swapping elsewhere.
                    view = replace(view, model_id=target, ready=False, failed=False, unloaded=False)
                out.append(view)
        return tuple(out)

    def acquire(self, pool: PoolView) -> None:
        """Counts a slot of ``pool`` as filled."""
        self._in_flight[pool.key] = self._in_flight.get(pool.key, 0) + 1
        self._views = None

    def release(self, pool: PoolView) -> None:
        """Frees a slot filled by ``acquire``."""
        self._in_flight[pool.key] = max(0, self._in_flight.get(pool.key, 0) - 1)
        self._views = None

    def client(self, node_id: str) -> PoolClient:
        """The client of a node's pool manager.

        Raises:
            KeyError: no such node.
        """
        for node in self._nodes:
            if node.node_id == node_id:
                return node.client
        raise KeyError(node_id)

    def hold(self, key: PoolKey) -> None:
        """Keeps a pool whose execution failed before starting (its worker crashed, it was not
        ready after all) out of placement until its node reports it again with anything
        changed, or ``lost_s`` passes: the report that put it in placement is stale, and each
        placement onto it would cost a task one of its attempts."""
        report = next(
            (p for n in self._nodes for p in n.pools if pool_key(n.node_id, p.pool_id) == key),
            None,
        )
        if report is None:
            return
        self._release(key, wake=False)  # a later hold starts its own time
        timer = asyncio.get_running_loop().call_later(self._lost_s, self._release, key)
        self._held[key] = (report, timer)
        self._views = None

    def _release(self, key: PoolKey, *, wake: bool = True) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            held[1].cancel()
            self._views = None
            if wake:
                self._on_change()

    def set_drained(self, key: PoolKey, drained: bool) -> None:
        """Takes the pool ``node/pool`` out of placement (it shows as draining) or back in."""
        if drained:
            self._drained.add(key)
        else:
            self._drained.discard(key)
        self._views = None

    def set_changing(self, key: PoolKey, model_id: str | None) -> None:
        """Marks the pool ``node/pool`` as loading ``model_id`` (placement sees it loading that
        model and places nothing on it), or, with None, ends the mark."""
        if model_id is not None:
            self._changing[key] = model_id
        else:
            self._changing.pop(key, None)
        self._views = None
        self._on_change()

    def changing(self, key: PoolKey) -> bool:
        """Whether the pool's model is being changed."""
        return key in self._changing

    def update_pool(self, node_id: str, pool: poolmanager_pb2.Pool) -> None:
        """Takes a pool's state from an answer of its pool manager (its watch stream sends the
        same a moment later), so a caller sees the state the answer describes."""
        for node in self._nodes:
            if node.node_id == node_id:
                node.pools = tuple(pool if p.pool_id == pool.pool_id else p for p in node.pools)
                node.prefixes[pool.pool_id] = frozenset(pool.prefix_cache.block_hashes)
                self._views = None
                self._on_change()
                return

    def is_drained(self, key: PoolKey) -> bool:
        """Whether an operator drained the pool ``node/pool``."""
        return key in self._drained

    def pools(self) -> list[tuple[str, bool, poolmanager_pb2.Pool]]:
        """Every pool as its pool manager reported it: (node id, node reachable, pool)."""
        return [(n.node_id, n.reachable, p) for n in self._nodes for p in n.pools]

    def gpus(self, node_id: str) -> tuple[poolmanager_pb2.Gpu, ...]:
        """The GPUs a node last reported."""
        return next((n.gpus for n in self._nodes if n.node_id == node_id), ())

    def reachable(self, node_id: str) -> bool:
        """Whether a node's watch stream is alive."""
        return any(n.node_id == node_id and n.reachable for n in self._nodes)

    async def _first_answer(self, node: _Node) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._lost_s):
                await node.answered.wait()

    async def _watch(self, node: _Node) -> None:
        backoff_s = 0.1
        request = poolmanager_pb2.WatchNodeRequest(heartbeat_ms=round(self._heartbeat_s * 1000))
        while True:
            why = await self._server_revoked(node)
            if why:
                self._ignore(node, f"pool manager {node.address} is not used: {why}")
                await asyncio.sleep(self._lost_s)
                continue
            call = node.client.watch_node(request)
            try:
                stream = aiter(call)
                while True:
                    # A node that stops talking is as lost as one whose stream broke.
                    async with asyncio.timeout(self._lost_s):
                        response = await anext(stream)
                    if (why := await self._server_revoked(node, only_if_changed=True)) is not None:
                        raise _Revoked(why)
                    self._apply(node, response.node)
                    backoff_s = 0.1
            except _Revoked as err:
                self._ignore(node, f"pool manager {node.address} is not used: {err}")
            except (grpc.aio.AioRpcError, LlorchError, TimeoutError, StopAsyncIteration) as err:
                reason = (
                    err.code().name if isinstance(err, grpc.aio.AioRpcError) else type(err).__name__
                )
                self._lose(node, reason)
            finally:
                if hasattr(call, "cancel"):
                    call.cancel()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, self._lost_s)

    async def _server_revoked(self, node: _Node, *, only_if_changed: bool = False) -> str | None:
        """Why the node's server certificate may not be used; checked again only after the
        denylist changed when ``only_if_changed``."""
        if self._server_check is None or node.channel is None:
            return None
        generation = self._server_check.generation()
        if only_if_changed and generation == node.checked_generation:
            return None
        try:
            why = await self._server_check.revoked(node.address)
        except OSError:
            return None  # not reached now: the watch tells; checked again on its next message
        node.checked_generation = generation
        return why

    def _lose(self, node: _Node, reason: str) -> None:
        node.answered.set()
        if node.reachable:
            _log.warning("pool manager %s lost (%s)", node.address, reason)
            node.reachable = False
            self._views = None
            self._on_change()

    def _ignore(self, node: _Node, why: str) -> None:
        """Takes a node whose identity is in doubt out of placement (logged once)."""
        if node.conflict:
            return
        _log.error(why)
        node.conflict = True
        node.reachable = False
        node.pools = ()
        self._views = None
        self._on_change()

    def _apply(self, node: _Node, state: poolmanager_pb2.Node) -> None:
        node.answered.set()
        node.last_seen = time.monotonic()
        node_id = state.node_id
        if node.expected_node_id and node_id != node.expected_node_id:
            # It registered as one node and answers as another: trust neither.
            self._ignore(
                node,
                f"pool manager {node.address} registered as node {node.expected_node_id} but "
                f"reports node {node_id}; ignoring it",
            )
            return
        twin = next((n for n in self._nodes if n is not node and n.node_id == node_id), None)
        if twin is not None:
            # Two pool managers with one node id would share slot counts and stubs.
            self._ignore(
                node,
                f"pool managers {twin.address} and {node.address} both call themselves node "
                f"{node_id}; ignoring {node.address}",
            )
            return
        node.conflict = False
        pools = tuple(state.pools)
        stored = frozenset(state.stored_models)
        staged = frozenset(m.model_id for m in state.staging.models)
        changed = (
            (not node.reachable)
            or pools != node.pools
            or node.node_id != node_id
            or stored != node.stored
            or staged != node.staged
        )
        node.stored, node.staged = stored, staged
        node.gpus = tuple(state.gpus)  # VRAM figures move all the time; not a change by itself
        if not node.reachable:
            _log.info("pool manager %s (node %s) is reachable", node.address, node_id)
        node.node_id = node_id
        node.pools = pools
        node.prefixes = {p.pool_id: frozenset(p.prefix_cache.block_hashes) for p in pools}
        node.reachable = True
        self._views = None  # the VRAM figures at least
        if changed:
            self._on_change()

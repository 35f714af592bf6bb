"""Placement: which pool serves a task. Pure: no I/O, no clock, deterministic.

``decide`` first filters every pool, giving each one it passes over a reason:

- failed, unreachable or draining;
- its context is smaller than the task needs;
- it holds another model and cannot take this one: it cannot load models, loading this model
  there failed recently, the model's weights alone exceed its VRAM (a model runs wholly in
  VRAM or not at all; the pool manager checks weights + KV cache + compute when it loads), it
  has work in flight (a busy model is never evicted), or other queued tasks still want its
  model (same-model tasks are grouped) and this task has not yet waited past the swap
  starvation bound.

Then it scores what is left: where the model's bytes are (loaded in the pool > staged in the
node's RAM > on the node's disk > must be fetched), then load (filled slots per slot, then most free
slots), then free VRAM (most first), then the pool key, so equal inputs always give the same pool.

Prefix affinity: when a pool that holds the model and has a free slot also holds the start of
the task's prompt in its worker's prefix cache (``PoolView.prefix_blocks``, chained block hashes
of mesh.prefix), the pools with a free slot are ranked by an estimated cost instead, in prompt
tokens of prefill (``prefix_cost``): the prompt tokens the pool would have to read, plus, for
every sequence already running there, ``DECODE_SHARE_TOKENS`` for each token the task will
generate (a batch with more sequences takes longer a step); prompt bytes become tokens at the
model's bytes per token, which the orchestrator measures from finished tasks (4 until then).
The cheapest wins; ties fall to the least-loaded order. Only pools with a free slot are ranked,
so a task never waits for the pool holding its prefix while another could start it (but for the
exception below): affinity fills a warm pool, and the next task goes elsewhere when that pool is
full or too busy for the saving. With no prefix held anywhere the choice is the least-loaded one,
unchanged.

One bounded exception groups the queue by prefix (SGLang's idea): while the pool holding a task's
prompt start has no free slot, the task may WAIT for it when the pool it would get instead holds
blocks worth ``PREFIX_WAIT_MIN_TOKENS`` tokens fewer of it: from the first time it was passed
over so (``prefix_waited_s``), for as long as reading those blocks would take on that pool (its
measured ``prefill_ms_per_token``), and never past ``prefix_wait_s``. Tasks behind it then take
the free slot (the dispatcher goes on down the queue), so a slot that frees on a pool goes to a
task whose prompt lives there; past the bound the task takes any pool.

Outcomes: ASSIGN a pool that has the model loaded and a free slot; ASSIGN with ``load=True``
(the pool must first load the model: a swap); WAIT with a reason when some pool will be able
to serve later (when is the forecaster's to say: orchestrator.forecast); REJECT with a reason
when none ever can.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NewType

from mesh.prefix import BYTES_PER_TOKEN, PREFIX_BLOCK_BYTES, hit_blocks
from orchestrator.tasks import Priority

PoolKey = NewType("PoolKey", str)
"""A pool's id in the mesh, ``node/pool``: made only by ``pool_key``."""


def pool_key(node_id: str, pool_id: str) -> PoolKey:
    """The mesh-wide key of pool ``pool_id`` on node ``node_id``."""
    return PoolKey(f"{node_id}/{pool_id}")


SWAP_STARVATION_S: Mapping[Priority, float] = {Priority.INTERACTIVE: 10.0, Priority.BATCH: 60.0}
"""Default: after this long in the queue a task may swap a pool whose model others still want."""


def is_starving(priority: Priority, waited_s: float) -> bool:
    """Whether a task has waited past the default swap starvation bound."""
    return waited_s >= SWAP_STARVATION_S.get(priority, 0.0)


class Locality(enum.IntEnum):
    """Where a pool's node has a model's bytes; lower is faster to serve from."""

    LOADED = 0
    STAGED = 1
    ON_DISK = 2
    FETCH = 3


@dataclass(frozen=True)
class PoolView:
    """A pool as the orchestrator sees it at one moment."""

    node_id: str
    pool_id: str
    model_id: str
    """The model loaded (or loading) in the pool."""
    ready: bool
    reachable: bool
    slots_total: int
    in_flight: int
    """Slots this orchestrator has filled (running executions)."""
    n_ctx: int
    engine_version: str = ""
    failed: bool = False
    """The pool gave up (its pool manager stopped restarting the worker)."""
    draining: bool = False
    """Finishing its work before an unload or reload: takes nothing new."""
    unloaded: bool = False
    """No worker and no model (drained on its node, or never loaded)."""
    can_load: bool = False
    """The pool manager can load another model into this pool (a swap)."""
    gpu: bool = False
    """Runs on GPUs; VRAM figures apply (a CPU pool has none)."""
    vram_total_bytes: int = 0
    vram_free_bytes: int = 0
    staged_models: frozenset[str] = frozenset()
    """Models in the node's host-RAM staging cache."""
    disk_models: frozenset[str] = frozenset()
    """Models whose files are in the node's model store."""
    prefix_blocks: frozenset[int] = frozenset()
    """Block hashes (mesh.prefix) of the prompt starts its worker holds warm."""
    prefill_ms_per_token: float = 0.0
    """What reading a prompt token costs there (0: not measured yet)."""

    @property
    def key(self) -> PoolKey:
        """Unique id of the pool in the mesh."""
        return pool_key(self.node_id, self.pool_id)

    @property
    def slots_free(self) -> int:
        """Slots this orchestrator has not filled."""
        return max(0, self.slots_total - self.in_flight)


@dataclass(frozen=True)
class PlacementInput:
    """One task's needs and a snapshot of every pool."""

    model_id: str
    tokens_needed: int
    """Prompt allowance + max_tokens: the context the task needs."""
    pools: tuple[PoolView, ...]
    priority: Priority = Priority.INTERACTIVE
    vram_needed_bytes: int = 0
    """The least VRAM the model needs on a GPU pool: its weights (0: unknown, assume it fits).
    The pool manager's load adds KV cache and compute to this and refuses what does not fit."""
    waited_s: float = 0.0
    """How long the task has been queued."""
    demand: Mapping[str, int] = field(default_factory=dict)
    """Other queued tasks per model: a pool whose model is still wanted is not swapped away."""
    failed_loads: Mapping[str, str] = field(default_factory=dict)
    """Pools (keys) where loading this model failed recently, with the error: not tried again."""
    swap_starvation_s: Mapping[Priority, float] = field(
        default_factory=lambda: dict(SWAP_STARVATION_S)
    )
    """After this long in the queue a task may swap a pool whose model other tasks still want."""
    prefix_hashes: tuple[int, ...] = ()
    """Block hashes of the task's prompt (mesh.prefix.prefix_block_hashes); empty: no affinity."""
    prefix_wait_s: float = 0.0
    """How long a task may wait for a busy pool holding its prompt's start (0: never)."""
    prefix_waited_s: float = 0.0
    """How long it has waited so, since it was first passed over for that reason."""
    prompt_bytes: int = 0
    """Size of the task's prompt, for the prefill the cost model counts."""
    max_tokens: int = 0
    """Tokens the task may generate, for the decode share the cost model counts."""
    bytes_per_token: float = BYTES_PER_TOKEN
    """Prompt bytes per token of the model's tokenizer (measured by the orchestrator)."""


class Outcome(enum.Enum):
    """What to do with the task now."""

    ASSIGN = "assign"
    WAIT = "wait"
    REJECT = "reject"


@dataclass(frozen=True)
class PlacementDecision:
    """The chosen pool (ASSIGN), or why not (WAIT, REJECT), and why each pool was excluded."""

    outcome: Outcome
    pool: PoolView | None = None
    load: bool = False
    """ASSIGN only: the pool must load the model first (a swap)."""
    locality: Locality | None = None
    reason: str = ""
    excluded: dict[str, str] = field(default_factory=dict)
    error_reason: str = "NO_POOL_FOR_MODEL"
    """REJECT only: the machine-readable reason (MODEL_LOAD_FAILED when loads were tried)."""
    prefix_hit_blocks: int = 0
    """ASSIGN only: blocks of the task's prompt the chosen pool holds (0: none, or no affinity)."""
    prefix_wait: bool = False
    """WAIT only: the task waits for a busy pool holding its prompt's start (bounded)."""
    prefix_wait_bound_s: float = 0.0
    """With ``prefix_wait``: how long it may wait so in all, from the first time."""


def _locality(pool: PoolView, model_id: str) -> Locality:
    if pool.model_id == model_id:
        return Locality.LOADED
    if model_id in pool.staged_models:
        return Locality.STAGED
    if model_id in pool.disk_models:
        return Locality.ON_DISK
    return Locality.FETCH


def decide(inp: PlacementInput) -> PlacementDecision:
    """Places one task (see the module docstring for the rules)."""
    model = inp.model_id
    excluded: dict[str, str] = {}
    warm: list[PoolView] = []  # hold the model, healthy: serve now or later
    swappable: list[PoolView] = []  # could load the model now
    full_warm: list[PoolView] = []  # hold the model, healthy, every slot taken
    warm_later = 0  # pools holding the model that may serve once a slot frees or they return
    later = 0  # any pool that may be able to serve once something changes
    starving = inp.waited_s >= inp.swap_starvation_s.get(inp.priority, 0.0)
    for pool in inp.pools:
        key = pool.key
        holds = pool.model_id == model
        if not holds and not pool.can_load:
            excluded[key] = f"holds model {pool.model_id} and cannot load another"
            continue
        if not holds and key in inp.failed_loads:
            excluded[key] = f"loading model {model} here failed: {inp.failed_loads[key]}"
            continue
        if pool.n_ctx and pool.n_ctx < inp.tokens_needed:
            excluded[key] = f"context {pool.n_ctx} < {inp.tokens_needed} tokens needed"
            continue
        if not holds and pool.gpu and inp.vram_needed_bytes > pool.vram_total_bytes:
            excluded[key] = (
                f"model needs {inp.vram_needed_bytes} bytes of VRAM; the pool has "
                f"{pool.vram_total_bytes} in all"
            )
            continue
        if pool.failed:
            excluded[key] = "failed"
            continue
        # From here on the pool could serve the task at some point.
        if not pool.reachable or pool.draining:
            excluded[key] = "node unreachable" if not pool.reachable else "draining"
            later += 1
            warm_later += holds
        elif holds and not pool.ready:
            excluded[key] = "unloaded" if pool.unloaded else "loading the model"
            later += 1
            warm_later += 1
        elif holds and pool.slots_free == 0:
            excluded[key] = "no free slot"
            later += 1
            warm_later += 1
            full_warm.append(pool)
        elif holds:
            warm.append(pool)
        elif pool.unloaded:
            excluded[key] = "unloaded (an operator's PreloadPool or ReloadPool brings it back)"
            later += 1
        elif pool.in_flight > 0 or not pool.ready:
            excluded[key] = f"busy with model {pool.model_id}; a busy model is never evicted"
            later += 1
        elif inp.demand.get(pool.model_id, 0) > 0 and not starving:
            excluded[key] = f"queued tasks still want its model {pool.model_id}"
            later += 1
        else:
            swappable.append(pool)
    if warm:

        def least_loaded(p: PoolView) -> tuple[float, int, int, str]:
            return (p.in_flight / p.slots_total, -p.slots_free, -p.vram_free_bytes, p.key)

        hashes = list(inp.prefix_hashes)
        hits = {p.key: hit_blocks(hashes, p.prefix_blocks) for p in warm}
        if any(hits.values()):
            best = min(warm, key=lambda p: (prefix_cost(inp, p, hits[p.key]), least_loaded(p)))
        else:
            best = min(warm, key=least_loaded)
        if hashes and inp.prefix_waited_s < inp.prefix_wait_s:
            holder = _busy_prefix_holder(inp, full_warm, hits[best.key])
            bound = 0.0
            if holder is not None:
                bound = prefix_wait_bound_s(inp, holder, hits[best.key])
            if holder is not None and inp.prefix_waited_s < bound:
                excluded[best.key] = (
                    f"holds fewer blocks of the prompt than {holder.key}, which it waits for"
                )
                return PlacementDecision(
                    Outcome.WAIT,
                    reason=f"waiting for pool {holder.key}, which holds its prompt's start",
                    excluded=excluded,
                    prefix_wait=True,
                    prefix_wait_bound_s=bound,
                )
        return PlacementDecision(
            Outcome.ASSIGN,
            pool=best,
            locality=Locality.LOADED,
            excluded=excluded,
            prefix_hit_blocks=hits[best.key],
        )
    if warm_later and swappable and not starving:
        # A pool with the model will be free; grouping says wait for it rather than swap.
        for pool in swappable:
            excluded[pool.key] = f"could load {model}, but a pool holding it frees up first"
        swappable = []
    if swappable:
        best = min(
            swappable,
            key=lambda p: (_locality(p, model), -p.vram_free_bytes, p.key),
        )
        return PlacementDecision(
            Outcome.ASSIGN,
            pool=best,
            load=True,
            locality=_locality(best, model),
            excluded=excluded,
        )
    if later:
        return PlacementDecision(
            Outcome.WAIT, reason=_wait_reason(inp, excluded), excluded=excluded
        )
    error_reason = "NO_POOL_FOR_MODEL"
    if any(k in inp.failed_loads for k in excluded):
        failed = min(k for k in excluded if k in inp.failed_loads)
        reason = f"model {model} could not be loaded on pool {failed}: {inp.failed_loads[failed]}"
        error_reason = "MODEL_LOAD_FAILED"
    elif any(p.model_id == model for p in inp.pools) and all(
        p.failed for p in inp.pools if p.model_id == model
    ):
        reason = f"every pool serving model {model} has failed"
    else:
        reason = f"no pool serves model {model}"
    return PlacementDecision(
        Outcome.REJECT, reason=reason, excluded=excluded, error_reason=error_reason
    )


PREFIX_WAIT_MIN_TOKENS = 64
"""A task waits for a busy pool holding its prompt's start only when that saves reading at least
this many prompt tokens (by the model's bytes per token) over the pool it would get now."""


def _busy_prefix_holder(
    inp: PlacementInput, full: list[PoolView], free_hit: int
) -> PoolView | None:
    """The full pool holding the most blocks of the task's prompt, when they are worth at least
    ``PREFIX_WAIT_MIN_TOKENS`` more than ``free_hit`` (the pool it would get now)."""
    hashes = list(inp.prefix_hashes)
    best: PoolView | None = None
    least = max(1, math.ceil(PREFIX_WAIT_MIN_TOKENS * inp.bytes_per_token / PREFIX_BLOCK_BYTES))
    best_hit = free_hit + least - 1
    for pool in sorted(full, key=lambda p: p.key):
        hit = hit_blocks(hashes, pool.prefix_blocks)
        if hit > best_hit:
            best, best_hit = pool, hit
    return best


def prefix_wait_bound_s(inp: PlacementInput, holder: PoolView, free_hit: int) -> float:
    """How long a task may wait for ``holder`` in all: the time reading the blocks it holds
    beyond ``free_hit`` would take there (its measured rate), at most ``prefix_wait_s``; the
    cap alone while the rate is not measured."""
    if holder.prefill_ms_per_token <= 0:
        return inp.prefix_wait_s
    saved_tokens = (hit_blocks(list(inp.prefix_hashes), holder.prefix_blocks) - free_hit) * (
        PREFIX_BLOCK_BYTES / inp.bytes_per_token
    )
    return min(inp.prefix_wait_s, saved_tokens * holder.prefill_ms_per_token / 1000)


DECODE_SHARE_TOKENS = 1.0
"""What one more running sequence costs each generated token of a task, in prompt tokens of
prefill: on the bench model on a CPU core a step takes ~4 ms more per sequence in the batch and a
prompt token ~2-4 ms to read; on a GPU both are smaller by about the same factor."""


def prefix_cost(inp: PlacementInput, pool: PoolView, hit: int) -> float:
    """Estimated cost of running the task on ``pool``, in prompt tokens of prefill: the prompt
    it would read (all but the ``hit`` blocks the pool holds) and its share of the pool's batch."""
    uncached = max(0, inp.prompt_bytes - hit * PREFIX_BLOCK_BYTES) / inp.bytes_per_token
    return uncached + DECODE_SHARE_TOKENS * inp.max_tokens * pool.in_flight


def _wait_reason(inp: PlacementInput, excluded: Mapping[str, str]) -> str:
    reasons = set(excluded.values())
    if "no free slot" in reasons:
        return "every pool serving the model is busy"
    if "loading the model" in reasons:
        return "the model is loading"
    if "node unreachable" in reasons:
        return "no pool serving the model is reachable"
    return f"no pool can take model {inp.model_id} now"


class PreloadAction(enum.Enum):
    """What making a model ready on the chosen pool takes."""

    NONE = "none"
    """The pool holds the model and is ready."""
    LOADING = "loading"
    """The pool is loading the model already: nothing to start, only to wait for."""
    LOAD = "load"
    """The pool is unloaded or failed: load the model into it (PreloadPool)."""
    SWAP = "swap"
    """The pool is ready with another model: change its model (ReloadPool)."""


@dataclass(frozen=True)
class PreloadChoice:
    """The pool an operator's PreloadModel goes to, or why there is none."""

    pool: PoolView | None
    action: PreloadAction = PreloadAction.NONE
    reason: str = ""
    excluded: dict[str, str] = field(default_factory=dict)


def choose_preload(
    model_id: str, pools: tuple[PoolView, ...], demand: Mapping[str, int]
) -> PreloadChoice:
    """Picks the pool where ``model_id`` should be made ready ahead of tasks.

    In order: a pool that holds it, ready or loading it (nothing to start); an unloaded or
    failed pool that holds it; any unloaded or failed pool; an idle ready swappable pool whose
    model has no queued task (a swap, never of a model with work running or waiting). Among
    equals the most free VRAM, then the pool key. Unreachable, draining and loading pools are
    passed over with their reason.
    """
    excluded: dict[str, str] = {}
    ranked: list[tuple[int, int, str, PoolView, PreloadAction]] = []
    for pool in pools:
        key = pool.key
        holds = pool.model_id == model_id
        if not pool.reachable:
            excluded[key] = "node unreachable"
        elif pool.draining:
            excluded[key] = "draining"
        elif pool.ready and holds:
            ranked.append((0, 0, key, pool, PreloadAction.NONE))
        elif pool.unloaded or pool.failed:
            rank = 1 if holds else 2
            ranked.append((rank, -pool.vram_free_bytes, key, pool, PreloadAction.LOAD))
        elif not pool.ready and holds:
            ranked.append((0, 1, key, pool, PreloadAction.LOADING))
        elif not pool.ready:
            excluded[key] = f"loading model {pool.model_id}"
        elif not pool.can_load:
            excluded[key] = f"holds model {pool.model_id} and is not swappable"
        elif pool.in_flight > 0:
            excluded[key] = f"busy with model {pool.model_id}; a busy model is never evicted"
        elif demand.get(pool.model_id, 0) > 0:
            excluded[key] = f"queued tasks still want its model {pool.model_id}"
        else:
            ranked.append((3, -pool.vram_free_bytes, key, pool, PreloadAction.SWAP))
    if not ranked:
        reason = (
            f"no pool can take model {model_id} now"
            if pools
            else f"there are no pools to load model {model_id} on"
        )
        return PreloadChoice(None, reason=reason, excluded=excluded)
    _, _, _, best, action = min(ranked, key=lambda r: r[:3])
    return PreloadChoice(best, action, excluded=excluded)


def preload_action(pool: PoolView, model_id: str) -> PreloadAction | None:
    """What making ``model_id`` ready on this named pool takes; None while it is busy changing
    state (loading or draining), when no action can start."""
    if pool.draining or (not pool.ready and not pool.unloaded and not pool.failed):
        return None
    if pool.ready and pool.model_id == model_id:
        return PreloadAction.NONE
    if pool.unloaded or pool.failed:
        return PreloadAction.LOAD
    return PreloadAction.SWAP

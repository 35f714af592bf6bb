"""Placement: which pool serves a task. Pure: no I/O, no clock, deterministic.

Filter (the pool is reachable and ready, holds the model, its context fits the task), then score
(least loaded, then most free slots, then pool id as the tie-break). Every excluded pool carries
its reason. Outcomes: assign a pool, wait (with the reason), or reject (no pool can ever serve).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolView:
    """A pool as the orchestrator sees it at one moment."""

    node_id: str
    pool_id: str
    model_id: str
    ready: bool
    reachable: bool
    slots_total: int
    in_flight: int
    n_ctx: int
    engine_version: str = ""
    failed: bool = False
    """The pool gave up (its pool manager stopped restarting the worker)."""

    @property
    def key(self) -> str:
        """Unique id of the pool in the mesh."""
        return f"{self.node_id}/{self.pool_id}"

    @property
    def slots_free(self) -> int:
        """Slots this orchestrator has not filled."""
        return max(0, self.slots_total - self.in_flight)


@dataclass(frozen=True)
class PlacementInput:
    """One task's needs and a snapshot of every pool."""

    model_id: str
    tokens_needed: int
    pools: tuple[PoolView, ...]


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
    reason: str = ""
    excluded: dict[str, str] = field(default_factory=dict)


def decide(inp: PlacementInput) -> PlacementDecision:
    """Places one task."""
    excluded: dict[str, str] = {}
    serving: list[PoolView] = []
    for pool in inp.pools:
        if pool.model_id != inp.model_id:
            excluded[pool.key] = f"holds model {pool.model_id}"
        elif pool.n_ctx and pool.n_ctx < inp.tokens_needed:
            excluded[pool.key] = f"context {pool.n_ctx} < {inp.tokens_needed} tokens needed"
        else:
            serving.append(pool)
    if not serving:
        return PlacementDecision(
            Outcome.REJECT, reason=f"no pool serves model {inp.model_id}", excluded=excluded
        )
    if all(p.failed for p in serving):
        return PlacementDecision(
            Outcome.REJECT,
            reason=f"every pool serving model {inp.model_id} has failed",
            excluded={**excluded, **{p.key: "failed" for p in serving}},
        )
    candidates: list[PoolView] = []
    for pool in serving:
        if pool.failed:
            excluded[pool.key] = "failed"
        elif not pool.reachable:
            excluded[pool.key] = "node unreachable"
        elif not pool.ready:
            excluded[pool.key] = "not ready"
        elif pool.slots_free == 0:
            excluded[pool.key] = "no free slot"
        else:
            candidates.append(pool)
    if not candidates:
        busy = any(p.reachable and p.ready for p in serving)
        reason = (
            "every pool serving the model is busy" if busy else "no pool serving the model is ready"
        )
        return PlacementDecision(Outcome.WAIT, reason=reason, excluded=excluded)
    best = min(candidates, key=lambda p: (p.in_flight / p.slots_total, -p.slots_free, p.key))
    return PlacementDecision(Outcome.ASSIGN, pool=best, excluded=excluded)

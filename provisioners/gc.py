"""Garbage collection of model files on one node: which replicas go, and why. Pure: the caller
supplies the node's replicas, its disk figures, what is in use there and the time.

Rules, in order, for each replica in the node's model store:

1. in use on the node (loaded or loading in a pool, staged in RAM, being pulled): kept;
2. pinned: kept;
3. retired, and neither used, retired nor registered within ``delete_retired_after_days``:
   deleted;
4. then, while the disk is over ``max_disk_usage_pct`` or under ``min_free_bytes`` free, the least
   recently used of the rest are deleted — never an Active model when ``keep_active``, never one
   used within ``keep_used_within_days`` — until the disk is within the policy again.

Everything else is kept, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from catalog.store import GcPolicy

_DAY_MS = 86_400_000


@dataclass(frozen=True)
class GcReplica:
    """One model file on the node, with what the catalog knows of its model."""

    model_id: str
    path: str
    size_bytes: int
    active: bool
    pinned: bool
    last_used_unix_ms: int
    state_changed_unix_ms: int = 0
    """When the model was retired (or its state last changed); 0: unknown."""
    created_unix_ms: int = 0


@dataclass(frozen=True)
class Disk:
    """The model store's file system."""

    total_bytes: int
    free_bytes: int

    @property
    def used_pct(self) -> float:
        """Percent in use."""
        return (
            100.0 * (self.total_bytes - self.free_bytes) / self.total_bytes
            if self.total_bytes
            else 0.0
        )


@dataclass(frozen=True)
class GcPlan:
    """What a collection deletes and keeps, each with its reason."""

    delete: list[tuple[GcReplica, str]] = field(default_factory=list)
    keep: list[tuple[GcReplica, str]] = field(default_factory=list)
    disk_before: Disk = Disk(0, 0)
    disk_after: Disk = Disk(0, 0)

    @property
    def freed_bytes(self) -> int:
        """Bytes the deletions free."""
        return sum(r.size_bytes for r, _ in self.delete)


def plan_gc(
    replicas: list[GcReplica],
    policy: GcPolicy,
    disk: Disk,
    in_use: Mapping[str, str],
    now_unix_ms: int,
) -> GcPlan:
    """Decides every replica (see the module docstring); deterministic for equal inputs."""
    delete: list[tuple[GcReplica, str]] = []
    keep: list[tuple[GcReplica, str]] = []
    rest: list[GcReplica] = []
    for replica in sorted(replicas, key=lambda r: (r.model_id, r.path)):
        idle_days = _idle_days(replica, now_unix_ms)
        if replica.model_id in in_use:
            keep.append((replica, f"in use: {in_use[replica.model_id]}"))
        elif replica.pinned:
            keep.append((replica, "pinned"))
        elif not replica.active and _quiet_days(replica, now_unix_ms) >= (
            policy.delete_retired_after_days
        ):
            delete.append(
                (
                    replica,
                    f"retired, and neither used nor changed for "
                    f"{_quiet_days(replica, now_unix_ms):.1f} days "
                    f"(policy: {policy.delete_retired_after_days:g} days)",
                )
            )
        else:
            rest.append(replica)
    free = disk.free_bytes + sum(r.size_bytes for r, _ in delete)
    room = _needed(policy, disk.total_bytes, free)
    # The least recently used first; then the largest (fewer deletions); then the id.
    for replica in sorted(rest, key=lambda r: (r.last_used_unix_ms, -r.size_bytes, r.model_id)):
        idle_days = _idle_days(replica, now_unix_ms)
        if policy.keep_active and replica.active:
            keep.append((replica, "active (keep_active)"))
        elif idle_days < policy.keep_used_within_days:
            keep.append(
                (
                    replica,
                    f"used {idle_days:.1f} days ago "
                    f"(policy: {policy.keep_used_within_days:g} days)",
                )
            )
        elif room <= 0:
            keep.append((replica, "the disk is within the policy"))
        else:
            delete.append(
                (
                    replica,
                    f"disk pressure: {_pressure(policy, disk)}; least recently used "
                    f"({_unused(idle_days)})",
                )
            )
            free += replica.size_bytes
            room = _needed(policy, disk.total_bytes, free)
    return GcPlan(
        delete=delete,
        keep=keep,
        disk_before=disk,
        disk_after=Disk(disk.total_bytes, min(disk.total_bytes, free)),
    )


def _needed(policy: GcPolicy, total: int, free: int) -> int:
    """Bytes still to free for the disk to be within the policy (<= 0: none)."""
    over_pct = (total - free) - int(total * policy.max_disk_usage_pct / 100.0)
    under_free = policy.min_free_bytes - free
    return max(over_pct, under_free)


def _pressure(policy: GcPolicy, disk: Disk) -> str:
    return (
        f"{disk.used_pct:.1f}% used, {disk.free_bytes} bytes free (policy: at most "
        f"{policy.max_disk_usage_pct:g}%, at least {policy.min_free_bytes} bytes free)"
    )


def _idle_days(replica: GcReplica, now_unix_ms: int) -> float:
    if replica.last_used_unix_ms <= 0:
        return float("inf")
    return max(0.0, (now_unix_ms - replica.last_used_unix_ms) / _DAY_MS)


def _quiet_days(replica: GcReplica, now_unix_ms: int) -> float:
    """Days since the model was last used, retired or registered, whichever came last."""
    since = max(replica.last_used_unix_ms, replica.state_changed_unix_ms, replica.created_unix_ms)
    return max(0.0, (now_unix_ms - since) / _DAY_MS) if since > 0 else float("inf")


def _unused(days: float) -> str:
    return "never used" if days == float("inf") else f"unused for {days:.1f} days"

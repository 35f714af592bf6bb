"""Unit and property tests of provisioners.gc.plan_gc (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.store import GcPolicy
from provisioners.gc import Disk, GcReplica, plan_gc

DAY = 86_400_000
NOW = 1_000 * DAY
GIB = 1024**3


def replica(
    model_id: str,
    *,
    gib: int = 1,
    active: bool = True,
    pinned: bool = False,
    used_days_ago: float | None = 100.0,
) -> GcReplica:
    last_used = 0 if used_days_ago is None else NOW - int(used_days_ago * DAY)
    return GcReplica(model_id, f"/store/{model_id}.gguf", gib * GIB, active, pinned, last_used)


ROOMY = Disk(total_bytes=1000 * GIB, free_bytes=900 * GIB)


def names(pairs: list[tuple[GcReplica, str]]) -> list[str]:
    return [r.model_id for r, _ in pairs]


def test_a_retired_model_unused_past_the_policy_goes_even_with_room() -> None:
    plan = plan_gc(
        [
            replica("old", active=False, used_days_ago=40),
            replica("recent", active=False, used_days_ago=3),
        ],
        GcPolicy(),
        ROOMY,
        {},
        NOW,
    )
    assert names(plan.delete) == ["old"]
    assert plan.delete[0][1] == (
        "retired, and neither used nor changed for 40.0 days (policy: 30 days)"
    )
    assert dict((r.model_id, why) for r, why in plan.keep)["recent"] == (
        "used 3.0 days ago (policy: 7 days)"
    )
    assert plan.freed_bytes == GIB and plan.disk_after.free_bytes == 901 * GIB


def test_a_model_retired_recently_is_kept_however_long_unused() -> None:
    retired_today = GcReplica("m", "/store/m.gguf", GIB, False, False, 0, NOW - DAY // 2, 1)
    plan = plan_gc([retired_today], GcPolicy(), ROOMY, {}, NOW)
    assert plan.delete == []


def test_in_use_and_pinned_models_are_never_deleted() -> None:
    plan = plan_gc(
        [
            replica("loaded", active=False, used_days_ago=None),
            replica("pinned", active=False, pinned=True, used_days_ago=None),
        ],
        GcPolicy(),
        Disk(100 * GIB, 0),
        {"loaded": "loaded in pool gpu-0"},
        NOW,
    )
    assert plan.delete == []
    assert [why for _, why in plan.keep] == ["in use: loaded in pool gpu-0", "pinned"]


def test_disk_pressure_deletes_the_least_recently_used_until_the_policy_holds() -> None:
    # 100 GiB disk, 5 GiB free; policy: at most 90% used and 10 GiB free → free 5 GiB more.
    policy = GcPolicy(max_disk_usage_pct=90, min_free_bytes=10 * GIB, keep_active=False)
    plan = plan_gc(
        [
            replica("a", gib=3, used_days_ago=50),
            replica("b", gib=4, used_days_ago=80),
            replica("c", gib=2, used_days_ago=60),
            replica("d", gib=9, used_days_ago=2),  # used recently: kept however big
        ],
        policy,
        Disk(100 * GIB, 5 * GIB),
        {},
        NOW,
    )
    assert names(plan.delete) == ["b", "c"]  # 80 days, then 60: 6 GiB ≥ 5 GiB needed
    assert "disk pressure: 95.0% used" in plan.delete[0][1]
    keep = dict((r.model_id, why) for r, why in plan.keep)
    assert keep == {
        "a": "the disk is within the policy",
        "d": "used 2.0 days ago (policy: 7 days)",
    }
    assert plan.disk_after.free_bytes == 11 * GIB


def test_active_models_are_kept_under_pressure_by_default() -> None:
    plan = plan_gc([replica("a", used_days_ago=None)], GcPolicy(), Disk(10 * GIB, 0), {}, NOW)
    assert plan.delete == [] and plan.keep[0][1] == "active (keep_active)"


@st.composite
def inputs(draw: st.DrawFn) -> tuple[list[GcReplica], GcPolicy, Disk, dict[str, str]]:
    count = draw(st.integers(0, 12))
    reps = [
        replica(
            f"m{i}",
            gib=draw(st.integers(1, 20)),
            active=draw(st.booleans()),
            pinned=draw(st.booleans()),
            used_days_ago=draw(st.one_of(st.none(), st.floats(0, 400))),
        )
        for i in range(count)
    ]
    policy = GcPolicy(
        max_disk_usage_pct=draw(st.sampled_from([50.0, 80.0, 95.0])),
        min_free_bytes=draw(st.integers(0, 50)) * GIB,
        keep_active=draw(st.booleans()),
        keep_used_within_days=draw(st.sampled_from([0.0, 7.0, 30.0])),
        delete_retired_after_days=draw(st.sampled_from([0.0, 30.0, 365.0])),
    )
    total = draw(st.integers(100, 400)) * GIB
    disk = Disk(total, draw(st.integers(0, total // GIB)) * GIB)
    in_use = {r.model_id: "loaded" for r in reps if draw(st.booleans())}
    return reps, policy, disk, in_use


@settings(max_examples=300, deadline=None)
@given(inputs())
def test_plan_invariants(case: tuple[list[GcReplica], GcPolicy, Disk, dict[str, str]]) -> None:
    reps, policy, disk, in_use = case
    plan = plan_gc(reps, policy, disk, in_use, NOW)
    assert plan_gc(list(reversed(reps)), policy, disk, in_use, NOW) == plan
    # Every replica is decided exactly once, with a reason.
    decided = [r for r, _ in plan.delete] + [r for r, _ in plan.keep]
    assert sorted(decided, key=lambda r: r.model_id) == sorted(reps, key=lambda r: r.model_id)
    assert all(why for _, why in plan.delete + plan.keep)
    for r, why in plan.delete:
        assert r.model_id not in in_use and not r.pinned
        if why.startswith("disk pressure"):
            assert not (policy.keep_active and r.active)
            assert (
                r.last_used_unix_ms == 0
                or NOW - r.last_used_unix_ms >= policy.keep_used_within_days * DAY
            )
    # Pressure deletions stop once the policy holds: dropping the last one would break it.
    pressure = [r for r, why in plan.delete if why.startswith("disk pressure")]
    if pressure:
        free_without_last = plan.disk_after.free_bytes - pressure[-1].size_bytes
        used = disk.total_bytes - free_without_last
        assert (
            used > disk.total_bytes * policy.max_disk_usage_pct / 100
            or free_without_last < policy.min_free_bytes
        )

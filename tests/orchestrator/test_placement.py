"""Unit tests of orchestrator.placement.decide (pure: no I/O, deterministic)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.placement import (
    Locality,
    Outcome,
    PlacementDecision,
    PlacementInput,
    PoolView,
    decide,
)
from orchestrator.tasks import Priority

MODEL = "tiny-llama"


def pool(
    pool_id: str,
    *,
    node_id: str = "n1",
    model_id: str = MODEL,
    ready: bool = True,
    reachable: bool = True,
    slots_total: int = 1,
    in_flight: int = 0,
    n_ctx: int = 2048,
    draining: bool = False,
) -> PoolView:
    return PoolView(
        node_id=node_id,
        pool_id=pool_id,
        model_id=model_id,
        ready=ready,
        reachable=reachable,
        slots_total=slots_total,
        in_flight=in_flight,
        n_ctx=n_ctx,
        draining=draining,
    )


def place(
    *pools: PoolView,
    tokens_needed: int = 100,
    model_id: str = MODEL,
    swap_waited_s: float = 0.0,
    **kw: object,
) -> PlacementDecision:
    return decide(
        PlacementInput(
            model_id=model_id,
            tokens_needed=tokens_needed,
            pools=pools,
            waited_s=swap_waited_s,
            **kw,  # type: ignore[arg-type]
        )
    )


# --- REJECT ---------------------------------------------------------------------------------


def test_reject_when_no_pools_at_all() -> None:
    decision = place()
    assert decision.outcome is Outcome.REJECT
    assert decision.pool is None
    assert MODEL in decision.reason
    assert decision.excluded == {}


def test_reject_when_no_pool_holds_the_model() -> None:
    a = pool("p0", node_id="n1", model_id="other")
    b = pool("p1", node_id="n2", model_id="third")
    decision = place(a, b)
    assert decision.outcome is Outcome.REJECT
    assert decision.pool is None
    assert set(decision.excluded) == {"n1/p0", "n2/p1"}
    assert "other" in decision.excluded["n1/p0"]
    assert "third" in decision.excluded["n2/p1"]


def test_reject_when_every_pool_with_the_model_has_too_small_a_context() -> None:
    small = pool("p0", n_ctx=512)
    smaller = pool("p1", n_ctx=99)
    wrong_model = pool("p2", model_id="other", n_ctx=100_000)
    decision = place(small, smaller, wrong_model, tokens_needed=1000)
    assert decision.outcome is Outcome.REJECT
    assert set(decision.excluded) == {"n1/p0", "n1/p1", "n1/p2"}
    assert "context 512 < 1000" in decision.excluded["n1/p0"]
    assert "context 99 < 1000" in decision.excluded["n1/p1"]
    assert "other" in decision.excluded["n1/p2"]


def test_reject_even_when_the_too_small_pool_is_idle_and_ready() -> None:
    # A context that is too small can never serve: rejecting beats waiting forever.
    decision = place(pool("p0", n_ctx=10, slots_total=4), tokens_needed=11)
    assert decision.outcome is Outcome.REJECT


def test_context_exactly_equal_to_tokens_needed_fits() -> None:
    decision = place(pool("p0", n_ctx=100), tokens_needed=100)
    assert decision.outcome is Outcome.ASSIGN


def test_unknown_context_zero_always_fits() -> None:
    decision = place(pool("p0", n_ctx=0), tokens_needed=10**9)
    assert decision.outcome is Outcome.ASSIGN
    assert decision.pool is not None and decision.pool.key == "n1/p0"


# --- WAIT -----------------------------------------------------------------------------------


def test_wait_when_every_pool_with_the_model_is_busy() -> None:
    full = pool("p0", slots_total=2, in_flight=2)
    over = pool("p1", slots_total=1, in_flight=3)
    decision = place(full, over)
    assert decision.outcome is Outcome.WAIT
    assert decision.pool is None
    assert decision.reason == "every pool serving the model is busy"
    assert decision.excluded == {"n1/p0": "no free slot", "n1/p1": "no free slot"}


def test_wait_when_no_pool_with_the_model_is_ready() -> None:
    decision = place(pool("p0", ready=False), pool("p1", ready=False))
    assert decision.outcome is Outcome.WAIT
    assert decision.reason == "the model is loading"
    assert decision.excluded == {"n1/p0": "loading the model", "n1/p1": "loading the model"}


def test_wait_when_every_node_is_unreachable() -> None:
    decision = place(pool("p0", reachable=False), pool("p1", node_id="n2", reachable=False))
    assert decision.outcome is Outcome.WAIT
    assert decision.reason == "no pool serving the model is reachable"
    assert decision.excluded == {"n1/p0": "node unreachable", "n2/p1": "node unreachable"}


def test_unreachable_is_reported_before_not_ready() -> None:
    decision = place(pool("p0", reachable=False, ready=False))
    assert decision.excluded == {"n1/p0": "node unreachable"}


def test_wait_is_busy_when_one_pool_is_busy_and_the_others_not_ready() -> None:
    decision = place(
        pool("p0", in_flight=1),
        pool("p1", ready=False),
        pool("p2", reachable=False),
        pool("p3", model_id="other"),
    )
    assert decision.outcome is Outcome.WAIT
    assert decision.reason == "every pool serving the model is busy"
    assert decision.excluded == {
        "n1/p0": "no free slot",
        "n1/p1": "loading the model",
        "n1/p2": "node unreachable",
        "n1/p3": "holds model other and cannot load another",
    }


def test_wait_not_reject_when_only_a_not_ready_pool_fits_the_context() -> None:
    decision = place(pool("p0", n_ctx=50), pool("p1", ready=False, n_ctx=4096), tokens_needed=100)
    assert decision.outcome is Outcome.WAIT
    assert "context 50 < 100" in decision.excluded["n1/p0"]
    assert decision.excluded["n1/p1"] == "loading the model"


# --- ASSIGN ---------------------------------------------------------------------------------


def test_assign_the_only_candidate_and_report_the_others() -> None:
    good = pool("p1", node_id="n2")
    decision = place(pool("p0", model_id="other"), good, pool("p2", ready=False))
    assert decision.outcome is Outcome.ASSIGN
    assert decision.pool == good
    assert decision.excluded == {
        "n1/p0": "holds model other and cannot load another",
        "n1/p2": "loading the model",
    }


def test_assign_picks_the_least_loaded() -> None:
    half = pool("a", slots_total=4, in_flight=2)
    quarter = pool("b", slots_total=4, in_flight=1)
    two_thirds = pool("c", slots_total=3, in_flight=2)
    decision = place(half, quarter, two_thirds)
    assert decision.outcome is Outcome.ASSIGN
    assert decision.pool == quarter


def test_load_ratio_beats_free_slots() -> None:
    # 4 free slots but half loaded vs. 1 free slot and empty.
    big_half = pool("a", slots_total=8, in_flight=4)
    small_empty = pool("b", slots_total=1, in_flight=0)
    decision = place(big_half, small_empty)
    assert decision.pool == small_empty


def test_equal_load_prefers_most_free_slots() -> None:
    small = pool("a", slots_total=2, in_flight=1)
    big = pool("z", slots_total=8, in_flight=4)
    decision = place(small, big)
    assert decision.pool == big


def test_equal_load_and_slots_prefers_smallest_key() -> None:
    p_b = pool("p", node_id="b")
    p_a = pool("p", node_id="a")
    p_c = pool("p", node_id="c")
    decision = place(p_b, p_c, p_a)
    assert decision.pool == p_a
    decision = place(pool("p1"), pool("p0"))
    assert decision.pool is not None and decision.pool.key == "n1/p0"


def test_assign_skips_pools_with_the_wrong_model_even_if_idle() -> None:
    wrong = pool("a", model_id="other", slots_total=8)
    loaded = pool("b", slots_total=2, in_flight=1)
    decision = place(wrong, loaded)
    assert decision.pool == loaded


# --- swaps, locality, VRAM ----------------------------------------------------------------------

GIB = 1 << 30


def gpu_pool(pool_id: str, model_id: str, **kw: object) -> PoolView:
    base = pool(pool_id, model_id=model_id)
    fields = {"can_load": True, "gpu": True, "vram_total_bytes": 24 * GIB, "vram_free_bytes": GIB}
    return replace(base, **{**fields, **kw})  # type: ignore[arg-type]


def test_an_idle_pool_loads_a_model_no_pool_holds() -> None:
    idle = gpu_pool("p0", "other")
    decision = place(idle)
    assert decision.outcome is Outcome.ASSIGN
    assert decision.pool == idle
    assert decision.load is True
    assert decision.locality is Locality.FETCH


def test_a_warm_pool_beats_any_swap() -> None:
    warm = gpu_pool("p9", MODEL, slots_total=4, in_flight=3)
    staged = gpu_pool("p0", "other", staged_models=frozenset({MODEL}))
    decision = place(staged, warm)
    assert decision.pool == warm
    assert decision.load is False
    assert decision.locality is Locality.LOADED


def test_swap_prefers_staged_then_disk_then_fetch() -> None:
    fetch = gpu_pool("a", "other", vram_free_bytes=20 * GIB)
    disk = gpu_pool("b", "other", disk_models=frozenset({MODEL}))
    staged = gpu_pool("c", "other", staged_models=frozenset({MODEL}))
    assert place(fetch, disk, staged).pool == staged
    assert place(fetch, disk).pool == disk
    decision = place(fetch)
    assert decision.pool == fetch and decision.locality is Locality.FETCH


def test_a_pool_where_the_model_failed_to_load_is_not_tried_again() -> None:
    failed = gpu_pool("a", "other")
    other = gpu_pool("b", "other", vram_free_bytes=0)
    decision = place(failed, other, failed_loads={"n1/a": "llama.cpp refused the file"})
    assert decision.pool == other and decision.load
    assert decision.excluded["n1/a"] == (
        f"loading model {MODEL} here failed: llama.cpp refused the file"
    )
    # The only pool failed: the task is rejected with the load's error, not left waiting.
    alone = place(failed, failed_loads={"n1/a": "llama.cpp refused the file"})
    assert alone.outcome is Outcome.REJECT
    assert alone.error_reason == "MODEL_LOAD_FAILED"
    assert alone.reason == (
        f"model {MODEL} could not be loaded on pool n1/a: llama.cpp refused the file"
    )
    # A pool holding the model is unaffected by a failed load elsewhere or of itself.
    warm = gpu_pool("a", MODEL)
    assert place(warm, failed_loads={"n1/a": "x"}).pool == warm


def test_a_busy_model_is_never_evicted() -> None:
    busy = gpu_pool("p0", "other", in_flight=1)
    decision = place(busy, swap_waited_s=1_000.0)
    assert decision.outcome is Outcome.WAIT
    assert "never evicted" in decision.excluded["n1/p0"]


def test_a_model_that_does_not_fit_vram_whole_is_refused() -> None:
    small = gpu_pool("p0", "other", vram_total_bytes=8 * GIB)
    decision = place(small, vram_needed_bytes=12 * GIB)
    assert decision.outcome is Outcome.REJECT
    assert "VRAM" in decision.excluded["n1/p0"]
    assert place(small, vram_needed_bytes=8 * GIB).load is True


def test_same_model_tasks_are_grouped_until_the_starvation_bound() -> None:
    # The pool's model still has queued tasks: a task for another model waits...
    wanted = gpu_pool("p0", "other")
    decision = place(wanted, demand={"other": 3}, swap_waited_s=5.0)
    assert decision.outcome is Outcome.WAIT
    assert "still want" in decision.excluded["n1/p0"]
    # ...until it has waited past the bound; then it may swap the idle pool.
    decision = place(wanted, demand={"other": 3}, swap_waited_s=10.0)
    assert decision.outcome is Outcome.ASSIGN and decision.load is True
    # BATCH tasks have a longer bound.
    batch = place(wanted, demand={"other": 3}, swap_waited_s=10.0, priority=Priority.BATCH)
    assert batch.outcome is Outcome.WAIT


def test_wait_for_a_busy_warm_pool_rather_than_swap_another() -> None:
    warm = gpu_pool("p0", MODEL, in_flight=1)
    idle = gpu_pool("p1", "other")
    decision = place(warm, idle, swap_waited_s=1.0)
    assert decision.outcome is Outcome.WAIT
    assert "frees up first" in decision.excluded["n1/p1"]
    starving = place(warm, idle, swap_waited_s=30.0)
    assert starving.pool == idle and starving.load is True


def test_draining_pools_take_nothing_new() -> None:
    draining = pool("a", draining=True)
    decision = place(draining)
    assert decision.outcome is Outcome.WAIT
    assert decision.excluded == {"n1/a": "draining"}
    assert place(draining, pool("b")).pool == pool("b")


# --- properties -----------------------------------------------------------------------------

MODELS = ["m0", "m1", "m2"]
POOL_KEYS = [(n, p) for n in ("n0", "n1", "n2") for p in ("p0", "p1", "p2")]


@st.composite
def placement_inputs(draw: st.DrawFn) -> PlacementInput:
    keys = draw(st.lists(st.sampled_from(POOL_KEYS), unique=True, max_size=9))
    pools = []
    for node_id, pool_id in keys:
        slots_total = draw(st.integers(min_value=1, max_value=8))
        gpu = draw(st.booleans())
        total = draw(st.sampled_from([8, 12, 24])) * GIB if gpu else 0
        pools.append(
            PoolView(
                node_id=node_id,
                pool_id=pool_id,
                model_id=draw(st.sampled_from(MODELS)),
                ready=draw(st.booleans()),
                reachable=draw(st.booleans()),
                slots_total=slots_total,
                in_flight=draw(st.integers(min_value=0, max_value=slots_total + 1)),
                n_ctx=draw(st.sampled_from([0, 128, 512, 2048])),
                failed=draw(st.booleans()),
                draining=draw(st.booleans()),
                can_load=draw(st.booleans()),
                gpu=gpu,
                vram_total_bytes=total,
                vram_free_bytes=draw(st.integers(0, total)),
                staged_models=frozenset(draw(st.sets(st.sampled_from(MODELS)))),
                disk_models=frozenset(draw(st.sets(st.sampled_from(MODELS)))),
            )
        )
    return PlacementInput(
        model_id=draw(st.sampled_from(MODELS)),
        tokens_needed=draw(st.integers(min_value=1, max_value=3000)),
        pools=tuple(pools),
        priority=draw(st.sampled_from(list(Priority))),
        vram_needed_bytes=draw(st.sampled_from([0, 6 * GIB, 10 * GIB, 20 * GIB])),
        waited_s=draw(st.sampled_from([0.0, 5.0, 100.0])),
        demand={m: draw(st.integers(0, 2)) for m in MODELS},
        failed_loads={
            k: "refused" for k in draw(st.sets(st.sampled_from([p.key for p in pools] or ["x"])))
        },
    )


def healthy_and_allowed(p: PoolView, inp: PlacementInput) -> bool:
    return (
        p.ready
        and p.reachable
        and not p.failed
        and not p.draining
        and (p.n_ctx == 0 or p.n_ctx >= inp.tokens_needed)
    )


def warm_candidate(p: PoolView, inp: PlacementInput) -> bool:
    return healthy_and_allowed(p, inp) and p.model_id == inp.model_id and p.slots_free > 0


@settings(max_examples=400, deadline=None)
@given(placement_inputs(), st.randoms(use_true_random=False))
def test_decide_is_deterministic_and_independent_of_pool_order(inp: PlacementInput, rnd) -> None:
    first = decide(inp)
    assert decide(inp) == first
    shuffled = list(inp.pools)
    rnd.shuffle(shuffled)
    assert decide(replace(inp, pools=tuple(shuffled))) == first


@settings(max_examples=400, deadline=None)
@given(placement_inputs())
def test_decide_invariants(inp: PlacementInput) -> None:
    decision = decide(inp)
    warm = [p for p in inp.pools if warm_candidate(p, inp)]
    assert all(reason for reason in decision.excluded.values())
    if decision.outcome is not Outcome.ASSIGN:
        assert decision.pool is None
        assert not warm
        return
    chosen = decision.pool
    assert chosen is not None and chosen in inp.pools
    assert chosen.key not in decision.excluded
    # Never an unhealthy, draining or too-small pool.
    assert healthy_and_allowed(chosen, inp)
    if decision.load:
        # A swap: never while any warm pool could serve, never evicting a busy model, and the
        # model must fit the pool's VRAM whole.
        assert not warm
        assert chosen.can_load and chosen.in_flight == 0
        assert chosen.model_id != inp.model_id
        assert not chosen.gpu or inp.vram_needed_bytes <= chosen.vram_total_bytes
        assert chosen.key not in inp.failed_loads  # a failed load is not tried again
    else:
        # Prefers warm, least loaded.
        assert chosen.model_id == inp.model_id and chosen.slots_free > 0
        ratio = chosen.in_flight / chosen.slots_total
        assert all(p.in_flight / p.slots_total >= ratio for p in warm)


def test_reject_when_every_pool_serving_the_model_has_failed() -> None:
    failed = PoolView(
        "n", "a", "m", ready=False, reachable=True, slots_total=1, in_flight=0, n_ctx=0, failed=True
    )
    other = PoolView(
        "n", "b", "other", ready=True, reachable=True, slots_total=1, in_flight=0, n_ctx=0
    )
    decision = decide(PlacementInput("m", 10, (failed, other)))
    assert decision.outcome is Outcome.REJECT
    assert "failed" in decision.reason
    assert decision.excluded["n/a"] == "failed"
    loading = PoolView(
        "n", "c", "m", ready=False, reachable=True, slots_total=1, in_flight=0, n_ctx=0
    )
    waiting = decide(PlacementInput("m", 10, (failed, loading)))
    assert waiting.outcome is Outcome.WAIT
    assert waiting.excluded["n/a"] == "failed"

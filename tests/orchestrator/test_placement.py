"""Unit tests of orchestrator.placement.decide (pure: no I/O, deterministic)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.placement import Outcome, PlacementInput, PoolView, decide

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
    )


def place(*pools: PoolView, tokens_needed: int = 100, model_id: str = MODEL):
    return decide(PlacementInput(model_id=model_id, tokens_needed=tokens_needed, pools=pools))


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
    assert decision.reason == "no pool serving the model is ready"
    assert decision.excluded == {"n1/p0": "not ready", "n1/p1": "not ready"}


def test_wait_when_every_node_is_unreachable() -> None:
    decision = place(pool("p0", reachable=False), pool("p1", node_id="n2", reachable=False))
    assert decision.outcome is Outcome.WAIT
    assert decision.reason == "no pool serving the model is ready"
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
        "n1/p1": "not ready",
        "n1/p2": "node unreachable",
        "n1/p3": "holds model other",
    }


def test_wait_not_reject_when_only_a_not_ready_pool_fits_the_context() -> None:
    decision = place(pool("p0", n_ctx=50), pool("p1", ready=False, n_ctx=4096), tokens_needed=100)
    assert decision.outcome is Outcome.WAIT
    assert "context 50 < 100" in decision.excluded["n1/p0"]
    assert decision.excluded["n1/p1"] == "not ready"


# --- ASSIGN ---------------------------------------------------------------------------------


def test_assign_the_only_candidate_and_report_the_others() -> None:
    good = pool("p1", node_id="n2")
    decision = place(pool("p0", model_id="other"), good, pool("p2", ready=False))
    assert decision.outcome is Outcome.ASSIGN
    assert decision.pool == good
    assert decision.excluded == {"n1/p0": "holds model other", "n1/p2": "not ready"}


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


# --- properties -----------------------------------------------------------------------------

MODELS = ["m0", "m1"]


@st.composite
def placement_inputs(draw: st.DrawFn) -> PlacementInput:
    keys = draw(
        st.lists(
            st.tuples(st.sampled_from(["n0", "n1", "n2"]), st.sampled_from(["p0", "p1", "p2"])),
            unique=True,
            max_size=9,
        )
    )
    pools = []
    for node_id, pool_id in keys:
        slots_total = draw(st.integers(min_value=1, max_value=8))
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
            )
        )
    return PlacementInput(
        model_id=draw(st.sampled_from(MODELS)),
        tokens_needed=draw(st.integers(min_value=1, max_value=3000)),
        pools=tuple(pools),
    )


def eligible(p: PoolView, inp: PlacementInput) -> bool:
    return (
        p.model_id == inp.model_id
        and p.ready
        and p.reachable
        and p.in_flight < p.slots_total
        and (p.n_ctx == 0 or p.n_ctx >= inp.tokens_needed)
    )


@settings(max_examples=300, deadline=None)
@given(placement_inputs(), st.randoms(use_true_random=False))
def test_decide_is_deterministic_and_independent_of_pool_order(inp: PlacementInput, rnd) -> None:
    first = decide(inp)
    assert decide(inp) == first
    shuffled = list(inp.pools)
    rnd.shuffle(shuffled)
    other = decide(replace(inp, pools=tuple(shuffled)))
    assert other.outcome is first.outcome
    assert other.pool == first.pool
    assert other.reason == first.reason
    assert other.excluded == first.excluded


@settings(max_examples=300, deadline=None)
@given(placement_inputs())
def test_decide_invariants(inp: PlacementInput) -> None:
    decision = decide(inp)
    candidates = [p for p in inp.pools if eligible(p, inp)]
    filtered = {p.key for p in inp.pools if not eligible(p, inp)}
    # A pool is in `excluded` exactly when a filter removed it: losing candidates are not there.
    assert set(decision.excluded) == filtered
    if decision.outcome is Outcome.ASSIGN:
        chosen = decision.pool
        assert chosen is not None
        assert chosen in inp.pools
        assert eligible(chosen, inp)
        assert chosen.key not in decision.excluded
        ratio = chosen.in_flight / chosen.slots_total
        for other in candidates:
            assert other.in_flight / other.slots_total >= ratio
    else:
        assert decision.pool is None
        assert not candidates
        holds = [
            p
            for p in inp.pools
            if p.model_id == inp.model_id and (p.n_ctx == 0 or p.n_ctx >= inp.tokens_needed)
        ]
        assert decision.outcome is (Outcome.WAIT if holds else Outcome.REJECT)


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

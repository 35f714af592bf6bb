"""Placement by prefix (orchestrator.placement, prefix affinity): the pure rules, on examples and
as properties over random fleets and prompts."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.prefix import PREFIX_BLOCK_BYTES, hit_blocks, prefix_block_hashes
from orchestrator.placement import (
    DECODE_SHARE_TOKENS,
    PREFIX_WAIT_MIN_TOKENS,
    Outcome,
    PlacementInput,
    PoolView,
    decide,
    prefix_cost,
)
from tests.orchestrator.test_placement import placement_inputs, pool, warm_candidate

SYSTEM = "You are a helpful assistant of the river and the mountain. " * 40  # ~2.4 KB
DOCS = [SYSTEM, "Another system prompt, about clouds and silver signals. " * 30, "short"]


def task(prompt: str, *pools: PoolView, max_tokens: int = 64) -> PlacementInput:
    return PlacementInput(
        model_id="tiny-llama",
        tokens_needed=max_tokens + 1,
        pools=pools,
        prefix_hashes=tuple(prefix_block_hashes(prompt)),
        prompt_bytes=len(prompt.encode()),
        max_tokens=max_tokens,
    )


def holding(view: PoolView, text: str) -> PoolView:
    return replace(view, prefix_blocks=view.prefix_blocks | frozenset(prefix_block_hashes(text)))


def test_the_pool_holding_a_long_prefix_wins_over_an_idle_one() -> None:
    warm = holding(pool("warm", slots_total=4, in_flight=2), SYSTEM)
    idle = pool("idle", slots_total=4)
    decision = decide(task(SYSTEM + " user: what now?", idle, warm))
    assert decision.outcome is Outcome.ASSIGN and decision.pool == warm
    assert decision.prefix_hit_blocks == len(SYSTEM.encode()) // PREFIX_BLOCK_BYTES


def test_without_any_prefix_held_the_least_loaded_pool_wins() -> None:
    busy = pool("busy", slots_total=4, in_flight=2)
    idle = pool("idle", slots_total=4)
    decision = decide(task(SYSTEM, busy, idle))
    assert decision.pool == idle and decision.prefix_hit_blocks == 0


def test_a_busy_pool_loses_when_the_saving_is_small_against_its_load() -> None:
    short = SYSTEM[:600]  # two blocks cached: 128 tokens saved
    warm = holding(pool("warm", slots_total=8, in_flight=6), short)
    idle = pool("idle", slots_total=8)
    inp = task(short + " and a question", warm, idle, max_tokens=256)
    assert prefix_cost(inp, warm, 2) > prefix_cost(inp, idle, 0)
    assert decide(inp).pool == idle


def test_a_full_pool_holding_the_prefix_is_passed_over_not_waited_for() -> None:
    full = holding(pool("full", slots_total=2, in_flight=2), SYSTEM)
    other = pool("other", slots_total=2, in_flight=1)
    decision = decide(task(SYSTEM + " more", full, other))
    assert decision.outcome is Outcome.ASSIGN and decision.pool == other
    assert decision.excluded[full.key] == "no free slot"


def test_a_prefix_of_another_text_is_no_hit() -> None:
    warm = holding(pool("warm", slots_total=4, in_flight=1), DOCS[1])
    idle = pool("idle", slots_total=4)
    decision = decide(task(SYSTEM, warm, idle))
    assert decision.pool == idle and decision.prefix_hit_blocks == 0


@st.composite
def prefix_inputs(draw: st.DrawFn) -> PlacementInput:
    """Random fleets (test_placement's), each pool holding random starts of random texts, and
    a prompt that starts like one of them."""
    inp = draw(placement_inputs())
    pools = []
    for view in inp.pools:
        held: set[int] = set()
        for _ in range(draw(st.integers(0, 3))):
            doc = draw(st.sampled_from(DOCS))
            held |= set(prefix_block_hashes(doc[: draw(st.integers(0, len(doc)))]))
        pools.append(replace(view, prefix_blocks=frozenset(held)))
    doc = draw(st.sampled_from(DOCS))
    prompt = doc[: draw(st.integers(0, len(doc)))] + draw(st.sampled_from(["", " a question"]))
    return replace(
        inp,
        pools=tuple(pools),
        prefix_hashes=tuple(prefix_block_hashes(prompt)),
        prompt_bytes=len(prompt.encode()),
        max_tokens=draw(st.integers(1, 512)),
    )


@st.composite
def affine_inputs(draw: st.DrawFn) -> PlacementInput:
    """Fleets built around the cases affinity decides: every pool healthy and holding the task's
    model, some full and some free, each holding a random start of the prompt's document."""
    doc = draw(st.sampled_from(DOCS[:2]))
    pools = []
    for i in range(draw(st.integers(2, 5))):
        slots = draw(st.integers(1, 4))
        full = draw(st.booleans())
        held = doc[: draw(st.sampled_from([0, len(doc)]) | st.integers(0, len(doc)))]
        pools.append(
            replace(
                pool(f"p{i}", model_id="m", slots_total=slots),
                in_flight=slots if full else draw(st.integers(0, slots - 1)),
                prefix_blocks=frozenset(prefix_block_hashes(held)),
            )
        )
    prompt = doc[: draw(st.integers(0, len(doc)))] + " and a question"
    return PlacementInput(
        model_id="m",
        tokens_needed=100,
        pools=tuple(pools),
        prefix_hashes=tuple(prefix_block_hashes(prompt)),
        prompt_bytes=len(prompt.encode()),
        max_tokens=draw(st.integers(1, 512)),
        waited_s=draw(st.sampled_from([0.0, 0.5, 3.0])),
    )


fleets = st.one_of(prefix_inputs(), affine_inputs())


@settings(max_examples=200, deadline=None)
@given(fleets, st.randoms(use_true_random=False))
def test_prefix_placement_is_deterministic_and_independent_of_pool_order(
    inp: PlacementInput, rnd
) -> None:
    first = decide(inp)
    shuffled = list(inp.pools)
    rnd.shuffle(shuffled)
    assert decide(replace(inp, pools=tuple(shuffled))) == first


@settings(max_examples=300, deadline=None)
@given(fleets)
def test_affinity_only_chooses_among_pools_that_can_start_the_task_now(
    inp: PlacementInput,
) -> None:
    """Whether a task starts, waits, swaps or is refused is the same with and without the
    prefixes: affinity never makes a task wait for a pool (no starvation), nor swap."""
    with_prefix = decide(inp)
    without = decide(replace(inp, prefix_hashes=()))
    assert (with_prefix.outcome, with_prefix.load) == (without.outcome, without.load)
    assert with_prefix.excluded == without.excluded
    if with_prefix.outcome is not Outcome.ASSIGN or with_prefix.load:
        assert with_prefix == without
        return
    chosen = with_prefix.pool
    assert chosen is not None and warm_candidate(chosen, inp)
    hashes = list(inp.prefix_hashes)
    assert with_prefix.prefix_hit_blocks == hit_blocks(hashes, chosen.prefix_blocks)
    warm = [p for p in inp.pools if warm_candidate(p, inp)]
    hits = {p.key: hit_blocks(hashes, p.prefix_blocks) for p in warm}
    if not any(hits.values()):
        assert with_prefix == without  # least loaded, unchanged
        return
    # The cheapest by the cost model; the cost counts what a hit saves and what load costs.
    best = prefix_cost(inp, chosen, hits[chosen.key])
    assert all(best <= prefix_cost(inp, p, hits[p.key]) for p in warm)


@settings(max_examples=200, deadline=None)
@given(fleets)
def test_holding_more_of_the_prompt_never_loses_a_pool_the_task(inp: PlacementInput) -> None:
    decision = decide(inp)
    if decision.outcome is not Outcome.ASSIGN or decision.load or decision.pool is None:
        return
    chosen = decision.pool
    more = replace(chosen, prefix_blocks=chosen.prefix_blocks | frozenset(inp.prefix_hashes))
    pools = tuple(more if p.key == chosen.key else p for p in inp.pools)
    again = decide(replace(inp, pools=pools))
    assert again.pool is not None and again.pool.key == chosen.key


def test_the_cost_model_in_numbers() -> None:
    inp = task("x" * 4096, max_tokens=100)
    idle, busy = pool("a", slots_total=4), pool("b", slots_total=4, in_flight=3)
    assert prefix_cost(inp, idle, 0) == 4096 / 4
    assert prefix_cost(inp, busy, 16) == 0 + DECODE_SHARE_TOKENS * 100 * 3


def test_a_task_waits_a_bounded_time_for_the_busy_pool_holding_its_prompt() -> None:
    full = holding(pool("full", slots_total=2, in_flight=2), SYSTEM)
    other = pool("other", slots_total=2)
    inp = replace(task(SYSTEM + " more", full, other), prefix_wait_s=1.0, prefix_waited_s=0.2)
    decision = decide(inp)
    assert decision.outcome is Outcome.WAIT and decision.prefix_wait
    assert "full" in decision.reason
    # Past the bound it takes the free pool; so does one that saves too little by waiting.
    assert decide(replace(inp, prefix_waited_s=1.0)).pool == other
    short = holding(pool("full", slots_total=2, in_flight=2), SYSTEM[:300])  # one block
    assert decide(replace(inp, pools=(short, other))).prefix_wait  # 64 tokens at 4 bytes each
    # With 8 bytes a token one block is 32 tokens: less than PREFIX_WAIT_MIN_TOKENS.
    assert decide(replace(inp, pools=(short, other), bytes_per_token=8.0)).pool == other


@settings(max_examples=300, deadline=None)
@given(fleets, st.sampled_from([0.5, 10.0]))
def test_a_task_only_waits_for_a_full_pool_that_saves_blocks_and_only_within_the_bound(
    inp: PlacementInput, wait_s: float
) -> None:
    patient = replace(inp, prefix_wait_s=wait_s, prefix_waited_s=min(inp.waited_s, 5.0))
    decision = decide(patient)
    eager = decide(inp)  # prefix_wait_s = 0: never waits for a prefix
    if not decision.prefix_wait:
        assert decision == eager
        return
    assert decision.outcome is Outcome.WAIT and eager.outcome is Outcome.ASSIGN
    assert patient.prefix_waited_s < decision.prefix_wait_bound_s <= wait_s
    hashes = list(inp.prefix_hashes)
    assert eager.pool is not None
    now_hit = hit_blocks(hashes, eager.pool.prefix_blocks)
    assert any(
        p.model_id == inp.model_id
        and p.slots_free == 0
        and (hit_blocks(hashes, p.prefix_blocks) - now_hit) * PREFIX_BLOCK_BYTES
        >= PREFIX_WAIT_MIN_TOKENS * inp.bytes_per_token
        for p in inp.pools
    )


def test_the_wait_is_bounded_by_the_reading_it_saves_at_the_pools_rate() -> None:
    full = replace(
        holding(pool("full", slots_total=2, in_flight=2), SYSTEM), prefill_ms_per_token=2.0
    )
    other = pool("other", slots_total=2)
    inp = replace(task(SYSTEM + " more", full, other), prefix_wait_s=30.0)
    decision = decide(inp)
    blocks = len(SYSTEM.encode()) // PREFIX_BLOCK_BYTES
    saved_s = blocks * PREFIX_BLOCK_BYTES / 4 * 2.0 / 1000  # tokens x 2 ms
    assert decision.prefix_wait and abs(decision.prefix_wait_bound_s - saved_s) < 1e-9
    assert decide(replace(inp, prefix_waited_s=saved_s)).pool == other
    # A fast pool (a GPU reads a token in microseconds) is hardly worth waiting for.
    fast = replace(full, prefill_ms_per_token=0.001)
    assert decide(replace(inp, pools=(fast, other), prefix_waited_s=0.01)).pool == other

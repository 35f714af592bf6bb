"""Unit tests of orchestrator.placement.choose_preload and preload_action (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.placement import PoolView, PreloadAction, choose_preload, preload_action

MODEL = "wanted"


def pool(pool_id: str, model_id: str = "other", **kw: object) -> PoolView:
    fields: dict[str, object] = {
        "node_id": "n1",
        "pool_id": pool_id,
        "model_id": model_id,
        "ready": True,
        "reachable": True,
        "slots_total": 1,
        "in_flight": 0,
        "n_ctx": 2048,
        "can_load": True,
        **kw,
    }
    return PoolView(**fields)  # type: ignore[arg-type]


def unloaded(pool_id: str, model_id: str = "other", **kw: object) -> PoolView:
    return pool(pool_id, model_id, ready=False, unloaded=True, **kw)


def test_a_ready_pool_with_the_model_needs_nothing() -> None:
    choice = choose_preload(MODEL, (unloaded("a"), pool("b", MODEL), pool("c")), {})
    assert (choice.pool, choice.action) == (pool("b", MODEL), PreloadAction.NONE)


def test_an_unloaded_pool_that_held_the_model_before_any_other() -> None:
    choice = choose_preload(MODEL, (unloaded("a"), unloaded("b", MODEL), pool("c")), {})
    assert choice.pool is not None and choice.pool.pool_id == "b"
    assert choice.action is PreloadAction.LOAD


def test_an_unloaded_or_failed_pool_before_a_swap() -> None:
    failed = pool("z", ready=False, failed=True)
    choice = choose_preload(MODEL, (pool("a"), failed), {})
    assert (choice.pool, choice.action) == (failed, PreloadAction.LOAD)


def test_among_equals_the_most_free_vram_then_the_key() -> None:
    small = pool("a", gpu=True, vram_free_bytes=10)
    large = pool("b", gpu=True, vram_free_bytes=20)
    assert choose_preload(MODEL, (small, large), {}).pool == large
    assert choose_preload(MODEL, (pool("b"), pool("a")), {}).pool == pool("a")


def test_a_swap_never_evicts_busy_or_wanted_models_and_says_why() -> None:
    busy = pool("a", in_flight=1)
    wanted = pool("b", model_id="queued-for")
    loading = pool("c", ready=False)
    lost = pool("d", reachable=False)
    draining = pool("e", draining=True)
    choice = choose_preload(
        MODEL, (busy, wanted, loading, lost, draining), {"queued-for": 2, "other": 0}
    )
    assert choice.pool is None
    assert choice.reason == f"no pool can take model {MODEL} now"
    assert choice.excluded == {
        "n1/a": "busy with model other; a busy model is never evicted",
        "n1/b": "queued tasks still want its model queued-for",
        "n1/c": "loading model other",
        "n1/d": "node unreachable",
        "n1/e": "draining",
    }
    idle = pool("f")
    chosen = choose_preload(MODEL, (busy, wanted, idle), {"queued-for": 2})
    assert (chosen.pool, chosen.action) == (idle, PreloadAction.SWAP)


def test_a_pool_already_loading_the_model_is_the_answer() -> None:
    loading = pool("b", MODEL, ready=False)
    choice = choose_preload(MODEL, (pool("a"), loading), {})
    assert (choice.pool, choice.action) == (loading, PreloadAction.LOADING)
    ready = pool("c", MODEL)
    assert choose_preload(MODEL, (loading, ready), {}).pool == ready


def test_a_pool_that_is_not_swappable_is_not_swapped() -> None:
    fixed = pool("a", can_load=False)
    choice = choose_preload(MODEL, (fixed,), {})
    assert choice.pool is None
    assert choice.excluded == {"n1/a": "holds model other and is not swappable"}


def test_no_pools_at_all() -> None:
    choice = choose_preload(MODEL, (), {})
    assert choice.pool is None and "no pools" in choice.reason


def test_preload_action_on_a_named_pool() -> None:
    assert preload_action(pool("a", MODEL), MODEL) is PreloadAction.NONE
    assert preload_action(pool("a"), MODEL) is PreloadAction.SWAP
    assert preload_action(pool("a", in_flight=1), MODEL) is PreloadAction.SWAP
    assert preload_action(unloaded("a", MODEL), MODEL) is PreloadAction.LOAD
    assert preload_action(pool("a", ready=False, failed=True), MODEL) is PreloadAction.LOAD
    assert preload_action(pool("a", ready=False), MODEL) is None  # loading
    assert preload_action(pool("a", draining=True), MODEL) is None


@st.composite
def pools(draw: st.DrawFn) -> tuple[PoolView, ...]:
    out = []
    for i in range(draw(st.integers(0, 8))):
        state = draw(st.sampled_from(["ready", "loading", "unloaded", "failed"]))
        out.append(
            pool(
                f"p{i}",
                draw(st.sampled_from([MODEL, "m1", "m2"])),
                ready=state == "ready",
                unloaded=state == "unloaded",
                failed=state == "failed",
                reachable=draw(st.booleans()),
                draining=draw(st.booleans()),
                in_flight=draw(st.integers(0, 1)),
                vram_free_bytes=draw(st.integers(0, 3)),
                can_load=draw(st.booleans()),
            )
        )
    return tuple(out)


@settings(max_examples=300, deadline=None)
@given(pools(), st.dictionaries(st.sampled_from([MODEL, "m1", "m2"]), st.integers(0, 2)))
def test_choice_is_safe_deterministic_and_accounts_for_every_pool(
    views: tuple[PoolView, ...], demand: dict[str, int]
) -> None:
    choice = choose_preload(MODEL, views, demand)
    assert choose_preload(MODEL, tuple(reversed(views)), demand) == choice
    if choice.pool is None:
        assert set(choice.excluded) == {p.key for p in views}
        return
    p = choice.pool
    assert p.reachable and not p.draining
    assert p.key not in choice.excluded
    if choice.action is PreloadAction.LOADING:
        assert p.model_id == MODEL and not p.ready and not p.unloaded and not p.failed
        assert not any(
            q.reachable and not q.draining and q.ready and q.model_id == MODEL for q in views
        )
        return
    assert choice.action is preload_action(p, MODEL)
    if choice.action is PreloadAction.SWAP:
        assert p.can_load and p.in_flight == 0 and demand.get(p.model_id, 0) == 0
        assert not any(q.reachable and not q.draining and (q.unloaded or q.failed) for q in views)
    if any(q.reachable and not q.draining and q.ready and q.model_id == MODEL for q in views):
        assert choice.action is PreloadAction.NONE

"""The worker's prefix cache (poolmanager.worker.prefix) in the batching engine, on the real tiny
model in this process: reused cells give the same output as a cold prefill, entries are bounded
and evicted least recently used, and they give their cells up to running sequences."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.prefix import prefix_block_hashes
from poolmanager.worker.engine import LlamaEngine
from poolmanager.worker.prefix import PrefixCache, common_prefix
from poolmanager.worker.protocol import Done, Failed, LoadSpec
from tests.poolmanager.worker.test_batching import Runner, Stream, cmd

SYSTEM = " ".join(
    "the orchestrator places every task on a pool and the pool decodes many sequences at once"
    for _ in range(12)
)
"""A long shared start (~200 tokens of the tiny vocabulary)."""


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(
        LoadSpec(model=str(tiny_model), n_ctx=1024, slots=4, n_threads=1, prefix_cache_entries=4)
    )
    yield eng
    eng.close()


def run(runner: Runner, *cmds: object) -> dict[str, Stream]:
    runner.submit(*cmds)  # type: ignore[arg-type]
    return runner.run()


def cold(engine: LlamaEngine, c: object) -> Stream:
    """The execution alone with the cache off."""
    runner = Runner(engine, prefix_cache_entries=0)
    return run(runner, c)[c.id]  # type: ignore[attr-defined]


def done(stream: Stream) -> Done:
    assert isinstance(stream.end, Done), stream.end
    return stream.end


def test_a_follow_up_reuses_the_conversation_so_far_and_answers_as_a_cold_prefill(
    engine: LlamaEngine,
) -> None:
    runner = Runner(engine)
    first = cmd("t1", SYSTEM + " question one", max_tokens=24)
    out1 = run(runner, first)["t1"]
    assert done(out1).tokens_cached == 0
    # The next turn: everything so far (the answer too), then more.
    follow = cmd("t2", first.prompt + out1.text + " and question two", max_tokens=24)
    out2 = run(runner, follow)["t2"]
    end = done(out2)
    prompt_tokens = end.tokens_in
    # Most of the prompt came from the cache: at least the first turn's prompt.
    assert end.tokens_cached >= len(engine.tokenize(first.prompt)) - 1
    assert end.tokens_cached < prompt_tokens
    assert out2.ids == cold(engine, follow).ids


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 40, "seed": 11}])
def test_the_same_prompt_again_reuses_all_but_its_last_token(
    engine: LlamaEngine, sampling: dict[str, object]
) -> None:
    runner = Runner(engine)
    c = cmd("a", SYSTEM, max_tokens=20, **sampling)
    run(runner, c)
    again = run(runner, cmd("b", SYSTEM, max_tokens=20, **sampling))["b"]
    end = done(again)
    assert end.tokens_cached == end.tokens_in - 1  # its logits need the last one decoded
    assert again.ids == cold(engine, c).ids


def test_a_prompt_reuses_a_running_sequences_cells(engine: LlamaEngine) -> None:
    runner = Runner(engine)
    long_one = cmd("long", SYSTEM + " the first", max_tokens=60)
    runner.submit(long_one)
    for _ in range(8):  # its prompt is read, and it generates
        runner.step()
    assert runner.streams["long"].ids
    second = cmd("second", SYSTEM + " the second", max_tokens=20)
    runner.submit(second)
    out = runner.run()
    assert done(out["second"]).tokens_cached >= len(engine.tokenize(SYSTEM)) - 2
    assert out["second"].ids == cold(engine, second).ids
    assert out["long"].ids == cold(engine, long_one).ids  # the source is unaffected


def test_entries_are_bounded_and_the_least_recently_used_goes_first(
    engine: LlamaEngine,
) -> None:
    runner = Runner(engine)
    prompts = {f"p{i}": f"{SYSTEM[: 40 + 9 * i]} number {i}" for i in range(6)}
    prompts = {k: f"{k} is {v}" for k, v in prompts.items()}  # no two share a start
    for name in ("p0", "p1", "p2", "p3"):
        run(runner, cmd(name, prompts[name], max_tokens=4))
    assert len(runner.batcher.cache) == 4
    # p0 is used again (the oldest, now the newest); p4 and p5 push out p1 and p2.
    assert done(run(runner, cmd("p0-again", prompts["p0"], max_tokens=4))["p0-again"]).tokens_cached
    run(runner, cmd("p4", prompts["p4"], max_tokens=4), cmd("p5", prompts["p5"], max_tokens=4))
    cache = runner.batcher.cache
    assert len(cache) == 4
    held = [e.text for e in cache.entries()]
    assert not any(t.startswith(("p1 ", "p2 ")) for t in held)
    assert any(t.startswith("p0 ") for t in held)
    # Every id that holds cells is a running sequence or an entry; nothing leaks.
    ids = {e.seq_id for e in cache.entries()}
    for seq_id in range(engine.n_seq_ids):
        assert (engine.cells_used(seq_id) > 0) == (seq_id in ids)


def test_a_prompt_that_extends_an_entry_takes_it_over(engine: LlamaEngine) -> None:
    runner = Runner(engine)
    # One token: it is sampled, never decoded, so the entry holds exactly the prompt's cells.
    run(runner, cmd("one", SYSTEM, max_tokens=1))
    (entry,) = runner.batcher.cache.entries()
    seq_id = entry.seq_id
    assert entry.tokens == engine.tokenize(SYSTEM)
    follow = cmd("two", SYSTEM + " more words", max_tokens=6)
    runner.submit(follow)
    runner.step()
    assert runner.batcher.seq_id_of("two") == seq_id  # the same cells, no copy
    assert len(runner.batcher.cache) == 0
    runner.run()
    assert runner.streams["two"].ids == cold(engine, follow).ids
    (entry,) = runner.batcher.cache.entries()  # the longer one replaces it
    assert entry.text.startswith(follow.prompt)


def test_entries_give_their_cells_up_to_running_sequences(tiny_model: Path) -> None:
    """In a cache of 1024 cells, entries fill what running sequences leave; new executions
    that need the room evict them instead of waiting or failing."""
    small = LlamaEngine(
        LoadSpec(
            model=str(tiny_model),
            n_ctx=512,
            slots=2,
            kv_cache_tokens=1024,
            n_threads=1,
            prefix_cache_entries=8,
        )
    )
    try:
        runner = Runner(small)
        for i in range(6):  # 6 x ~250 cells of entries would not fit: the oldest go
            run(runner, cmd(f"fill{i}", f"entry {i} {SYSTEM[:300]}", max_tokens=20))
            assert runner.batcher.cache.cells <= small.kv_cache_tokens
        assert len(runner.batcher.cache) >= 3
        big = [cmd(f"big{i}", f"run {i} {SYSTEM[:400]}", max_tokens=100) for i in range(2)]
        out = run(runner, *big)
        for c in big:
            assert isinstance(out[c.id].end, Done), out[c.id].end
            assert not isinstance(out[c.id].end, Failed)
            assert out[c.id].ids == cold(small, c).ids
    finally:
        small.close()


def test_the_cache_reports_the_block_hashes_of_what_it_holds(engine: LlamaEngine) -> None:
    runner = Runner(engine)
    out = run(runner, cmd("h", SYSTEM, max_tokens=10))["h"]
    last = runner.cache_states[-1]
    assert last.entries == 1 and last.cells > 0
    assert last.prefill_ms_per_token > 0  # measured on the prompt's read
    expected = prefix_block_hashes(SYSTEM + out.text)
    assert expected and set(expected) <= set(last.block_hashes)
    off = Runner(engine, prefix_cache_entries=0)
    run(off, cmd("h", SYSTEM, max_tokens=10))
    assert off.cache_states == []  # nothing to report with the cache off


def test_a_redundant_entry_is_dropped() -> None:
    from poolmanager.worker.prefix import Entry

    cache = PrefixCache(4)
    assert cache.add(Entry(0, list(range(20)), "a")) == []
    dropped = cache.add(Entry(1, list(range(30)), "ab"))  # extends entry 0
    assert [e.seq_id for e in dropped] == [0]
    shorter = Entry(2, list(range(10)), "a")
    assert cache.add(shorter) == [shorter]  # an entry already covers it
    assert [e.seq_id for e in cache.entries()] == [1]


def test_common_prefix() -> None:
    a = list(range(1000))
    assert common_prefix(a, a) == 1000
    assert common_prefix(a, [*a[:700], -1]) == 700
    assert common_prefix(a, a[:300]) == 300
    assert common_prefix([], a) == 0
    assert common_prefix([5], [6]) == 0


def test_the_entry_a_prompt_copies_from_never_makes_it_wait(tiny_model: Path) -> None:
    """1,024 cells: an entry of ~500 (its prompt and a long answer) and a running sequence of
    ~460. A prompt sharing only the entry's prompt fits once the entry's answer goes: it is
    admitted at once, with the shared cells copied, as it would be with the cache off."""
    small = LlamaEngine(
        LoadSpec(
            model=str(tiny_model),
            n_ctx=512,
            slots=2,
            kv_cache_tokens=1024,
            n_threads=1,
            prefix_cache_entries=4,
        )
    )
    try:
        runner = Runner(small)
        start = "E " + SYSTEM[:300]
        run(runner, cmd("E", start, max_tokens=270, ignore_eos=True))
        (entry,) = runner.batcher.cache.entries()
        assert len(entry.tokens) > 450
        other = "zz unrelated " + SYSTEM[300:700]
        runner.submit(cmd("R", other, max_tokens=512 - len(small.tokenize(other)), ignore_eos=True))
        for _ in range(150):
            runner.step()
        assert runner.streams["R"].end is None  # still running, ~460 cells
        runner.submit(cmd("N", start + " and " + SYSTEM[700:820], max_tokens=5))
        runner.step()
        assert runner.batcher.seq_id_of("N") is not None  # admitted in the next step
        assert len(runner.batcher.cache) == 0  # the entry gave up what the copy did not keep
        out = runner.run()
        assert done(out["N"]).tokens_cached >= len(small.tokenize(start)) - 1
        assert isinstance(out["R"].end, Done)
    finally:
        small.close()

"""The continuous-batching engine on the real tiny model, in this process (llama.cpp in-process:
the tiny model loads in milliseconds, and every call that could abort the process is guarded by
the engine, which these tests also check)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from poolmanager.worker.batching import BatchEngine
from poolmanager.worker.engine import EngineLog, EngineMisuse, LlamaEngine
from poolmanager.worker.protocol import (
    CacheState,
    Cancelled,
    Done,
    Event,
    Execute,
    Failed,
    LoadSpec,
    Tokens,
)
from provisioners.tiny_model import TinyModelSpec, write_tiny_model

EngineLog.install()  # llama.cpp's INFO lines stay off the test output


@dataclass
class Stream:
    """What one execution produced."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    end: Event | None = None
    steps: list[int] = field(default_factory=list)
    """The step numbers at which tokens came."""

    @property
    def reason(self) -> str:
        return self.end.reason if isinstance(self.end, Done) else type(self.end).__name__


class Runner:
    """Drives a BatchEngine step by step and files each event under its execution."""

    def __init__(
        self,
        engine: LlamaEngine,
        prefill_chunk_tokens: int = 64,
        prefix_cache_entries: int | None = None,
    ) -> None:
        self.engine = engine
        self.batcher = BatchEngine(
            engine,
            prefill_chunk_tokens=prefill_chunk_tokens,
            prefix_cache_entries=prefix_cache_entries,
        )
        self.streams: dict[str, Stream] = {}
        self.cache_states: list[CacheState] = []
        self.step_no = 0

    def submit(self, *cmds: Execute) -> None:
        for cmd in cmds:
            self.streams[cmd.id] = Stream()
            self.batcher.submit(cmd)

    def step(self) -> list[Event]:
        events = self.batcher.step()
        self.step_no += 1
        for event in events:
            if isinstance(event, CacheState):
                self.cache_states.append(event)
                continue
            stream = self.streams[event.id]
            if isinstance(event, Tokens):
                assert event.index == len(stream.ids), "tokens out of order"
                stream.ids += event.ids
                stream.text += event.text
                stream.steps.append(self.step_no)
            else:
                assert stream.end is None, f"{event.id} ended twice"
                stream.end = event
        return events

    def run(self, max_steps: int = 100_000) -> dict[str, Stream]:
        while not self.batcher.idle:
            self.step()
            assert self.step_no < max_steps
        return self.streams


def cmd(exec_id: str, prompt: str, max_tokens: int = 40, **kw: object) -> Execute:
    return Execute(id=exec_id, prompt=prompt, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(LoadSpec(model=str(tiny_model), n_ctx=1024, slots=4, n_threads=1))
    yield eng
    eng.close()


def _alone(engine: LlamaEngine, c: Execute) -> Stream:
    runner = Runner(engine)
    runner.submit(c)
    return runner.run()[c.id]


PROMPTS = [
    "The orchestrator places every task",
    "A pool decodes many sequences",
    "Hello",
    "the river and the mountain and the quiet cloud of silver signal",
    "one two three",
    "model token stream",
]


def test_greedy_outputs_in_a_batch_with_staggered_arrivals_equal_each_alone(
    engine: LlamaEngine,
) -> None:
    cmds = [cmd(f"e{i}", p, max_tokens=30 + 7 * i, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    expected = {c.id: _alone(engine, c) for c in cmds}
    runner = Runner(engine)
    # Arrivals between steps: two at once, then one every few steps; 6 executions on 4 slots,
    # so some also wait for a slot.
    arrivals = {0: cmds[:2], 3: cmds[2:3], 5: cmds[3:4], 9: cmds[4:5], 10: cmds[5:]}
    while arrivals or not runner.batcher.idle:
        runner.submit(*arrivals.pop(runner.step_no, []))
        runner.step()
    for c in cmds:
        got, want = runner.streams[c.id], expected[c.id]
        assert got.ids == want.ids, c.id
        assert got.text == want.text
        assert got.reason == "length" and len(got.ids) == c.max_tokens


def test_every_step_is_one_decode_for_all_sequences(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = engine.decode

    def counting() -> int:
        calls.append(engine.batch_size)
        return real()

    monkeypatch.setattr(engine, "decode", counting)
    runner = Runner(engine)
    runner.submit(*(cmd(f"e{i}", p, ignore_eos=True) for i, p in enumerate(PROMPTS[:4])))
    runner.run()
    assert len(calls) == runner.step_no  # one llama_decode per step, never one per sequence
    # After the prompts, each decode carries one token of each of the 4 sequences.
    assert calls.count(4) >= 35


def test_seeded_sampling_is_reproducible_in_a_batch_and_alone(engine: LlamaEngine) -> None:
    sampling = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "ignore_eos": True}
    cmds = [cmd(f"s{i}", PROMPTS[0], max_tokens=40, seed=1000 + i, **sampling) for i in range(4)]
    runner = Runner(engine)
    runner.submit(*cmds)
    batched = runner.run()
    again = Runner(engine)
    again.submit(*reversed(cmds))
    again_out = again.run()
    for c in cmds:
        assert batched[c.id].ids == again_out[c.id].ids == _alone(engine, c).ids
    # Same prompt, different seeds: the samples differ.
    assert len({tuple(s.ids) for s in batched.values()}) == 4


def test_cancel_mid_way_frees_the_cells_and_leaves_the_others_unchanged(
    engine: LlamaEngine,
) -> None:
    cmds = [cmd(f"c{i}", p, max_tokens=60, ignore_eos=True) for i, p in enumerate(PROMPTS[:3])]
    expected = {c.id: _alone(engine, c).ids for c in cmds}
    runner = Runner(engine)
    runner.submit(*cmds)
    while len(runner.streams["c1"].ids) < 10:
        runner.step()
    victim = runner.batcher.seq_id_of("c1")
    assert victim is not None
    assert engine.cells_used(victim) > 10
    runner.batcher.cancel("c1")
    events = runner.step()
    assert Cancelled("c1") in events
    assert engine.cells_used(victim) == 0  # freed in the step that applied the cancel
    assert not any(isinstance(e, Tokens) and e.id == "c1" for e in events)
    runner.run()
    assert isinstance(runner.streams["c1"].end, Cancelled)
    assert runner.streams["c0"].ids == expected["c0"]
    assert runner.streams["c2"].ids == expected["c2"]


def test_cancelling_a_queued_execution_never_starts_it(engine: LlamaEngine) -> None:
    runner = Runner(engine)
    runner.submit(*(cmd(f"q{i}", "Hello", max_tokens=20, ignore_eos=True) for i in range(6)))
    runner.step()  # four admitted, two wait for a slot
    assert runner.batcher.waiting == 2
    runner.batcher.cancel("q5")
    runner.run()
    assert isinstance(runner.streams["q5"].end, Cancelled)
    assert runner.streams["q5"].ids == []
    assert runner.streams["q4"].reason == "length"


def test_a_prompt_longer_than_the_batch_is_read_in_chunks_while_others_stream(
    engine: LlamaEngine,
) -> None:
    long_prompt = " ".join(PROMPTS * 5)
    n_prompt = len(engine.tokenize(long_prompt))
    assert engine.n_batch < n_prompt < engine.n_ctx - 10  # more than one decode could take
    short = cmd("short", "Hello", max_tokens=60, ignore_eos=True)
    long = cmd("long", long_prompt, max_tokens=10, ignore_eos=True)
    runner = Runner(engine, prefill_chunk_tokens=64)
    runner.submit(short)
    runner.step()
    runner.step()
    runner.submit(long)
    reading: list[int] = []
    while not runner.batcher.idle:
        runner.step()
        stats = runner.batcher.last_step
        if stats.prefill_tokens:
            reading.append(runner.step_no)
            assert stats.prefill_tokens <= 64  # bounded while "short" generates
    # The running stream got a token in every step the long prompt was being read.
    assert set(reading) <= set(runner.streams["short"].steps)
    assert len(reading) >= n_prompt // 64
    assert runner.streams["long"].reason == "length"
    # Chunking does not change the result: the same as the prompt read whole.
    assert runner.streams["long"].ids == _alone(engine, long).ids
    assert runner.streams["short"].ids == _alone(engine, short).ids


def test_stop_sequences_are_per_stream(engine: LlamaEngine) -> None:
    base = [cmd(f"t{i}", p, max_tokens=40, ignore_eos=True) for i, p in enumerate(PROMPTS[:3])]
    texts = {c.id: _alone(engine, c).text for c in base}
    # Each stream stops at a word from the middle of its own text; the other streams' stops do
    # not apply to it.
    stops = {k: t.split()[len(t.split()) // 2] for k, t in texts.items()}
    cmds = [
        cmd(c.id, c.prompt, max_tokens=40, ignore_eos=True, stop=(" " + stops[c.id],)) for c in base
    ]
    runner = Runner(engine)
    runner.submit(*cmds)
    out = runner.run()
    for c in cmds:
        cut = texts[c.id].index(c.stop[0])
        assert out[c.id].text == texts[c.id][:cut]
        assert out[c.id].reason == "stop_sequence"


def test_eog_ends_a_generation_and_ignore_eos_bans_every_eog_token(
    engine: LlamaEngine,
) -> None:
    assert engine.eog_tokens  # the tiny model's </s>
    sampled = {"temperature": 1.0, "max_tokens": 300}
    natural = [cmd(f"n{i}", f"number {i} the", seed=i, **sampled) for i in range(8)]
    runner = Runner(engine)
    runner.submit(*natural)
    ended = [c for c in natural if runner.run()[c.id].reason == "stop"]
    assert len(ended) >= 4, "sampled, the tiny model ends most generations with </s>"
    banned = Runner(engine)
    banned.submit(*(cmd(c.id, c.prompt, seed=c.seed, ignore_eos=True, **sampled) for c in ended))
    for stream in banned.run().values():
        assert stream.reason == "length" and len(stream.ids) == 300
        assert not set(stream.ids) & set(engine.eog_tokens)


def test_overflowing_the_shared_cache_ends_only_the_youngest(tiny_model: Path) -> None:
    # A cache smaller than slots x n_ctx (the pool's kv_cache_tokens): three sequences that
    # each fit alone outgrow it together.
    small = LlamaEngine(
        LoadSpec(model=str(tiny_model), n_ctx=256, slots=4, kv_cache_tokens=256, n_threads=1)
    )
    try:
        cmds = [cmd(f"o{i}", PROMPTS[i], max_tokens=200, ignore_eos=True) for i in range(3)]
        runner = Runner(small)
        runner.submit(*cmds)
        out = runner.run()
        first = out["o0"]
        assert first.reason == "length" and len(first.ids) == 200
        assert first.ids == _alone(small, cmds[0]).ids  # the survivor is unaffected
        for c in cmds[1:]:
            end = out[c.id].end
            assert isinstance(end, Failed)
            assert (end.code, end.reason) == ("UNAVAILABLE", "CONTEXT_FULL")
            # What it streamed before it ended is what it would have streamed alone.
            assert out[c.id].ids == _alone(small, c).ids[: len(out[c.id].ids)]
        # Youngest first: o2 ended before o1.
        assert len(out["o2"].ids) < len(out["o1"].ids)
        # Every cell is free again but those of the finished sequences the prefix cache keeps.
        again = Runner(small)
        again.submit(*cmds)
        again.run()
        cached = {e.seq_id: len(e.tokens) for e in again.batcher.cache.entries()}
        assert cached and all(
            small.cells_used(s) == cached.get(s, 0) for s in range(small.n_seq_ids)
        )
    finally:
        small.close()


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        ({"prompt": "word " * 2000}, "prompt"),
        ({"max_tokens": 1020}, "sampling.max_tokens"),
        ({"max_tokens": 0}, "sampling.max_tokens"),
        ({"temperature": float("nan")}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_k": -1}, "sampling.top_k"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_the_others_go_on(
    engine: LlamaEngine, change: dict[str, object], field_name: str
) -> None:
    good = cmd("good", "Hello", max_tokens=20, ignore_eos=True)
    bad = Execute(**{"id": "bad", "prompt": "Hello", "max_tokens": 20, **change})  # type: ignore[arg-type]
    runner = Runner(engine)
    runner.submit(good, bad)
    out = runner.run()
    end = out["bad"].end
    assert isinstance(end, Failed) and end.code == "INVALID_ARGUMENT"
    assert end.field == field_name
    assert out["good"].ids == _alone(engine, good).ids


def test_a_defaulted_max_tokens_is_shortened_to_fit_the_context(engine: LlamaEngine) -> None:
    c = cmd("d", "Hello", max_tokens=5000, max_tokens_defaulted=True, ignore_eos=True)
    out = _alone(engine, c)
    assert out.reason == "length"
    assert len(out.ids) + len(engine.tokenize("Hello")) == engine.n_ctx


def test_the_guards_refuse_what_would_abort_the_process(engine: LlamaEngine) -> None:
    engine.clear()
    engine.clear_batch()
    with pytest.raises(EngineMisuse, match="position"):
        engine.add(0, 1, 5, logits=False)  # position 5 of an empty sequence
    with pytest.raises(EngineMisuse, match="sequence id"):
        engine.add(engine.n_seq_ids, 1, 0, logits=False)
    for pos in range(engine.n_batch):
        engine.add(0, 1, pos, logits=pos == 3)
    with pytest.raises(EngineMisuse, match="at most"):
        engine.add(1, 1, 0, logits=True)
    assert engine.decode() == 0
    sampler = engine.sampler(temperature=0, top_k=0, top_p=1, seed=0, ignore_eos=False)
    try:
        with pytest.raises(EngineMisuse, match="no logits"):
            engine.sample(sampler, 4)
        assert 0 <= engine.sample(sampler, 3) < engine.n_vocab
    finally:
        sampler.free()
        engine.free_sequence(0)
    assert engine.cells_used(0) == 0


def test_the_worker_log_names_no_prompt(
    engine: LlamaEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "the secret prompt text"
    _alone(engine, cmd("p", secret, max_tokens=5, correlation_id="cid-7"))
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert {"execution started", "execution finished"} <= {x["msg"] for x in lines}
    assert all(x.get("correlation_id") == "cid-7" for x in lines)
    assert secret not in json.dumps(lines)


def test_split_utf8_characters_come_out_whole(tmp_path: Path) -> None:
    # A variant of the tiny model that samples byte tokens too, so multi-byte characters are
    # split across tokens, and several streams run at once.
    path = write_tiny_model(tmp_path / "bytes.gguf", TinyModelSpec(byte_tokens=True, seed=3))
    eng = LlamaEngine(LoadSpec(model=str(path), n_ctx=512, slots=4, n_threads=1))
    try:
        runner = Runner(eng)
        runner.submit(
            *(cmd(f"u{i}", f"{i} é ✓", max_tokens=300, ignore_eos=True) for i in range(4))
        )
        whole = 0
        for stream in runner.run().values():
            raw = b"".join(eng.piece(t) for t in stream.ids)
            # The streamed text is the whole byte string decoded at once.
            assert stream.text == raw.decode("utf-8", errors="replace")
            whole += sum(1 for ch in stream.text if len(ch.encode()) > 1 and ch != "\ufffd")
        assert whole, "no multi-byte character was made of several tokens"
    finally:
        eng.close()

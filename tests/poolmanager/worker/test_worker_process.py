"""The batching engine through a real worker process (``python -m poolmanager.worker``) and the
pool manager's handle on it (``WorkerProcess``): commands and events cross the pipes as they do
in the mesh, tokens merged by the event writer. test_batching.py checks the engine step by step in
this process; these check that what a pool manager reads from the worker is the same.

llama.cpp's logits are not bit-identical across batch shapes: a sequence read and decoded beside
others ends up with logits up to ~3e-3 away from the same sequence alone on the tiny model
(bench/engine_steps.py, ``logits_delta_vs_alone``). Whether a stream runs alone or beside others
for a given step depends on timing here, so a greedy near-tie could flip. The greedy comparisons
use prompts whose alone generation has no near-tie (tests/greedy.py checks it first), and
seeded sampling is compared between runs that never decode alone (beside a running stream)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from poolmanager.worker.engine import LlamaEngine
from poolmanager.worker.protocol import (
    TERMINAL,
    Cancelled,
    Done,
    Event,
    Execute,
    Failed,
    LoadSpec,
    Tokens,
    encode,
)
from poolmanager.worker_process import ExecutionQueue, WorkerExited, WorkerProcess
from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from tests.greedy import MARGIN, smallest_margin


@dataclass
class Result:
    """What one execution sent: its tokens, text and end."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    end: Event | WorkerExited | None = None

    @property
    def reason(self) -> str:
        return self.end.reason if isinstance(self.end, Done) else type(self.end).__name__


async def collect(events: ExecutionQueue, on_token: asyncio.Event | None = None) -> Result:
    """Reads one execution's events to its end; sets ``on_token`` at the first tokens."""
    result = Result()
    while True:
        event = await asyncio.wait_for(events.get(), 60)
        if isinstance(event, Tokens):
            assert event.index == len(result.ids), "tokens out of order or repeated"
            result.ids += event.ids
            result.text += event.text
            if on_token is not None:
                on_token.set()
        elif isinstance(event, (*TERMINAL, WorkerExited)):
            result.end = event
            return result


async def spawn(model: Path, **spec: object) -> WorkerProcess:
    return await WorkerProcess.spawn(
        LoadSpec(model=str(model), n_threads=1, log_level="WARNING", **spec),  # type: ignore[arg-type]
        gpu_devices=[],
        env=dict(os.environ),
        start_timeout_s=60,
    )


@pytest.fixture
async def worker(tiny_model: Path) -> AsyncIterator[WorkerProcess]:
    proc = await spawn(tiny_model, n_ctx=1024, slots=4)
    yield proc
    await proc.stop(5)


def execute(exec_id: str, prompt: str, max_tokens: int, **kw: object) -> Execute:
    return Execute(id=exec_id, prompt=prompt, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


async def alone(worker: WorkerProcess, cmd: Execute) -> Result:
    return await collect(worker.submit(cmd))


async def staggered(worker: WorkerProcess, cmds: list[Execute]) -> list[Result]:
    """Submits each execution once the one before it has sent tokens (so each joins a running
    batch), and collects them all."""
    tasks = []
    for cmd in cmds:
        started = asyncio.Event()
        tasks.append(asyncio.create_task(collect(worker.submit(cmd), started)))
        await asyncio.wait_for(started.wait(), 30)
    return list(await asyncio.gather(*tasks))


PROMPTS = [
    "The orchestrator places every task",
    "A pool decodes many sequences",
    "Hello",
    "the river and the mountain",
]


async def test_staggered_greedy_outputs_equal_each_alone(
    worker: WorkerProcess, tiny_model: Path
) -> None:
    assert worker.ready.slots == 4
    cmds = [execute(f"g{i}", p, 90 + 10 * i, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    cmds += [execute(f"h{i}", p, 60, ignore_eos=True) for i, p in enumerate(PROMPTS)]  # 8 on 4
    for cmd in cmds[:4]:
        assert smallest_margin(tiny_model, cmd.prompt, cmd.max_tokens) > MARGIN, cmd.prompt
    expected = [await alone(worker, c) for c in cmds]
    got = await staggered(worker, cmds)
    for cmd, want, have in zip(cmds, expected, got, strict=True):
        assert have.reason == "length" and len(have.ids) == cmd.max_tokens, cmd.id
        assert (have.ids, have.text) == (want.ids, want.text), cmd.id


async def test_seeded_sampling_is_reproducible(worker: WorkerProcess) -> None:
    seeded = [
        execute(f"s{i}", p, 80, ignore_eos=True, temperature=0.9, top_k=40, top_p=0.95, seed=7 + i)
        for i, p in enumerate(PROMPTS[:3])
    ]

    async def beside_a_running_stream(cmds: list[Execute]) -> list[Result]:
        started = asyncio.Event()
        blocker = execute(f"blocker-{cmds[0].id}", "Hello", 900, ignore_eos=True)
        running = asyncio.create_task(collect(worker.submit(blocker), started))
        await asyncio.wait_for(started.wait(), 30)
        results = await staggered(worker, cmds)
        assert (await running).reason == "length"  # it outlived them: none decoded alone
        return results

    first = await beside_a_running_stream(seeded)
    again = await beside_a_running_stream(
        [msgspec.structs.replace(c, id=c.id + "'") for c in seeded]
    )
    assert [r.ids for r in first] == [r.ids for r in again]
    # Alone, twice: the same again.
    assert (await alone(worker, seeded[0])).ids == (await alone(worker, seeded[0])).ids
    # Seeds matter: another seed on the same prompt gives another generation.
    reseeded = msgspec.structs.replace(seeded[0], id="s-other", seed=99)
    assert (await alone(worker, reseeded)).ids != (await alone(worker, seeded[0])).ids


async def test_cancelling_one_stream_frees_its_cells_and_leaves_the_other_unchanged(
    tiny_model: Path,
) -> None:
    # One context of 256 cells for two slots. The cancelled execution held ~40 cells; the one
    # after it needs 250 of the 256, so it runs to its end only if those cells were freed.
    worker = await spawn(tiny_model, n_ctx=256, slots=2, kv_cache_tokens=256)
    try:
        assert worker.ready.kv_cache_tokens == 256
        other = execute("other", "A pool decodes", 150, ignore_eos=True)
        assert smallest_margin(tiny_model, other.prompt, other.max_tokens) > MARGIN
        want = await alone(worker, other)
        doomed_events = worker.submit(execute("doomed", "Hello", 240, ignore_eos=True))
        doomed = Result()
        running = asyncio.create_task(collect(worker.submit(other)))
        while doomed.end is None:
            event = await asyncio.wait_for(doomed_events.get(), 30)
            if isinstance(event, Tokens):
                assert event.index == len(doomed.ids)
                doomed.ids += event.ids
                if len(doomed.ids) >= 40 and len(doomed.ids) - len(event.ids) < 40:
                    worker.cancel("doomed")  # tokens of the current step may still come
            else:
                doomed.end = event
        assert isinstance(doomed.end, Cancelled), doomed.end
        assert 40 <= len(doomed.ids) < 240
        got = await running
        assert got.reason == "length" and got.ids == want.ids
        after = await alone(worker, execute("after", "Hello", 245, ignore_eos=True))
        assert after.reason == "length" and len(after.ids) == 245, after.end
    finally:
        await worker.stop(5)


async def test_a_prompt_longer_than_the_batch_is_read_while_another_streams(
    worker: WorkerProcess, tiny_model: Path
) -> None:
    words = "the river and the mountain and the quiet cloud of silver signal " * 15
    long = execute("long", words, 24, ignore_eos=True)
    assert worker.ready.n_batch == 512
    want_long = await alone(worker, long)
    assert isinstance(want_long.end, Done), want_long.end
    assert want_long.end.tokens_in > worker.ready.n_batch
    short = execute("short", "Hello", 300, ignore_eos=True)
    assert smallest_margin(tiny_model, short.prompt, short.max_tokens) > MARGIN
    want_short = await alone(worker, short)
    got_short, got_long = await staggered(worker, [short, long])
    assert got_long.ids == want_long.ids and got_short.ids == want_short.ids


async def test_stop_sequences_are_per_stream(worker: WorkerProcess, tiny_model: Path) -> None:
    base = [execute(f"t{i}", p, 60, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    for cmd in base:
        assert smallest_margin(tiny_model, cmd.prompt, cmd.max_tokens) > MARGIN, cmd.prompt
    texts = {c.id: (await alone(worker, c)).text for c in base}
    # Each stream stops at a word from the middle of its own text; the others' stops do not
    # apply to it.
    stops = {k: " " + t.split()[len(t.split()) // 2] for k, t in texts.items()}
    cmds = [execute(c.id, c.prompt, 60, ignore_eos=True, stop=(stops[c.id],)) for c in base]
    for cmd, got in zip(cmds, await staggered(worker, cmds), strict=True):
        assert got.reason == "stop_sequence", cmd.id
        assert got.text == texts[cmd.id][: texts[cmd.id].index(stops[cmd.id])]


async def test_split_utf8_characters_arrive_whole_in_every_stream(tmp_path: Path) -> None:
    # A model that samples byte tokens too, so multi-byte characters are split across tokens.
    path = write_tiny_model(tmp_path / "bytes.gguf", TinyModelSpec(byte_tokens=True, seed=3))
    worker = await spawn(path, n_ctx=512, slots=4)
    try:
        cmds = [
            execute(f"u{i}", f"{i} é ✓", 300, ignore_eos=True, temperature=1.0, seed=i)
            for i in range(4)
        ]
        got = await staggered(worker, cmds)
        engine = LlamaEngine(LoadSpec(model=str(path), n_ctx=512, slots=1, n_threads=1))
        try:
            whole = 0
            for result in got:
                assert result.reason == "length" and len(result.ids) == 300
                # Merged into events by steps and windows, the text is still the stream's
                # bytes decoded at once: no character split across events became U+FFFD.
                raw = b"".join(engine.piece(t) for t in result.ids)
                assert result.text == raw.decode("utf-8", errors="replace")
                whole += sum(1 for ch in result.text if len(ch.encode()) > 1 and ch != "\ufffd")
            assert whole, "no multi-byte character came out of these streams"
        finally:
            engine.close()
    finally:
        await worker.stop(5)


async def test_bad_sampling_input_is_refused_naming_the_field_beside_a_running_stream(
    worker: WorkerProcess,
) -> None:
    running = asyncio.Event()
    stream = asyncio.create_task(
        collect(worker.submit(execute("ok", "Hello", 200, ignore_eos=True)), running)
    )
    await asyncio.wait_for(running.wait(), 30)
    bad = await alone(worker, execute("bad", "Hello", 10, top_p=1.5))
    assert isinstance(bad.end, Failed)
    assert (bad.end.code, bad.end.field) == ("INVALID_ARGUMENT", "sampling.top_p")
    assert (await stream).reason == "length"


def test_a_worker_whose_pool_manager_died_mid_stream_exits_without_a_traceback(
    tiny_model: Path,
) -> None:
    # A SIGKILLed pool manager closes both pipes while the worker streams (bench/chaos.py): its
    # next event write fails. It used to end with a BrokenPipeError traceback in the log.
    argv = ["--model", str(tiny_model), "--n-ctx", "1024", "--slots", "1", "--n-threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolmanager.worker", *argv, "--log-level", "WARNING"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        assert b'"ready"' in proc.stdout.readline()
        proc.stdin.write(encode(execute("e", "Hello", 1000, ignore_eos=True)))
        proc.stdin.flush()
        assert b'"tok"' in proc.stdout.readline()  # streaming now
        proc.stdout.close()
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""Engine step benchmark: what one ``llama_decode`` of the batching engine costs, in this process.

On one context of the pool's shape (``LlamaEngine``, 16 slots, one thread unless told), best of
three each:
- prompts: eight-ish-token prompts ("Hello") read together, 1 to 16 of them in one decode;
- decode steps: one token for each of 1, 4, 8 and 16 sequences 32 tokens in;
- prompt chunks: a 64-token chunk of one long prompt at its start, middle and near 1,900 tokens
  (attention spans every cached token, so later chunks cost more);
- batch shape: how far the logits of one sequence move when its token is decoded beside others
  rather than alone (llama.cpp takes another kernel for one token than for several).
These are the figures behind docs/operators.md ("Slots") and docs/decisions.md (the batching
engine). The last line is JSON.

  .venv/bin/python bench/engine_steps.py                  # bench-170m
  .venv/bin/python bench/engine_steps.py --model tiny     # quick
"""

from __future__ import annotations

# llama_cpp before anything that loads numpy's libraries (see bench/relay.py).
import llama_cpp  # noqa: F401  # isort: skip

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from relay import write_model  # bench/relay.py

from poolmanager.worker.engine import EngineLog, LlamaEngine
from poolmanager.worker.protocol import LoadSpec

MODELS = {"170m": "bench-170m", "tiny": "tiny-llama"}
SLOTS = 16


def reset(engine: LlamaEngine) -> None:
    for seq in range(engine.slots):
        engine.free_sequence(seq)


def best_ms(engine: LlamaEngine, fill: Callable[[], None], rounds: int = 3) -> float:
    """Best time of ``rounds`` decodes of the batch ``fill`` builds (the cache cleared first)."""
    best = float("inf")
    for _ in range(rounds):
        reset(engine)
        fill()
        started = time.perf_counter()
        assert engine.decode() == 0
        best = min(best, (time.perf_counter() - started) * 1000)
    return round(best, 1)


def prompts(engine: LlamaEngine, ids: list[int], count: int) -> None:
    engine.clear_batch()
    for seq in range(count):
        for pos, token in enumerate(ids):
            engine.add(seq, token, pos, logits=pos == len(ids) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="170m")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    EngineLog.install()
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as tmp:
        path = write_model(Path(tmp) / "model.gguf", args.model)
        engine = LlamaEngine(
            LoadSpec(model=str(path), n_ctx=2048, slots=SLOTS, n_threads=args.threads)
        )
        try:
            figures = measure(engine)
        finally:
            engine.close()
    figures = {"model": MODELS[args.model], "threads": args.threads, **figures}
    for name, value in figures.items():
        print(f"{name:<34} {value}")
    print(json.dumps(figures))


def measure(engine: LlamaEngine) -> dict[str, object]:
    hello = engine.tokenize("Hello")
    out: dict[str, object] = {"prompt_tokens": len(hello)}
    out["prompts_ms"] = {
        k: best_ms(engine, lambda k=k: prompts(engine, hello, k)) for k in (1, 2, 4, 8, 16)
    }

    context = [100 + pos % 50 for pos in range(32)]  # 16 x 32 fill one batch of 512

    def step(k: int) -> None:
        prompts(engine, context, k)
        assert engine.decode() == 0
        engine.clear_batch()
        for seq in range(k):
            engine.add(seq, 120, len(context), logits=True)

    out["decode_step_ms"] = {k: best_ms(engine, lambda k=k: step(k)) for k in (1, 4, 8, 16)}

    chunk_ms = {}
    reset(engine)
    for start in range(0, 1920, 64):
        engine.clear_batch()
        for pos in range(start, start + 64):
            engine.add(0, 100 + pos % 50, pos, logits=pos == start + 63)
        started = time.perf_counter()
        assert engine.decode() == 0
        chunk_ms[start] = round((time.perf_counter() - started) * 1000, 1)
    out["chunk64_ms_at"] = {p: chunk_ms[p] for p in (0, 960, 1856)}
    out["chunk64_total_s"] = round(sum(chunk_ms.values()) / 1000, 2)

    def logits_of(k: int) -> np.ndarray:
        reset(engine)
        step(k)
        assert engine.decode() == 0
        raw = engine.logits(0)
        return np.ctypeslib.as_array(raw, shape=(engine.n_vocab,)).copy()

    alone = logits_of(1)
    out["logits_delta_vs_alone"] = {k: float(np.abs(logits_of(k) - alone).max()) for k in (2, 4, 8)}
    return out


if __name__ == "__main__":
    main()

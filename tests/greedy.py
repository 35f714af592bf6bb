"""Greedy near-ties, for tests that compare a batched generation with the same one alone.

llama.cpp's logits move with the batch's shape (bench/engine_steps.py measures by how much:
~3e-3 on the tiny model), so a greedy choice between two tokens closer than that may differ
between a request run alone and the same request in a batch. Tests that compare the two first
check that their prompts have no such tie.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp  # noqa: F401  -- loaded before numpy, as in bench/relay.py
import numpy as np

from poolmanager.worker.engine import LlamaEngine
from poolmanager.worker.protocol import LoadSpec

MARGIN = 1e-2
"""Smallest gap between the two best logits a compared prompt may have: ~3x the tiny model's
measured movement."""


def smallest_margin(model: Path, prompt: str, tokens: int) -> float:
    """The smallest gap between the two best logits over a greedy generation alone (EOG
    banned, as with ignore_eos), decoded in this process."""
    engine = LlamaEngine(LoadSpec(model=str(model), n_ctx=1024, slots=1, n_threads=1))
    try:
        ids = engine.tokenize(prompt)
        for pos, token in enumerate(ids):
            index = engine.add(0, token, pos, logits=pos == len(ids) - 1)
        smallest = float("inf")
        for pos in range(len(ids), len(ids) + tokens):
            assert engine.decode() == 0
            logits = np.ctypeslib.as_array(engine.logits(index), shape=(engine.n_vocab,)).copy()
            logits[list(engine.eog_tokens)] = -np.inf
            second, best = np.sort(logits)[-2:]
            smallest = min(smallest, float(best - second))
            engine.clear_batch()
            index = engine.add(0, int(np.argmax(logits)), pos, logits=True)
        return smallest
    finally:
        engine.close()

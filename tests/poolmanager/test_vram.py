"""The VRAM estimate against real generated GGUF files and what llama.cpp itself allocates."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolmanager.vram import CACHE_TYPE_BYTES, estimate_vram
from provisioners.gguf_facts import ModelShape, read_model_shape
from provisioners.tiny_model import TinyModelSpec, write_tiny_model

# A bigger model with grouped-query attention (fewer KV heads than query heads).
GQA_SPEC = TinyModelSpec(n_layers=4, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, seed=5)

# Loads a model on the CPU as a pool's worker does and prints llama.cpp's own buffer sizes (its
# log, captured).
_PROBE = r"""
import json, sys
from poolmanager.worker.engine import EngineLog, LlamaEngine
from poolmanager.worker.protocol import LoadSpec
log = EngineLog.install()
log.loading = True
engine = LlamaEngine(LoadSpec(model=sys.argv[1], n_ctx=int(sys.argv[2]), slots=int(sys.argv[3])))
print(json.dumps("".join(log.lines)))
"""


def _llama_buffers_mib(path: Path, n_ctx: int, slots: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), str(n_ctx), str(slots)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    log = json.loads(out.strip().splitlines()[-1])
    sizes = {}
    for kind in ("model", "KV", "compute"):
        found = re.findall(rf"CPU\S* {kind} buffer size =\s+([\d.]+) MiB", log)
        sizes[kind] = sum(float(x) for x in found)
    return sizes


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("gqa") / "gqa.gguf", GQA_SPEC)


def test_shape_of_the_tiny_model(tiny_model: Path) -> None:
    shape = read_model_shape(tiny_model)
    spec = TinyModelSpec()
    assert shape.n_layers == spec.n_layers and shape.n_embd == spec.n_embd
    assert shape.n_head_kv == spec.n_head_kv and shape.key_length == spec.n_embd // spec.n_head
    assert shape.context_length == spec.context_length
    # Weights are every tensor as stored: F32 tensors plus the 1-D norms.
    assert 0 < shape.weight_bytes < tiny_model.stat().st_size


@pytest.mark.parametrize(
    ("which", "n_ctx", "slots"), [("tiny", 512, 1), ("gqa", 512, 1), ("gqa", 300, 3)]
)
def test_weights_and_kv_match_what_llama_cpp_allocates(
    which: str, n_ctx: int, slots: int, tiny_model: Path, gqa_model: Path
) -> None:
    """Weights and the KV cache of ``slots`` sequences (300 x 3 cells, which llama.cpp pads
    to 1,024) are exactly what the engine's context allocates."""
    path = tiny_model if which == "tiny" else gqa_model
    estimate = estimate_vram(
        read_model_shape(path), n_ctx=n_ctx, slots=slots, overhead_bytes_per_device=0
    )
    llama = _llama_buffers_mib(path, n_ctx, slots)
    mib = 1024 * 1024
    # llama.cpp prints MiB with two decimals.
    assert estimate.weights_bytes / mib == pytest.approx(llama["model"], abs=0.01)
    assert estimate.kv_bytes / mib == pytest.approx(llama["KV"], abs=0.01)
    assert llama["KV"] > 0
    # The compute estimate is an upper bound of llama.cpp's compute buffers.
    assert estimate.compute_bytes / mib >= llama["compute"]


def test_kv_cache_tokens_replace_slots_times_context(tiny_model: Path) -> None:
    shape = read_model_shape(tiny_model)
    full = estimate_vram(shape, n_ctx=1024, slots=8)
    shared = estimate_vram(shape, n_ctx=1024, slots=8, kv_cache_tokens=2048)
    assert shared.kv_bytes * 4 == full.kv_bytes
    assert shared.kv_bytes == estimate_vram(shape, n_ctx=1024, slots=2).kv_bytes


def test_gqa_kv_is_smaller_than_full_attention(gqa_model: Path) -> None:
    shape = read_model_shape(gqa_model)
    full = ModelShape(**{**shape.__dict__, "n_head_kv": shape.n_head})
    assert estimate_vram(shape, n_ctx=4096).kv_bytes * 4 == estimate_vram(full, n_ctx=4096).kv_bytes


_shape = st.builds(
    ModelShape,
    architecture=st.just("llama"),
    weight_bytes=st.integers(1, 10**11),
    n_layers=st.integers(1, 128),
    n_embd=st.integers(64, 16384),
    n_head=st.integers(1, 128),
    n_head_kv=st.integers(1, 128),
    key_length=st.integers(16, 256),
    value_length=st.integers(16, 256),
    context_length=st.integers(256, 131072),
    n_vocab=st.integers(256, 256000),
)


@given(_shape, st.integers(1, 65536), st.integers(1, 8), st.sampled_from(sorted(CACHE_TYPE_BYTES)))
def test_estimate_grows_with_context_and_slots(
    shape: ModelShape, n_ctx: int, slots: int, cache: str
) -> None:
    base = estimate_vram(shape, n_ctx=n_ctx, slots=slots, cache_type=cache)
    # llama.cpp allocates cells in multiples of 256: the estimate never shrinks as either grows,
    # and grows once the cells cross the next multiple.
    assert estimate_vram(shape, n_ctx=n_ctx * 2, slots=slots, cache_type=cache).total_bytes >= (
        base.total_bytes
    )
    assert estimate_vram(shape, n_ctx=n_ctx, slots=slots + 1, cache_type=cache).kv_bytes >= (
        base.kv_bytes
    )
    assert estimate_vram(shape, n_ctx=n_ctx + 256, slots=slots, cache_type=cache).kv_bytes > (
        base.kv_bytes
    )
    assert base.total_bytes >= base.weights_bytes + base.kv_bytes
    assert estimate_vram(shape, n_ctx=n_ctx, slots=slots, cache_type="q4_0").kv_bytes <= (
        estimate_vram(shape, n_ctx=n_ctx, slots=slots, cache_type="f16").kv_bytes
    )


def test_each_device_pays_the_overhead(tiny_model: Path) -> None:
    shape = read_model_shape(tiny_model)
    one = estimate_vram(shape, n_ctx=256, n_devices=1, overhead_bytes_per_device=100)
    two = estimate_vram(shape, n_ctx=256, n_devices=2, overhead_bytes_per_device=100)
    assert two.total_bytes - one.total_bytes == 100


def test_unknown_cache_type_is_refused(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="cache type"):
        estimate_vram(read_model_shape(tiny_model), n_ctx=256, cache_type="q3")

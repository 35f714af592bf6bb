"""The VRAM a model needs on a GPU pool, estimated from its GGUF header before any load. Pure.

The VRAM-only rule: a model runs wholly in VRAM or not at all. So before a worker is started
the need is compared with the free VRAM of the pool's devices, and a model that does not fit is
refused with both numbers, never loaded partly on the CPU.

need = weights (every tensor as stored)
     + KV cache (layers x (key + value width) x cells x bytes per element of the cache type),
       cells = slots x n_ctx (or the pool's kv_cache_tokens) rounded up as llama.cpp rounds them
     + compute buffers (llama.cpp's graph for one micro-batch of ``n_ubatch`` tokens)
     + per-device overhead (CUDA context, cuBLAS workspace) — calibrated on a GPU, see
       docs/operators.md "The VRAM-only rule".
"""

from __future__ import annotations

from dataclasses import dataclass

from poolmanager.worker.engine import N_BATCH, kv_cells
from provisioners.gguf_facts import ModelShape

# Bytes per element of the KV cache types llama.cpp offers (block formats averaged).
CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
}

DEFAULT_OVERHEAD_BYTES = 768 * 1024 * 1024
"""CUDA context, cuBLAS workspace and allocator slack per device: a worker with a 0.5 MB model
took 658 MB on an H200 (CUDA 13), see docs/operators.md."""

N_UBATCH = N_BATCH
"""The worker's micro-batch, which sizes llama.cpp's compute buffers."""


@dataclass(frozen=True)
class VramEstimate:
    """The parts of a model's VRAM need, in bytes."""

    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    kv_cells: int = 0
    """Tokens the KV cache holds (all slots together, padded as llama.cpp pads them)."""

    @property
    def total_bytes(self) -> int:
        """Everything together."""
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes


def estimate_vram(
    shape: ModelShape,
    *,
    n_ctx: int,
    slots: int = 1,
    cache_type: str = "f16",
    n_devices: int = 1,
    overhead_bytes_per_device: int = DEFAULT_OVERHEAD_BYTES,
    kv_cache_tokens: int = 0,
) -> VramEstimate:
    """Estimates the VRAM of a model with ``n_ctx`` tokens of context for each of ``slots``.

    Args:
        shape: the model's header facts.
        n_ctx: context window per slot in tokens (0: the model's trained length).
        slots: sequences decoded at once, each with its own context.
        kv_cache_tokens: cells the slots share instead of ``slots * n_ctx`` (0: that).
        cache_type: KV cache element type (a key of ``CACHE_TYPE_BYTES``).
        n_devices: GPUs the pool spans; each pays the overhead.
        overhead_bytes_per_device: per-device overhead.

    Raises:
        ValueError: an unknown cache type or a non-positive size.
    """
    if cache_type not in CACHE_TYPE_BYTES:
        raise ValueError(f"unknown KV cache type {cache_type!r}")
    if slots < 1 or n_devices < 1 or n_ctx < 0:
        raise ValueError("slots and n_devices must be >= 1, n_ctx >= 0")
    ctx = n_ctx or shape.context_length
    tokens = kv_cells(ctx, slots, kv_cache_tokens)
    kv_width = shape.n_head_kv * (shape.key_length + shape.value_length)
    kv = shape.n_layers * kv_width * tokens * CACHE_TYPE_BYTES[cache_type]
    ubatch = min(N_UBATCH, tokens)
    # The biggest live tensors of one micro-batch: the logits, the attention scores of every
    # head against the whole context, and a few activations of model width (float32).
    compute = 4 * ubatch * (shape.n_vocab + shape.n_head * tokens + 8 * shape.n_embd)
    return VramEstimate(
        weights_bytes=shape.weight_bytes,
        kv_bytes=int(kv),
        compute_bytes=int(compute),
        overhead_bytes=overhead_bytes_per_device * n_devices,
        kv_cells=tokens,
    )

"""The embedded default model: a tiny llama-architecture GGUF with random weights.

Generated from a fixed seed with the ``gguf`` package, so the same spec always gives a
byte-identical file. It is a real llama.cpp model (SPM vocabulary with the 256 byte tokens that
byte fallback needs), just untrained: it produces a salad of English words at thousands of
tokens per second, which is what tests and the relay benchmark need. ``TinyModelSpec.bench()``
gives a ~170 MiB F16 variant that decodes at a realistic engine speed.

It carries a ChatML chat template, and the template's two control tokens ``<|im_start|>`` and
``<|im_end|>`` at the end of the vocabulary, so chat can be tested end to end. Their weights come
from a generator of their own, so every other weight is what it was in the model without them
(outputs of prompts that do not use them are unchanged). Like ``<s>`` they are never sampled, and
generations end at ``</s>``, the EOS token (llama.cpp also counts ``<|im_end|>`` as an
end-of-generation token, by its text).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np

DEFAULT_MODEL_ID = "tiny-llama"

# Word pieces after the byte tokens, so sampled text reads as words rather than raw bytes.
_WORDS = (
    "the of and to in is that it for on was with as be at by this had not are but from or have "
    "an they which one you were all we her she there would their will when who him been has more "
    "if no out so said what up its about than into them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also did "
    "many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three llama model token stream pool queue "
    "orchestrator worker engine fast slow light dark river mountain cloud signal silver quiet"
).split()
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_PUNCT = [".", ",", "!", "?", ";", ":", "'", "-", "(", ")"]
_SUPPRESSED_TYPES = (int(gguf.TokenType.BYTE), int(gguf.TokenType.UNKNOWN))
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
"""The chat template's control tokens, the last ids of the vocabulary."""
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The standard ChatML template (its ``\\n`` are Jinja string escapes, as in the models that use
it)."""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and seed of a generated model."""

    n_layers: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int = 4
    context_length: int = 2048
    dtype: Literal["F32", "F16"] = "F32"
    seed: int = 0
    name: str = DEFAULT_MODEL_ID
    byte_tokens: bool = False
    """Let generation sample the 256 byte tokens too (tests of characters split across
    tokens); by default they are never sampled, and the text reads as words."""
    chat_template: str = CHATML_TEMPLATE
    """``tokenizer.chat_template``; empty for a model without one (no such key)."""
    chat_token_type: gguf.TokenType = gguf.TokenType.CONTROL
    """Token type of ``CHAT_TOKENS``: CONTROL, or USER_DEFINED as some conversions leave them."""

    @classmethod
    def bench(cls) -> TinyModelSpec:
        """~170 MiB F16 model with a realistic decode speed (tens of tokens/s on a CPU core)."""
        return cls(
            n_layers=8,
            n_embd=1024,
            n_ff=2304,
            n_head=16,
            n_head_kv=16,
            dtype="F16",
            seed=1,
            name="bench-170m",
        )

    @classmethod
    def reload_bench(cls) -> TinyModelSpec:
        """~1 GiB F16 model for the reload benchmark and the GPU check."""
        return cls(
            n_layers=12,
            n_embd=2048,
            n_ff=4096,
            n_head=16,
            n_head_kv=16,
            dtype="F16",
            seed=2,
            name="bench-1g",
        )


def vocabulary(
    chat_token_type: gguf.TokenType = gguf.TokenType.CONTROL,
) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and token types of the SPM vocabulary."""
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [
        int(gguf.TokenType.UNKNOWN),
        int(gguf.TokenType.CONTROL),
        int(gguf.TokenType.CONTROL),
    ]
    tokens += [f"<0x{b:02X}>".encode() for b in range(256)]
    types += [int(gguf.TokenType.BYTE)] * 256
    pieces = ["\u2581"] + [f"\u2581{w}" for w in _WORDS] + list(_LETTERS)
    pieces += [f"\u2581{c}" for c in _LETTERS] + _PUNCT + [f"\u2581{p}" for p in _PUNCT]
    seen: set[str] = set()
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece.encode())
            types.append(int(gguf.TokenType.NORMAL))
    # Longer pieces score higher so the SPM tokenizer prefers whole words.
    scores = [0.0] * 259 + [float(len(t)) - 100.0 for t in tokens[259:]]
    tokens += [t.encode() for t in CHAT_TOKENS]
    scores += [0.0] * len(CHAT_TOKENS)
    types += [int(chat_token_type)] * len(CHAT_TOKENS)
    return tokens, scores, types


def write_tiny_model(path: Path, spec: TinyModelSpec | None = None) -> Path:
    """Writes the model to ``path`` atomically (temp file, fsync, rename) and returns ``path``."""
    spec = spec or TinyModelSpec()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = vocabulary(spec.chat_token_type)
    n_vocab = len(tokens)
    n_words = n_vocab - len(CHAT_TOKENS)  # the vocabulary before the chat tokens
    rng = np.random.default_rng(spec.seed)
    chat_rng = np.random.default_rng(spec.seed + 10_000)  # theirs, so `rng` draws as before
    dtype = np.float32 if spec.dtype == "F32" else np.float16
    head_dim = spec.n_embd // spec.n_head
    n_embd_kv = head_dim * spec.n_head_kv

    def dense(rows: int, cols: int, scale: float, gen: np.random.Generator = rng) -> np.ndarray:
        return (gen.standard_normal((rows, cols), dtype=np.float32) * scale).astype(dtype)

    def vocab_rows(scale: float) -> np.ndarray:
        """One row per token: the words' from ``rng``, the chat tokens' from ``chat_rng``."""
        words = dense(n_words, spec.n_embd, scale)
        return np.concatenate([words, dense(len(CHAT_TOKENS), spec.n_embd, scale, chat_rng)])

    def norm() -> np.ndarray:
        return np.ones(spec.n_embd, dtype=np.float32)  # 1-D norms must be F32

    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, "llama")
        writer.add_name(spec.name)
        writer.add_context_length(spec.context_length)
        writer.add_embedding_length(spec.n_embd)
        writer.add_block_count(spec.n_layers)
        writer.add_feed_forward_length(spec.n_ff)
        writer.add_head_count(spec.n_head)
        writer.add_head_count_kv(spec.n_head_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_file_type(
            gguf.LlamaFileType.ALL_F32 if spec.dtype == "F32" else gguf.LlamaFileType.MOSTLY_F16
        )
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        if spec.chat_template:
            writer.add_chat_template(spec.chat_template)

        scale = 1.0 / np.sqrt(spec.n_embd)
        # Dimension 0 of every embedding holds a large constant, so it survives the final norm
        # as a steady positive value; output rows with a negative weight there are never
        # sampled. That keeps byte tokens (and <unk>, <s>, the chat tokens) out of the generated
        # text, which then reads as words instead of broken UTF-8. </s> stays possible, so
        # generations still end.
        embeddings = vocab_rows(1.0)
        embeddings[:, 0] = 8.0
        writer.add_tensor("token_embd.weight", embeddings)
        for i in range(spec.n_layers):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
            writer.add_tensor(f"blk.{i}.attn_q.weight", dense(spec.n_embd, spec.n_embd, scale))
            writer.add_tensor(f"blk.{i}.attn_k.weight", dense(n_embd_kv, spec.n_embd, scale))
            writer.add_tensor(f"blk.{i}.attn_v.weight", dense(n_embd_kv, spec.n_embd, scale))
            writer.add_tensor(f"blk.{i}.attn_output.weight", dense(spec.n_embd, spec.n_embd, scale))
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", dense(spec.n_ff, spec.n_embd, scale))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", dense(spec.n_ff, spec.n_embd, scale))
            writer.add_tensor(
                f"blk.{i}.ffn_down.weight", dense(spec.n_embd, spec.n_ff, 1.0 / np.sqrt(spec.n_ff))
            )
        writer.add_tensor("output_norm.weight", norm())
        # A larger output scale makes the next-token distribution peaked, like a trained model's.
        output = vocab_rows(4.0 * scale)
        output[:, 0] = 0
        kept_out = _SUPPRESSED_TYPES[1:] if spec.byte_tokens else _SUPPRESSED_TYPES
        suppressed = [i for i, t in enumerate(types) if t in kept_out] + [1]
        suppressed += range(n_words, n_vocab)  # the chat tokens
        output[suppressed, 0] = -8.0
        writer.add_tensor("output.weight", output)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path

"""Facts read from a GGUF file's header with the ``gguf`` package (no weights are loaded)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf


class NotAGgufError(ValueError):
    """The file is not a GGUF model llama.cpp could load."""


@dataclass(frozen=True)
class GgufFacts:
    """What the catalog records about a model file."""

    architecture: str
    parameter_count: int
    file_type: str
    context_length: int
    block_count: int
    embedding_length: int


def read_gguf_facts(path: Path) -> GgufFacts:
    """Reads the header of ``path``; raises NotAGgufError when it is not a usable GGUF."""
    if not path.is_file():
        raise NotAGgufError(f"{path} is not a file")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, IndexError) as exc:
        raise NotAGgufError(f"{path} is not a GGUF file: {exc}") from None

    def field(key: str) -> Any:
        value = reader.get_field(key)
        return None if value is None else value.contents()

    arch = field("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise NotAGgufError(f"{path} has no general.architecture")
    context_length = field(f"{arch}.context_length")
    if not isinstance(context_length, int) or context_length <= 0:
        raise NotAGgufError(f"{path} has no {arch}.context_length")
    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name
        file_type_name = file_type_name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        file_type_name = "UNKNOWN" if file_type is None else f"UNKNOWN_{file_type}"
    return GgufFacts(
        architecture=arch,
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        file_type=file_type_name,
        context_length=context_length,
        block_count=int(field(f"{arch}.block_count") or 0),
        embedding_length=int(field(f"{arch}.embedding_length") or 0),
    )


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Lowercase hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelShape:
    """What the VRAM estimate needs from a GGUF header."""

    architecture: str
    weight_bytes: int
    """Bytes of every tensor as stored (the weights llama.cpp puts in VRAM)."""
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int
    """Size of one attention head's key (``{arch}.attention.key_length``, else n_embd/n_head)."""
    value_length: int
    context_length: int
    n_vocab: int


def read_model_shape(path: Path) -> ModelShape:
    """Reads the header of ``path``; raises NotAGgufError when it lacks what an estimate needs."""
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, IndexError) as exc:
        raise NotAGgufError(f"{path} is not a GGUF file: {exc}") from None

    def number(key: str, default: int | None = None) -> int:
        value = reader.get_field(key)
        content = None if value is None else value.contents()
        if isinstance(content, list):  # per-layer values (e.g. head_count_kv): the largest
            content = max((int(v) for v in content), default=None)
        if content is None:
            if default is None:
                raise NotAGgufError(f"{path} has no {key}")
            return default
        return int(content)

    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if not isinstance(arch, str) or not arch:
        raise NotAGgufError(f"{path} has no general.architecture")
    n_embd = number(f"{arch}.embedding_length")
    n_head = max(1, number(f"{arch}.attention.head_count"))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return ModelShape(
        architecture=arch,
        weight_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        n_layers=number(f"{arch}.block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=number(f"{arch}.attention.head_count_kv", n_head),
        key_length=number(f"{arch}.attention.key_length", n_embd // n_head),
        value_length=number(f"{arch}.attention.value_length", n_embd // n_head),
        context_length=number(f"{arch}.context_length"),
        n_vocab=len(tokens.data) if tokens is not None else 0,
    )

"""Facts read from a GGUF file's header with the ``gguf`` package (no weights are loaded)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

_CONTROL = int(gguf.TokenType.CONTROL)
_UNKNOWN = int(gguf.TokenType.UNKNOWN)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)


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
    chat_template: str = ""
    """``tokenizer.chat_template``; empty when the file has none."""
    bos_token: str = ""
    """Text of the token at ``tokenizer.ggml.bos_token_id``; empty when there is none."""
    eos_token: str = ""
    """Text of the token at ``tokenizer.ggml.eos_token_id``; empty when there is none."""
    control_tokens: tuple[str, ...] = ()
    """Texts of the tokens message content could forge, in vocabulary order (see
    ``_control_tokens``)."""


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
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None and tokens.types != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
        tokens = None
    chat_template = _text(reader.get_field("tokenizer.chat_template"))
    bos_token = _token_text(tokens, field("tokenizer.ggml.bos_token_id"))
    eos_token = _token_text(tokens, field("tokenizer.ggml.eos_token_id"))
    return GgufFacts(
        architecture=arch,
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        file_type=file_type_name,
        context_length=context_length,
        block_count=int(field(f"{arch}.block_count") or 0),
        embedding_length=int(field(f"{arch}.embedding_length") or 0),
        chat_template=chat_template,
        bos_token=bos_token,
        eos_token=eos_token,
        control_tokens=_control_tokens(reader, tokens, chat_template, (bos_token, eos_token)),
    )


# Texts are decoded leniently: ``ReaderField.contents()`` decodes strictly and would refuse the
# whole file for one token that is not valid UTF-8 (a few vocabularies have such tokens).
def _text(value: gguf.ReaderField | None) -> str:
    """A string field's text; "" when it is absent or not a string."""
    if value is None or value.types != [gguf.GGUFValueType.STRING]:
        return ""
    return bytes(value.parts[-1]).decode("utf-8", errors="replace")


def _token_text(tokens: gguf.ReaderField | None, token_id: object) -> str:
    """Text of one token of the vocabulary; "" when there is no such token."""
    if tokens is None or not isinstance(token_id, int) or not 0 <= token_id < len(tokens.data):
        return ""
    return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", errors="replace")


def _control_tokens(
    reader: gguf.GGUFReader,
    tokens: gguf.ReaderField | None,
    chat_template: str,
    bos_eos: tuple[str, str],
) -> tuple[str, ...]:
    """Texts of the tokens that message content could forge, in vocabulary order.

    llama.cpp parses CONTROL and UNKNOWN tokens from text when special tokens are parsed (as
    rendered chat prompts are), and USER_DEFINED tokens always. Every CONTROL and UNKNOWN token
    counts. A USER_DEFINED one counts when the chat template writes its text or it is the BOS or
    EOS: some vocabularies mark thousands of ordinary pieces USER_DEFINED (whitespace runs, HTML
    tags), and refusing those in messages would refuse ordinary text, while a turn marker that a
    conversion left USER_DEFINED (ChatML's in some files) is exactly what a template writes.
    """
    types = reader.get_field("tokenizer.ggml.token_type")
    if tokens is None or types is None or types.types[:1] != [gguf.GGUFValueType.ARRAY]:
        return ()
    if len(types.types) != 2 or not types.data or len(types.data) != len(tokens.data):
        return ()
    first = types.parts[types.data[0]]
    if first.dtype.kind not in "iu":
        return ()
    # The types are one contiguous array in the file: one numpy view of it, rather than a Python
    # step per token (a 128k vocabulary: 0.3 ms instead of 30).
    start = types.offset + sum(int(part.nbytes) for part in types.parts[: types.data[0]])
    values = reader.data[start : start + first.nbytes * len(types.data)].view(first.dtype)
    out: list[str] = []
    for i in np.flatnonzero(
        (values == _CONTROL) | (values == _UNKNOWN) | (values == _USER_DEFINED)
    ).tolist():
        text = _token_text(tokens, i)
        if values[i] != _USER_DEFINED or (text and (text in chat_template or text in bos_eos)):
            out.append(text)
    return tuple(out)


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

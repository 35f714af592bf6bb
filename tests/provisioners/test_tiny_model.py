"""Unit tests of provisioners.tiny_model and provisioners.gguf_facts."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from provisioners.gguf_facts import NotAGgufError, read_gguf_facts, sha256_file
from provisioners.tiny_model import TinyModelSpec, vocabulary, write_tiny_model


def test_same_spec_gives_a_byte_identical_file(tmp_path: Path, tiny_model: Path) -> None:
    first = write_tiny_model(tmp_path / "a.gguf")
    second = write_tiny_model(tmp_path / "sub" / "b.gguf")
    assert first == tmp_path / "a.gguf"
    assert second.is_file()
    assert sha256_file(first) == sha256_file(second)
    assert sha256_file(first) == sha256_file(tiny_model)
    assert first.read_bytes() == second.read_bytes()


def test_another_seed_gives_another_file(tmp_path: Path, tiny_model: Path) -> None:
    other = write_tiny_model(tmp_path / "seed1.gguf", TinyModelSpec(seed=1))
    assert sha256_file(other) != sha256_file(tiny_model)
    assert other.stat().st_size == tiny_model.stat().st_size


def test_rewriting_replaces_the_file_and_leaves_no_temp_files(
    tmp_path: Path, tiny_model: Path
) -> None:
    path = tmp_path / "m.gguf"
    write_tiny_model(path, TinyModelSpec(seed=1))
    write_tiny_model(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert sha256_file(path) == sha256_file(tiny_model)


def test_file_is_small(tiny_model: Path) -> None:
    size = tiny_model.stat().st_size
    assert 0 < size < 2 * 1024 * 1024


def test_facts_of_the_default_model(tiny_model: Path) -> None:
    facts = read_gguf_facts(tiny_model)
    assert facts.architecture == "llama"
    assert facts.context_length == 2048
    assert facts.file_type == "F32"
    assert facts.block_count == 2
    assert facts.embedding_length == 64
    n_vocab = len(vocabulary()[0])
    # token_embd + output (n_vocab x 64) + per layer: 4 attention 64x64, 3 ffn 64x128, 2 norms,
    # + the output norm.
    expected = 2 * n_vocab * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert facts.parameter_count == expected


def test_facts_follow_the_spec(tmp_path: Path) -> None:
    path = write_tiny_model(
        tmp_path / "f16.gguf",
        TinyModelSpec(
            n_layers=3, n_embd=32, n_head=2, n_head_kv=2, context_length=512, dtype="F16"
        ),
    )
    facts = read_gguf_facts(path)
    assert facts.context_length == 512
    assert facts.block_count == 3
    assert facts.embedding_length == 32
    assert facts.file_type == "F16"


def test_a_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "not.gguf"
    path.write_bytes(b"this is definitely not a GGUF file" * 10)
    with pytest.raises(NotAGgufError):
        read_gguf_facts(path)


def test_an_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(NotAGgufError):
        read_gguf_facts(path)


def test_a_missing_file_or_a_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(NotAGgufError):
        read_gguf_facts(tmp_path / "missing.gguf")
    with pytest.raises(NotAGgufError):
        read_gguf_facts(tmp_path)


def test_a_truncated_model_is_rejected(tmp_path: Path, tiny_model: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_model.read_bytes()[:64])
    with pytest.raises(NotAGgufError):
        read_gguf_facts(path)


def test_not_a_gguf_error_is_a_value_error() -> None:
    assert issubclass(NotAGgufError, ValueError)


def test_vocabulary_layout() -> None:
    tokens, scores, types = vocabulary()
    assert len(tokens) == len(scores) == len(types)
    assert tokens[:3] == [b"<unk>", b"<s>", b"</s>"]
    assert types[:3] == [
        int(gguf.TokenType.UNKNOWN),
        int(gguf.TokenType.CONTROL),
        int(gguf.TokenType.CONTROL),
    ]
    byte_tokens = tokens[3:259]
    assert byte_tokens == [f"<0x{b:02X}>".encode() for b in range(256)]
    assert byte_tokens[0] == b"<0x00>"
    assert byte_tokens[-1] == b"<0xFF>"
    assert types[3:259] == [int(gguf.TokenType.BYTE)] * 256
    # Every other token is a normal, unique word piece.
    assert len(tokens) > 259
    assert set(types[259:]) == {int(gguf.TokenType.NORMAL)}
    assert len(set(tokens)) == len(tokens)


def test_vocabulary_is_deterministic() -> None:
    assert vocabulary() == vocabulary()

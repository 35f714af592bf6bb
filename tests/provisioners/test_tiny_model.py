"""Unit tests of provisioners.tiny_model and provisioners.gguf_facts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from provisioners.gguf_facts import NotAGgufError, read_gguf_facts, sha256_file
from provisioners.tiny_model import (
    CHAT_TOKENS,
    CHATML_TEMPLATE,
    TinyModelSpec,
    vocabulary,
    write_tiny_model,
)

# The standard ChatML template, spelled out here so that a change to the module's shows.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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


def test_facts_of_the_default_model_include_its_chat_template_and_special_tokens(
    tiny_model: Path,
) -> None:
    facts = read_gguf_facts(tiny_model)
    assert facts.chat_template == CHATML == CHATML_TEMPLATE
    assert facts.bos_token == "<s>"
    assert facts.eos_token == "</s>"
    assert facts.control_tokens == ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")


def test_a_model_without_a_template_reads_as_empty(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "plain.gguf", TinyModelSpec(chat_template=""))
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("tokenizer.chat_template") is None
    facts = read_gguf_facts(path)
    assert facts.chat_template == ""
    assert facts.bos_token == "<s>" and facts.eos_token == "</s>"  # the vocabulary is the same


def _write_gguf(
    path: Path,
    tokens: list[bytes] | None = None,
    types: list[int] | None = None,
    bos: int | None = None,
    eos: int | None = None,
    template: str | None = None,
) -> Path:
    """A model header with only the tokenizer keys given (no real weights)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    if template is not None:
        writer.add_chat_template(template)
    if tokens is not None:
        writer.add_token_list(tokens)
    if types is not None:
        writer.add_token_types(types)
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_model_without_tokenizer_keys_has_empty_tokenizer_facts(tmp_path: Path) -> None:
    facts = read_gguf_facts(_write_gguf(tmp_path / "bare.gguf"))
    assert (facts.chat_template, facts.bos_token, facts.eos_token) == ("", "", "")
    assert facts.control_tokens == ()
    # Ids without a vocabulary, or past its end, name no token.
    facts = read_gguf_facts(_write_gguf(tmp_path / "ids.gguf", bos=1, eos=2))
    assert (facts.bos_token, facts.eos_token) == ("", "")
    facts = read_gguf_facts(
        _write_gguf(tmp_path / "past.gguf", tokens=[b"a", b"b"], types=[1, 1], bos=1, eos=2)
    )
    assert (facts.bos_token, facts.eos_token) == ("b", "")
    assert facts.control_tokens == ()


def test_token_texts_that_are_not_utf8_are_read_with_replacement_characters(
    tmp_path: Path,
) -> None:
    control = int(gguf.TokenType.CONTROL)
    path = _write_gguf(
        tmp_path / "bytes.gguf",
        tokens=[b"<x>", b"\xff<bad>", b"ok", b"<|end|>"],
        types=[control, control, int(gguf.TokenType.NORMAL), control],
        bos=0,
        eos=1,
    )
    facts = read_gguf_facts(path)
    assert facts.bos_token == "<x>"
    assert facts.eos_token == "\ufffd<bad>"
    assert facts.control_tokens == ("<x>", "\ufffd<bad>", "<|end|>")


def test_unknown_tokens_and_the_user_defined_ones_a_template_writes_count_as_control(
    tmp_path: Path,
) -> None:
    """llama.cpp parses CONTROL and UNKNOWN tokens from a rendered prompt, and USER_DEFINED ones
    from any text. The USER_DEFINED ones that count are those the template writes or the BOS/EOS;
    the vocabulary's other USER_DEFINED pieces (whitespace runs, tags) are ordinary text."""
    kinds = {
        "unknown": int(gguf.TokenType.UNKNOWN),
        "control": int(gguf.TokenType.CONTROL),
        "user": int(gguf.TokenType.USER_DEFINED),
        "normal": int(gguf.TokenType.NORMAL),
        "unused": int(gguf.TokenType.UNUSED),
        "byte": int(gguf.TokenType.BYTE),
    }
    vocab = [
        (b"<unk>", "unknown"),
        (b"<bos>", "user"),
        (b"<eos>", "control"),
        (b"<start_of_turn>", "user"),
        (b"<end_of_turn>", "user"),
        (b"<table>", "user"),
        (b"\n\n", "user"),
        (b"hello", "normal"),
        (b"<unused0>", "unused"),
        (b"<0x41>", "byte"),
        (b"<reserved>", "control"),
    ]
    template = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.content }}<end_of_turn>"
    path = _write_gguf(
        tmp_path / "gemma-like.gguf",
        tokens=[t for t, _ in vocab],
        types=[kinds[k] for _, k in vocab],
        bos=1,
        eos=2,
        template=template + "{% endfor %}",
    )
    facts = read_gguf_facts(path)
    assert facts.control_tokens == (
        "<unk>",
        "<bos>",
        "<eos>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<reserved>",
    )
    # Without a template only the BOS/EOS of the USER_DEFINED ones count.
    plain = _write_gguf(
        tmp_path / "plain.gguf",
        tokens=[t for t, _ in vocab],
        types=[kinds[k] for _, k in vocab],
        bos=1,
        eos=2,
    )
    assert read_gguf_facts(plain).control_tokens == ("<unk>", "<bos>", "<eos>", "<reserved>")


def test_a_model_whose_chat_tokens_are_user_defined_records_them_and_llama_cpp_parses_them(
    tmp_path: Path,
) -> None:
    path = write_tiny_model(
        tmp_path / "user-defined.gguf",
        TinyModelSpec(chat_token_type=gguf.TokenType.USER_DEFINED),
    )
    assert read_gguf_facts(path).control_tokens == (
        "<unk>",
        "<s>",
        "</s>",
        "<|im_start|>",
        "<|im_end|>",
    )
    llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        n_vocab = len(vocabulary()[0])
        # USER_DEFINED tokens are parsed from text even without special parsing: message content
        # holding one would forge a turn whatever the worker did, so the catalog names them.
        for special in (True, False):
            assert llama.tokenize(b"<|im_start|>", add_bos=False, special=special) == [
                n_vocab - len(CHAT_TOKENS)
            ]
    finally:
        llama.close()


def test_the_chat_tokens_are_single_control_tokens_to_llama_cpp(tiny_model: Path) -> None:
    """With special parsing each chat token is its one id (the last two of the vocabulary);
    without, the text is split into pieces. llama.cpp takes <|im_end|> for the end-of-turn token
    by its text, so it ends a generation as </s> does."""
    llama = llama_cpp.Llama(str(tiny_model), vocab_only=True, verbose=False)
    try:
        n_vocab = len(vocabulary()[0])
        ids = {text: n_vocab - len(CHAT_TOKENS) + i for i, text in enumerate(CHAT_TOKENS)}
        for text, token in ids.items():
            assert llama.tokenize(text.encode(), add_bos=False, special=True) == [token]
            assert len(llama.tokenize(text.encode(), add_bos=False, special=False)) > 3
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        assert llama_cpp.llama_vocab_n_tokens(vocab) == n_vocab
        eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        assert eog == [2, ids["<|im_end|>"]]
        assert llama_cpp.llama_vocab_eos(vocab) == 2
    finally:
        llama.close()


def _words_digest(path: Path) -> str:
    """SHA-256 of every tensor, without the chat tokens' rows."""
    n_words = len(vocabulary()[0]) - len(CHAT_TOKENS)
    digest = hashlib.sha256()
    for tensor in gguf.GGUFReader(str(path)).tensors:
        data = np.asarray(tensor.data)
        if tensor.name in ("token_embd.weight", "output.weight"):
            assert data.shape[0] == n_words + len(CHAT_TOKENS)
            data = data[:n_words]
        digest.update(tensor.name.encode())
        digest.update(data.tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (TinyModelSpec(), "520ddec2b8ab6cf142362108656d2dca931dcf1730d7dcfe815db93706bff215"),
        (
            TinyModelSpec(byte_tokens=True, seed=3),
            "c86654d6f0ededd4a03e33521efe3bce8fa266f5e340783aa4ff677367e40bd7",
        ),
    ],
)
def test_the_weights_of_the_words_are_those_from_before_the_chat_tokens(
    tmp_path: Path, spec: TinyModelSpec, expected: str
) -> None:
    """The digests of the models as they were before the chat tokens: greedy outputs of prompts
    without them stay what they were. (A numpy release that changed its generators' streams
    would change them, and the outputs, too.)"""
    path = write_tiny_model(tmp_path / "m.gguf", spec)
    assert _words_digest(path) == expected
    reader = gguf.GGUFReader(str(path))
    for name, dim0 in (("token_embd.weight", 8.0), ("output.weight", -8.0)):
        rows = np.asarray(next(t for t in reader.tensors if t.name == name).data)
        assert rows[-len(CHAT_TOKENS) :, 0].tolist() == [dim0] * len(CHAT_TOKENS)


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
    # Then normal, unique word pieces, and the chat tokens last.
    n_chat = len(CHAT_TOKENS)
    assert len(tokens) > 259 + n_chat
    assert set(types[259:-n_chat]) == {int(gguf.TokenType.NORMAL)}
    assert tokens[-n_chat:] == [b"<|im_start|>", b"<|im_end|>"]
    assert types[-n_chat:] == [int(gguf.TokenType.CONTROL)] * n_chat
    assert scores[-n_chat:] == [0.0] * n_chat
    assert len(set(tokens)) == len(tokens)


def test_vocabulary_is_deterministic() -> None:
    assert vocabulary() == vocabulary()

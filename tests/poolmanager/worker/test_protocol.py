"""The worker protocol: every message survives its one encode/decode, and bad lines are refused
as a whole."""

from __future__ import annotations

import pytest

from poolmanager.worker.protocol import (
    Cancel,
    Cancelled,
    Done,
    Execute,
    Failed,
    Load,
    LoadFailed,
    LoadSpec,
    ProtocolError,
    Ready,
    Spare,
    Tokens,
    decode_command,
    decode_event,
    encode,
)

COMMANDS = [
    Execute(
        id="e1",
        prompt="Hello ✓\n",
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=2**32 - 1,
        stop=("END", "\n\n"),
        ignore_eos=True,
        max_tokens_defaulted=True,
        correlation_id="c",
        traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
    ),
    Execute(id="e2", prompt="", max_tokens=1),
    Cancel("e1"),
    Load(LoadSpec(model="/m.gguf", slots=8, tensor_split=(0.5, 0.5), gpu=True, cache_type="q8_0")),
]
EVENTS = [
    Spare(warm_ms=12.5, gpus=2),
    Ready(
        engine_version="llama-cpp-python/0.3.36",
        n_ctx=2048,
        slots=4,
        kv_cache_tokens=8192,
        n_batch=512,
        n_vocab=496,
        load_ms=7.0,
        gpu_offload=False,
    ),
    LoadFailed("no such file", refused=True),
    Tokens("e1", 3, (5, 6, 7), "a€b"),
    Done(
        id="e1",
        reason="stop_sequence",
        tokens_in=4,
        tokens_out=9,
        ttft_ms=1.5,
        decode_ms=20.0,
        started_ns=1,
        first_token_ns=2,
        ended_ns=3,
        queue_ms=0.5,
    ),
    Cancelled("e1"),
    Failed(id="e1", code="UNAVAILABLE", message="full", reason="CONTEXT_FULL"),
    Failed(id="e1", code="INVALID_ARGUMENT", message="too long", field="prompt"),
]


@pytest.mark.parametrize("message", COMMANDS, ids=lambda m: type(m).__name__)
def test_commands_round_trip(message: object) -> None:
    line = encode(message)  # type: ignore[arg-type]
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the prompt
    assert decode_command(line) == message


@pytest.mark.parametrize("message", EVENTS, ids=lambda m: type(m).__name__)
def test_events_round_trip(message: object) -> None:
    line = encode(message)  # type: ignore[arg-type]
    assert line.count(b"\n") == 1
    assert decode_event(line) == message


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"{}",
        b'{"type": "nope", "id": "x"}',
        b'{"type": "exec", "id": "x"}',  # prompt and max_tokens missing
        b'{"type": "exec", "id": "x", "prompt": "p", "max_tokens": "8"}',  # wrong type
        b'{"type": "cancel"}',
    ],
)
def test_a_bad_command_is_refused_whole(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_command(line)


def test_an_event_is_not_a_command_and_back() -> None:
    with pytest.raises(ProtocolError):
        decode_command(encode(Cancelled("x")))
    with pytest.raises(ProtocolError):
        decode_event(encode(Cancel("x")))
    with pytest.raises(ProtocolError):
        decode_event(b'{"type": "error", "id": "x", "code": "TEAPOT", "message": "m"}')

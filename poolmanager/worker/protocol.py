"""What the pool manager and a worker process say to each other: typed commands and events.

Both sides import this module and nothing else of the other. Messages travel as JSON lines
(one object a line): commands on the worker's stdin, events on its original stdout. Each
message is a ``msgspec.Struct`` tagged by its ``type`` field, and ``encode`` / ``decode_command``
/ ``decode_event`` are the only way in and out, so a field is named and typed in one place and a
malformed line is refused as a whole (``ProtocolError``) instead of surfacing as a ``KeyError``
deep in either side.

EOF on stdin means the pool manager is gone: the worker exits. A worker that dies shows up as
EOF on its stdout.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# ----- what a worker loads ------------------------------------------------------------------------

CacheType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class LoadSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How a worker loads its model and sizes its context; the command line of
    ``python -m poolmanager.worker`` and a spare's ``Load`` carry the same fields."""

    model: str
    """GGUF file to load."""
    n_ctx: int = 0
    """Context of each execution in tokens (prompt + generated); 0: the model's trained length."""
    slots: int = 1
    """Sequences decoded at once (llama.cpp's ``n_seq_max``)."""
    kv_cache_tokens: int = 0
    """Cells of the KV cache all sequences share; 0: ``slots * n_ctx``, so every execution
    always fits. Fewer saves memory; when running sequences together outgrow it, the youngest
    ends retriably (``CONTEXT_FULL``)."""
    prefill_chunk_tokens: int = 256
    """Most prompt tokens decoded in one step while other sequences are generating (a lone
    prompt takes the whole batch): bounds how long a long prompt holds the others up."""
    prefix_cache_entries: int = 16
    """Finished sequences kept resident in the KV cache for prompts that start the same way
    (sequence ids beyond ``slots``; their cells are the cache's free cells, given up when
    running sequences need them). 0: off."""
    n_threads: int = 0
    """CPU threads for decoding; 0: half the machine's cores."""
    gpu: bool = False
    """Offload every layer to the visible GPUs (the VRAM-only rule: none may stay on the CPU)."""
    tensor_split: tuple[float, ...] = ()
    """Shares of the visible GPUs (empty: llama.cpp's default split)."""
    cache_type: CacheType = "f16"
    """Element type of the KV cache."""
    log_level: LogLevel = "INFO"
    """Lowest level the worker logs (JSON lines on stderr)."""
    token_batch_ms: float = 4.0
    """Longest a generated token waits to travel with the ones after it (first tokens never)."""


# ----- commands: pool manager -> worker ---------------------------------------------------------


class Load(msgspec.Struct, frozen=True, tag="load", tag_field="type"):
    """A spare worker loads a model; from then on it is an ordinary worker."""

    spec: LoadSpec


class Execute(msgspec.Struct, frozen=True, kw_only=True, tag="exec", tag_field="type"):
    """One generation. Sampling was validated by the pool manager; the worker checks what
    only it can (the prompt's tokens against the context)."""

    id: str
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    max_tokens_defaulted: bool = False
    """max_tokens came from a default: shorten it to fit the context instead of refusing."""
    templated: bool = False
    """The prompt is a rendered chat template: special-token text is read as the tokens, and
    no BOS is added (the template writes its own)."""
    grammar: str = ""
    """GBNF (root rule ``root``) every sampled token must follow; empty for none."""
    correlation_id: str = ""
    traceparent: str = ""
    """W3C traceparent of the pool manager's span, for the worker's log lines."""


class Cancel(msgspec.Struct, frozen=True, tag="cancel", tag_field="type"):
    """Stop an execution (queued or running); it ends with ``Cancelled`` and its cells are
    freed at once."""

    id: str


Command = Load | Execute | Cancel

# ----- events: worker -> pool manager ------------------------------------------------------------


class Spare(msgspec.Struct, frozen=True, tag="spare", tag_field="type"):
    """A spare is warm (engine started, GPUs' CUDA contexts created) and waits for ``Load``."""

    warm_ms: float
    gpus: int


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag="ready", tag_field="type"):
    """The model is loaded and the context allocated."""

    engine_version: str
    n_ctx: int
    """Context of each execution, in tokens."""
    slots: int
    """Sequences the context decodes at once."""
    kv_cache_tokens: int
    """Cells of the KV cache, as llama.cpp allocated them (padded)."""
    n_batch: int
    """Most tokens one decode takes."""
    n_vocab: int
    load_ms: float
    gpu_offload: bool


class LoadFailed(msgspec.Struct, frozen=True, tag="load_failed", tag_field="type"):
    """The model could not be loaded; ``refused``: a restart cannot help (the VRAM-only rule)."""

    message: str
    refused: bool = False


class Tokens(msgspec.Struct, frozen=True, tag="tok", tag_field="type"):
    """Consecutive tokens of an execution starting at ``index``, with their text (UTF-8
    complete: a token ending mid-character travels with the ones that complete it)."""

    id: str
    index: int
    ids: tuple[int, ...]
    text: str


FinishReason = Literal["stop", "stop_sequence", "length"]


class Done(msgspec.Struct, frozen=True, kw_only=True, tag="done", tag_field="type"):
    """An execution ended normally."""

    id: str
    reason: FinishReason
    tokens_in: int
    tokens_out: int
    ttft_ms: float
    """From admission into a slot to the first token."""
    decode_ms: float
    started_ns: int
    """Wall time (ns) the prompt began to load, the first token came, it ended."""
    first_token_ns: int
    ended_ns: int
    queue_ms: float = 0.0
    """How long it waited in the worker for a free slot."""
    tokens_cached: int = 0
    """Prompt tokens whose cells came from the prefix cache (not read again)."""


class Cancelled(msgspec.Struct, frozen=True, tag="cancelled", tag_field="type"):
    """An execution ended by ``Cancel`` (or the pool manager going away)."""

    id: str


class CacheState(msgspec.Struct, frozen=True, kw_only=True, tag="cache", tag_field="type"):
    """What the prefix cache holds, sent when it changes: its entries, the cells they hold
    (shared cells counted once per entry) and the chained block hashes (mesh.prefix) of the
    text of the entries and the running prompts, at most ``MAX_SUMMARY_HASHES``."""

    entries: int
    cells: int
    block_hashes: tuple[int, ...] = ()
    prefill_ms_per_token: float = 0.0
    """What reading one prompt token costs on this pool now (0: not measured yet)."""


ErrorCode = Literal["INVALID_ARGUMENT", "UNAVAILABLE", "INTERNAL"]


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag="error", tag_field="type"):
    """An execution ended with an error: INVALID_ARGUMENT names ``field``; UNAVAILABLE is
    retriable and says why in ``reason`` (``CONTEXT_FULL``)."""

    id: str
    code: ErrorCode
    message: str
    field: str = ""
    reason: str = ""


Event = Spare | Ready | LoadFailed | Tokens | Done | Cancelled | Failed | CacheState

TERMINAL = (Done, Cancelled, Failed)
"""Events after which an execution says nothing more."""


class ProtocolError(ValueError):
    """A line that is not a valid command or event."""


_encoder = msgspec.json.Encoder()
_commands = msgspec.json.Decoder(Command)
_events = msgspec.json.Decoder(Event)


def encode(message: Command | Event) -> bytes:
    """One message as a JSON line (newline included)."""
    return _encoder.encode(message) + b"\n"


def decode_command(line: bytes) -> Command:
    """A command line from the pool manager.

    Raises:
        ProtocolError: not a valid command.
    """
    try:
        return _commands.decode(line)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad command: {exc}") from None


def decode_event(line: bytes) -> Event:
    """An event line from a worker.

    Raises:
        ProtocolError: not a valid event.
    """
    try:
        return _events.decode(line)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad event: {exc}") from None

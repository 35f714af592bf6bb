"""llama.cpp through llama-cpp-python's low-level API: one model, one context of many sequences.

``LlamaEngine`` is the only module of the worker that calls llama.cpp. It loads the model with
every layer on the GPUs (or none, on a CPU pool), builds one context with ``n_seq_max`` = slots
and a unified KV cache of ``slots * n_ctx`` cells (``llama_init_from_model``; ``Llama`` cannot,
it is one sequence per context), and offers what the batching loop needs: tokenize, token
pieces, one batch, one decode, a sampler chain per sequence, and freeing a sequence's cells.

Several misuses of these calls abort the whole process (SIGABRT, no Python exception). Each is
guarded here and raises ``EngineMisuse`` instead:
- more tokens in one batch than ``n_batch``;
- sampling a batch index whose logits were not requested;
- a sequence id outside ``[0, n_seq_max)``, or a token whose position is not the next one of its
  sequence.

Every call must come from one thread (ctypes releases the GIL during each).
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from poolmanager.worker.protocol import LoadSpec

# ggml type ids of the KV cache types (ggml.h).
CACHE_TYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "bf16": 30,
}

N_BATCH = 512
"""Most tokens one decode takes (llama.cpp's ``n_batch`` and ``n_ubatch``; the VRAM estimate
sizes the compute buffers for it)."""

KV_PAD = 256
"""llama.cpp rounds the context's cells up to a multiple of this."""

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5
_LAYER_DEVICE = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")


class EngineError(Exception):
    """The model or its context could not be created."""


class EngineMisuse(Exception):
    """A call that would have aborted the process in llama.cpp (a bug of the caller)."""


class GrammarError(ValueError):
    """llama.cpp could not parse a grammar (its log says where)."""


class GrammarDeadEnd(Exception):
    """A sequence's grammar allows none of the vocabulary's tokens next: sampling would have
    aborted the process in llama.cpp. The sequence cannot go on; the others can."""


class EngineLog:
    """Collects llama.cpp's log lines while a model loads (they say where each layer went),
    then passes on only warnings and errors. The callback object must outlive the engine:
    llama.cpp calls it until the process ends, and a freed callback crashes the process at
    exit, so one instance is made per process and kept (``EngineLog.install``)."""

    _installed: EngineLog | None = None

    def __init__(self) -> None:
        import llama_cpp

        self.loading = False
        self.lines: list[str] = []
        self._last_level = 0

        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def callback(level: int, text: bytes, user_data: Any) -> None:
            if level == _LOG_CONT:  # the rest of the previous line
                level = self._last_level
            self._last_level = level
            if self.loading:
                self.lines.append(text.decode("utf-8", "replace"))
            elif level in (_LOG_WARN, _LOG_ERROR):
                sys.stderr.write(text.decode("utf-8", "replace"))

        self._callback = callback
        llama_cpp.llama_log_set(callback, None)

    @classmethod
    def install(cls) -> EngineLog:
        """The process's one log (made on first use)."""
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed

    def cpu_layers(self) -> list[int]:
        """Layers the last load placed on the CPU (a GPU pool must have none)."""
        text = "".join(self.lines)
        return [int(m[1]) for m in _LAYER_DEVICE.finditer(text) if m[2].startswith("CPU")]


def engine_version() -> str:
    """Engine name and version, e.g. ``llama-cpp-python/0.3.36``."""
    import llama_cpp

    return f"llama-cpp-python/{llama_cpp.__version__}"


def default_threads() -> int:
    """Threads when the pool leaves it to us: half the cores (the rest of the machine, the pool
    manager and other pools, needs the others)."""
    return max(1, (os.cpu_count() or 2) // 2)


def kv_cells(n_ctx: int, slots: int, kv_cache_tokens: int = 0) -> int:
    """Cells llama.cpp allocates for ``slots`` sequences of ``n_ctx`` (or ``kv_cache_tokens``
    when set), padded as it pads them."""
    wanted = kv_cache_tokens or n_ctx * slots
    return -(-wanted // KV_PAD) * KV_PAD


@dataclass
class _SeqPos:
    """Next position of a sequence in the cache, for the in-order guard."""

    next_pos: int = 0


class LlamaEngine:
    """One model and its one context; see the module docstring."""

    def __init__(self, spec: LoadSpec) -> None:
        """Loads ``spec.model`` and builds the context.

        Raises:
            EngineError: the file is missing or not a model, the context cannot be built, or
                llama.cpp gave fewer sequences or cells than asked for.
        """
        import llama_cpp

        self._ll = llama_cpp
        llama_cpp.llama_backend_init()
        if not os.path.isfile(spec.model):
            raise EngineError(f"model file {spec.model} does not exist")
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0x7FFFFFFF if spec.gpu else 0  # every layer, or none
        self._split = None
        if spec.tensor_split:
            if len(spec.tensor_split) > llama_cpp.LLAMA_MAX_DEVICES:
                raise EngineError(
                    f"tensor_split has {len(spec.tensor_split)} shares; llama.cpp takes at most "
                    f"{llama_cpp.LLAMA_MAX_DEVICES}"
                )
            self._split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*spec.tensor_split)
            mparams.tensor_split = self._split
        model = llama_cpp.llama_model_load_from_file(spec.model.encode(), mparams)
        if not model:
            raise EngineError(f"{spec.model} is not a model llama.cpp can load")
        self._model = model
        self._ctx: Any = None
        self._batch: Any = None
        try:
            self._build_context(spec)
        except BaseException:
            self.close()
            raise

    def _build_context(self, spec: LoadSpec) -> None:
        ll = self._ll
        self.vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self._candidates: Any = None  # the grammar path's token array, made on first use
        self._all_ids: Any = None
        self.n_ctx = spec.n_ctx or int(ll.llama_model_n_ctx_train(self._model))
        """Context of each execution (prompt + generated tokens)."""
        most = int(ll.llama_max_parallel_sequences())
        if not 1 <= spec.slots <= most:
            raise EngineError(f"slots must be in [1, {most}] (llama.cpp's most sequences)")
        if spec.kv_cache_tokens and spec.kv_cache_tokens < self.n_ctx:
            raise EngineError(
                f"kv_cache_tokens ({spec.kv_cache_tokens}) must hold at least one context "
                f"({self.n_ctx} tokens)"
            )
        cells = kv_cells(self.n_ctx, spec.slots, spec.kv_cache_tokens)
        threads = spec.n_threads or default_threads()
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cells
        cparams.n_batch = N_BATCH
        cparams.n_ubatch = N_BATCH
        self.prefix_cache_supported = not (
            ll.llama_model_is_recurrent(self._model)
            or ll.llama_model_is_hybrid(self._model)
            or int(ll.llama_model_n_swa(self._model)) > 0
        )
        """Cells can be shared between sequences and cut at a position: not so for recurrent
        state or a sliding window (llama-server turns its prompt cache off for those too)."""
        spare_ids = spec.prefix_cache_entries if self.prefix_cache_supported else 0
        n_seq = min(spec.slots + max(0, spare_ids), most)
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        # Prompts use as many threads as decoding: more would wait on cores that the rest of
        # the machine (the pool manager, other pools) is using.
        cparams.n_threads_batch = threads
        # One cache for every sequence: busy sequence ids need not be contiguous (split caches
        # decode gaps as separate micro-batches, 3.5x slower) and a sequence may use any cell.
        cparams.kv_unified = True
        cparams.type_k = CACHE_TYPES[spec.cache_type]
        cparams.type_v = CACHE_TYPES[spec.cache_type]
        cparams.no_perf = True
        ctx = ll.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise EngineError(
                f"llama.cpp could not build a context of {cells} cells for {spec.slots} "
                "sequences (out of memory?)"
            )
        self._ctx = ctx
        self.kv_cache_tokens = int(ll.llama_n_ctx(ctx))
        self.n_seq_ids = int(ll.llama_n_seq_max(ctx))
        """Sequence ids of the context: ``slots`` to run on, the rest for the prefix cache."""
        self.slots = spec.slots
        """Sequences decoded at once."""
        self.n_batch = int(ll.llama_n_batch(ctx))
        if self.n_seq_ids < n_seq or self.kv_cache_tokens < cells or self.n_batch < spec.slots:
            raise EngineError(
                f"llama.cpp gave {self.n_seq_ids} sequences, {self.kv_cache_tokens} cells and a "
                f"batch of {self.n_batch} for {n_seq} sequences of {cells} cells"
            )
        self._mem = ll.llama_get_memory(ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self._n = 0
        self._logits_at: set[int] = set()
        self._pos = [_SeqPos() for _ in range(self.n_seq_ids)]
        self.eog_tokens = tuple(
            t for t in range(self.n_vocab) if ll.llama_vocab_is_eog(self.vocab, t)
        )
        self._piece_buf = ctypes.create_string_buffer(64)

    def close(self) -> None:
        """Frees the batch, the context and the model (idempotent)."""
        ll = self._ll
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            ll.llama_model_free(self._model)
            self._model = None

    # ----- text -----------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokens of ``text``. Special-token text (``<|im_start|>``) is taken literally unless
        ``special``, which reads it as those tokens (for a rendered chat template)."""
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            out = (self._ll.llama_token * size)()
            n = self._ll.llama_tokenize(self.vocab, data, len(data), out, size, add_bos, special)
            if n >= 0:
                return list(out[:n])
            size = -n
        raise EngineMisuse("llama_tokenize did not settle on a size")

    def piece(self, token: int) -> bytes:
        """The bytes of one token (``llama_token_to_piece`` returns their count; longer pieces
        get a bigger buffer)."""
        buf = self._piece_buf
        n = self._ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (any EOG token of the vocabulary)."""
        return bool(self._ll.llama_vocab_is_eog(self.vocab, token))

    # ----- samplers -------------------------------------------------------------------------

    def sampler(
        self,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int,
        ignore_eos: bool,
        grammar: str = "",
    ) -> Sampler:
        """A sampler chain of its own for one sequence: temperature 0 is greedy; otherwise
        top_k (0: off), top_p (1: off), temperature, then a seeded draw. ``ignore_eos`` bans
        every EOG token with a -inf logit bias, as llama.cpp does. A ``grammar`` (GBNF, root
        rule ``root``) comes first, so the others choose among the tokens it allows; once it is
        complete it allows only EOG tokens (never combine it with ``ignore_eos``: nothing would
        be left to sample). The grammar is kept out of the chain, so that ``sample`` can see
        that it allowed no token before llama.cpp would abort on it.

        Raises:
            GrammarError: llama.cpp could not parse ``grammar``.
            EngineMisuse: ``grammar`` together with ``ignore_eos``.
        """
        ll = self._ll
        if grammar and ignore_eos:
            raise EngineMisuse("a grammar cannot be combined with ignore_eos")
        constraint = None
        if grammar:
            constraint = ll.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
            if not constraint:
                raise GrammarError("llama.cpp could not parse the grammar")
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if ignore_eos and self.eog_tokens:
            biases = (ll.llama_logit_bias * len(self.eog_tokens))(
                *((t, float("-inf")) for t in self.eog_tokens)
            )
            ll.llama_sampler_chain_add(
                chain, ll.llama_sampler_init_logit_bias(self.n_vocab, len(biases), biases)
            )
        if temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(top_k))
            if top_p < 1:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return Sampler(self, chain, constraint)

    def sample(self, sampler: Sampler, batch_index: int) -> int:
        """Samples (and accepts) the next token from the logits of ``batch_index`` of the last
        decode.

        Raises:
            EngineMisuse: no logits were asked for at that index.
            GrammarDeadEnd: the sequence's grammar allows no token (nothing was accepted).
        """
        if batch_index not in self._logits_at:
            raise EngineMisuse(f"no logits at batch index {batch_index}")
        if sampler.grammar is None:
            return int(self._ll.llama_sampler_sample(sampler.handle, self._ctx, batch_index))
        return self._sample_constrained(sampler, batch_index)

    def _sample_constrained(self, sampler: Sampler, batch_index: int) -> int:
        """``llama_sampler_sample`` in its steps, with the grammar applied on its own first: a
        grammar that rejects every token leaves every logit -inf, and llama.cpp would then
        accept an arbitrary token and abort on the grammar's empty stack."""
        ll = self._ll
        if self._candidates is None:
            self._candidates = np.zeros(
                self.n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)]
            )
            self._all_ids = np.arange(self.n_vocab, dtype=np.int32)
        cand = self._candidates
        logits = ll.llama_get_logits_ith(self._ctx, batch_index)
        cand["id"] = self._all_ids
        cand["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        cand["p"] = 0.0
        array = ll.llama_token_data_array(
            data=cand.ctypes.data_as(ll.llama_token_data_p),
            size=self.n_vocab,
            selected=-1,
            sorted=False,
        )
        ll.llama_sampler_apply(sampler.grammar, ctypes.byref(array))
        if not np.isfinite(cand["logit"][: array.size]).any():
            raise GrammarDeadEnd("the grammar allows no token here")
        ll.llama_sampler_apply(sampler.handle, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise EngineMisuse(f"the sampler chain selected {array.selected} of {array.size}")
        token = int(cand["id"][array.selected])
        ll.llama_sampler_accept(sampler.grammar, token)
        ll.llama_sampler_accept(sampler.handle, token)
        return token

    def logits(self, batch_index: int) -> Any:
        """The raw logits of ``batch_index`` of the last decode: a ctypes float pointer,
        ``n_vocab`` long, valid until the next decode (for checks and measurements; the
        samplers read them in place).

        Raises:
            EngineMisuse: no logits were asked for at that index.
        """
        if batch_index not in self._logits_at:
            raise EngineMisuse(f"no logits at batch index {batch_index}")
        return self._ll.llama_get_logits_ith(self._ctx, batch_index)

    # ----- the batch ------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Tokens in the batch being built."""
        return self._n

    def clear_batch(self) -> None:
        """Starts a new batch."""
        self._n = 0
        self._logits_at = set()

    def add(self, seq_id: int, token: int, pos: int, *, logits: bool) -> int:
        """Adds a token of sequence ``seq_id`` at ``pos``; returns its batch index.

        Raises:
            EngineMisuse: the batch is full, the sequence id is out of range, or ``pos`` is not
                the sequence's next position.
        """
        if self._n >= self.n_batch:
            raise EngineMisuse(f"a batch holds at most {self.n_batch} tokens")
        self._check_id(seq_id)
        seq = self._pos[seq_id]
        if pos != seq.next_pos:
            raise EngineMisuse(f"sequence {seq_id} is at position {seq.next_pos}, not {pos}")
        seq.next_pos += 1
        batch, i = self._batch, self._n
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits
        if logits:
            self._logits_at.add(i)
        self._n = i + 1
        return i

    def decode(self) -> int:
        """Decodes the batch in one ``llama_decode``: 0 done; 1 no room in the KV cache (the
        cache is as before, and the batch's positions are given back); other codes are
        failures (the batch's positions are given back too)."""
        batch = self._batch
        batch.n_tokens = self._n
        code = int(self._ll.llama_decode(self._ctx, batch))
        if code != 0:
            self._rewind()
        return code

    def _rewind(self) -> None:
        """Gives back the positions of the tokens of a batch that was not decoded."""
        batch = self._batch
        for i in range(self._n - 1, -1, -1):
            self._pos[batch.seq_id[i][0]].next_pos = min(
                self._pos[batch.seq_id[i][0]].next_pos, batch.pos[i]
            )
        self._logits_at = set()

    # ----- cells ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Frees every cell of every sequence."""
        self._ll.llama_memory_clear(self._mem, True)
        for pos in self._pos:
            pos.next_pos = 0

    def _check_id(self, seq_id: int) -> None:
        if not 0 <= seq_id < self.n_seq_ids:
            raise EngineMisuse(f"sequence id {seq_id} is outside [0, {self.n_seq_ids})")

    def free_sequence(self, seq_id: int) -> None:
        """Frees every cell of a sequence at once; the id can be used again from position 0."""
        self._check_id(seq_id)
        self._ll.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        self._pos[seq_id].next_pos = 0

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Gives empty sequence ``dst`` the cells of positions 0..n-1 of ``src`` (in the unified
        cache: the same cells, now shared; nothing is computed). ``dst`` goes on at ``n``.

        Raises:
            EngineMisuse: an id is out of range or the same, ``dst`` is not empty, ``src`` holds
                fewer than ``n`` cells, or the model cannot share cells.
        """
        self._check_id(src)
        self._check_id(dst)
        if not self.prefix_cache_supported:
            raise EngineMisuse("this model's memory cannot share cells between sequences")
        if src == dst or self._pos[dst].next_pos != 0 or not 0 < n <= self._pos[src].next_pos:
            raise EngineMisuse(f"cannot copy {n} cells of sequence {src} to sequence {dst}")
        self._ll.llama_memory_seq_cp(self._mem, src, dst, 0, n)
        self._pos[dst].next_pos = n

    def cells_used(self, seq_id: int) -> int:
        """Cells a sequence holds (its positions are 0..n-1)."""
        return int(self._ll.llama_memory_seq_pos_max(self._mem, seq_id)) + 1


class Sampler:
    """One sequence's sampler chain, and its grammar beside it; ``free()`` it when the sequence
    ends."""

    def __init__(self, engine: LlamaEngine, handle: Any, grammar: Any = None) -> None:
        self._engine = engine
        self.handle = handle
        self.grammar = grammar

    def free(self) -> None:
        """Frees the chain, every sampler in it and the grammar (idempotent)."""
        if self.handle is not None:
            self._engine._ll.llama_sampler_free(self.handle)
            self.handle = None
        if self.grammar is not None:
            self._engine._ll.llama_sampler_free(self.grammar)
            self.grammar = None

"""Continuous batching: every running sequence of a pool advances in one ``llama_decode`` a step.

``BatchEngine.step()`` does, in order:
1. applies cancels: a cancelled sequence's cells are freed at once (a queued one just leaves);
2. admits waiting executions, in arrival order, while a slot is free and the KV cache has room
   for the prompt;
3. builds one batch: one token for every generating sequence, then prompt chunks of the
   sequences still reading their prompt, at most ``prefill_chunk_tokens`` of them while any
   sequence generates (a prompt alone takes the whole batch), never more than ``n_batch`` in all;
4. calls ``llama_decode`` once;
5. samples every sequence that asked for logits with its own sampler chain, streams its text,
   and ends those that are done.

New executions join between steps; nothing waits for the batch to drain. Each execution's
prompt plus max_tokens fits its ``n_ctx`` (checked at admission), and the cache has
``slots * n_ctx`` cells unless the pool chose fewer, so the cache is full only when it was made
smaller: then ``llama_decode`` returns 1, prompt chunks wait a step, and if generating tokens
alone do not fit the youngest sequence ends UNAVAILABLE (``CONTEXT_FULL``, retriable) until the
rest fit. The others go on.

Synchronous and single-threaded; all llama.cpp calls go through ``LlamaEngine``.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from mesh.prefix import prefix_block_hashes
from poolmanager.worker import log
from poolmanager.worker.engine import (
    EngineMisuse,
    GrammarDeadEnd,
    GrammarError,
    LlamaEngine,
    Sampler,
)
from poolmanager.worker.prefix import MIN_REUSE_TOKENS, Cells, Entry, PrefixCache, common_prefix
from poolmanager.worker.protocol import (
    CacheState,
    Cancelled,
    Done,
    Event,
    Execute,
    Failed,
    FinishReason,
    Tokens,
)
from poolmanager.worker.text import TextChunk, TextStream


@dataclass
class _Sequence:
    """An admitted execution: its slot (sequence id), prompt, sampler and progress."""

    cmd: Execute
    seq_id: int
    order: int
    """Admission order: the youngest has the largest."""
    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    text: TextStream
    queued_at: float
    admitted_at: float
    admitted_ns: int
    n_past: int = 0
    """Positions of the sequence in the cache (prompt tokens read, then generated ones)."""
    next_token: int | None = None
    """The token sampled last, decoded in the next step (None while reading the prompt)."""
    produced: int = 0
    first_at: float = 0.0
    first_ns: int = 0
    chunk: int = 0
    """Tokens of the sequence in the batch being decoded."""
    batch_index: int = -1
    """Where its logits are in the batch being decoded (-1: none this step)."""
    trace_ids: dict[str, str] = field(default_factory=dict)
    tokens_cached: int = 0
    """Prompt tokens whose cells came from the prefix cache."""
    generated: list[int] = field(default_factory=list)
    """Tokens sampled so far (those decoded are in its cells after the prompt)."""
    generated_text: list[str] = field(default_factory=list)
    cells: Cells = field(default_factory=Cells)
    borrowed_from: Cells | None = None
    """Whose cells its first ``tokens_cached`` are, shared: counted there while that holder
    lives."""
    hashes: list[int] = field(default_factory=list)
    """Block hashes of its prompt text (mesh.prefix), for the cache's summary."""

    @property
    def generating(self) -> bool:
        return self.next_token is not None

    @property
    def cells_needed(self) -> int:
        """Cells it holds once its prompt is read and its last token decoded."""
        return len(self.prompt) + self.produced


_RATE_MIN_PROMPT_TOKENS = 32


@dataclass(frozen=True)
class StepStats:
    """What the last step did (for benchmarks and logs)."""

    generating: int = 0
    prefill_tokens: int = 0
    decode_ms: float = 0.0


class BatchEngine:
    """The scheduler of one context: waiting executions, running sequences, one step at a time."""

    def __init__(
        self,
        engine: LlamaEngine,
        *,
        prefill_chunk_tokens: int = 256,
        prefix_cache_entries: int | None = None,
    ) -> None:
        self._engine = engine
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        self._waiting: deque[tuple[Execute, float]] = deque()
        self._running: dict[int, _Sequence] = {}  # by sequence id, in admission order
        self._by_id: dict[str, _Sequence] = {}
        engine.clear()  # the context is this scheduler's alone, from empty
        self._free_ids = list(range(engine.n_seq_ids))
        heapq.heapify(self._free_ids)
        spare_ids = engine.n_seq_ids - engine.slots  # 0 where the model cannot share cells
        entries = spare_ids if prefix_cache_entries is None else prefix_cache_entries
        self._cache = PrefixCache(min(entries, spare_ids))
        self._reported: tuple[int, int] | None = None  # the versions last reported
        self._changes = 0  # counts admissions and releases: the running prompts changed
        self._cancels: set[str] = set()
        self._admitted = 0
        self.last_step = StepStats()
        self.prefill_ms_per_token = 0.0
        """What reading a prompt token costs here (a moving average over steps that read 32
        tokens or more; 0 before the first): what a task saves by finding its prompt cached."""

    # ----- inputs ---------------------------------------------------------------------------

    def submit(self, cmd: Execute) -> None:
        """Queues an execution; it is admitted at the start of a step when a slot is free."""
        self._waiting.append((cmd, time.perf_counter()))

    def cancel(self, exec_id: str) -> None:
        """Ends an execution at the start of the next step (nothing if it already ended)."""
        self._cancels.add(exec_id)

    def cancel_all(self) -> None:
        """Ends every execution at the next step (the pool manager went away)."""
        self._cancels.update(cmd.id for cmd, _ in self._waiting)
        self._cancels.update(self._by_id)

    def seq_id_of(self, exec_id: str) -> int | None:
        """The sequence id an admitted execution decodes on (None if not admitted or ended)."""
        seq = self._by_id.get(exec_id)
        return None if seq is None else seq.seq_id

    @property
    def idle(self) -> bool:
        """Nothing waits, runs or is to be cancelled."""
        return not self._waiting and not self._running and not self._cancels

    @property
    def running(self) -> int:
        """Sequences holding a slot."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Executions waiting for a slot."""
        return len(self._waiting)

    # ----- the step -------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """One step (see the module docstring); returns the events it produced."""
        out: list[Event] = []
        self.last_step = StepStats()
        self._apply_cancels(out)
        self._admit(out)
        if self._running and self._decode(out):
            self._sample(out)
        self._report(out)
        return out

    @property
    def cache(self) -> PrefixCache:
        """The prefix cache (for tests and benchmarks to read)."""
        return self._cache

    def _report(self, out: list[Event]) -> None:
        """A CacheState when the entries or the running prompts changed since the last."""
        if not self._cache.capacity:
            return
        version = (self._cache.version, self._changes)
        if version == self._reported:
            return
        self._reported = version
        out.append(
            CacheState(
                entries=len(self._cache),
                cells=self._cache.cells,
                block_hashes=self._cache.summary(s.hashes for s in self._running.values()),
                prefill_ms_per_token=round(self.prefill_ms_per_token, 4),
            )
        )

    def _apply_cancels(self, out: list[Event]) -> None:
        if not self._cancels:
            return
        cancels, self._cancels = self._cancels, set()
        if self._waiting and any(cmd.id in cancels for cmd, _ in self._waiting):
            kept: deque[tuple[Execute, float]] = deque()
            for cmd, queued_at in self._waiting:
                if cmd.id in cancels:
                    out.append(Cancelled(cmd.id))
                else:
                    kept.append((cmd, queued_at))
            self._waiting = kept
        for exec_id in cancels:
            seq = self._by_id.get(exec_id)
            if seq is not None:
                self._release(seq)
                out.append(Cancelled(exec_id))
                log.log("INFO", "execution cancelled", execution_id=exec_id, **self._ids(seq))

    def _admit(self, out: list[Event]) -> None:
        engine = self._engine
        while self._waiting and len(self._running) < engine.slots:
            cmd, queued_at = self._waiting[0]
            try:
                prompt, max_tokens = self._check(cmd)
            except _Refused as refusal:
                self._waiting.popleft()
                out.append(refusal.event)
                continue
            source, reuse = self._lookup(prompt)
            room = self._room_for(len(prompt) - reuse, source, reuse)
            if room is None:
                return  # no room for its prompt yet: it waits, and so do those behind it
            self._waiting.popleft()
            try:
                sampler = engine.sampler(
                    temperature=cmd.temperature,
                    top_k=cmd.top_k,
                    top_p=cmd.top_p,
                    seed=cmd.seed,
                    ignore_eos=cmd.ignore_eos,
                    grammar=cmd.grammar,
                )
            except (GrammarError, EngineMisuse) as exc:
                out.append(_Refused.invalid(cmd, "grammar", str(exc)).event)
                continue
            seq_id, cells = self._claim(source, reuse)
            if room == "drop source" and isinstance(source, Entry) and source.seq_id in self._cache:
                self._evict(source)  # the copy keeps the cells it shares; the rest are freed
            now = time.perf_counter()
            seq = _Sequence(
                cmd=cmd,
                seq_id=seq_id,
                order=self._admitted,
                prompt=prompt,
                max_tokens=max_tokens,
                sampler=sampler,
                text=TextStream(cmd.stop),
                queued_at=queued_at,
                admitted_at=now,
                admitted_ns=time.time_ns(),
                trace_ids=log.trace_ids(cmd.traceparent),
                n_past=reuse,
                tokens_cached=reuse,
                cells=cells or Cells(),
                borrowed_from=None if cells is not None or source is None else source.cells,
                hashes=prefix_block_hashes(cmd.prompt) if self._cache.capacity else [],
            )
            self._admitted += 1
            self._changes += 1
            self._running[seq_id] = seq
            self._by_id[cmd.id] = seq
            log.log(
                "INFO",
                "execution started",
                execution_id=cmd.id,
                tokens_in=len(prompt),
                tokens_cached=reuse,
                slot=seq_id,
                **self._ids(seq),
            )

    # ----- the prefix cache -----------------------------------------------------------------

    def _lookup(self, prompt: list[int]) -> tuple[Entry | _Sequence | None, int]:
        """The entry or running sequence whose cells hold the longest start of ``prompt``, and
        how many of its cells to reuse: never the prompt's last token, whose logits are needed
        (a prompt cached whole still decodes it)."""
        if not self._cache.capacity:
            return None, 0
        source: Entry | _Sequence | None
        source, length = self._cache.best(prompt)
        for seq in self._running.values():
            if seq.n_past <= length:
                continue
            n = min(common_prefix(prompt, seq.prompt + seq.generated), seq.n_past)
            if n > length:
                source, length = seq, n
        reuse = min(length, len(prompt) - 1)
        if source is None or reuse < MIN_REUSE_TOKENS:
            return None, 0
        return source, reuse

    def _cells_in_use(self) -> int:
        """Cells the running sequences and the entries hold: an upper bound (a copy is counted
        once, at its holder, while that holder is alive; entries count shared cells again)."""
        alive = {seq.cells for seq in self._running.values()} | self._cache.alive()
        running = sum(
            seq.cells_needed - (seq.tokens_cached if seq.borrowed_from in alive else 0)
            for seq in self._running.values()
        )
        return running + self._cache.cells

    def _room_for(
        self, new_cells: int, source: Entry | _Sequence | None, reuse: int
    ) -> Literal["fits", "drop source"] | None:
        """Whether ``new_cells`` more fit in the KV cache, evicting entries (the least recently
        used first, the ``source`` of the copy last) until they do: "fits"; "drop source" when
        they fit only if the source entry goes once its first ``reuse`` cells are copied (the
        copy keeps those), so an entry never makes an execution wait that would fit without the
        cache; None: no room yet. Alone, a sequence always fits."""
        capacity = self._engine.kv_cache_tokens
        keep = source if isinstance(source, Entry) else None
        while self._cells_in_use() + new_cells + len(self._running) > capacity:
            victim = self._cache.oldest(keep=keep)
            if victim is None:
                break
            self._evict(victim)
        else:
            return "fits"
        if keep is not None and keep.seq_id in self._cache:
            spare = len(keep.tokens) - reuse  # the source's cells the copy does not keep
            if self._cells_in_use() - spare + new_cells + len(self._running) <= capacity:
                return "drop source"
        return "fits" if not self._running else None

    def _evict(self, entry: Entry) -> None:
        self._cache.take(entry.seq_id)
        self._engine.free_sequence(entry.seq_id)
        heapq.heappush(self._free_ids, entry.seq_id)

    def _claim(self, source: Entry | _Sequence | None, reuse: int) -> tuple[int, Cells | None]:
        """A sequence id for a new execution, holding the first ``reuse`` cells of ``source``;
        with the ``Cells`` it took over (None: its own, or copied)."""
        engine = self._engine
        if isinstance(source, Entry) and reuse == len(source.tokens):
            self._cache.take(source.seq_id)  # the new prompt extends it: take it over
            return source.seq_id, source.cells
        if not self._free_ids:  # every spare id holds an entry: the oldest gives its id up
            victim = self._cache.oldest(keep=source if isinstance(source, Entry) else None)
            assert victim is not None, "ids beyond the running slots are free or entries"
            self._evict(victim)
        seq_id = heapq.heappop(self._free_ids)
        if source is not None:
            engine.copy_prefix(source.seq_id, seq_id, reuse)
            if isinstance(source, Entry):
                self._cache.touch(source)
        return seq_id, None

    def _check(self, cmd: Execute) -> tuple[list[int], int]:
        """The prompt's tokens and the max_tokens to use, or the refusal."""
        n_ctx = self._engine.n_ctx
        if not (math.isfinite(cmd.temperature) and cmd.temperature >= 0):
            raise _Refused.invalid(cmd, "sampling.temperature", "must be >= 0")
        if not (math.isfinite(cmd.top_p) and 0 < cmd.top_p <= 1):
            raise _Refused.invalid(cmd, "sampling.top_p", "must be in (0, 1]")
        if cmd.top_k < 0:
            raise _Refused.invalid(cmd, "sampling.top_k", "must be >= 0")
        if cmd.max_tokens < 1:
            raise _Refused.invalid(cmd, "sampling.max_tokens", "must be >= 1")
        prompt = self._engine.tokenize(cmd.prompt, add_bos=not cmd.templated, special=cmd.templated)
        if not prompt:
            raise _Refused.invalid(cmd, "prompt", "has no tokens")
        max_tokens = cmd.max_tokens
        # llama.cpp fails one step past n_ctx: refuse, or shorten a defaulted max_tokens,
        # before decoding anything.
        if len(prompt) >= n_ctx:
            raise _Refused.invalid(
                cmd, "prompt", f"is {len(prompt)} tokens; the pool's context is {n_ctx} tokens"
            )
        if len(prompt) + max_tokens > n_ctx:
            if not cmd.max_tokens_defaulted:
                raise _Refused.invalid(
                    cmd,
                    "sampling.max_tokens",
                    f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the "
                    f"pool's context of {n_ctx} tokens",
                )
            max_tokens = n_ctx - len(prompt)
        return prompt, max_tokens

    def _build_batch(self, *, prefill: bool) -> None:
        """One token per generating sequence, then (``prefill``) bounded prompt chunks."""
        engine = self._engine
        engine.clear_batch()
        readers: list[_Sequence] = []
        for seq in self._running.values():
            seq.chunk, seq.batch_index = 0, -1
            if seq.generating:
                assert seq.next_token is not None
                seq.batch_index = engine.add(seq.seq_id, seq.next_token, seq.n_past, logits=True)
                seq.chunk = 1
            else:
                readers.append(seq)
        if not prefill or not readers:
            return
        room = engine.n_batch - engine.batch_size
        budget = min(room, self.prefill_chunk_tokens) if engine.batch_size else room
        for seq in readers:
            if budget <= 0:
                break
            take = min(len(seq.prompt) - seq.n_past, budget)
            last = len(seq.prompt) - 1
            for pos in range(seq.n_past, seq.n_past + take):
                index = engine.add(seq.seq_id, seq.prompt[pos], pos, logits=pos == last)
            seq.chunk = take
            if seq.n_past + take == len(seq.prompt):
                seq.batch_index = index
            budget -= take

    def _decode(self, out: list[Event]) -> bool:
        """Builds the batch and decodes it; on a full cache, prompt chunks wait and then the
        youngest sequences end until the rest fit. False when nothing was decoded."""
        engine = self._engine
        prefill = True
        while self._running:
            self._build_batch(prefill=prefill)
            if engine.batch_size == 0:
                return False
            started = time.perf_counter()
            code = engine.decode()
            if code == 0:
                generating = prompt_tokens = 0
                for seq in self._running.values():
                    seq.n_past += seq.chunk
                    if seq.generating:
                        generating += 1
                    else:
                        prompt_tokens += seq.chunk
                self.last_step = StepStats(
                    generating, prompt_tokens, (time.perf_counter() - started) * 1000
                )
                if prompt_tokens >= _RATE_MIN_PROMPT_TOKENS:
                    rate = self.last_step.decode_ms / (prompt_tokens + generating)
                    old = self.prefill_ms_per_token
                    self.prefill_ms_per_token = rate if not old else old + 0.2 * (rate - old)
                return True
            if code != 1:
                for seq in list(self._running.values()):
                    if seq.chunk:
                        self._fail(
                            seq,
                            out,
                            Failed(
                                id=seq.cmd.id,
                                code="INTERNAL",
                                message=f"engine error: llama_decode returned {code}",
                            ),
                        )
                return False
            victim = self._cache.oldest()
            if victim is not None:  # no room: resident entries give their cells up first
                self._evict(victim)
                continue
            if prefill and any(s.generating for s in self._running.values()):
                prefill = False  # no room: prompts wait a step, generating sequences go on
                continue
            youngest = max(self._running.values(), key=lambda s: s.order)
            self._fail(
                youngest,
                out,
                Failed(
                    id=youngest.cmd.id,
                    code="UNAVAILABLE",
                    reason="CONTEXT_FULL",
                    message=(
                        f"the pool's KV cache ({engine.kv_cache_tokens} tokens) is full: "
                        f"execution {youngest.cmd.id} was the youngest of "
                        f"{len(self._running)} running and ended so that the others go on"
                    ),
                ),
            )
        return False

    def _sample(self, out: list[Event]) -> None:
        engine = self._engine
        for seq in list(self._running.values()):
            if seq.batch_index < 0:
                continue
            try:
                token = engine.sample(seq.sampler, seq.batch_index)
            except EngineMisuse as exc:  # a bug of this module: end the sequence, not all
                self._fail(
                    seq, out, Failed(id=seq.cmd.id, code="INTERNAL", message=f"engine: {exc}")
                )
                continue
            except GrammarDeadEnd:  # a schema admission did not see through: this one ends
                self._fail(
                    seq,
                    out,
                    Failed(
                        id=seq.cmd.id,
                        code="INVALID_ARGUMENT",
                        field="response_format",
                        reason="GRAMMAR_DEAD_END",
                        message=(
                            "response_format: its grammar allows no token after "
                            f"{seq.produced} tokens of output, so no answer can match it"
                        ),
                    ),
                )
                continue
            if seq.produced == 0:
                seq.first_at = time.perf_counter()
                seq.first_ns = time.time_ns()
            if engine.is_eog(token) and not seq.cmd.ignore_eos:
                self._finish(seq, out, "stop")
                continue
            seq.produced += 1
            seq.generated.append(token)
            chunk = seq.text.push(token, engine.piece(token))
            if chunk is not None:
                seq.generated_text.append(chunk.text)
                out.append(_tokens(seq, chunk))
            if seq.text.stopped:
                self._finish(seq, out, "stop_sequence")
            elif seq.produced >= seq.max_tokens:
                self._finish(seq, out, "length")
            else:
                seq.next_token = token

    # ----- endings --------------------------------------------------------------------------

    def _finish(self, seq: _Sequence, out: list[Event], reason: FinishReason) -> None:
        chunk = seq.text.finish()
        if chunk is not None:
            seq.generated_text.append(chunk.text)
            out.append(_tokens(seq, chunk))
        end = time.perf_counter()
        first = seq.first_at or end
        out.append(
            Done(
                id=seq.cmd.id,
                reason=reason,
                tokens_in=len(seq.prompt),
                tokens_out=seq.text.sent,
                ttft_ms=(first - seq.admitted_at) * 1000,
                decode_ms=(end - first) * 1000,
                started_ns=seq.admitted_ns,
                first_token_ns=seq.first_ns,
                ended_ns=time.time_ns(),
                queue_ms=(seq.admitted_at - seq.queued_at) * 1000,
                tokens_cached=seq.tokens_cached,
            )
        )
        self._release(seq, keep=True)
        log.log(
            "INFO",
            "execution finished",
            execution_id=seq.cmd.id,
            tokens_out=seq.text.sent,
            reason=reason,
            **self._ids(seq),
        )

    def _fail(self, seq: _Sequence, out: list[Event], event: Failed) -> None:
        out.append(event)
        self._release(seq)
        log.log("WARNING", event.message, execution_id=seq.cmd.id, **self._ids(seq))

    def _release(self, seq: _Sequence, *, keep: bool = False) -> None:
        """Frees the sequence's sampler and slot, and its cells, unless ``keep``: a finished
        sequence's cells become an entry of the prefix cache."""
        seq.sampler.free()
        del self._running[seq.seq_id]
        del self._by_id[seq.cmd.id]
        self._changes += 1
        if keep and self._cache.capacity and seq.n_past >= MIN_REUSE_TOKENS:
            tokens = (seq.prompt + seq.generated)[: seq.n_past]
            entry = Entry(
                seq.seq_id, tokens, seq.cmd.prompt + "".join(seq.generated_text), seq.cells
            )
            for dropped in self._cache.add(entry):
                self._engine.free_sequence(dropped.seq_id)
                heapq.heappush(self._free_ids, dropped.seq_id)
            return
        self._engine.free_sequence(seq.seq_id)
        heapq.heappush(self._free_ids, seq.seq_id)

    @staticmethod
    def _ids(seq: _Sequence) -> dict[str, str]:
        return {"correlation_id": seq.cmd.correlation_id, **seq.trace_ids}


class _Refused(Exception):
    def __init__(self, event: Failed) -> None:
        super().__init__(event.message)
        self.event = event

    @classmethod
    def invalid(cls, cmd: Execute, field_name: str, problem: str) -> _Refused:
        return cls(
            Failed(
                id=cmd.id,
                code="INVALID_ARGUMENT",
                field=field_name,
                message=problem,
            )
        )


def _tokens(seq: _Sequence, chunk: TextChunk) -> Tokens:
    return Tokens(seq.cmd.id, chunk.index, chunk.ids, chunk.text)

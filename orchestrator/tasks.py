"""Tasks and their event logs (domain; no I/O).

A task's events are an append-only log. Readers (Generate, StreamTask) follow it from a cursor,
so any number of them can attach, detach and re-attach; a reader that falls behind receives the
tokens that piled up as one message. Once a task is terminal nothing more is appended: a cancel
acknowledged to a client is the last word, and no token follows it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mesh.errors import CancelledError as TaskCancelledError
from mesh.errors import LlorchError
from mesh.prefix import prefix_block_hashes
from orchestrator.chat import ChatMessage

if TYPE_CHECKING:
    from orchestrator.tracing import TaskTrace


class Priority(enum.IntEnum):
    """Scheduling class; lower values are served first."""

    INTERACTIVE = 0
    BATCH = 1


class TaskState(enum.Enum):
    """Lifecycle of a task."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters with every default resolved."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """What a client asked for, validated."""

    model_id: str
    prompt: str
    sampling: Sampling
    priority: Priority = Priority.INTERACTIVE
    request_id: str = ""
    max_tokens_defaulted: bool = False
    """The client left max_tokens unset: the pool may shorten it to fit a long prompt."""
    tenant: str = "default"
    """Whose task it is: the unit of fair sharing in the queue."""
    messages: tuple[ChatMessage, ...] = ()
    """A conversation still to be rendered into ``prompt`` (at admission, once); empty after."""
    templated: bool = False
    """``prompt`` is a rendered chat template: the worker reads its special-token text as the
    tokens and adds no BOS."""
    grammar: str = ""
    """GBNF the sampled text must follow (the response format); empty for free text."""


@dataclass(frozen=True)
class Queued:
    """The task waits; sent again whenever position or prediction changes."""

    position: int
    predicted_start_ms: int


@dataclass(frozen=True)
class Started:
    """The task began executing."""

    pool_id: str
    node_id: str
    model_id: str
    engine_version: str
    queue_ms: float


@dataclass(frozen=True)
class Tokens:
    """Consecutive tokens from ``index``."""

    index: int
    token_ids: tuple[int, ...]
    text: str

    @property
    def end(self) -> int:
        """Index after the last token."""
        return self.index + len(self.token_ids)


@dataclass(frozen=True)
class Metrics:
    """Throughput of the execution."""

    decode_tokens_per_second: float
    total_ms: float


@dataclass(frozen=True)
class Finished:
    """Normal end."""

    reason: str
    tokens_in: int
    tokens_out: int
    ttft_ms: float
    decode_ms: float
    tokens_cached: int = 0
    """Of tokens_in, those the worker's prefix cache held."""


@dataclass(frozen=True)
class Failed:
    """Terminal error (including cancellation); the reader's stream ends with its status."""

    error: LlorchError


TaskEvent = Queued | Started | Tokens | Metrics | Finished | Failed


MAX_PROMPT_BLOCKS = 1024
"""Blocks of a prompt placement looks at (256 KiB of text): the summaries hold no more."""


class Task:
    """One admitted task and its event log."""

    def __init__(
        self,
        task_id: str,
        spec: TaskSpec,
        *,
        correlation_id: str,
        created: float,
        deadline: float | None,
    ) -> None:
        self.task_id = task_id
        self.spec = spec
        self.correlation_id = correlation_id
        self.created = created
        self.deadline = deadline
        self.state = TaskState.QUEUED
        self.log: list[TaskEvent] = []
        self.tokens_out = 0
        self.pool_id = ""
        self.node_id = ""
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.queue_position = 0
        self.wait_reason = ""
        self.excluded: dict[str, str] = {}
        """Pools the latest placement passed over (pool key → reason)."""
        self._last_queued: Queued | None = None
        """The latest Queued worth sending; the log holds one Queued entry that stands for it."""
        self._queued_version = 0
        self._changed = asyncio.Event()
        self.observer: Callable[[Task, TaskEvent], None] | None = None
        """Called with every event appended to the log (the orchestrator's journal)."""
        self.trace: TaskTrace | None = None
        """The task's spans when tracing is on (orchestrator/tracing.py)."""
        self.prefix_hit_blocks = 0
        """Blocks of its prompt the pool it was placed on held warm (placement's reason)."""
        self.prefix_wait_since: float | None = None
        """When placement first let it wait for a busy pool holding its prompt's start."""
        self._prefix_hashes: tuple[int, ...] | None = None

    @property
    def prefix_hashes(self) -> tuple[int, ...]:
        """Block hashes of the prompt (mesh.prefix), made once: placement by prefix."""
        if self._prefix_hashes is None:
            self._prefix_hashes = tuple(
                prefix_block_hashes(self.spec.prompt, max_blocks=MAX_PROMPT_BLOCKS)
            )
        return self._prefix_hashes

    @property
    def terminal(self) -> bool:
        """Whether the task has ended."""
        return self.state in TERMINAL_STATES

    @property
    def predicted_start_ms(self) -> int:
        """The latest prediction sent in a Queued event."""
        return self._last_queued.predicted_start_ms if self._last_queued else 0

    @property
    def finished(self) -> Finished | None:
        """The Finished event, once the task succeeded."""
        last = self.log[-1] if self.log else None
        return last if isinstance(last, Finished) else None

    @property
    def error(self) -> LlorchError | None:
        """The terminal error, once the task failed or was cancelled."""
        last = self.log[-1] if self.log else None
        return last.error if isinstance(last, Failed) else None

    @property
    def latest_queued(self) -> Queued | None:
        """The Queued event readers get now (None before the first)."""
        return self._last_queued

    def set_queued(self, position: int, predicted_start_ms: int) -> None:
        """Records the queue position; readers get a new Queued only when something changed.

        The log keeps one Queued entry however often the position changes (a task behind
        thousands would otherwise grow by one entry per task ahead of it); readers receive the
        latest value in its place, and again whenever it changes while the task waits.
        """
        if self.state is not TaskState.QUEUED:
            return
        self.queue_position = position
        event = Queued(position, predicted_start_ms)
        last = self._last_queued
        if (
            last is not None
            and last.position == position
            and _close(last.predicted_start_ms, predicted_start_ms)
        ):
            return
        self._last_queued = event
        self._queued_version += 1
        if last is None:
            self._append(event)
        else:
            self._changed.set()

    def start(self, started: Started, now: float) -> None:
        """QUEUED → RUNNING."""
        if self.state is not TaskState.QUEUED:
            return
        self.state = TaskState.RUNNING
        self.started_at = now
        self.pool_id = started.pool_id
        self.node_id = started.node_id
        self._append(started)

    def requeue(self) -> bool:
        """RUNNING → QUEUED for a task whose pool failed before its first token.

        Readers see a new Queued event and later a new Started; no token was sent, so nothing
        is repeated. False (and no change) once a token exists or the task is not running.
        """
        if self.state is not TaskState.RUNNING or self.tokens_out:
            return False
        self.state = TaskState.QUEUED
        self.pool_id = self.node_id = ""
        self.started_at = None
        self._last_queued = None  # the next set_queued appends a fresh Queued event
        return True

    def add_tokens(self, tokens: Tokens) -> None:
        """Appends tokens; ignored once terminal. Indexes must continue where the last ended."""
        if self.state is not TaskState.RUNNING:
            return
        if tokens.index != self.tokens_out:
            raise ValueError(f"token index {tokens.index} after {self.tokens_out} tokens")
        self.tokens_out = tokens.end
        self._append(tokens)

    def succeed(self, finished: Finished, metrics: Metrics | None, now: float) -> None:
        """RUNNING → SUCCEEDED."""
        if self.state is not TaskState.RUNNING:
            return
        if metrics is not None:
            self._append(metrics)
        self.state = TaskState.SUCCEEDED
        self.ended_at = now
        self._append(finished)

    def fail(self, error: LlorchError, now: float) -> None:
        """Ends the task with an error (CANCELLED for a cancel); no-op once terminal."""
        if self.terminal:
            return
        self.state = (
            TaskState.CANCELLED if isinstance(error, TaskCancelledError) else TaskState.FAILED
        )
        self.ended_at = now
        self._append(Failed(error))

    async def follow(self, from_index: int = 0) -> AsyncIterator[TaskEvent]:
        """Events for a reader, from the start of the log.

        Queued events superseded by a later one are skipped, tokens before ``from_index`` are
        skipped (a coalesced message that straddles it is sent whole; its index says where it
        starts), and tokens that piled up since the last read come as one Tokens event. Ends after
        the terminal event.
        """
        cursor = 0
        seen_queued = 0
        while True:
            requeued = (
                self.state is TaskState.QUEUED
                and seen_queued
                and self._queued_version > seen_queued
            )
            if cursor >= len(self.log) and not requeued:
                if self.terminal:
                    return
                self._changed.clear()
                await self._changed.wait()
                continue
            batch = self.log[cursor:]
            cursor = len(self.log)
            if requeued and self._last_queued is not None:
                seen_queued = self._queued_version
                yield self._last_queued
            pending: Tokens | None = None
            out: list[TaskEvent] = []
            for event in batch:
                if isinstance(event, Queued):
                    # The log's one Queued entry stands for the latest value.
                    seen_queued = self._queued_version
                    event = self._last_queued or event
                if isinstance(event, Tokens):
                    if event.end <= from_index:
                        continue
                    if pending is None:
                        pending = event
                    else:
                        pending = Tokens(
                            pending.index,
                            pending.token_ids + event.token_ids,
                            pending.text + event.text,
                        )
                    continue
                if pending is not None:
                    out.append(pending)
                    pending = None
                out.append(event)
            if pending is not None:
                out.append(pending)
            live = not self.terminal
            for event in out:
                if live and isinstance(event, Tokens) and self.state is TaskState.CANCELLED:
                    continue  # cancelled while an earlier event was written: no token after it
                yield event

    def _append(self, event: TaskEvent) -> None:
        self.log.append(event)
        self._changed.set()
        if self.observer is not None:
            self.observer(self, event)


def _close(a: int, b: int) -> bool:
    """Predictions within 20% (or 50 ms) of each other are not worth a new event."""
    return abs(a - b) <= max(50, 0.2 * max(a, b))

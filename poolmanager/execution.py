"""Executions: the typed generation request and its events, one ``Execution`` handed to a pool's
worker, and ``Executions``, the registry of those running on the node and of the models they
asked for. An ``Execution`` reports through two callbacks its registry gives it (a change, its
end); it knows nothing of the pool manager.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Span

from mesh import logs, tracing
from mesh.errors import CancelledError as ExecutionCancelledError
from mesh.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LlorchError,
    UnavailableError,
)
from poolmanager.changes import Notify
from poolmanager.pool import Pool, PoolState
from poolmanager.worker.protocol import Cancelled, Done, Event, Execute, Failed, Tokens
from poolmanager.worker_process import ExecutionQueue, Interrupted, WorkerExited, WorkerProcess


@dataclass(frozen=True)
class ExecutionSpec:
    """One generation, sampling fully resolved."""

    execution_id: str
    task_id: str
    pool_id: str
    model_id: str
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    ignore_eos: bool
    max_tokens_defaulted: bool = False
    templated: bool = False
    """The prompt is a rendered chat template (special-token text read as the tokens, no BOS
    added)."""
    grammar: str = ""
    """GBNF every sampled token must follow; empty for none."""


@dataclass(frozen=True)
class ExecStarted:
    """The worker accepted the execution."""

    engine_version: str
    tokens_in: int


@dataclass(frozen=True)
class ExecTokens:
    """Consecutive tokens starting at ``index``."""

    index: int
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class ExecFinished:
    """Generation ended normally."""

    reason: str
    tokens_in: int
    tokens_out: int
    ttft_ms: float
    decode_ms: float
    started_ns: int = 0
    """Wall times (ns, the worker's clock) the prompt began, the first token came, it ended;
    0 from a worker that did not say."""
    first_token_ns: int = 0
    ended_ns: int = 0
    tokens_cached: int = 0
    """Prompt tokens whose cells came from the worker's prefix cache."""


ExecEvent = ExecStarted | ExecTokens | ExecFinished

OnEnd = Callable[["Execution", bool], None]
"""Called once when an execution ends, with whether it finished (else it is cancelled)."""


class Executions:
    """The executions running on the node's pools, and the models executions asked for."""

    def __init__(self, node_id: str, notify: Notify) -> None:
        self._node_id = node_id
        self._notify = notify
        self._running: dict[str, Execution] = {}
        self._used: set[str] = set()  # models asked for since the last take_used()

    def begin(self, pool: Pool, spec: ExecutionSpec) -> Execution:
        """Checks an execution and hands it to the pool's worker at once, without awaiting.

        Raises:
            FailedPreconditionError: the pool holds another model.
            UnavailableError: the pool is not ready (draining, loading) or its worker died
                (retriable).
        """
        self._used.add(spec.model_id)
        if pool.model_id != spec.model_id:
            raise FailedPreconditionError(
                f"pool {spec.pool_id} holds {pool.model_id}, not {spec.model_id}",
                reason="MODEL_NOT_LOADED",
            )
        if pool.state is not PoolState.READY or pool.worker is None:
            raise UnavailableError(
                f"pool {spec.pool_id} is {pool.state.value}",
                reason="POOL_DRAINING" if pool.state is PoolState.DRAINING else "POOL_NOT_READY",
                retry_delay_s=1.0,
            )
        if spec.execution_id in self._running:
            raise FailedPreconditionError(
                f"execution {spec.execution_id} already exists", reason="EXECUTION_EXISTS"
            )
        # No refusal when every slot is taken: the orchestrator owns admission, and a slot
        # freed by a cancel may not be released here yet when the next execution arrives.
        # The worker runs executions beyond its slots in arrival order.
        worker = pool.worker
        pool.active.add(spec.execution_id)
        traceparent = ""
        span = None
        if tracing.enabled():
            # The worker's part of the trace: it logs under this span's id, and its phases
            # come back with its result as child spans (the worker has no exporter).
            span = tracing.tracer("llorch.poolmanager").start_span(
                "llorch.worker",
                attributes={
                    "llorch.task_id": spec.task_id,
                    "llorch.execution_id": spec.execution_id,
                    "llorch.pool_id": spec.pool_id,
                    "llorch.node_id": self._node_id,
                    "llorch.model_id": spec.model_id,
                },
            )
            traceparent = tracing.traceparent(span)
        events = worker.submit(_execute_command(spec, traceparent))
        execution = Execution(
            spec, pool, worker, events, span, on_change=self._notify, on_end=self._end
        )
        self._running[spec.execution_id] = execution
        return execution

    def cancel(self, execution_id: str) -> bool:
        """Stops an execution; its stream ends CANCELLED. False when it is not running."""
        execution = self._running.get(execution_id)
        if execution is None:
            return False
        execution.worker.cancel(execution_id)
        return True

    def on_pool(self, pool: Pool) -> list[Execution]:
        """The executions running on ``pool``."""
        return [e for e in self._running.values() if e.pool is pool]

    def take_used(self) -> set[str]:
        """Models executions asked for since the last call; see ``give_back_used``."""
        used, self._used = self._used, set()
        return used

    def give_back_used(self, models: set[str]) -> None:
        """Puts back what ``take_used`` returned when the report failed."""
        self._used |= models

    def _end(self, execution: Execution, finished: bool) -> None:
        """Drops an execution's bookkeeping; cancels it in the worker unless it finished."""
        spec = execution.spec
        if not finished:
            execution.worker.cancel(spec.execution_id)
        execution.worker.forget(spec.execution_id)
        execution.pool.active.discard(spec.execution_id)
        self._running.pop(spec.execution_id, None)


class Execution:
    """One execution handed to a worker; its events are read once, with ``events()``."""

    def __init__(
        self,
        spec: ExecutionSpec,
        pool: Pool,
        worker: WorkerProcess,
        queue: ExecutionQueue,
        span: Span | None = None,
        *,
        on_change: Notify,
        on_end: OnEnd,
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.worker = worker
        self._queue = queue
        self._read = False
        self._span = span
        self._on_change = on_change
        self._on_end = on_end

    async def events(self) -> AsyncIterator[list[ExecEvent]]:
        """Batches of events until the execution ends (a slow reader gets larger batches).

        Closing the iterator early (the caller went away) cancels the execution in the worker.

        Raises:
            UnavailableError: the worker died (retriable).
            InvalidArgumentError: the prompt and max_tokens do not fit the context.
        """
        if self._read:
            raise RuntimeError("an execution's events are read once")
        self._read = True
        spec, events = self.spec, self._queue
        finished = False
        failure: BaseException | None = None
        try:
            # Sent while the worker reads the prompt, so it is off the first token's path;
            # the prompt's token count arrives with the end of the execution.
            yield [ExecStarted(self.pool.engine_version, 0)]
            await self._on_change()
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                out: list[ExecEvent] = []
                for raw in batch:
                    event = _convert(raw, spec)
                    if event is None:
                        continue
                    if isinstance(event, ExecTokens) and out and isinstance(out[-1], ExecTokens):
                        prev = out[-1]
                        event = ExecTokens(
                            prev.index, prev.token_ids + event.token_ids, prev.text + event.text
                        )
                        out[-1] = event
                    else:
                        out.append(event)
                    if isinstance(event, ExecFinished):
                        finished = True
                        self.pool.prefix_lookup_tokens += event.tokens_in
                        self.pool.prefix_hit_tokens += event.tokens_cached
                        self._trace_phases(event)
                if out:
                    yield out
                if finished:
                    return
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if self._span is not None:
                self._span.set_attribute("llorch.finished", finished)
                tracing.end_rpc_span(self._span, None if finished else failure or GeneratorExit())
            self._on_end(self, finished)
            await self._on_change()

    def _trace_phases(self, event: ExecFinished) -> None:
        """The worker's prompt and decode phases, as children of the execution's span."""
        if self._span is None or not event.started_ns:
            return
        self._span.set_attributes(
            {"llorch.tokens_in": event.tokens_in, "llorch.tokens_out": event.tokens_out}
        )
        tracer = tracing.tracer("llorch.worker")
        parent = trace.set_span_in_context(self._span)
        first = event.first_token_ns or event.ended_ns
        tracer.start_span(
            "llorch.worker.prompt",
            context=parent,
            start_time=event.started_ns,
            attributes={"llorch.tokens_in": event.tokens_in},
        ).end(first)
        tracer.start_span(
            "llorch.worker.decode",
            context=parent,
            start_time=first,
            attributes={"llorch.tokens_out": event.tokens_out},
        ).end(event.ended_ns)

    def interrupt(self, error: LlorchError) -> None:
        """Ends the execution's events with ``error`` (after what is already queued)."""
        self._queue.put_nowait(Interrupted(error))
        self.worker.cancel(self.spec.execution_id)

    def abandon(self) -> None:
        """Cancels an execution whose events will never be read (no-op once reading began)."""
        if not self._read:
            self._read = True
            if self._span is not None:
                tracing.end_rpc_span(self._span, GeneratorExit())
            self._on_end(self, False)


def _execute_command(spec: ExecutionSpec, traceparent: str) -> Execute:
    return Execute(
        id=spec.execution_id,
        prompt=spec.prompt,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        seed=spec.seed,
        stop=spec.stop,
        ignore_eos=spec.ignore_eos,
        max_tokens_defaulted=spec.max_tokens_defaulted,
        templated=spec.templated,
        grammar=spec.grammar,
        correlation_id=logs.correlation_id.get() or "",
        traceparent=traceparent,
    )


def _convert(raw: Event | WorkerExited | Interrupted, spec: ExecutionSpec) -> ExecEvent | None:
    if isinstance(raw, Interrupted):
        raise raw.error
    if isinstance(raw, WorkerExited):
        raise UnavailableError(
            f"worker of pool {spec.pool_id} exited (code {raw.returncode}) during the execution",
            reason="WORKER_CRASHED",
            retry_delay_s=1.0,
        )
    if isinstance(raw, Tokens):
        return ExecTokens(raw.index, list(raw.ids), raw.text)
    if isinstance(raw, Done):
        return ExecFinished(
            raw.reason,
            raw.tokens_in,
            raw.tokens_out,
            raw.ttft_ms,
            raw.decode_ms,
            raw.started_ns,
            raw.first_token_ns,
            raw.ended_ns,
            raw.tokens_cached,
        )
    if isinstance(raw, Cancelled):
        raise ExecutionCancelledError(f"execution {spec.execution_id} was cancelled")
    if isinstance(raw, Failed):
        if raw.code == "INVALID_ARGUMENT":
            raise InvalidArgumentError(
                raw.field or "prompt", raw.message, reason=raw.reason or None
            )
        if raw.code == "UNAVAILABLE":
            raise UnavailableError(
                f"pool {spec.pool_id}: {raw.message}",
                reason=raw.reason or "WORKER_UNAVAILABLE",
                retry_delay_s=1.0,
            )
        raise InternalError(raw.message)
    return None

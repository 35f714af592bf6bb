"""The spans of one task's life at the orchestrator (when tracing is on; mesh/tracing.py).

A task outlives the call that admitted it, and the dispatcher places it from wherever the loop
happens to be, so the task carries its own trace context instead of relying on the current one::

    llorch.task                       admission → end (the admitting call's span is its parent)
      llorch.admission                checks, catalog lookup, enqueue
      llorch.queue_wait               enqueued → placed (again after a failover)
      llorch.placement                the dispatcher pass that placed it
      llorch.dispatch                 placed → the pool manager's first answer
        PoolManagerService/Execute    (pool manager) ── llorch.worker (→ prompt, decode)
      llorch.first_token              placed → first token back at the orchestrator
      llorch.decode                   first token → end

Every span has ``llorch.task_id``; spans after placement also the pool and node.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from mesh import tracing
from mesh.errors import LlorchError
from orchestrator.tasks import Finished, TaskSpec

_TRACER = "llorch.orchestrator"


class TaskTrace:
    """Spans of one task; each hook is called once per transition, from the event loop."""

    def __init__(
        self,
        task_id: str,
        spec: TaskSpec,
        admission_started_ns: int,
        parent: Context | None = None,
    ) -> None:
        """Opens the task's span; ``parent`` defaults to the current context (the admitting
        call's span)."""
        self._tracer = tracing.tracer(_TRACER)
        self._base = {"llorch.task_id": task_id, "llorch.model_id": spec.model_id}
        self._where: dict[str, str] = {}
        self.root = self._tracer.start_span(
            "llorch.task",
            context=parent,
            start_time=admission_started_ns,
            attributes={
                **self._base,
                "llorch.priority": spec.priority.name.lower(),
                "llorch.tenant": spec.tenant,
                "llorch.max_tokens": spec.sampling.max_tokens,
            },
        )
        self.context: Context = trace.set_span_in_context(self.root)
        """The task's context: the parent of its spans, current in its relay (for logs)."""
        self._admission_started_ns = admission_started_ns
        self._queue: Span | None = None
        self._dispatch: Span | None = None
        self._first_token: Span | None = None
        self._decode: Span | None = None

    @classmethod
    def recovered(cls, task_id: str, spec: TaskSpec, position: int) -> TaskTrace:
        """The trace of a task the journal gave back after a restart: a new root (its
        admitting call is gone), starting in the queue."""
        trace_ = cls(task_id, spec, time.time_ns(), parent=Context())
        trace_.root.set_attribute("llorch.recovered", True)
        trace_._queue = trace_._span("llorch.queue_wait", **{"llorch.queue_position": position})
        return trace_

    def _span(self, name: str, start_ns: int | None = None, **attributes: object) -> Span:
        return self._tracer.start_span(
            name,
            context=self.context,
            start_time=start_ns,
            attributes={**self._base, **attributes},  # type: ignore[dict-item]
        )

    def admitted(self, position: int) -> None:
        """The task is in the queue at ``position``."""
        now = time.time_ns()
        self._span("llorch.admission", self._admission_started_ns).end(now)
        self._queue = self._span("llorch.queue_wait", now, **{"llorch.queue_position": position})

    def placed(self, node_id: str, pool_id: str, pass_started_ns: int) -> None:
        """The dispatcher pass that began at ``pass_started_ns`` placed it on a pool."""
        now = time.time_ns()
        where = self._where = {"llorch.node_id": node_id, "llorch.pool_id": pool_id}
        self.root.set_attributes(where)
        if self._queue is not None:
            self._queue.end(now)
            self._queue = None
        self._span("llorch.placement", min(pass_started_ns, now), **where).end(now)
        self._dispatch = self._span("llorch.dispatch", now, **where)
        self._first_token = self._span("llorch.first_token", now, **where)

    def dispatch_metadata(self) -> list[tuple[str, str]]:
        """Metadata that makes the Execute call a child of the dispatch span."""
        if self._dispatch is None:
            return []
        return tracing.inject(trace.set_span_in_context(self._dispatch))

    def dispatched(self) -> None:
        """The pool manager answered the Execute call."""
        if self._dispatch is not None:
            self._dispatch.end()
            self._dispatch = None

    def first_token(self) -> None:
        """The first token reached the orchestrator."""
        self.dispatched()
        if self._first_token is not None:
            now = time.time_ns()
            self._first_token.end(now)
            self._first_token = None
            self._decode = self._span("llorch.decode", now, **self._where)

    def requeued(self, error: LlorchError) -> None:
        """The execution failed before its first token; the task waits to be placed again."""
        for span in (self._dispatch, self._first_token):
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, error.message))
                span.end()
        self._dispatch = self._first_token = None
        self.root.add_event("placed again", {"llorch.error.reason": error.reason})
        self._queue = self._span("llorch.queue_wait", **{"llorch.requeued": True})

    def ended(self, finished: Finished | None, error: LlorchError | None) -> None:
        """The task ended: ``finished`` on success, else ``error``."""
        now = time.time_ns()
        for span in (self._queue, self._dispatch, self._first_token, self._decode):
            if span is not None:
                if error is not None:
                    span.set_status(Status(StatusCode.ERROR, error.message))
                span.end(now)
        self._queue = self._dispatch = self._first_token = self._decode = None
        if finished is not None:
            self.root.set_attributes(
                {
                    "llorch.finish_reason": finished.reason,
                    "llorch.tokens_in": finished.tokens_in,
                    "llorch.tokens_out": finished.tokens_out,
                }
            )
        if error is not None:
            self.root.set_attribute("llorch.error.reason", error.reason)
            self.root.set_status(Status(StatusCode.ERROR, error.message))
        self.root.end(now)

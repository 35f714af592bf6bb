"""The journal binding: every task's events go to the metrics, its trace and the journal; and
at start, the tasks a previous run journaled come back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict

from mesh import logs, tracing
from mesh.errors import UnavailableError, error_from_dict, error_to_dict
from orchestrator.admission import AdmissionQueue
from orchestrator.journal import Journal, TaskRow, spec_from_json, spec_to_json
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.table import TaskTable
from orchestrator.tasks import (
    Failed,
    Finished,
    Started,
    Task,
    TaskEvent,
    TaskState,
    Tokens,
)
from orchestrator.tracing import TaskTrace

_log = logs.get_logger("orchestrator")


class TaskRecorder:
    """Observes tasks: metrics, traces and (with a journal) the durable record of each."""

    def __init__(
        self,
        journal: Journal | None,
        metrics: OrchestratorMetrics,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._journal = journal
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock

    @property
    def journal(self) -> Journal | None:
        """The journal, or None when tasks are not journaled."""
        return self._journal

    def record_new(self, task: Task, urgent: bool) -> asyncio.Future[None] | None:
        """Records a new task and everything that happens to it from now on; returns the future
        of its journal commit (None without a journal). ``urgent``: commit at once."""
        task.observer = self.on_event
        if self._journal is None:
            return None
        now, wall = self._clock(), self._wall_clock()
        return self._journal.record_task(
            TaskRow(
                task_id=task.task_id,
                seq=0,
                spec=spec_to_json(task.spec),
                correlation_id=task.correlation_id,
                created_unix_s=wall - (now - task.created),
                deadline_unix_s=None if task.deadline is None else wall + task.deadline - now,
                state=TaskState.QUEUED.value,
                pool_id="",
                node_id="",
                outcome=None,
                ended_unix_s=None,
                tokens=[],
            ),
            urgent=urgent,
        )

    def on_event(self, task: Task, event: TaskEvent) -> None:
        """One event of a recorded task."""
        if not isinstance(event, Tokens):
            self._metrics.on_event(task, event)
        if task.trace is not None:
            if isinstance(event, Tokens) and event.index == 0:
                task.trace.first_token()
            elif isinstance(event, Finished):
                task.trace.ended(event, None)
            elif isinstance(event, Failed):
                task.trace.ended(None, event.error)
        journal = self._journal
        if journal is None:
            return
        if isinstance(event, Tokens):
            journal.record_tokens(task.task_id, event.index, event.token_ids, event.text)
        elif isinstance(event, Started):
            journal.record_start(task.task_id, event.pool_id, event.node_id)
        elif isinstance(event, Finished):
            journal.record_end(
                task.task_id, task.state.value, {"finished": asdict(event)}, self._wall_clock()
            )
        elif isinstance(event, Failed):
            journal.record_end(
                task.task_id,
                task.state.value,
                {"error": error_to_dict(event.error)},
                self._wall_clock(),
            )

    def forget(self, task_ids: list[str]) -> None:
        """Drops expired tasks from the journal."""
        if task_ids and self._journal is not None:
            self._journal.forget(task_ids)

    async def close(self) -> None:
        """Closes the journal (its last commits land first)."""
        if self._journal is not None:
            await asyncio.to_thread(self._journal.close)

    def recover(
        self,
        table: TaskTable,
        queue: AdmissionQueue,
        finished_ttl_s: float,
        add_deadline: Callable[[Task], None],
    ) -> None:
        """Rebuilds the tasks a previous run journaled into ``table`` and ``queue``.

        Queued tasks queue again in their old order. A running task that had emitted nothing
        queues again too; one that had emitted tokens ends UNAVAILABLE (retriable) with its
        tokens readable, because the rest of its stream is lost with the previous run.
        Finished tasks stay readable until their retention ends.
        """
        journal = self._journal
        if journal is None:
            return
        now, wall = self._clock(), self._wall_clock()
        requeued = failed = kept = 0
        for row in journal.load():
            spec = spec_from_json(row.spec)
            created = now - max(0.0, wall - row.created_unix_s)
            deadline = None if row.deadline_unix_s is None else now + row.deadline_unix_s - wall
            task = Task(
                row.task_id,
                spec,
                correlation_id=row.correlation_id,
                created=created,
                deadline=deadline,
            )
            ended = None if row.ended_unix_s is None else now - max(0.0, wall - row.ended_unix_s)
            if ended is not None and now - ended > finished_ttl_s:
                journal.forget([row.task_id])
                continue
            table.add(task)
            if row.state == TaskState.QUEUED.value or (
                row.state == TaskState.RUNNING.value and not row.tokens
            ):
                if row.state == TaskState.RUNNING.value:
                    journal.record_requeue(task.task_id)
                # Accepted before, so never refused now: running tasks that queue again can
                # take the queue past its capacity (a smaller capacity configured since too).
                queue.push(task, created, readmit=True)
                task.set_queued(len(queue) - 1, 0)
                if deadline is not None:
                    add_deadline(task)
                task.observer = self.on_event
                if tracing.enabled():
                    # Its admitting call is gone: a trace of its own, not whoever is current.
                    task.trace = TaskTrace.recovered(task.task_id, spec, len(queue) - 1)
                requeued += 1
                continue
            task.set_queued(0, 0)
            if row.pool_id:
                task.start(Started(row.pool_id, row.node_id, spec.model_id, "", 0.0), created)
                for index, ids, text in row.tokens:
                    task.add_tokens(Tokens(index, tuple(ids), text))
            outcome = row.outcome or {}
            if row.state == TaskState.SUCCEEDED.value and "finished" in outcome:
                task.succeed(Finished(**outcome["finished"]), None, ended or now)
            elif "error" in outcome:
                task.fail(error_from_dict(outcome["error"]), ended or now)
            else:  # it was running when the previous run ended
                task.observer = self.on_event
                task.fail(
                    UnavailableError(
                        f"the orchestrator restarted while task {task.task_id} ran; "
                        f"{task.tokens_out} tokens were emitted",
                        reason="ORCHESTRATOR_RESTARTED",
                        retry_delay_s=1.0,
                    ),
                    now,
                )
                failed += 1
                continue
            kept += 1
        if requeued or failed or kept:
            _log.info(
                "journal recovered: %d tasks queued again, %d running tasks failed, "
                "%d finished tasks readable",
                requeued,
                failed,
                kept,
            )

"""Every task the orchestrator holds, by id and by idempotency key."""

from __future__ import annotations

from collections.abc import Iterator

from orchestrator.tasks import Task, TaskState

_SWEEP_EVERY_S = 10.0


class TaskTable:
    """Queued, running and recently finished tasks; finished ones go after their retention."""

    def __init__(self, finished_ttl_s: float) -> None:
        self._ttl_s = finished_ttl_s
        self._tasks: dict[str, Task] = {}
        # (tenant, request id) → task id: one tenant's idempotency keys never find another's.
        self._by_request_id: dict[tuple[str, str], str] = {}
        self._last_sweep = 0.0

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._tasks.values()))

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: Task) -> None:
        """Holds a task (and its request id, when it has one)."""
        self._tasks[task.task_id] = task
        if task.spec.request_id:
            self._by_request_id[(task.spec.tenant, task.spec.request_id)] = task.task_id

    def get(self, task_id: str) -> Task | None:
        """A task by id, or None."""
        return self._tasks.get(task_id)

    def by_request(self, tenant: str, request_id: str) -> Task | None:
        """The task a tenant submitted under ``request_id``, or None."""
        task_id = self._by_request_id.get((tenant, request_id))
        return None if task_id is None else self._tasks.get(task_id)

    def has_request(self, tenant: str, request_id: str) -> bool:
        """Whether a tenant's ``request_id`` is taken (its task may have expired since)."""
        return (tenant, request_id) in self._by_request_id

    def active(self, model_id: str) -> list[Task]:
        """Queued and running tasks of a model."""
        return [
            t
            for t in self._tasks.values()
            if t.spec.model_id == model_id and t.state in (TaskState.QUEUED, TaskState.RUNNING)
        ]

    def sweep(self, now: float) -> list[str]:
        """Forgets finished tasks past their retention (at most every 10 s); their ids."""
        if now - self._last_sweep < _SWEEP_EVERY_S:
            return []
        self._last_sweep = now
        expired = []
        for task_id, task in list(self._tasks.items()):
            if task.terminal and task.ended_at is not None and now - task.ended_at > self._ttl_s:
                del self._tasks[task_id]
                expired.append(task_id)
                if task.spec.request_id:
                    self._by_request_id.pop((task.spec.tenant, task.spec.request_id), None)
        return expired

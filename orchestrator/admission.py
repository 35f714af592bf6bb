"""The admission queue (domain; no I/O): bounded, INTERACTIVE before BATCH, FIFO within each."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from orchestrator.tasks import Priority, Task


class QueueFullError(Exception):
    """The queue holds ``capacity`` tasks already."""


class AdmissionQueue:
    """Tasks waiting for a pool, in the order they should be considered."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lanes: dict[Priority, deque[Task]] = {p: deque() for p in Priority}

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def push(self, task: Task) -> int:
        """Enqueues; returns the task's position. Raises QueueFullError when full."""
        if len(self) >= self.capacity:
            raise QueueFullError
        self._lanes[task.spec.priority].append(task)
        return self.position(task)

    def remove(self, task: Task) -> bool:
        """Removes a task; False when it was not queued."""
        try:
            self._lanes[task.spec.priority].remove(task)
        except ValueError:
            return False
        return True

    def __iter__(self) -> Iterator[Task]:
        """Tasks in service order."""
        for priority in sorted(self._lanes):
            yield from self._lanes[priority]

    def position(self, task: Task) -> int:
        """Tasks ahead of ``task`` that could be served before it."""
        ahead = sum(len(self._lanes[p]) for p in self._lanes if p < task.spec.priority)
        return ahead + self._lanes[task.spec.priority].index(task)

"""The admission queue (domain; no I/O, the clock is passed in).

Service order, three lanes:

1. **aged BATCH**: a BATCH task that has waited ``batch_max_wait_s`` moves here, in arrival
   order, ahead of everything: no BATCH task starves behind a steady INTERACTIVE stream for much
   longer than the bound.
2. **INTERACTIVE**.
3. **BATCH**.

Within lanes 2 and 3, tenants share by start-time fair queueing: each task gets a virtual start
tag ``max(lane clock, the tenant's last finish tag)`` and a finish tag ``start + 1 / weight``;
tasks are served in start-tag order (arrival order breaks ties), and taking a task advances the
lane's clock to its start tag. A tenant that floods the queue pushes only its own tags into the
future: a task of another tenant arriving later is served after at most about one task of each
other tenant per unit of its weight. Within one tenant and lane the order is FIFO.

When full, policy ``reject`` refuses the new task; ``drop-oldest-batch`` makes room by dropping
the BATCH task that arrived first (the caller ends it), and refuses only when none is queued.
"""

from __future__ import annotations

import bisect
import enum
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from orchestrator.tasks import Priority, Task


class QueueFullError(Exception):
    """The queue holds ``capacity`` tasks and the policy cannot make room."""


class WhenFull(enum.Enum):
    """What a full queue does with one more task."""

    REJECT = "reject"
    DROP_OLDEST_BATCH = "drop-oldest-batch"


class _Lane(enum.IntEnum):
    AGED_BATCH = 0
    INTERACTIVE = 1
    BATCH = 2


_LANE_OF = {Priority.INTERACTIVE: _Lane.INTERACTIVE, Priority.BATCH: _Lane.BATCH}


@dataclass(order=True)
class _Entry:
    """A queued task's place: lane, then virtual start tag, then arrival number."""

    lane: _Lane
    tag: float
    seq: int
    task: Task = field(compare=False)
    arrived: float = field(compare=False)


@dataclass
class Admitted:
    """A task the queue took, where it stands, and a task dropped to make room (if any)."""

    position: int
    dropped: Task | None = None


class AdmissionQueue:
    """Tasks waiting for a pool, in the order they should be considered."""

    def __init__(
        self,
        capacity: int,
        *,
        when_full: WhenFull = WhenFull.REJECT,
        batch_max_wait_s: float = 30.0,
        tenant_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.capacity = capacity
        self.when_full = when_full
        self.batch_max_wait_s = batch_max_wait_s
        self._weights = dict(tenant_weights or {})
        self._order: list[_Entry] = []  # sorted: the service order
        self._by_model: dict[str, list[_Entry]] = {}  # the same, per model
        self._entries: dict[int, _Entry] = {}  # id(task) → entry
        self._batch_arrivals: deque[_Entry] = deque()  # BATCH entries by arrival (lazy removal)
        self._clock = {_Lane.INTERACTIVE: 0.0, _Lane.BATCH: 0.0}
        self._finish: dict[tuple[_Lane, str], float] = {}
        self._seq = 0
        self._front_seq = 0  # negative arrival numbers: requeued tasks go first

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Task]:
        """Tasks in service order."""
        return iter([e.task for e in self._order])

    def window(self, start: int, stop: int, model_id: str | None = None) -> list[Task]:
        """Tasks at positions ``start`` to ``stop`` (exclusive) in service order, among all
        tasks or among those of one model."""
        entries = self._order if model_id is None else self._by_model.get(model_id, [])
        return [e.task for e in entries[start:stop]]

    def models(self) -> list[str]:
        """Models with queued tasks."""
        return sorted(self._by_model)

    def depth_by_priority(self) -> dict[str, int]:
        """Queued tasks per priority (``interactive``, ``batch``); O(n), for metrics scrapes."""
        depth = {p.name.lower(): 0 for p in Priority}
        for entry in self._order:
            depth[entry.task.spec.priority.name.lower()] += 1
        return depth

    def count(self, model_id: str) -> int:
        """Queued tasks of one model."""
        return len(self._by_model.get(model_id, ()))

    def __contains__(self, task: object) -> bool:
        return id(task) in self._entries and self._entries[id(task)].task is task

    def weight(self, tenant: str) -> float:
        """A tenant's share (1.0 unless configured)."""
        return self._weights.get(tenant, 1.0)

    def push(self, task: Task, now: float, *, readmit: bool = False) -> Admitted:
        """Enqueues ``task`` (arrived at ``now``).

        ``readmit``: the task was accepted before (a journaled task after a restart): like
        ``push_front``, never refused and never the cause of a drop, even past ``capacity``
        (new tasks are then refused until the queue is below it again).

        Raises:
            QueueFullError: full, and the policy cannot make room.
        """
        dropped = None
        if len(self._order) >= self.capacity and not readmit:
            victim = self._oldest_batch() if self.when_full is WhenFull.DROP_OLDEST_BATCH else None
            if victim is None:
                raise QueueFullError
            self.remove(victim)
            dropped = victim
        lane = _LANE_OF[task.spec.priority]
        tenant = task.spec.tenant
        start = max(self._clock[lane], self._finish.get((lane, tenant), 0.0))
        self._finish[(lane, tenant)] = start + 1.0 / self.weight(tenant)
        entry = _Entry(lane, start, self._seq, task, now)
        self._seq += 1
        self._insert(entry)
        if lane is _Lane.BATCH:
            self._batch_arrivals.append(entry)
        return Admitted(self._index(entry), dropped)

    def push_front(self, task: Task, arrived: float) -> int:
        """Queues a task again ahead of its lane (its pool failed before it produced anything);
        never refused, since it was accepted before. Returns its position."""
        lane = _LANE_OF[task.spec.priority]
        self._front_seq -= 1
        entry = _Entry(lane, self._clock[lane], self._front_seq, task, arrived)
        self._insert(entry)
        if lane is _Lane.BATCH:
            self._batch_arrivals.appendleft(entry)
        return self._index(entry)

    def take(self, task: Task) -> None:
        """Removes a task because it is being served: its lane's virtual clock moves on."""
        entry = self._entries.get(id(task))
        if entry is None or entry.task is not task:
            raise ValueError("task is not queued")
        self._discard(entry)
        if entry.lane in self._clock:
            self._clock[entry.lane] = max(self._clock[entry.lane], entry.tag)

    def remove(self, task: Task) -> bool:
        """Removes a task that will not be served (cancelled, expired); False if not queued."""
        entry = self._entries.get(id(task))
        if entry is None or entry.task is not task:
            return False
        self._discard(entry)
        return True

    def position(self, task: Task) -> int:
        """How many tasks would be considered before ``task``.

        Raises:
            ValueError: the task is not queued.
        """
        entry = self._entries.get(id(task))
        if entry is None or entry.task is not task:
            raise ValueError("task is not queued")
        return self._index(entry)

    def age(self, now: float) -> bool:
        """Moves BATCH tasks that have waited ``batch_max_wait_s`` ahead; True if any moved."""
        moved = False
        while self._batch_arrivals:
            entry = self._batch_arrivals[0]
            if self._entries.get(id(entry.task)) is not entry or entry.lane is not _Lane.BATCH:
                self._batch_arrivals.popleft()  # already gone
                continue
            if now - entry.arrived < self.batch_max_wait_s:
                break
            self._batch_arrivals.popleft()
            self._discard(entry)
            aged = _Entry(_Lane.AGED_BATCH, float(entry.seq), entry.seq, entry.task, entry.arrived)
            self._insert(aged)
            moved = True
        return moved

    def next_aging_at(self) -> float | None:
        """When the next BATCH task ages, or None when no BATCH task waits."""
        for entry in self._batch_arrivals:
            if self._entries.get(id(entry.task)) is entry:
                return entry.arrived + self.batch_max_wait_s
        return None

    def _oldest_batch(self) -> Task | None:
        oldest = [e for e in self._order if e.lane is not _Lane.INTERACTIVE]
        return min(oldest, key=lambda e: e.seq).task if oldest else None

    def _index(self, entry: _Entry) -> int:
        return bisect.bisect_left(self._order, entry)

    def _insert(self, entry: _Entry) -> None:
        bisect.insort(self._order, entry)
        bisect.insort(self._by_model.setdefault(entry.task.spec.model_id, []), entry)
        self._entries[id(entry.task)] = entry

    def _discard(self, entry: _Entry) -> None:
        del self._order[self._index(entry)]
        model = entry.task.spec.model_id
        same = self._by_model[model]
        del same[bisect.bisect_left(same, entry)]
        if not same:
            del self._by_model[model]
        del self._entries[id(entry.task)]


class DrainMeter:
    """Tasks leaving the queue per second, over the last ``window`` departures."""

    def __init__(self, window: int = 32) -> None:
        self._times: deque[float] = deque(maxlen=window)

    def record(self, now: float) -> None:
        """One task left the queue for a pool at ``now``."""
        self._times.append(now)

    def rate(self, now: float) -> float | None:
        """Departures per second, or None before two have been seen.

        The time since the last departure counts too, so a queue that stopped draining shows a
        falling rate instead of its last busy one.
        """
        if len(self._times) < 2:
            return None
        span = max(now, self._times[-1]) - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else None

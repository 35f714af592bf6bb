"""The dispatcher: one loop owns the placement of queued tasks.

It wakes on every change (a task admitted, cancelled or finished, a pool's state changed),
expires what is overdue, places what can start, and has the forecaster publish fresh queue
positions. Tasks alike share one placement decision per pass (``DecisionKey``), so a long queue
of work that cannot start yet costs a pass almost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import NamedTuple

from mesh import logs
from mesh.errors import DeadlineExceededError, FailedPreconditionError, LlorchError
from mesh.prefix import hit_blocks
from orchestrator.admission import AdmissionQueue
from orchestrator.forecast import Forecaster
from orchestrator.lifecycle import PoolLifecycle
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.placement import (
    Outcome,
    PlacementDecision,
    PlacementInput,
    PoolView,
    decide,
    is_starving,
)
from orchestrator.pools import PoolRegistry
from orchestrator.relay import Relay
from orchestrator.tasks import Task

_log = logs.get_logger("orchestrator")

_WINDOW = 64
"""Queued tasks read at a time while placing."""


class DecisionKey(NamedTuple):
    """What one placement decision depends on: tasks with equal keys get equal decisions
    until an assignment or a swap changes the pools."""

    model_id: str
    tokens_needed: int
    starving: bool
    """Waited past the swap starvation bound (only where a swap is possible; else False)."""
    prefix_hits: tuple[int, ...] = ()
    """Blocks of its prompt each pool holds, when any pool holds some (else empty)."""
    prompt_bytes: int = 0
    """With ``prefix_hits`` only: the prompt's size, which the cost model counts."""
    prefix_waited_s: float = 0.0
    """With ``prefix_hits`` only: how long it has waited for a pool holding its prompt's start
    (tasks not passed over yet share decisions; one that was has its own)."""


def decision_key(
    task: Task,
    starving: bool = False,
    views: Sequence[PoolView] = (),
    *,
    affinity: bool = True,
    prefix_waited_s: float = 0.0,
) -> DecisionKey:
    """The decision key of ``task`` among ``views``."""
    model, tokens = task.spec.model_id, task.spec.sampling.max_tokens + 1
    if affinity and any(v.prefix_blocks for v in views):
        hashes = list(task.prefix_hashes)
        hits = tuple(hit_blocks(hashes, v.prefix_blocks) for v in views)
        if any(hits):
            size = len(task.spec.prompt.encode())
            return DecisionKey(model, tokens, starving, hits, size, prefix_waited_s)
    return DecisionKey(model, tokens, starving)


class Dispatcher:
    """Places queued tasks onto pools: the loop, the pass and its decision memo, deadlines."""

    def __init__(
        self,
        queue: AdmissionQueue,
        registry: PoolRegistry,
        forecaster: Forecaster,
        relay: Relay,
        lifecycle: PoolLifecycle,
        metrics: OrchestratorMetrics,
        clock: Callable[[], float],
        end: Callable[[Task, LlorchError], None],
        sweep: Callable[[float], None],
    ) -> None:
        """``end``: ends a task wherever it is; ``sweep``: forgets expired finished tasks."""
        self._queue = queue
        self._registry = registry
        self._forecaster = forecaster
        self._relay = relay
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._clock = clock
        self._end = end
        self._sweep = sweep
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._memo: dict[DecisionKey, PlacementDecision] = {}
        self._pass_started_ns = 0
        self.prefix_affinity = True
        """Placement weighs where a prompt's start is cached (off: least loaded only)."""
        self.prefix_wait_s = 0.0
        """How long a task may wait for a busy pool holding its prompt's start."""
        self._prefix_due: float | None = None  # when the first such wait runs out
        """Wall time (ns) the current pass began, for placement spans."""
        # Deadlines of queued tasks (deadline, arrival number, task); stale entries are skipped.
        self._deadlines: list[tuple[float, int, Task]] = []
        self._arrivals = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # The least VRAM each model's weights take (from the catalog, as tasks are admitted).
        self._model_bytes: dict[str, int] = {}

    def wake(self) -> None:
        """Asks for a pass on the loop's next turn."""
        self._wake.set()

    def start(self) -> None:
        """Starts the loop."""
        self._loop = asyncio.create_task(self._run(), name="dispatcher")

    async def stop(self) -> None:
        """Stops the loop and its timer."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if self._timer is not None:
            self._timer.cancel()

    def learn_model(self, model_id: str, size_bytes: int) -> None:
        """The size of a model's weights, the least VRAM a pool needs to load it."""
        self._model_bytes[model_id] = size_bytes

    def add_deadline(self, task: Task) -> None:
        """Expires ``task`` (DEADLINE_BEFORE_START) if it is still queued at its deadline."""
        if task.deadline is not None:
            self._arrivals += 1
            heapq.heappush(self._deadlines, (task.deadline, self._arrivals, task))

    def admitted(self, task: Task, now: float) -> None:
        """A task just joined the queue: place (or refuse) it now when it may be able to
        start, rather than on the loop's next turn (one loop iteration less before the first
        token); otherwise note why it waits."""
        open_models = _open_models(self._registry.views())
        alone = self._decide_alone(task, now) if open_models is None else None
        if (open_models is not None and task.spec.model_id in open_models) or (
            alone is not None and (alone.outcome is not Outcome.WAIT or alone.prefix_wait)
        ):
            # A wait for a prefix's pool runs the pass too: it starts the wait's clock and timer.
            self.pass_once()
            return
        self._note_waiting(task, now, alone)
        if task.queue_position != len(self._queue) - 1:
            # It went ahead of others: their positions changed.
            self._forecaster.schedule_positions(now)
        self._arm_timer_for(task)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self.pass_once()
            except Exception:  # a bug must not stop dispatching for every later task
                _log.exception("dispatch pass failed")

    def pass_once(self) -> None:
        """One pass: expire what is overdue, place what can start, publish positions.

        Only tasks of models with a free slot are looked at (in service order, in windows),
        and tasks alike share one decision.
        """
        now = self._clock()
        self._pass_started_ns = time.time_ns()
        self._queue.age(now)
        self._expire(now)
        self._relay.fail_over_lost_nodes()
        views = list(self._registry.views())
        open_models = _open_models(views)
        swaps = open_models is None
        demand: Counter[str] = Counter(self._demand() if swaps else {})
        memo = self._memo = {}
        self._prefix_due = None

        def open_now() -> set[str] | None:
            return open_models  # as the assignments below change it

        for task in self._placeable(open_now):
            starving = swaps and is_starving(task.spec.priority, now - task.created)
            key = self._key(task, starving, views, now)
            decision = memo.get(key)
            if decision is None:
                decision = self._decide(self._placement_input(task, views, demand, now))
                memo[key] = decision
            self._note_placement(task, decision)
            if decision.prefix_wait:
                if task.prefix_wait_since is None:
                    task.prefix_wait_since = now
                due = task.prefix_wait_since + decision.prefix_wait_bound_s
                self._prefix_due = due if self._prefix_due is None else min(self._prefix_due, due)
            if decision.outcome is Outcome.REJECT and views:
                self._end(
                    task, FailedPreconditionError(decision.reason, reason=decision.error_reason)
                )
            elif decision.outcome is Outcome.ASSIGN and decision.load and decision.pool:
                # The task stays queued; once the pool is ready with its model it is placed.
                model_id = task.spec.model_id
                self._lifecycle.swap(decision.pool, model_id)
                views = [
                    replace(v, model_id=model_id, ready=False) if v.key == decision.pool.key else v
                    for v in views
                ]
                memo.clear()
                open_models = _open_models(views)
            elif decision.outcome is Outcome.ASSIGN and decision.pool is not None:
                pool = decision.pool
                task.prefix_hit_blocks = decision.prefix_hit_blocks
                self._queue.take(task)
                self._forecaster.started(now)
                self._relay.start(task, pool, now, self._pass_started_ns)
                views = [
                    replace(v, in_flight=v.in_flight + 1) if v.key == pool.key else v for v in views
                ]
                demand[task.spec.model_id] -= 1
                memo.clear()
                open_models = _open_models(views)
        if open_models is not None:
            self._reject_unservable(views, open_models, now)
        self._forecaster.schedule_positions(now)
        self._sweep(now)
        self._arm_timer(now)

    def _placeable(self, open_now: Callable[[], set[str] | None]) -> Iterator[Task]:
        """Queued tasks to try, in service order, read in windows; ``open_now``: the pass's
        ``_open_models`` as its assignments change it.

        While an idle pool could load any model, every task; once none can (the pass gave it
        work), per model with a free slot, and a model whose pools filled up is left at once.
        Reading on through the whole queue after the idle pool was taken decided nothing new,
        and a pass that began with an idle pool read all of it: with 10,000 tasks queued, that
        was most of the orchestrator's time (bench/load.py).
        """
        index = 0
        while open_now() is None:
            window = self._queue.window(index, index + _WINDOW)
            if not window:
                return
            for task in window:
                if open_now() is not None:
                    break
                yield task
                if task in self._queue:
                    index += 1  # still waiting; a task that left shifted the rest forward
        for model in sorted(open_now() or ()):
            index = 0
            while model in (open_now() or ()):
                window = self._queue.window(index, index + _WINDOW, model)
                if not window:
                    break
                for task in window:
                    if model not in (open_now() or ()):
                        break
                    yield task
                    if task in self._queue:
                        index += 1

    def _reject_unservable(self, views: list[PoolView], open_models: set[str], now: float) -> None:
        """Ends queued tasks of models that no pool can ever serve (e.g. every pool serving
        the model failed); the placement loop looks only at models with a free slot."""
        if not views:
            return  # no pool manager answered yet: wait rather than refuse
        for model in self._queue.models():
            if model in open_models:
                continue
            head = self._queue.window(0, 1, model)[0]
            if (
                self._decide(self._placement_input(head, views, {}, now)).outcome
                is not Outcome.REJECT
            ):
                continue
            for task in self._queue.window(0, self._queue.count(model), model):
                decision = self._decide(self._placement_input(task, views, {}, now))
                if decision.outcome is Outcome.REJECT:
                    self._note_placement(task, decision)
                    self._end(
                        task,
                        FailedPreconditionError(decision.reason, reason=decision.error_reason),
                    )

    def _expire(self, now: float) -> None:
        """Fails queued tasks whose deadline has passed (they could not start in time)."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, task = heapq.heappop(self._deadlines)
            if task in self._queue:
                self._end(
                    task,
                    DeadlineExceededError(
                        f"task {task.task_id} could not start before its deadline",
                        reason="DEADLINE_BEFORE_START",
                    ),
                )

    def _demand(self) -> dict[str, int]:
        """Queued tasks per model."""
        return {m: self._queue.count(m) for m in self._queue.models()}

    def _decide_alone(self, task: Task, now: float) -> PlacementDecision:
        """Placement of this one task now, where an idle pool could swap models. Then every
        task is placeable, and a whole pass per submission would cost a pass over the queue
        each time; a task that must wait changes nothing for the others, so only one that can
        start (or must be refused) runs the pass."""
        views = list(self._registry.views())
        return self._decide(self._placement_input(task, views, self._demand(), now))

    def _decide(self, inp: PlacementInput) -> PlacementDecision:
        """``placement.decide``, counted by outcome."""
        decision = decide(inp)
        self._metrics.decisions.labels(decision.outcome.name.lower()).inc()
        return decision

    def _placement_input(
        self, task: Task, views: list[PoolView], demand: Mapping[str, int], now: float
    ) -> PlacementInput:
        model_id = task.spec.model_id
        return PlacementInput(
            failed_loads=self._lifecycle.failed_loads(model_id, now),
            model_id=model_id,
            tokens_needed=task.spec.sampling.max_tokens + 1,
            vram_needed_bytes=self._model_bytes.get(model_id, 0),
            pools=tuple(views),
            priority=task.spec.priority,
            waited_s=now - task.created,
            demand=demand,
            prefix_hashes=task.prefix_hashes if self.prefix_affinity else (),
            prefix_wait_s=self.prefix_wait_s,
            prefix_waited_s=self._prefix_waited(task, now),
            prompt_bytes=len(task.spec.prompt.encode()),
            max_tokens=task.spec.sampling.max_tokens,
            bytes_per_token=self._forecaster.bytes_per_token(model_id),
        )

    def _key(
        self, task: Task, starving: bool, views: Sequence[PoolView], now: float
    ) -> DecisionKey:
        """The task's decision key now (``decision_key`` with this dispatcher's settings)."""
        return decision_key(
            task,
            starving,
            views,
            affinity=self.prefix_affinity,
            prefix_waited_s=self._prefix_waited(task, now),
        )

    @staticmethod
    def _prefix_waited(task: Task, now: float) -> float:
        """How long the task has waited for a busy pool holding its prompt's start."""
        return 0.0 if task.prefix_wait_since is None else now - task.prefix_wait_since

    def _note_waiting(
        self, task: Task, now: float, decision: PlacementDecision | None = None
    ) -> None:
        """Placement reasons for a task queued while no pool could take it."""
        if decision is None:
            views = list(self._registry.views())
            key = self._key(task, False, views, now)
            decision = self._memo.get(key)
            if decision is None:
                decision = self._decide(self._placement_input(task, views, {}, now))
                self._memo[key] = decision
        self._note_placement(task, decision)

    def _note_placement(self, task: Task, decision: PlacementDecision) -> None:
        """Keeps a task's placement reasons for GetTask, and logs them when they change."""
        wait_reason = decision.reason if decision.outcome is Outcome.WAIT else ""
        if (
            decision.excluded != task.excluded
            or wait_reason != task.wait_reason
            or decision.prefix_hit_blocks
        ):
            _log.info(
                "placement: %s%s",
                decision.outcome.value,
                f" ({decision.reason})" if decision.reason else "",
                extra={
                    "task_id": task.task_id,
                    "excluded": "; ".join(f"{k}: {v}" for k, v in decision.excluded.items()),
                    "locality": decision.locality.name.lower() if decision.locality else "",
                    "prefix_hit_blocks": decision.prefix_hit_blocks,
                },
            )
            task.excluded = dict(decision.excluded)
        task.wait_reason = wait_reason

    def _arm_timer_for(self, task: Task) -> None:
        """Re-arms the timer if a newly queued task needs it earlier."""
        due = [t for t in (task.deadline, self._queue.next_aging_at()) if t is not None]
        if due and (self._timer_at is None or min(due) < self._timer_at):
            self._arm_timer(self._clock())

    def _arm_timer(self, now: float) -> None:
        """One timer, at the earliest deadline of a queued task, the next BATCH aging, or the
        end of the first wait for a pool holding a prompt's start."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        while self._deadlines and self._deadlines[0][2] not in self._queue:
            heapq.heappop(self._deadlines)  # started, cancelled or expired: no longer due
        deadlines = [self._deadlines[0][0]] if self._deadlines else []
        aging = self._queue.next_aging_at()
        if aging is not None:
            deadlines.append(aging)
        if self._prefix_due is not None:
            deadlines.append(self._prefix_due)
        if deadlines:
            self._timer_at = min(deadlines)
            delay = max(0.0, self._timer_at - now)
            self._timer = asyncio.get_running_loop().call_later(delay + 0.001, self._wake.set)


def _open_models(views: Iterable[PoolView]) -> set[str] | None:
    """Models that have a pool with a free slot now; None when an idle pool could load any
    model (then every task may be placeable)."""
    open_models: set[str] = set()
    for v in views:
        if not v.ready or not v.reachable or v.failed or v.draining:  # drained included
            continue
        if v.can_load and v.in_flight == 0:
            return None
        if v.slots_free > 0:
            open_models.add(v.model_id)
    return open_models

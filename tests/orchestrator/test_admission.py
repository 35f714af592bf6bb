"""Unit and property tests of orchestrator.admission: order, bound, fairness, aging, no loss."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.admission import AdmissionQueue, DrainMeter, QueueFullError, WhenFull
from orchestrator.tasks import Priority, Sampling, Task, TaskSpec

SAMPLING = Sampling(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=0)
INTER, B = Priority.INTERACTIVE, Priority.BATCH


def make_task(
    task_id: str, priority: Priority = INTER, tenant: str = "default", created: float = 0.0
) -> Task:
    spec = TaskSpec(
        model_id="tiny-llama", prompt="hi", sampling=SAMPLING, priority=priority, tenant=tenant
    )
    return Task(task_id, spec, correlation_id="c", created=created, deadline=None)


def ids(queue: AdmissionQueue) -> list[str]:
    return [t.task_id for t in queue]


def serve_all(queue: AdmissionQueue) -> list[str]:
    """Takes the head until the queue is empty; returns the order served."""
    served = []
    while len(queue):
        head = next(iter(queue))
        queue.take(head)
        served.append(head.task_id)
    return served


def test_empty_queue() -> None:
    queue = AdmissionQueue(capacity=3)
    assert len(queue) == 0
    assert list(queue) == []
    assert queue.next_aging_at() is None


def test_fifo_within_a_priority_and_tenant() -> None:
    queue = AdmissionQueue(capacity=10)
    for i in range(4):
        assert queue.push(make_task(f"t{i}"), 0.0).position == i
    assert ids(queue) == ["t0", "t1", "t2", "t3"]
    assert serve_all(queue) == ["t0", "t1", "t2", "t3"]


def test_interactive_is_served_before_batch() -> None:
    queue = AdmissionQueue(capacity=10)
    assert queue.push(make_task("b0", B), 0.0).position == 0
    assert queue.push(make_task("b1", B), 0.0).position == 1
    assert queue.push(make_task("i0"), 0.0).position == 0
    assert queue.push(make_task("i1"), 0.0).position == 1
    assert ids(queue) == ["i0", "i1", "b0", "b1"]


def test_a_batch_task_that_waited_the_bound_goes_first() -> None:
    queue = AdmissionQueue(capacity=10, batch_max_wait_s=5.0)
    queue.push(make_task("b0", B), 0.0)
    queue.push(make_task("b1", B), 3.0)
    queue.push(make_task("i0"), 4.0)
    assert queue.next_aging_at() == 5.0
    assert queue.age(4.9) is False
    assert ids(queue) == ["i0", "b0", "b1"]
    assert queue.age(5.0) is True
    assert ids(queue) == ["b0", "i0", "b1"]
    assert queue.next_aging_at() == 8.0
    queue.push(make_task("i1"), 9.0)
    queue.age(9.0)
    # Aged tasks keep their arrival order, ahead of every interactive task.
    assert ids(queue) == ["b0", "b1", "i0", "i1"]
    assert queue.next_aging_at() is None


def test_a_flooding_tenant_does_not_starve_another() -> None:
    queue = AdmissionQueue(capacity=100)
    for i in range(50):
        queue.push(make_task(f"a{i}", tenant="flood"), 0.0)
    queue.take(next(iter(queue)))  # a0 is being served
    queue.push(make_task("b0", tenant="quiet"), 0.0)
    # The quiet tenant's task goes ahead of the flooder's 49 waiting tasks.
    assert ids(queue)[:3] == ["b0", "a1", "a2"]


def test_weights_share_the_queue_in_proportion() -> None:
    queue = AdmissionQueue(capacity=100, tenant_weights={"big": 2.0})
    for i in range(20):
        queue.push(make_task(f"big{i}", tenant="big"), 0.0)
        queue.push(make_task(f"small{i}", tenant="small"), 0.0)
    first_twelve = serve_all(queue)[:12]
    assert sum(t.startswith("big") for t in first_twelve) == 8
    assert sum(t.startswith("small") for t in first_twelve) == 4


def test_reject_policy_refuses_when_full() -> None:
    queue = AdmissionQueue(capacity=2)
    queue.push(make_task("a"), 0.0)
    queue.push(make_task("b", B), 0.0)
    with pytest.raises(QueueFullError):
        queue.push(make_task("c"), 0.0)
    assert ids(queue) == ["a", "b"]


def test_drop_oldest_batch_makes_room() -> None:
    queue = AdmissionQueue(capacity=3, when_full=WhenFull.DROP_OLDEST_BATCH)
    b0, b1 = make_task("b0", B), make_task("b1", B)
    queue.push(b0, 0.0)
    queue.push(make_task("i0"), 0.0)
    queue.push(b1, 0.0)
    admitted = queue.push(make_task("i1"), 1.0)
    assert admitted.dropped is b0
    assert ids(queue) == ["i0", "i1", "b1"]
    assert queue.push(make_task("b2", B), 2.0).dropped is b1
    # Only interactive tasks and one new batch task left: a batch task can still be dropped.
    assert queue.push(make_task("i2"), 3.0).dropped is not None
    with pytest.raises(QueueFullError):  # nothing left to drop
        queue.push(make_task("i3"), 4.0)
    assert ids(queue) == ["i0", "i1", "i2"]


def test_a_readmitted_task_is_never_refused_nor_makes_room() -> None:
    # Tasks accepted before a restart queue again past the capacity; new ones wait for room.
    for when_full in WhenFull:
        queue = AdmissionQueue(capacity=1, when_full=when_full)
        queue.push(make_task("b0", B), 0.0)
        assert queue.push(make_task("b1", B), 0.0, readmit=True).dropped is None
        assert queue.push(make_task("i0"), 0.0, readmit=True).dropped is None
        assert ids(queue) == ["i0", "b0", "b1"]
        if when_full is WhenFull.REJECT:
            with pytest.raises(QueueFullError):
                queue.push(make_task("i1"), 1.0)
        else:  # a new task still makes room as the policy says, and the queue stays full
            assert queue.push(make_task("i1"), 1.0).dropped is not None
            assert len(queue) == 3


def test_remove_and_take() -> None:
    queue = AdmissionQueue(capacity=10)
    a, b = make_task("a"), make_task("b", B)
    queue.push(a, 0.0)
    queue.push(b, 0.0)
    assert queue.remove(a) is True
    assert queue.remove(a) is False
    assert queue.remove(make_task("b", B)) is False  # identity, not task id
    with pytest.raises(ValueError):
        queue.take(a)
    with pytest.raises(ValueError):
        queue.position(a)
    queue.take(b)
    assert len(queue) == 0


def test_drain_meter() -> None:
    meter = DrainMeter(window=4)
    assert meter.rate(0.0) is None
    meter.record(0.0)
    assert meter.rate(0.0) is None
    for t in (0.5, 1.0, 1.5):
        meter.record(t)
    assert meter.rate(1.5) == pytest.approx(2.0)
    # A queue that stopped draining shows a falling rate.
    assert meter.rate(3.0) == pytest.approx(1.0)


# --- properties ------------------------------------------------------------------------------

tenants = st.sampled_from(["a", "b", "c"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from(list(Priority)), tenants),
        st.tuples(st.just("take"), st.integers(0, 50), st.just("")),
        st.tuples(st.just("remove"), st.integers(0, 50), st.just("")),
        st.tuples(st.just("tick"), st.integers(0, 20), st.just("")),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=10),
    st.sampled_from(list(WhenFull)),
    operations,
)
def test_bound_order_and_no_loss(capacity: int, when_full: WhenFull, ops: list) -> None:
    """Whatever happens: never more than capacity; FIFO within (priority, tenant) until a task
    ages; INTERACTIVE ahead of unaged BATCH; every admitted task is queued, served, removed or
    dropped, exactly once."""
    queue = AdmissionQueue(capacity, when_full=when_full, batch_max_wait_s=10.0)
    now = 0.0
    queued: list[Task] = []  # in arrival order
    gone: dict[str, str] = {}
    created = 0
    for op, arg, tenant in ops:
        if op == "push":
            task = make_task(f"t{created}", arg, tenant, now)
            created += 1
            try:
                admitted = queue.push(task, now)
            except QueueFullError:
                assert len(queue) == capacity
                gone[task.task_id] = "refused"
                continue
            if admitted.dropped is not None:
                assert admitted.dropped.spec.priority is B
                assert admitted.dropped.task_id not in gone
                # The oldest batch task is the one dropped.
                oldest = min((t for t in queued if t.spec.priority is B), key=lambda t: t.created)
                assert admitted.dropped.created == oldest.created
                queued.remove(admitted.dropped)
                gone[admitted.dropped.task_id] = "dropped"
            queued.append(task)
        elif op in ("take", "remove") and queued:
            task = queued[arg % len(queued)]
            if op == "take":
                queue.take(task)
            else:
                assert queue.remove(task)
            queued.remove(task)
            gone[task.task_id] = op
        elif op == "tick":
            now += arg
            queue.age(now)
        order = list(queue)
        assert len(order) == len(queue) <= capacity
        assert {t.task_id for t in order} == {t.task_id for t in queued}
        assert len(gone) + len(queued) == created
        for i, task in enumerate(order):
            assert queue.position(task) == i
        aged = [t for t in order if t.spec.priority is B and now - t.created >= 10.0]
        fresh = [t for t in order if t not in aged]
        assert order[: len(aged)] == sorted(aged, key=lambda t: int(t.task_id[1:]))
        # Unaged: interactive first, and FIFO per (priority, tenant).
        prios = [t.spec.priority for t in fresh]
        assert prios == sorted(prios)
        for p in Priority:
            for tn in ("a", "b", "c"):
                lane = [
                    int(t.task_id[1:])
                    for t in fresh
                    if t.spec.priority is p and t.spec.tenant == tn
                ]
                assert lane == sorted(lane)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(0, 39), st.sampled_from([1.0, 2.0, 3.0]))
def test_a_late_task_waits_behind_a_bounded_number_of_a_flooders_tasks(
    flood: int, served_before: int, weight: float
) -> None:
    """A flooding tenant with weight w gets at most about w tasks served ahead of a task that
    another tenant submits later, however long its own backlog."""
    queue = AdmissionQueue(capacity=100, tenant_weights={"flood": weight})
    for i in range(flood):
        queue.push(make_task(f"f{i}", tenant="flood"), 0.0)
    for _ in range(min(served_before, flood)):
        queue.take(next(iter(queue)))
    queue.push(make_task("late", tenant="quiet"), 0.0)
    ahead = ids(queue).index("late")
    assert ahead <= weight + 1

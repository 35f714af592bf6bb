"""Unit tests of orchestrator.admission.AdmissionQueue."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.admission import AdmissionQueue, QueueFullError
from orchestrator.tasks import Priority, Sampling, Task, TaskSpec

SAMPLING = Sampling(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=0)


def make_task(task_id: str, priority: Priority = Priority.INTERACTIVE) -> Task:
    spec = TaskSpec(model_id="tiny-llama", prompt="hi", sampling=SAMPLING, priority=priority)
    return Task(task_id, spec, correlation_id="c", created=0.0, deadline=None)


def ids(queue: AdmissionQueue) -> list[str]:
    return [t.task_id for t in queue]


def test_empty_queue() -> None:
    queue = AdmissionQueue(capacity=3)
    assert len(queue) == 0
    assert list(queue) == []


def test_fifo_within_a_priority() -> None:
    queue = AdmissionQueue(capacity=10)
    for i in range(4):
        assert queue.push(make_task(f"t{i}")) == i
    assert ids(queue) == ["t0", "t1", "t2", "t3"]
    assert len(queue) == 4


def test_interactive_is_served_before_batch() -> None:
    queue = AdmissionQueue(capacity=10)
    b0 = make_task("b0", Priority.BATCH)
    b1 = make_task("b1", Priority.BATCH)
    i0 = make_task("i0")
    i1 = make_task("i1")
    assert queue.push(b0) == 0
    assert queue.push(b1) == 1
    # An interactive task goes ahead of every batch task.
    assert queue.push(i0) == 0
    assert queue.push(i1) == 1
    assert ids(queue) == ["i0", "i1", "b0", "b1"]


def test_position_counts_higher_priority_tasks_ahead() -> None:
    queue = AdmissionQueue(capacity=10)
    b0 = make_task("b0", Priority.BATCH)
    i0 = make_task("i0")
    b1 = make_task("b1", Priority.BATCH)
    i1 = make_task("i1")
    for t in (b0, i0, b1, i1):
        queue.push(t)
    assert queue.position(i0) == 0
    assert queue.position(i1) == 1
    assert queue.position(b0) == 2
    assert queue.position(b1) == 3


def test_position_of_a_task_not_queued_raises() -> None:
    queue = AdmissionQueue(capacity=10)
    queue.push(make_task("a"))
    with pytest.raises(ValueError):
        queue.position(make_task("b"))


def test_remove() -> None:
    queue = AdmissionQueue(capacity=10)
    a, b, c = make_task("a"), make_task("b", Priority.BATCH), make_task("c")
    for t in (a, b, c):
        queue.push(t)
    assert queue.remove(a) is True
    assert ids(queue) == ["c", "b"]
    assert queue.position(c) == 0
    assert queue.position(b) == 1
    assert len(queue) == 2
    # Removing again, or removing a task never queued, reports False and changes nothing.
    assert queue.remove(a) is False
    assert queue.remove(make_task("z", Priority.BATCH)) is False
    assert ids(queue) == ["c", "b"]


def test_remove_uses_identity_not_task_id() -> None:
    queue = AdmissionQueue(capacity=10)
    queue.push(make_task("same"))
    assert queue.remove(make_task("same")) is False
    assert len(queue) == 1


def test_capacity() -> None:
    queue = AdmissionQueue(capacity=2)
    a, b = make_task("a"), make_task("b", Priority.BATCH)
    queue.push(a)
    queue.push(b)
    with pytest.raises(QueueFullError):
        queue.push(make_task("c"))
    # Capacity counts every lane, and a refused task is not queued.
    assert ids(queue) == ["a", "b"]
    assert len(queue) == 2
    queue.remove(a)
    assert queue.push(make_task("d")) == 0
    with pytest.raises(QueueFullError):
        queue.push(make_task("e", Priority.BATCH))


def test_zero_capacity_refuses_everything() -> None:
    queue = AdmissionQueue(capacity=0)
    with pytest.raises(QueueFullError):
        queue.push(make_task("a"))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from(list(Priority))),
        st.tuples(st.just("remove"), st.integers(min_value=0, max_value=50)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=12), ops)
def test_order_is_a_stable_sort_of_insertion_order(capacity: int, operations) -> None:
    queue = AdmissionQueue(capacity=capacity)
    model: list[Task] = []  # queued tasks in insertion order
    created: list[Task] = []
    for op, arg in operations:
        if op == "push":
            task = make_task(f"t{len(created)}", arg)
            created.append(task)
            if len(model) >= capacity:
                with pytest.raises(QueueFullError):
                    queue.push(task)
                continue
            model.append(task)
            expected = sorted(model, key=lambda t: t.spec.priority)
            assert queue.push(task) == expected.index(task)
        elif created:
            task = created[arg % len(created)]
            assert queue.remove(task) is (task in model)
            if task in model:
                model.remove(task)
        expected = sorted(model, key=lambda t: t.spec.priority)  # sorted() is stable
        assert [t.task_id for t in queue] == [t.task_id for t in expected]
        assert len(queue) == len(model)
        for i, t in enumerate(expected):
            assert queue.position(t) == i

"""Unit tests of orchestrator.tasks.Task: its event log and Task.follow."""

from __future__ import annotations

import asyncio

import pytest

from mesh.errors import CancelledError, UnavailableError
from orchestrator.tasks import (
    Failed,
    Finished,
    Metrics,
    Queued,
    Sampling,
    Started,
    Task,
    TaskEvent,
    TaskSpec,
    TaskState,
    Tokens,
)

SAMPLING = Sampling(max_tokens=16, temperature=0.0, top_p=1.0, top_k=0, seed=0)
STARTED = Started(
    pool_id="cpu-0", node_id="local", model_id="tiny-llama", engine_version="x", queue_ms=1.0
)
FINISHED = Finished(reason="length", tokens_in=3, tokens_out=6, ttft_ms=1.0, decode_ms=2.0)
METRICS = Metrics(decode_tokens_per_second=100.0, total_ms=3.0)


def make_task() -> Task:
    spec = TaskSpec(model_id="tiny-llama", prompt="hi", sampling=SAMPLING)
    return Task("t1", spec, correlation_id="c", created=0.0, deadline=None)


def running_task() -> Task:
    task = make_task()
    task.start(STARTED, now=1.0)
    return task


async def collect(task: Task, from_index: int = 0) -> list[TaskEvent]:
    return [event async for event in task.follow(from_index)]


async def settle() -> None:
    """Lets every ready coroutine run (no timing involved)."""
    for _ in range(10):
        await asyncio.sleep(0)


# --- Queued events --------------------------------------------------------------------------


def test_queued_changes_only_when_position_changes_or_prediction_moves() -> None:
    task = make_task()
    task.set_queued(3, 1000)
    assert task.log == [Queued(3, 1000)]
    assert task.latest_queued == Queued(3, 1000)
    assert task.predicted_start_ms == 1000
    # Same position, prediction within 20%: nothing new.
    task.set_queued(3, 1100)
    task.set_queued(3, 850)
    assert task.latest_queued == Queued(3, 1000)
    assert task.queue_position == 3
    assert task.predicted_start_ms == 1000
    # Same prediction, new position: a new value.
    task.set_queued(2, 1000)
    assert task.latest_queued == Queued(2, 1000)
    assert task.queue_position == 2
    # Prediction moved by more than 20% of the larger value (vs. the last *sent* one).
    task.set_queued(2, 1300)
    assert task.latest_queued == Queued(2, 1300)
    assert task.predicted_start_ms == 1300
    # However often it changes, the log holds one Queued entry.
    assert len(task.log) == 1


def test_the_log_does_not_grow_with_position_changes() -> None:
    task = make_task()
    for position in range(10_000, 0, -1):
        task.set_queued(position, position * 10)
    assert len(task.log) == 1
    assert task.latest_queued == Queued(1, 10)


def test_queued_small_predictions_use_the_50ms_floor() -> None:
    task = make_task()
    task.set_queued(1, 0)
    task.set_queued(1, 50)  # 50 ms off: not worth an event
    assert task.latest_queued == Queued(1, 0)
    task.set_queued(1, 51)  # more than 50 ms off
    assert task.latest_queued == Queued(1, 51)


def test_queued_drift_is_measured_against_the_last_event_sent() -> None:
    task = make_task()
    task.set_queued(1, 1000)
    # Each step is within 20% of the previous call, but the third is far from the sent 1000.
    task.set_queued(1, 1150)
    task.set_queued(1, 1200)
    assert task.latest_queued == Queued(1, 1000)
    task.set_queued(1, 1300)
    assert task.latest_queued == Queued(1, 1300)


async def test_a_live_reader_gets_every_change_and_a_late_one_only_the_latest() -> None:
    task = make_task()
    task.set_queued(2, 1000)
    live = task.follow()
    assert await anext(live) == Queued(2, 1000)
    task.set_queued(1, 1000)
    assert await anext(live) == Queued(1, 1000)
    task.set_queued(1, 1010)  # not a change worth sending
    task.set_queued(0, 500)
    assert await anext(live) == Queued(0, 500)
    task.start(STARTED, now=1.0)
    assert await anext(live) == STARTED
    await live.aclose()
    task.succeed(FINISHED, None, now=2.0)
    assert await collect(task) == [Queued(0, 500), STARTED, FINISHED]


def test_set_queued_after_start_is_ignored() -> None:
    task = running_task()
    task.set_queued(0, 10)
    assert task.log == [STARTED]
    assert task.queue_position == 0


# --- state transitions ----------------------------------------------------------------------


def test_start_records_pool_and_state() -> None:
    task = make_task()
    task.start(STARTED, now=5.0)
    assert task.state is TaskState.RUNNING
    assert task.started_at == 5.0
    assert (task.pool_id, task.node_id) == ("cpu-0", "local")
    task.start(Started("other", "n2", "m", "v", 0.0), now=6.0)
    assert task.log == [STARTED]
    assert task.pool_id == "cpu-0"


def test_tokens_before_start_are_ignored() -> None:
    task = make_task()
    task.add_tokens(Tokens(0, (1,), "a"))
    assert task.log == []
    assert task.tokens_out == 0


def test_non_contiguous_token_index_raises() -> None:
    task = running_task()
    task.add_tokens(Tokens(0, (1, 2), "ab"))
    with pytest.raises(ValueError):
        task.add_tokens(Tokens(3, (4,), "d"))  # gap
    with pytest.raises(ValueError):
        task.add_tokens(Tokens(1, (2,), "b"))  # overlap
    assert task.tokens_out == 2
    assert task.log == [STARTED, Tokens(0, (1, 2), "ab")]
    task.add_tokens(Tokens(2, (3,), "c"))
    assert task.tokens_out == 3


def test_succeed() -> None:
    task = running_task()
    task.add_tokens(Tokens(0, (1,), "a"))
    task.succeed(FINISHED, METRICS, now=9.0)
    assert task.state is TaskState.SUCCEEDED
    assert task.terminal
    assert task.ended_at == 9.0
    assert task.log[-2:] == [METRICS, FINISHED]
    assert task.finished == FINISHED
    assert task.error is None


def test_fail_with_other_error_is_failed_not_cancelled() -> None:
    task = running_task()
    err = UnavailableError("pool went away")
    task.fail(err, now=2.0)
    assert task.state is TaskState.FAILED
    assert task.error is err
    assert task.finished is None


async def test_cancel_is_the_last_word() -> None:
    task = running_task()
    task.add_tokens(Tokens(0, (1,), "a"))
    cancel = CancelledError("cancelled by client")
    task.fail(cancel, now=3.0)
    assert task.state is TaskState.CANCELLED
    assert task.terminal
    assert task.ended_at == 3.0
    # Nothing is appended after the cancel.
    task.add_tokens(Tokens(1, (2,), "b"))
    task.succeed(FINISHED, METRICS, now=4.0)
    task.fail(UnavailableError("late"), now=5.0)
    assert task.state is TaskState.CANCELLED
    assert task.tokens_out == 1
    assert task.error is cancel
    assert task.ended_at == 3.0
    events = await collect(task)
    assert events == [STARTED, Tokens(0, (1,), "a"), Failed(cancel)]


async def test_cancel_while_queued() -> None:
    task = make_task()
    task.set_queued(0, 0)
    task.fail(CancelledError("bye"), now=1.0)
    task.start(STARTED, now=2.0)
    assert task.state is TaskState.CANCELLED
    events = await collect(task)
    assert isinstance(events[-1], Failed)
    assert not any(isinstance(e, Started) for e in events)


# --- follow ---------------------------------------------------------------------------------


async def test_late_reader_gets_tokens_coalesced() -> None:
    task = running_task()
    task.add_tokens(Tokens(0, (10, 11), "ab"))
    task.add_tokens(Tokens(2, (12,), "c"))
    task.add_tokens(Tokens(3, (13, 14, 15), "def"))
    task.succeed(FINISHED, METRICS, now=2.0)
    events = await collect(task)
    assert events == [
        STARTED,
        Tokens(0, (10, 11, 12, 13, 14, 15), "abcdef"),
        METRICS,
        FINISHED,
    ]


async def test_superseded_queued_events_are_skipped_for_a_late_reader() -> None:
    # The working tree's follow() keeps the latest Queued event even once started (a task placed
    # at submit would otherwise never show its queue position); only superseded ones are stale.
    task = make_task()
    task.set_queued(3, 1000)
    task.set_queued(2, 1000)
    task.set_queued(1, 1000)
    task.start(STARTED, now=1.0)
    task.succeed(FINISHED, None, now=2.0)
    events = await collect(task)
    assert events == [Queued(1, 1000), STARTED, FINISHED]


async def test_a_started_task_with_no_queued_event_sends_none() -> None:
    task = running_task()
    task.set_queued(5, 5000)  # ignored once started
    task.succeed(FINISHED, None, now=2.0)
    assert await collect(task) == [STARTED, FINISHED]


async def test_only_the_latest_queued_event_is_sent_before_start() -> None:
    task = make_task()
    task.set_queued(3, 1000)
    task.set_queued(2, 1000)
    task.set_queued(1, 1000)
    reader = task.follow()
    assert await anext(reader) == Queued(1, 1000)
    task.set_queued(0, 1000)
    assert await anext(reader) == Queued(0, 1000)
    task.start(STARTED, now=1.0)
    assert await anext(reader) == STARTED
    await reader.aclose()


async def test_from_index_skips_earlier_chunks_and_sends_a_straddling_chunk_whole() -> None:
    task = running_task()
    task.add_tokens(Tokens(0, (1, 2), "ab"))
    task.add_tokens(Tokens(2, (3, 4, 5), "cde"))
    task.add_tokens(Tokens(5, (6,), "f"))
    task.succeed(FINISHED, None, now=2.0)

    def tokens(events: list[TaskEvent]) -> list[Tokens]:
        return [e for e in events if isinstance(e, Tokens)]

    assert tokens(await collect(task, 0)) == [Tokens(0, (1, 2, 3, 4, 5, 6), "abcdef")]
    assert tokens(await collect(task, 1)) == [Tokens(0, (1, 2, 3, 4, 5, 6), "abcdef")]
    # Index 2 is where the second chunk starts: the first one is skipped.
    assert tokens(await collect(task, 2)) == [Tokens(2, (3, 4, 5, 6), "cdef")]
    # Index 3 falls inside the second chunk: it is sent whole, its index says where it starts.
    assert tokens(await collect(task, 3)) == [Tokens(2, (3, 4, 5, 6), "cdef")]
    assert tokens(await collect(task, 5)) == [Tokens(5, (6,), "f")]
    assert tokens(await collect(task, 6)) == []
    # Non-token events are never skipped.
    assert await collect(task, 6) == [STARTED, FINISHED]


async def test_live_reader_gets_each_chunk_and_from_index_applies_to_live_chunks() -> None:
    task = running_task()
    reader = task.follow(from_index=3)
    assert await anext(reader) == STARTED
    task.add_tokens(Tokens(0, (1, 2), "ab"))  # ends before 3: skipped
    task.add_tokens(Tokens(2, (3, 4), "cd"))  # straddles 3: sent whole
    assert await anext(reader) == Tokens(2, (3, 4), "cd")
    task.add_tokens(Tokens(4, (5,), "e"))
    assert await anext(reader) == Tokens(4, (5,), "e")
    task.succeed(FINISHED, None, now=2.0)
    assert await anext(reader) == FINISHED
    with pytest.raises(StopAsyncIteration):
        await anext(reader)


async def test_blocked_reader_is_woken_by_new_events() -> None:
    task = make_task()
    seen: list[TaskEvent] = []

    async def read() -> None:
        async for event in task.follow():
            seen.append(event)

    reader = asyncio.create_task(read())
    await settle()
    assert seen == []
    assert not reader.done()

    task.set_queued(0, 100)
    await settle()
    assert seen == [Queued(0, 100)]

    task.start(STARTED, now=1.0)
    await settle()
    assert seen[-1] == STARTED

    task.add_tokens(Tokens(0, (7,), "x"))
    await settle()
    assert seen[-1] == Tokens(0, (7,), "x")
    assert not reader.done()

    task.fail(CancelledError("stop"), now=2.0)
    await settle()
    assert reader.done()
    await reader
    assert isinstance(seen[-1], Failed)
    assert isinstance(seen[-1].error, CancelledError)
    assert seen == [Queued(0, 100), STARTED, Tokens(0, (7,), "x"), seen[-1]]


async def test_several_blocked_readers_are_all_woken() -> None:
    task = running_task()
    readers = [asyncio.create_task(collect(task)) for _ in range(3)]
    await settle()
    task.add_tokens(Tokens(0, (1,), "a"))
    await settle()
    task.add_tokens(Tokens(1, (2,), "b"))
    await settle()
    task.succeed(FINISHED, None, now=2.0)
    await settle()
    assert all(r.done() for r in readers)
    for r in readers:
        assert r.result() == [STARTED, Tokens(0, (1,), "a"), Tokens(1, (2,), "b"), FINISHED]


async def test_reader_that_detaches_and_reattaches_sees_everything_from_the_start() -> None:
    task = running_task()
    task.add_tokens(Tokens(0, (1,), "a"))
    first = task.follow()
    assert await anext(first) == STARTED
    await first.aclose()
    task.add_tokens(Tokens(1, (2,), "b"))
    task.succeed(FINISHED, None, now=2.0)
    assert await collect(task) == [STARTED, Tokens(0, (1, 2), "ab"), FINISHED]


async def test_follow_of_a_terminal_task_ends_without_blocking() -> None:
    task = running_task()
    task.succeed(FINISHED, None, now=2.0)
    events = await asyncio.wait_for(collect(task), timeout=5)
    assert events[-1] == FINISHED

"""SubmitTasks end to end: a batch is admitted entry by entry, journaled before the answer, and
runs in the order given; a refused entry names its place; a malformed batch fails as a whole.

One CPU pool with one slot, held by a long generation (the "hog") so that the batch queues.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2

from tests.conftest import Mesh, start_mesh, stop_mesh
from tests.e2e.helpers import error_details, generate_request, status_details
from tests.e2e.test_admission import _hog, _start_order


def _request(
    name: str, model_id: str = "tiny-llama", **fields: object
) -> orchestrator_pb2.SubmitTaskRequest:
    return orchestrator_pb2.SubmitTaskRequest(
        model_id=model_id,
        prompt=f"task {name}",
        sampling=common_pb2.SamplingParams(max_tokens=4),
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
async def four_places(tmp_path: Path, long_model: Path) -> AsyncIterator[Mesh]:
    # One slot: the batch's entries run one after another, in order.
    mesh = await start_mesh(tmp_path, long_model, pool={"slots": 1}, queue_capacity=4)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


async def test_a_batch_is_admitted_entry_by_entry_and_runs_in_order(
    four_places: Mesh, tmp_path: Path
) -> None:
    mesh = four_places
    hog = await _hog(mesh)
    no_prompt = _request("x")
    no_prompt.prompt = ""
    response = await mesh.stub.SubmitTasks(
        orchestrator_pb2.SubmitTasksRequest(
            requests=[
                _request("a", request_id="key-a"),
                no_prompt,
                _request("x", model_id="no-such-model"),
                _request("a again", request_id="key-a"),
                _request("b"),
                _request("c", priority=common_pb2.PRIORITY_BATCH),
                _request("d"),
                _request("e"),  # the queue holds four: refused
            ]
        )
    )
    results = response.results
    assert [r.WhichOneof("result") for r in results] == [
        "task",
        "error",
        "error",
        "task",
        "task",
        "task",
        "task",
        "error",
    ]
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status_details(results[1].error)["fields"] == ["requests[1].prompt"]
    assert "requests[1].prompt" in results[1].error.message
    assert results[2].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    full = status_details(results[7].error)
    assert results[7].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert full["reason"] == "QUEUE_FULL" and full["retriable"] and full["retry_delay_ms"] > 0
    # The same request id within a batch is one task.
    assert results[3].task.task_id == results[0].task.task_id
    ids = {n: results[i].task.task_id for n, i in (("a", 0), ("b", 4), ("c", 5), ("d", 6))}
    assert len(set(ids.values())) == 4
    # Positions as admitted: c is BATCH, so d (INTERACTIVE) went ahead of it.
    positions = {n: results[i].task.queue_position for n, i in (("a", 0), ("b", 4), ("d", 6))}
    assert positions == {"a": 0, "b": 1, "d": 2}
    assert all(results[i].task.predicted_start_ms > 0 for i in (0, 4, 5, 6))

    # Journaled before the answer came: a restart would find all four.
    with sqlite3.connect(tmp_path / "journal.db") as db:
        journaled = {row[0] for row in db.execute("SELECT task_id FROM tasks")}
    assert set(ids.values()) <= journaled

    hog.cancel()
    assert await _start_order(mesh, ids) == ["a", "b", "d", "c"]


async def test_an_empty_or_oversized_batch_fails_as_a_whole(four_places: Mesh) -> None:
    for count in (0, 1001):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await four_places.stub.SubmitTasks(
                orchestrator_pb2.SubmitTasksRequest(requests=[_request("x")] * count)
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(raised.value)["fields"] == ["requests"]
    # Nothing of them was admitted: the pool's slot takes the next task at once.
    done = four_places.stub.Generate(generate_request(max_tokens=2))
    kinds = [r.event.WhichOneof("kind") async for r in done]
    assert kinds[-1] == "finished"

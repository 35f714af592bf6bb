"""Bad input gets a clear status naming the field; never INTERNAL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from llorch.orchestrator.v1 import orchestrator_pb2

from tests.conftest import Mesh
from tests.e2e.helpers import collect, error_details, generate_request

INVALID = grpc.StatusCode.INVALID_ARGUMENT

CASES: list[tuple[str, dict[str, Any], grpc.StatusCode, str | None]] = [
    ("missing model", {"model_id": ""}, INVALID, "model_id"),
    ("model id is a path", {"model_id": "../etc/passwd"}, INVALID, "model_id"),
    ("unknown model", {"model_id": "no-such-model"}, grpc.StatusCode.NOT_FOUND, None),
    ("empty prompt", {"prompt": ""}, INVALID, "prompt"),
    ("prompt over the limit", {"prompt": "x" * 65_537}, INVALID, "prompt"),
    ("max_tokens zero", {"max_tokens": 0}, INVALID, "sampling.max_tokens"),
    ("max_tokens negative", {"max_tokens": -5}, INVALID, "sampling.max_tokens"),
    ("max_tokens beyond the context", {"max_tokens": 4096}, INVALID, "sampling.max_tokens"),
    ("temperature negative", {"temperature": -0.1}, INVALID, "sampling.temperature"),
    ("top_p zero", {"top_p": 0.0}, INVALID, "sampling.top_p"),
    ("top_p above one", {"top_p": 1.5}, INVALID, "sampling.top_p"),
    ("top_k negative", {"top_k": -1}, INVALID, "sampling.top_k"),
    ("empty stop sequence", {"stop": [""]}, INVALID, "sampling.stop[0]"),
    ("too many stop sequences", {"stop": [str(i) for i in range(9)]}, INVALID, "sampling.stop"),
    ("priority out of range", {"priority": 9}, INVALID, "priority"),
    # The prompt fits the model's context only without the requested tokens: the worker refuses.
    (
        "prompt + max_tokens over n_ctx",
        {"prompt": "zz " * 800, "max_tokens": 2000},
        INVALID,
        "sampling.max_tokens",
    ),
    ("prompt alone over n_ctx", {"prompt": "zz " * 1500}, INVALID, "prompt"),
]


def _request(case: dict[str, Any]) -> orchestrator_pb2.GenerateRequest:
    sampling = {k: v for k, v in case.items() if k not in ("model_id", "prompt", "priority")}
    request = generate_request(
        case.get("prompt", "Hello"), case.get("model_id", "tiny-llama"), **sampling
    )
    request.priority = case.get("priority", 0)
    return request


@pytest.mark.parametrize(("name", "case", "code", "field"), CASES, ids=[c[0] for c in CASES])
async def test_generate_rejects_bad_input(
    mesh: Mesh, name: str, case: dict[str, Any], code: grpc.StatusCode, field: str | None
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(mesh.stub.Generate(_request(case), timeout=30))
    err = raised.value
    assert err.code() == code, err.details()
    details = error_details(err)
    assert details["retriable"] is False
    if field is not None:
        assert details["fields"] == [field]
        assert field in (err.details() or "")


async def test_submit_rejects_bad_input_too(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.stub.SubmitTask(
            orchestrator_pb2.SubmitTaskRequest(model_id="tiny-llama", prompt="")
        )
    assert raised.value.code() == INVALID
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.stub.SubmitTask(
            orchestrator_pb2.SubmitTaskRequest(
                model_id="tiny-llama", prompt="x", request_id="r" * 129
            )
        )
    assert error_details(raised.value)["fields"] == ["request_id"]


@pytest.mark.parametrize("rpc", ["GetTask", "CancelTask", "StreamTask"])
async def test_unknown_task_id_is_not_found(mesh: Mesh, rpc: str) -> None:
    requests = {
        "GetTask": orchestrator_pb2.GetTaskRequest(task_id="f" * 32),
        "CancelTask": orchestrator_pb2.CancelTaskRequest(task_id="f" * 32),
        "StreamTask": orchestrator_pb2.StreamTaskRequest(task_id="f" * 32),
    }
    call = getattr(mesh.stub, rpc)(requests[rpc])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        if rpc == "StreamTask":
            await collect(call)
        else:
            await call
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(raised.value)["reason"] == "TASK_NOT_FOUND"


async def test_missing_task_id_is_invalid(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.stub.GetTask(orchestrator_pb2.GetTaskRequest())
    assert raised.value.code() == INVALID
    assert error_details(raised.value)["fields"] == ["task_id"]


async def test_mesh_still_serves_after_bad_input(mesh: Mesh) -> None:
    for _, case, _, _ in CASES[:6]:
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(mesh.stub.Generate(_request(case), timeout=30))
    got = await collect(mesh.stub.Generate(generate_request(max_tokens=4, ignore_eos=True)))
    assert len(got.token_ids) == 4

"""Protobuf ↔ orchestrator domain types, with validation that names the offending field."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2

from mesh.common_types import FINISH_REASON_TO_PB, check_sampling
from mesh.errors import InvalidArgumentError, LlorchError
from mesh.ids import check_name
from orchestrator.chat import ChatMessage
from orchestrator.structured import grammar_of
from orchestrator.tasks import (
    Finished,
    Metrics,
    Priority,
    Queued,
    Sampling,
    Started,
    Task,
    TaskEvent,
    TaskSpec,
    TaskState,
    Tokens,
)

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
MAX_REQUEST_ID_BYTES = 128

_PRIORITY_FROM_PB = {
    common_pb2.PRIORITY_UNSPECIFIED: Priority.INTERACTIVE,
    common_pb2.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    common_pb2.PRIORITY_BATCH: Priority.BATCH,
}
_PRIORITY_TO_PB = {
    Priority.INTERACTIVE: common_pb2.PRIORITY_INTERACTIVE,
    Priority.BATCH: common_pb2.PRIORITY_BATCH,
}
_STATE_TO_PB = {
    TaskState.QUEUED: orchestrator_pb2.TASK_STATE_QUEUED,
    TaskState.RUNNING: orchestrator_pb2.TASK_STATE_RUNNING,
    TaskState.SUCCEEDED: orchestrator_pb2.TASK_STATE_SUCCEEDED,
    TaskState.FAILED: orchestrator_pb2.TASK_STATE_FAILED,
    TaskState.CANCELLED: orchestrator_pb2.TASK_STATE_CANCELLED,
}


_ROLE_FROM_PB = {
    orchestrator_pb2.ROLE_SYSTEM: "system",
    orchestrator_pb2.ROLE_USER: "user",
    orchestrator_pb2.ROLE_ASSISTANT: "assistant",
    orchestrator_pb2.ROLE_TOOL: "tool",
}
MAX_MESSAGES = 1024


class TaskRequest(Protocol):
    """GenerateRequest and SubmitTaskRequest share these fields."""

    model_id: str
    prompt: str
    sampling: common_pb2.SamplingParams
    priority: int

    @property
    def messages(self) -> Sequence[orchestrator_pb2.ChatMessage]: ...

    @property
    def response_format(self) -> orchestrator_pb2.ResponseFormat: ...


def _messages_from_pb(
    messages: Sequence[orchestrator_pb2.ChatMessage], max_prompt_bytes: int
) -> tuple[ChatMessage, ...]:
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgumentError("messages", f"has more than {MAX_MESSAGES} messages")
    out: list[ChatMessage] = []
    total = 0
    for i, message in enumerate(messages):
        role = _ROLE_FROM_PB.get(message.role)
        if role is None:
            raise InvalidArgumentError(
                f"messages[{i}].role",
                "is required" if message.role == 0 else f"unknown value {message.role}",
            )
        total += len(message.content.encode("utf-8"))
        out.append(ChatMessage(role, message.content))
    if total > max_prompt_bytes:
        raise InvalidArgumentError(
            "messages", f"hold {total} bytes of content; the limit is {max_prompt_bytes} bytes"
        )
    return tuple(out)


def spec_from_pb(
    request: TaskRequest,
    *,
    request_id: str,
    max_prompt_bytes: int,
    default_max_tokens: int,
    tenant: str = "default",
) -> TaskSpec:
    """Validates a request and resolves the defaults of its sampling parameters."""
    model_id = check_name(request.model_id, "model_id")
    messages: tuple[ChatMessage, ...] = ()
    if request.messages:
        if request.prompt:
            raise InvalidArgumentError("prompt", "must be empty when messages are given")
        messages = _messages_from_pb(request.messages, max_prompt_bytes)
    elif not request.prompt:
        raise InvalidArgumentError("prompt", "is required (or messages)")
    else:
        check_prompt_size("prompt", request.prompt, max_prompt_bytes)
    if request.priority not in _PRIORITY_FROM_PB:
        raise InvalidArgumentError("priority", f"unknown value {request.priority}")
    if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidArgumentError("request_id", f"is longer than {MAX_REQUEST_ID_BYTES} bytes")
    s = request.sampling
    defaulted = not s.HasField("max_tokens")
    max_tokens = default_max_tokens if defaulted else s.max_tokens
    if max_tokens <= 0:
        raise InvalidArgumentError("sampling.max_tokens", "must be > 0")
    temperature = s.temperature if s.HasField("temperature") else DEFAULT_TEMPERATURE
    top_p = s.top_p if s.HasField("top_p") else DEFAULT_TOP_P
    top_k = s.top_k if s.HasField("top_k") else DEFAULT_TOP_K
    check_sampling(temperature, top_p, top_k, s.stop)
    grammar = grammar_of(request.response_format, "response_format")
    if grammar and s.ignore_eos:
        raise InvalidArgumentError(
            "sampling.ignore_eos",
            "cannot be set with a response_format: the grammar ends the text with the "
            "end-of-sequence token",
        )
    # A sampling seed is no secret: the fast generator will do (os.urandom per task showed).
    seed = s.seed if s.HasField("seed") else random.getrandbits(32)
    spec = TaskSpec(
        model_id=model_id,
        prompt=request.prompt,
        sampling=Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(s.stop),
            ignore_eos=s.ignore_eos,
        ),
        priority=_PRIORITY_FROM_PB[request.priority],
        request_id=request_id,
        max_tokens_defaulted=defaulted,
        tenant=tenant,
        messages=messages,
        grammar=grammar,
    )
    return spec


def check_prompt_size(field: str, prompt: str, max_prompt_bytes: int) -> None:
    """Refuses a prompt (as sent, or as rendered from messages) above the size limit."""
    prompt_bytes = len(prompt.encode("utf-8"))
    if prompt_bytes > max_prompt_bytes:
        raise InvalidArgumentError(
            field, f"is {prompt_bytes} bytes; the limit is {max_prompt_bytes} bytes"
        )


def event_to_pb(task_id: str, event: TaskEvent) -> orchestrator_pb2.TaskEvent:
    """A domain event as protobuf. Failed events are not sent; they become the call's status."""
    if isinstance(event, Tokens):
        return orchestrator_pb2.TaskEvent(
            task_id=task_id,
            token=common_pb2.Token(index=event.index, text=event.text, token_ids=event.token_ids),
        )
    if isinstance(event, Queued):
        return orchestrator_pb2.TaskEvent(
            task_id=task_id,
            queued=orchestrator_pb2.Queued(
                position=event.position, predicted_start_ms=event.predicted_start_ms
            ),
        )
    if isinstance(event, Started):
        return orchestrator_pb2.TaskEvent(
            task_id=task_id,
            started=orchestrator_pb2.Started(
                pool_id=event.pool_id,
                node_id=event.node_id,
                model_id=event.model_id,
                engine_version=event.engine_version,
                queue_ms=event.queue_ms,
            ),
        )
    if isinstance(event, Metrics):
        return orchestrator_pb2.TaskEvent(
            task_id=task_id,
            metrics=orchestrator_pb2.Metrics(
                decode_tokens_per_second=event.decode_tokens_per_second, total_ms=event.total_ms
            ),
        )
    if isinstance(event, Finished):
        return orchestrator_pb2.TaskEvent(task_id=task_id, finished=finished_to_pb(event))
    raise TypeError(f"{type(event).__name__} is not sent as an event")


def finished_to_pb(event: Finished) -> common_pb2.Finished:
    """The Finished summary as protobuf."""
    return common_pb2.Finished(
        finish_reason=FINISH_REASON_TO_PB.get(event.reason, common_pb2.FINISH_REASON_UNSPECIFIED),
        tokens_in=event.tokens_in,
        tokens_out=event.tokens_out,
        ttft_ms=event.ttft_ms,
        decode_ms=event.decode_ms,
        tokens_cached=event.tokens_cached,
    )


def task_to_pb(task: Task) -> orchestrator_pb2.Task:
    """A task's state as protobuf."""
    out = orchestrator_pb2.Task(
        task_id=task.task_id,
        model_id=task.spec.model_id,
        state=_STATE_TO_PB[task.state],
        priority=_PRIORITY_TO_PB[task.spec.priority],
        queue_position=task.queue_position if task.state is TaskState.QUEUED else 0,
        pool_id=task.pool_id,
        tokens_out=task.tokens_out,
        correlation_id=task.correlation_id,
        tenant=task.spec.tenant,
        node_id=task.node_id,
        wait_reason=task.wait_reason if task.state is TaskState.QUEUED else "",
        excluded_pools=[
            orchestrator_pb2.PoolExclusion(pool=pool, reason=reason)
            for pool, reason in sorted(task.excluded.items())
        ],
        prefix_hit_blocks=task.prefix_hit_blocks,
    )
    if task.finished is not None:
        out.finished.CopyFrom(finished_to_pb(task.finished))
    if task.error is not None:
        out.error.CopyFrom(error_to_pb(task.error))
    return out


def error_to_pb(error: LlorchError) -> orchestrator_pb2.TaskError:
    """A task's terminal error as protobuf."""
    return orchestrator_pb2.TaskError(
        code=error.code.name,
        reason=error.reason,
        message=error.message,
        retriable=error.retriable,
    )


def state_to_pb(state: TaskState) -> int:
    """Task state enum value."""
    return int(_STATE_TO_PB[state])


def state_from_pb(value: int, field: str) -> TaskState:
    """A task state from its enum value; INVALID_ARGUMENT naming ``field`` when unknown."""
    for state, pb in _STATE_TO_PB.items():
        if pb == value:
            return state
    raise InvalidArgumentError(field, f"unknown task state {value}")

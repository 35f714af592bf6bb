"""OrchestratorService: transport only. Converts protobuf and hands off to the Orchestrator."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import grpc
from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from mesh import auth, logs
from mesh.errors import InvalidArgumentError, LlorchError, NotFoundError, PermissionDeniedError
from mesh.ids import check_name
from mesh.server import ServiceBinding
from mesh.settings import OrchestratorSettings
from orchestrator import convert
from orchestrator.service import Orchestrator
from orchestrator.tasks import Failed, Task, TaskSpec, TaskState

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """gRPC face of the Orchestrator."""

    def __init__(self, orchestrator: Orchestrator, settings: OrchestratorSettings) -> None:
        self._orch = orchestrator
        self._settings = settings

    def binding(self) -> ServiceBinding:
        """How the bootstrap adds this servicer."""
        return ServiceBinding(
            SERVICE_NAME,
            lambda s: orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(self, s),
        )

    async def Generate(
        self, request: orchestrator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
        # The call's deadline is the task's: a task that cannot start in time fails early.
        task = await self._submit(request, "", context.time_remaining(), context)
        try:
            async for event in _events(task, 0):
                yield orchestrator_pb2.GenerateResponse(event=event)
        finally:
            # The client went away or its deadline passed: the task goes with the call.
            if not task.terminal:
                self._orch.cancel(task.task_id)

    async def SubmitTask(
        self, request: orchestrator_pb2.SubmitTaskRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.SubmitTaskResponse:
        # The task outlives this call, so the call's deadline is not the task's; the answer
        # waits until the task is journaled, so an accepted task survives a restart.
        task = await self._submit(request, request.request_id, None, context, durable=True)
        return orchestrator_pb2.SubmitTaskResponse(
            task_id=task.task_id,
            queue_position=task.queue_position,
            predicted_start_ms=task.predicted_start_ms,
        )

    async def SubmitTasks(
        self, request: orchestrator_pb2.SubmitTasksRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.SubmitTasksResponse:
        if not request.requests:
            raise InvalidArgumentError("requests", "is empty; give at least one task")
        if len(request.requests) > MAX_BATCH:
            raise InvalidArgumentError(
                "requests", f"has {len(request.requests)} tasks; at most {MAX_BATCH} per call"
            )
        tenant = _tenant(context)
        specs: list[TaskSpec | LlorchError] = []
        for one in request.requests:
            try:
                specs.append(self._spec(one, one.request_id, tenant))
            except LlorchError as err:
                specs.append(err)
        results = await self._orch.submit_many(specs, correlation_id=logs.correlation_id.get())
        response = orchestrator_pb2.SubmitTasksResponse()
        for i, result in enumerate(results):
            if isinstance(result, Task):
                response.results.add(
                    task=orchestrator_pb2.SubmitTaskResponse(
                        task_id=result.task_id,
                        queue_position=result.queue_position,
                        predicted_start_ms=result.predicted_start_ms,
                    )
                )
            else:
                response.results.add(error=_in_batch(result, i).to_rpc_status())
        return response

    async def StreamTask(
        self, request: orchestrator_pb2.StreamTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.StreamTaskResponse]:
        task = _own(self._orch.get(_task_id(request.task_id)))
        logs.task_id.set(task.task_id)
        async for event in _events(task, request.from_index):
            yield orchestrator_pb2.StreamTaskResponse(event=event)

    async def CancelTask(
        self, request: orchestrator_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.CancelTaskResponse:
        task = self._orch.cancel(_own(self._orch.get(_task_id(request.task_id))).task_id)
        return orchestrator_pb2.CancelTaskResponse(state=convert.state_to_pb(task.state))

    async def GetTask(
        self, request: orchestrator_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.GetTaskResponse:
        task = _own(self._orch.get(_task_id(request.task_id)))
        return orchestrator_pb2.GetTaskResponse(task=convert.task_to_pb(task))

    async def ListModels(
        self, request: orchestrator_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ListModelsResponse:
        who = auth.caller.get()
        return orchestrator_pb2.ListModelsResponse(
            models=[
                orchestrator_pb2.ServedModel(
                    model_id=m.model_id,
                    context_length=m.context_length,
                    chat=bool(m.chat_template),
                    created_unix_ms=m.created_unix_ms,
                )
                for m in await self._orch.models()
                if who is None or who.may_use(m.model_id)
            ]
        )

    async def ListTasks(
        self, request: orchestrator_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ListTasksResponse:
        size = request.page_size or _DEFAULT_PAGE
        if not 1 <= size <= _MAX_PAGE:
            raise InvalidArgumentError(
                "page_size", f"must be 1 to {_MAX_PAGE} (0: {_DEFAULT_PAGE})"
            )
        model_id = check_name(request.model_id, "model_id") if request.model_id else ""
        state = convert.state_from_pb(request.state, "state") if request.state else None
        filters = f"{request.state}/{model_id}"
        after = _page_after(request.page_token, filters)
        who = auth.caller.get()
        tenant = who.tenant if who is not None and not who.sees_every_tenant else None
        chosen = sorted(
            (
                t
                for t in self._orch.tasks()
                if (tenant is None or t.spec.tenant == tenant)
                and (state is None or t.state is state)
                and (not model_id or t.spec.model_id == model_id)
                and (after is None or (-t.created, t.task_id) > after)
            ),
            key=lambda t: (-t.created, t.task_id),
        )
        page = chosen[:size]
        response = orchestrator_pb2.ListTasksResponse()
        for task in page:
            if task.state is TaskState.QUEUED:
                task = self._orch.get(task.task_id)  # its position, exact now
            response.tasks.append(convert.task_to_pb(task))
        if len(chosen) > size:
            last = page[-1]
            response.next_page_token = _page_token(-last.created, last.task_id, filters)
        return response

    async def _submit(
        self,
        request: convert.TaskRequest,
        request_id: str,
        timeout_s: float | None,
        context: grpc.aio.ServicerContext,
        *,
        durable: bool = False,
    ) -> Task:
        spec = self._spec(request, request_id, _tenant(context))
        task = await self._orch.submit(
            spec,
            correlation_id=logs.correlation_id.get(),
            timeout_s=timeout_s,
            durable=durable,
        )
        logs.task_id.set(task.task_id)
        return task

    def _spec(self, request: convert.TaskRequest, request_id: str, tenant: str) -> TaskSpec:
        spec = convert.spec_from_pb(
            request,
            request_id=request_id,
            max_prompt_bytes=self._settings.max_prompt_bytes,
            default_max_tokens=self._settings.default_max_tokens,
            tenant=tenant,
        )
        who = auth.caller.get()
        if who is not None and not who.may_use(spec.model_id):
            raise PermissionDeniedError(
                f"key {who.name} may not use model {spec.model_id}", reason="MODEL_NOT_ALLOWED"
            )
        return spec


async def _events(task: Task, from_index: int) -> AsyncIterator[orchestrator_pb2.TaskEvent]:
    async for event in task.follow(from_index):
        if isinstance(event, Failed):
            raise event.error
        yield convert.event_to_pb(task.task_id, event)


TENANT_HEADER = "x-llorch-tenant"
DEFAULT_TENANT = "default"


def _tenant(context: grpc.aio.ServicerContext) -> str:
    """The caller's tenant: its API key's; without auth (loopback), the ``x-llorch-tenant``
    metadata value, taken on trust, or ``default``."""
    who = auth.caller.get()
    if who is not None:
        return who.tenant
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_HEADER:
            return check_name(str(value), TENANT_HEADER)
    return DEFAULT_TENANT


_DEFAULT_PAGE = 100
_MAX_PAGE = 1000


def _page_token(key: float, task_id: str, filters: str) -> str:
    raw = json.dumps([key, task_id, filters]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _page_after(token: str, filters: str) -> tuple[float, str] | None:
    """Where a page token says the previous page ended; INVALID_ARGUMENT when it is not one of
    ours, or came with other filters."""
    if not token:
        return None
    try:
        key, task_id, made_with = json.loads(base64.urlsafe_b64decode(token.encode()))
        after = (float(key), str(task_id))
    except (ValueError, TypeError):
        raise InvalidArgumentError("page_token", "is not a token ListTasks returned") from None
    if made_with != filters:
        raise InvalidArgumentError("page_token", "was made for other filters")
    return after


MAX_BATCH = 1000
"""Most tasks one SubmitTasks call takes."""


def _in_batch(error: LlorchError, index: int) -> LlorchError:
    """``error`` as refusing the request at ``index`` of a batch: its fields get the prefix."""
    if isinstance(error, InvalidArgumentError):
        description = error.field_violations[0][1] if error.field_violations else error.message
        return InvalidArgumentError(
            f"requests[{index}].{error.field}", description, reason=error.reason
        )
    return error


def _own(task: Task) -> Task:
    """``task`` if the caller may see it: a client key sees only its tenant's tasks, and any
    other task does not exist for it (NOT_FOUND, as for an unknown id: ids are not probed)."""
    who = auth.caller.get()
    if who is not None and not who.sees_every_tenant and task.spec.tenant != who.tenant:
        raise NotFoundError(f"task {task.task_id} does not exist", reason="TASK_NOT_FOUND")
    return task


def _task_id(value: str) -> str:
    if not value:
        raise InvalidArgumentError("task_id", "is required")
    if len(value) > 64:
        raise InvalidArgumentError("task_id", "is not a task id")
    return value

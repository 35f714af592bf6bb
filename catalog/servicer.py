"""CatalogService: transport only. Validates requests, converts protobuf, calls the store."""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import asdict

import grpc
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from catalog.convert import (
    MAX_INT64,
    STATE_FROM_PB,
    engine_from_pb,
    engine_to_pb,
    gc_policy_from_pb,
    gc_policy_to_pb,
    model_record_from_pb,
    model_to_pb,
)
from catalog.store import CatalogStore, ConflictError, GcPolicy, ModelRecord, ReplicaRecord
from mesh import auth
from mesh.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from mesh.ids import check_name
from mesh.server import ServiceBinding

SERVICE_NAME = catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name
_DEFAULT_PAGE = 100
_MAX_PAGE = 1000
_MAX_PAGE_BYTES = 2 * 1024 * 1024
"""A ListModels answer stops short of its page size past this many bytes: records carry chat
templates and control tokens (up to ~800 KiB each, catalog.convert), and gRPC's default receive
limit is 4 MiB."""


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """gRPC face of the catalog store."""

    def __init__(self, store: CatalogStore, any_node_id: bool = False) -> None:
        """``any_node_id``: a pool manager's certificate need not name the node it writes for
        (fleets sharing one certificate; catalog_service.node_identity = "any")."""
        self._store = store
        self._any_node_id = any_node_id

    def _may_write_for(self, node_id: str, field: str) -> None:
        auth.require_own_node(
            node_id, f"write the records ({field})", any_node_id=self._any_node_id
        )

    def binding(self) -> ServiceBinding:
        """How the bootstrap adds this servicer."""
        return ServiceBinding(
            SERVICE_NAME, lambda s: catalog_pb2_grpc.add_CatalogServiceServicer_to_server(self, s)
        )

    async def RegisterModel(
        self, request: catalog_pb2.RegisterModelRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.RegisterModelResponse:
        record = model_record_from_pb(request.model)
        replicas = []
        for i, loc in enumerate(request.locations):
            check_name(loc.node_id, f"locations[{i}].node_id")
            self._may_write_for(loc.node_id, f"locations[{i}].node_id")
            if not loc.path.startswith("/"):
                raise InvalidArgumentError(f"locations[{i}].path", "must be an absolute path")
            if loc.size_bytes > MAX_INT64:
                raise InvalidArgumentError(
                    f"locations[{i}].size_bytes", f"must be at most {MAX_INT64}"
                )
            replicas.append(ReplicaRecord(record.model_id, loc.node_id, loc.path, loc.size_bytes))
        try:
            stored = await asyncio.to_thread(self._store.register, record, replicas)
        except ConflictError as exc:
            raise AlreadyExistsError(str(exc), reason="MODEL_EXISTS") from None
        return catalog_pb2.RegisterModelResponse(model=model_to_pb(stored))

    async def GetModel(
        self, request: catalog_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.GetModelResponse:
        model_id = check_name(request.model_id, "model_id")
        record = await asyncio.to_thread(self._store.get, model_id)
        return catalog_pb2.GetModelResponse(model=model_to_pb(_found(record, model_id)))

    async def ListModels(
        self, request: catalog_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.ListModelsResponse:
        if request.page_size < 0 or request.page_size > _MAX_PAGE:
            raise InvalidArgumentError("page_size", f"must be between 0 and {_MAX_PAGE}")
        size = request.page_size or _DEFAULT_PAGE
        after = _decode_page_token(request.page_token)
        state = None
        if request.state != catalog_pb2.MODEL_STATE_UNSPECIFIED:
            state = STATE_FROM_PB.get(request.state)
            if state is None:
                raise InvalidArgumentError("state", f"unknown state {request.state}")
        if request.node_id:
            check_name(request.node_id, "node_id")
        records = await asyncio.to_thread(
            self._store.list_models, after, size + 1, state, request.node_id
        )
        models: list[catalog_pb2.Model] = []
        page_bytes = 0
        for record in records[:size]:
            model = model_to_pb(record)
            page_bytes += model.ByteSize()
            if models and page_bytes > _MAX_PAGE_BYTES:
                break
            models.append(model)
        next_token = ""
        if len(models) < len(records):
            next_token = base64.urlsafe_b64encode(models[-1].model_id.encode()).decode()
        return catalog_pb2.ListModelsResponse(models=models, next_page_token=next_token)

    async def LocateModel(
        self, request: catalog_pb2.LocateModelRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.LocateModelResponse:
        model_id = check_name(request.model_id, "model_id")
        if request.node_id:
            check_name(request.node_id, "node_id")
        _found(await asyncio.to_thread(self._store.get, model_id), model_id)
        replicas = await asyncio.to_thread(self._store.locate, model_id, request.node_id)
        return catalog_pb2.LocateModelResponse(
            locations=[
                catalog_pb2.ModelLocation(
                    node_id=r.node_id,
                    path=r.path,
                    size_bytes=r.size_bytes,
                    last_used_unix_ms=r.last_used_unix_ms,
                )
                for r in replicas
            ]
        )

    async def SetModelState(
        self, request: catalog_pb2.SetModelStateRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.SetModelStateResponse:
        model_id = check_name(request.model_id, "model_id")
        state = STATE_FROM_PB.get(request.state)
        if state is None:
            raise InvalidArgumentError("state", "must be MODEL_STATE_ACTIVE or MODEL_STATE_RETIRED")
        record = await asyncio.to_thread(self._store.set_state, model_id, state)
        return catalog_pb2.SetModelStateResponse(model=model_to_pb(_found(record, model_id)))

    async def RegisterEngine(
        self, request: catalog_pb2.RegisterEngineRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.RegisterEngineResponse:
        record = engine_from_pb(request.engine)
        self._may_write_for(record.node_id, "engine.node_id")
        stored = await asyncio.to_thread(self._store.put_engine, record)
        return catalog_pb2.RegisterEngineResponse(engine=engine_to_pb(stored))

    async def ListEngines(
        self, request: catalog_pb2.ListEnginesRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.ListEnginesResponse:
        if request.node_id:
            check_name(request.node_id, "node_id")
        records = await asyncio.to_thread(self._store.list_engines, request.node_id)
        return catalog_pb2.ListEnginesResponse(engines=[engine_to_pb(r) for r in records])

    async def DeleteModel(
        self, request: catalog_pb2.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.DeleteModelResponse:
        model_id = check_name(request.model_id, "model_id")
        replicas = await asyncio.to_thread(self._store.delete_model, model_id)
        if replicas is None:
            raise NotFoundError(f"model {model_id} is not in the catalog", reason="MODEL_NOT_FOUND")
        return catalog_pb2.DeleteModelResponse(
            locations=[
                catalog_pb2.ModelLocation(node_id=r.node_id, path=r.path, size_bytes=r.size_bytes)
                for r in replicas
            ]
        )

    async def MarkModelsUsed(
        self, request: catalog_pb2.MarkModelsUsedRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.MarkModelsUsedResponse:
        node_id = check_name(request.node_id, "node_id")
        self._may_write_for(node_id, "node_id")
        if len(request.model_ids) > _MAX_PAGE:
            raise InvalidArgumentError("model_ids", f"at most {_MAX_PAGE} at once")
        ids = [check_name(m, f"model_ids[{i}]") for i, m in enumerate(request.model_ids)]
        await asyncio.to_thread(self._store.mark_used, node_id, ids)
        return catalog_pb2.MarkModelsUsedResponse()

    async def DeleteReplica(
        self, request: catalog_pb2.DeleteReplicaRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.DeleteReplicaResponse:
        model_id = check_name(request.model_id, "model_id")
        node_id = check_name(request.node_id, "node_id")
        self._may_write_for(node_id, "node_id")
        if not request.path.startswith("/"):
            raise InvalidArgumentError("path", "must be an absolute path")
        removed = await asyncio.to_thread(
            self._store.delete_replica, model_id, node_id, request.path
        )
        return catalog_pb2.DeleteReplicaResponse(removed=removed)

    async def GetGcPolicy(
        self, request: catalog_pb2.GetGcPolicyRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.GetGcPolicyResponse:
        if request.node_id:
            check_name(request.node_id, "node_id")
        stored, own = await asyncio.to_thread(self._store.gc_policy, request.node_id)
        policy = GcPolicy(**stored) if stored is not None else GcPolicy()  # type: ignore[arg-type]
        return catalog_pb2.GetGcPolicyResponse(policy=gc_policy_to_pb(policy), node_specific=own)

    async def SetGcPolicy(
        self, request: catalog_pb2.SetGcPolicyRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.SetGcPolicyResponse:
        if request.node_id:
            check_name(request.node_id, "node_id")
        if not request.HasField("policy"):
            raise InvalidArgumentError("policy", "is required")
        policy = gc_policy_from_pb(request.policy)
        await asyncio.to_thread(self._store.set_gc_policy, request.node_id, asdict(policy))
        return catalog_pb2.SetGcPolicyResponse(policy=gc_policy_to_pb(policy))

    async def SetModelPinned(
        self, request: catalog_pb2.SetModelPinnedRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.SetModelPinnedResponse:
        model_id = check_name(request.model_id, "model_id")
        record = await asyncio.to_thread(self._store.set_pinned, model_id, request.pinned)
        return catalog_pb2.SetModelPinnedResponse(model=model_to_pb(_found(record, model_id)))


def _found(record: ModelRecord | None, model_id: str) -> ModelRecord:
    if record is None:
        raise NotFoundError(f"model {model_id} is not in the catalog", reason="MODEL_NOT_FOUND")
    return record


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgumentError("page_token", "is not a token this server issued") from None

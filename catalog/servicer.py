"""CatalogService: transport only. Validates requests, converts protobuf, calls the store."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import asdict

import grpc
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from catalog.store import (
    CatalogStore,
    ConflictError,
    EngineRecord,
    ModelRecord,
    ModelState,
    ReplicaRecord,
)
from mesh import auth
from mesh.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from mesh.ids import check_name
from mesh.server import ServiceBinding
from provisioners.gc import GcPolicy

SERVICE_NAME = catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_DEFAULT_PAGE = 100
_MAX_PAGE = 1000
_MAX_INT64 = 2**63 - 1  # SQLite integers are signed 64-bit

_STATE_TO_PB = {
    ModelState.ACTIVE: catalog_pb2.MODEL_STATE_ACTIVE,
    ModelState.RETIRED: catalog_pb2.MODEL_STATE_RETIRED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}


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
        record = _record_from_pb(request.model)
        replicas = []
        for i, loc in enumerate(request.locations):
            check_name(loc.node_id, f"locations[{i}].node_id")
            self._may_write_for(loc.node_id, f"locations[{i}].node_id")
            if not loc.path.startswith("/"):
                raise InvalidArgumentError(f"locations[{i}].path", "must be an absolute path")
            if loc.size_bytes > _MAX_INT64:
                raise InvalidArgumentError(
                    f"locations[{i}].size_bytes", f"must be at most {_MAX_INT64}"
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
            state = _STATE_FROM_PB.get(request.state)
            if state is None:
                raise InvalidArgumentError("state", f"unknown state {request.state}")
        if request.node_id:
            check_name(request.node_id, "node_id")
        records = await asyncio.to_thread(
            self._store.list_models, after, size + 1, state, request.node_id
        )
        next_token = ""
        if len(records) > size:
            records = records[:size]
            next_token = base64.urlsafe_b64encode(records[-1].model_id.encode()).decode()
        return catalog_pb2.ListModelsResponse(
            models=[model_to_pb(r) for r in records], next_page_token=next_token
        )

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
        state = _STATE_FROM_PB.get(request.state)
        if state is None:
            raise InvalidArgumentError("state", "must be MODEL_STATE_ACTIVE or MODEL_STATE_RETIRED")
        record = await asyncio.to_thread(self._store.set_state, model_id, state)
        return catalog_pb2.SetModelStateResponse(model=model_to_pb(_found(record, model_id)))

    async def RegisterEngine(
        self, request: catalog_pb2.RegisterEngineRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.RegisterEngineResponse:
        record = _engine_from_pb(request.engine)
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


def gc_policy_to_pb(policy: GcPolicy) -> catalog_pb2.GcPolicy:
    """The wire form of a GC policy."""
    return catalog_pb2.GcPolicy(
        max_disk_usage_pct=policy.max_disk_usage_pct,
        min_free_bytes=policy.min_free_bytes,
        keep_active=policy.keep_active,
        keep_used_within_days=policy.keep_used_within_days,
        delete_retired_after_days=policy.delete_retired_after_days,
    )


def gc_policy_from_pb(policy: catalog_pb2.GcPolicy) -> GcPolicy:
    """A GC policy from the wire, validated field by field."""
    if not 1.0 <= policy.max_disk_usage_pct <= 100.0:
        raise InvalidArgumentError("policy.max_disk_usage_pct", "must be between 1 and 100")
    if policy.min_free_bytes > _MAX_INT64:
        raise InvalidArgumentError("policy.min_free_bytes", f"must be at most {_MAX_INT64}")
    for name in ("keep_used_within_days", "delete_retired_after_days"):
        value = getattr(policy, name)
        if not 0.0 <= value <= 36_500.0:
            raise InvalidArgumentError(f"policy.{name}", "must be between 0 and 36500 days")
    return GcPolicy(
        max_disk_usage_pct=policy.max_disk_usage_pct,
        min_free_bytes=policy.min_free_bytes,
        keep_active=policy.keep_active,
        keep_used_within_days=policy.keep_used_within_days,
        delete_retired_after_days=policy.delete_retired_after_days,
    )


def engine_to_pb(record: EngineRecord) -> catalog_pb2.Engine:
    """The wire form of an engine record."""
    return catalog_pb2.Engine(
        node_id=record.node_id,
        name=record.name,
        version=record.version,
        backend=record.backend,
        build_info=record.build_info,
        path=record.path,
        gpu_offload=record.gpu_offload,
        backend_libraries=list(record.backend_libraries),
        checked_unix_ms=record.checked_unix_ms,
    )


_ENGINE_TEXT_LIMIT = 4096
_ENGINE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_BACKENDS = ("cpu", "cuda", "metal", "vulkan", "rocm", "sycl", "opencl")


def _engine_from_pb(engine: catalog_pb2.Engine) -> EngineRecord:
    node_id = check_name(engine.node_id, "engine.node_id")
    for name in ("name", "version"):
        if not _ENGINE_NAME_RE.fullmatch(getattr(engine, name)):
            raise InvalidArgumentError(
                f"engine.{name}", "must be 1-64 letters, digits, '.', '_', '+' or '-'"
            )
    if engine.backend not in _BACKENDS:
        raise InvalidArgumentError("engine.backend", f"must be one of {', '.join(_BACKENDS)}")
    if engine.path and not engine.path.startswith("/"):
        raise InvalidArgumentError("engine.path", "must be an absolute path")
    for name in ("build_info", "path"):
        if len(getattr(engine, name)) > _ENGINE_TEXT_LIMIT:
            raise InvalidArgumentError(
                f"engine.{name}", f"must be at most {_ENGINE_TEXT_LIMIT} characters"
            )
    for i, lib in enumerate(engine.backend_libraries):
        if not re.fullmatch(r"[a-z0-9]{1,16}", lib):  # ggml's library names: cpu, cuda, blas, rpc
            raise InvalidArgumentError(
                f"engine.backend_libraries[{i}]", "must be 1-16 lowercase letters or digits"
            )
    return EngineRecord(
        node_id=node_id,
        name=engine.name,
        version=engine.version,
        backend=engine.backend,
        build_info=engine.build_info,
        path=engine.path,
        gpu_offload=engine.gpu_offload,
        backend_libraries=tuple(engine.backend_libraries),
    )


def _found(record: ModelRecord | None, model_id: str) -> ModelRecord:
    if record is None:
        raise NotFoundError(f"model {model_id} is not in the catalog", reason="MODEL_NOT_FOUND")
    return record


def model_to_pb(record: ModelRecord) -> catalog_pb2.Model:
    """Converts a stored model to its protobuf."""
    return catalog_pb2.Model(
        model_id=record.model_id,
        source_ref=record.source_ref,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        facts=catalog_pb2.ModelFacts(
            architecture=record.architecture,
            parameter_count=record.parameter_count,
            file_type=record.file_type,
            context_length=record.context_length,
            block_count=record.block_count,
            embedding_length=record.embedding_length,
        ),
        state=_STATE_TO_PB[record.state],
        pinned=record.pinned,
        created_unix_ms=record.created_unix_ms,
        last_used_unix_ms=record.last_used_unix_ms,
        state_changed_unix_ms=record.state_changed_unix_ms,
    )


def _record_from_pb(model: catalog_pb2.Model) -> ModelRecord:
    model_id = check_name(model.model_id, "model.model_id")
    if not _SHA256_RE.fullmatch(model.sha256):
        raise InvalidArgumentError("model.sha256", "must be 64 lowercase hex digits")
    if not 0 < model.size_bytes <= _MAX_INT64:
        raise InvalidArgumentError("model.size_bytes", f"must be between 1 and {_MAX_INT64}")
    if model.facts.parameter_count > _MAX_INT64:
        raise InvalidArgumentError("model.facts.parameter_count", f"must be at most {_MAX_INT64}")
    if not model.source_ref:
        raise InvalidArgumentError("model.source_ref", "is required")
    if not model.facts.architecture:
        raise InvalidArgumentError("model.facts.architecture", "is required")
    if model.facts.context_length == 0:
        raise InvalidArgumentError("model.facts.context_length", "must be > 0")
    if model.state == catalog_pb2.MODEL_STATE_UNSPECIFIED:
        state = ModelState.ACTIVE
    elif model.state in _STATE_FROM_PB:
        state = _STATE_FROM_PB[model.state]
    else:
        raise InvalidArgumentError("model.state", "unknown state")
    return ModelRecord(
        model_id=model_id,
        source_ref=model.source_ref,
        sha256=model.sha256,
        size_bytes=model.size_bytes,
        architecture=model.facts.architecture,
        parameter_count=model.facts.parameter_count,
        file_type=model.facts.file_type,
        context_length=model.facts.context_length,
        block_count=model.facts.block_count,
        embedding_length=model.facts.embedding_length,
        state=state,
        pinned=model.pinned,
    )


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgumentError("page_token", "is not a token this server issued") from None

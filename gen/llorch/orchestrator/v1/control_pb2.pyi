from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PoolStatus(_message.Message):
    __slots__ = ("node_id", "pool_id", "model_id", "state", "reachable", "drained", "slots_total", "slots_busy", "n_ctx", "engine_version", "devices", "queued", "last_error", "vram_estimate_bytes", "vram_measured_bytes", "vram_free_bytes", "cpu_only", "tasks_finished", "tokens_out", "prefix_cache_entries", "prefix_lookup_tokens", "prefix_hit_tokens")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_BUSY_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    VRAM_ESTIMATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VRAM_MEASURED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VRAM_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_ONLY_FIELD_NUMBER: _ClassVar[int]
    TASKS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_OUT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LOOKUP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    pool_id: str
    model_id: str
    state: str
    reachable: bool
    drained: bool
    slots_total: int
    slots_busy: int
    n_ctx: int
    engine_version: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    queued: int
    last_error: str
    vram_estimate_bytes: int
    vram_measured_bytes: int
    vram_free_bytes: int
    cpu_only: bool
    tasks_finished: int
    tokens_out: int
    prefix_cache_entries: int
    prefix_lookup_tokens: int
    prefix_hit_tokens: int
    def __init__(self, node_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., model_id: _Optional[str] = ..., state: _Optional[str] = ..., reachable: _Optional[bool] = ..., drained: _Optional[bool] = ..., slots_total: _Optional[int] = ..., slots_busy: _Optional[int] = ..., n_ctx: _Optional[int] = ..., engine_version: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., queued: _Optional[int] = ..., last_error: _Optional[str] = ..., vram_estimate_bytes: _Optional[int] = ..., vram_measured_bytes: _Optional[int] = ..., vram_free_bytes: _Optional[int] = ..., cpu_only: _Optional[bool] = ..., tasks_finished: _Optional[int] = ..., tokens_out: _Optional[int] = ..., prefix_cache_entries: _Optional[int] = ..., prefix_lookup_tokens: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ...) -> None: ...

class GetPoolRequest(_message.Message):
    __slots__ = ("node_id", "pool_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    pool_id: str
    def __init__(self, node_id: _Optional[str] = ..., pool_id: _Optional[str] = ...) -> None: ...

class GetPoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: PoolStatus
    def __init__(self, pool: _Optional[_Union[PoolStatus, _Mapping]] = ...) -> None: ...

class DrainPoolRequest(_message.Message):
    __slots__ = ("node_id", "pool_id", "deadline_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    pool_id: str
    deadline_ms: int
    def __init__(self, node_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class DrainPoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: PoolStatus
    def __init__(self, pool: _Optional[_Union[PoolStatus, _Mapping]] = ...) -> None: ...

class ResumePoolRequest(_message.Message):
    __slots__ = ("node_id", "pool_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    pool_id: str
    def __init__(self, node_id: _Optional[str] = ..., pool_id: _Optional[str] = ...) -> None: ...

class ResumePoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: PoolStatus
    def __init__(self, pool: _Optional[_Union[PoolStatus, _Mapping]] = ...) -> None: ...

class ReloadPoolRequest(_message.Message):
    __slots__ = ("node_id", "pool_id", "model_id", "deadline_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    pool_id: str
    model_id: str
    deadline_ms: int
    def __init__(self, node_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., model_id: _Optional[str] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class ReloadPoolResponse(_message.Message):
    __slots__ = ("pool", "finished", "cancelled")
    POOL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    pool: PoolStatus
    finished: int
    cancelled: int
    def __init__(self, pool: _Optional[_Union[PoolStatus, _Mapping]] = ..., finished: _Optional[int] = ..., cancelled: _Optional[int] = ...) -> None: ...

class PreloadModelRequest(_message.Message):
    __slots__ = ("model_id", "node_id", "pool_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    node_id: str
    pool_id: str
    def __init__(self, model_id: _Optional[str] = ..., node_id: _Optional[str] = ..., pool_id: _Optional[str] = ...) -> None: ...

class PreloadModelResponse(_message.Message):
    __slots__ = ("pool", "replaced_model_id", "already_loaded")
    POOL_FIELD_NUMBER: _ClassVar[int]
    REPLACED_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    pool: PoolStatus
    replaced_model_id: str
    already_loaded: bool
    def __init__(self, pool: _Optional[_Union[PoolStatus, _Mapping]] = ..., replaced_model_id: _Optional[str] = ..., already_loaded: _Optional[bool] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelCapability(_message.Message):
    __slots__ = ("model_id", "max_context_tokens", "pools", "pools_ready", "engine_versions")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    POOLS_READY_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    max_context_tokens: int
    pools: int
    pools_ready: int
    engine_versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., max_context_tokens: _Optional[int] = ..., pools: _Optional[int] = ..., pools_ready: _Optional[int] = ..., engine_versions: _Optional[_Iterable[str]] = ...) -> None: ...

class GetCapabilitiesResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelCapability]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelCapability, _Mapping]]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model_id", "drain")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    drain: bool
    def __init__(self, model_id: _Optional[str] = ..., drain: _Optional[bool] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("drained_pools", "tasks_ended", "files")
    DRAINED_POOLS_FIELD_NUMBER: _ClassVar[int]
    TASKS_ENDED_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    drained_pools: _containers.RepeatedScalarFieldContainer[str]
    tasks_ended: int
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, drained_pools: _Optional[_Iterable[str]] = ..., tasks_ended: _Optional[int] = ..., files: _Optional[_Iterable[str]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "address", "reachable", "registered", "last_seen_ms_ago", "pool_ids")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_AGO_FIELD_NUMBER: _ClassVar[int]
    POOL_IDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    reachable: bool
    registered: bool
    last_seen_ms_ago: int
    pool_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., reachable: _Optional[bool] = ..., registered: _Optional[bool] = ..., last_seen_ms_ago: _Optional[int] = ..., pool_ids: _Optional[_Iterable[str]] = ...) -> None: ...

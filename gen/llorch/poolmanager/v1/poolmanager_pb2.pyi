from llorch.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PoolState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOL_STATE_UNSPECIFIED: _ClassVar[PoolState]
    POOL_STATE_UNLOADED: _ClassVar[PoolState]
    POOL_STATE_LOADING: _ClassVar[PoolState]
    POOL_STATE_READY: _ClassVar[PoolState]
    POOL_STATE_DRAINING: _ClassVar[PoolState]
    POOL_STATE_FAILED: _ClassVar[PoolState]
POOL_STATE_UNSPECIFIED: PoolState
POOL_STATE_UNLOADED: PoolState
POOL_STATE_LOADING: PoolState
POOL_STATE_READY: PoolState
POOL_STATE_DRAINING: PoolState
POOL_STATE_FAILED: PoolState

class GetNodeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetNodeResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: Node
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ...) -> None: ...

class WatchNodeRequest(_message.Message):
    __slots__ = ("heartbeat_ms",)
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_ms: int
    def __init__(self, heartbeat_ms: _Optional[int] = ...) -> None: ...

class WatchNodeResponse(_message.Message):
    __slots__ = ("node", "version")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    node: Node
    version: int
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("node_id", "pools", "gpus", "gpu_status", "staging", "stored_models")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPU_STATUS_FIELD_NUMBER: _ClassVar[int]
    STAGING_FIELD_NUMBER: _ClassVar[int]
    STORED_MODELS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    gpu_status: str
    staging: Staging
    stored_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., gpu_status: _Optional[str] = ..., staging: _Optional[_Union[Staging, _Mapping]] = ..., stored_models: _Optional[_Iterable[str]] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "uuid", "name", "vram_total_bytes", "vram_free_bytes", "vram_used_bytes", "utilization_pct", "compute_capability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VRAM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    VRAM_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VRAM_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    vram_total_bytes: int
    vram_free_bytes: int
    vram_used_bytes: int
    utilization_pct: int
    compute_capability: str
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., vram_total_bytes: _Optional[int] = ..., vram_free_bytes: _Optional[int] = ..., vram_used_bytes: _Optional[int] = ..., utilization_pct: _Optional[int] = ..., compute_capability: _Optional[str] = ...) -> None: ...

class Staging(_message.Message):
    __slots__ = ("budget_bytes", "staged_bytes", "hits", "misses", "models")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    staged_bytes: int
    hits: int
    misses: int
    models: _containers.RepeatedCompositeFieldContainer[StagedModel]
    def __init__(self, budget_bytes: _Optional[int] = ..., staged_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., models: _Optional[_Iterable[_Union[StagedModel, _Mapping]]] = ...) -> None: ...

class StagedModel(_message.Message):
    __slots__ = ("model_id", "size_bytes", "in_use")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    size_bytes: int
    in_use: bool
    def __init__(self, model_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., in_use: _Optional[bool] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("pool_id", "state", "model_id", "engine_version", "devices", "slots_total", "slots_free", "n_ctx", "last_error", "cpu_only", "vram_estimate_bytes", "vram_measured_bytes", "load_ms", "loaded_from", "restarts", "breaker_open", "spare_ready", "loaded_in_spare", "can_load", "prefix_cache")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FREE_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CPU_ONLY_FIELD_NUMBER: _ClassVar[int]
    VRAM_ESTIMATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VRAM_MEASURED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FROM_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    BREAKER_OPEN_FIELD_NUMBER: _ClassVar[int]
    SPARE_READY_FIELD_NUMBER: _ClassVar[int]
    LOADED_IN_SPARE_FIELD_NUMBER: _ClassVar[int]
    CAN_LOAD_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    state: PoolState
    model_id: str
    engine_version: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    slots_total: int
    slots_free: int
    n_ctx: int
    last_error: str
    cpu_only: bool
    vram_estimate_bytes: int
    vram_measured_bytes: int
    load_ms: float
    loaded_from: str
    restarts: int
    breaker_open: bool
    spare_ready: bool
    loaded_in_spare: bool
    can_load: bool
    prefix_cache: PrefixCache
    def __init__(self, pool_id: _Optional[str] = ..., state: _Optional[_Union[PoolState, str]] = ..., model_id: _Optional[str] = ..., engine_version: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., slots_total: _Optional[int] = ..., slots_free: _Optional[int] = ..., n_ctx: _Optional[int] = ..., last_error: _Optional[str] = ..., cpu_only: _Optional[bool] = ..., vram_estimate_bytes: _Optional[int] = ..., vram_measured_bytes: _Optional[int] = ..., load_ms: _Optional[float] = ..., loaded_from: _Optional[str] = ..., restarts: _Optional[int] = ..., breaker_open: _Optional[bool] = ..., spare_ready: _Optional[bool] = ..., loaded_in_spare: _Optional[bool] = ..., can_load: _Optional[bool] = ..., prefix_cache: _Optional[_Union[PrefixCache, _Mapping]] = ...) -> None: ...

class PrefixCache(_message.Message):
    __slots__ = ("entries", "cells", "block_hashes", "lookup_tokens", "hit_tokens", "prefill_ms_per_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: int
    cells: int
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    lookup_tokens: int
    hit_tokens: int
    prefill_ms_per_token: float
    def __init__(self, entries: _Optional[int] = ..., cells: _Optional[int] = ..., block_hashes: _Optional[_Iterable[int]] = ..., lookup_tokens: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., prefill_ms_per_token: _Optional[float] = ...) -> None: ...

class PreloadPoolRequest(_message.Message):
    __slots__ = ("pool_id", "model_id")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    model_id: str
    def __init__(self, pool_id: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class PreloadPoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: Pool
    def __init__(self, pool: _Optional[_Union[Pool, _Mapping]] = ...) -> None: ...

class DrainPoolRequest(_message.Message):
    __slots__ = ("pool_id", "deadline_ms")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    deadline_ms: int
    def __init__(self, pool_id: _Optional[str] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class DrainPoolResponse(_message.Message):
    __slots__ = ("pool", "finished", "cancelled")
    POOL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    pool: Pool
    finished: int
    cancelled: int
    def __init__(self, pool: _Optional[_Union[Pool, _Mapping]] = ..., finished: _Optional[int] = ..., cancelled: _Optional[int] = ...) -> None: ...

class ReloadPoolRequest(_message.Message):
    __slots__ = ("pool_id", "model_id", "deadline_ms")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    model_id: str
    deadline_ms: int
    def __init__(self, pool_id: _Optional[str] = ..., model_id: _Optional[str] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class ReloadPoolResponse(_message.Message):
    __slots__ = ("pool", "finished", "cancelled")
    POOL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    pool: Pool
    finished: int
    cancelled: int
    def __init__(self, pool: _Optional[_Union[Pool, _Mapping]] = ..., finished: _Optional[int] = ..., cancelled: _Optional[int] = ...) -> None: ...

class StageModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class StageModelResponse(_message.Message):
    __slots__ = ("staging",)
    STAGING_FIELD_NUMBER: _ClassVar[int]
    staging: Staging
    def __init__(self, staging: _Optional[_Union[Staging, _Mapping]] = ...) -> None: ...

class UnstageModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class UnstageModelResponse(_message.Message):
    __slots__ = ("removed", "staging")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    STAGING_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    staging: Staging
    def __init__(self, removed: _Optional[bool] = ..., staging: _Optional[_Union[Staging, _Mapping]] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("execution_id", "task_id", "pool_id", "model_id", "prompt", "sampling", "max_tokens_defaulted", "templated", "grammar")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_DEFAULTED_FIELD_NUMBER: _ClassVar[int]
    TEMPLATED_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    task_id: str
    pool_id: str
    model_id: str
    prompt: str
    sampling: _common_pb2.SamplingParams
    max_tokens_defaulted: bool
    templated: bool
    grammar: str
    def __init__(self, execution_id: _Optional[str] = ..., task_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., model_id: _Optional[str] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_tokens_defaulted: _Optional[bool] = ..., templated: _Optional[bool] = ..., grammar: _Optional[str] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("started", "token", "finished")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    started: ExecutionStarted
    token: _common_pb2.Token
    finished: _common_pb2.Finished
    def __init__(self, started: _Optional[_Union[ExecutionStarted, _Mapping]] = ..., token: _Optional[_Union[_common_pb2.Token, _Mapping]] = ..., finished: _Optional[_Union[_common_pb2.Finished, _Mapping]] = ...) -> None: ...

class ExecutionStarted(_message.Message):
    __slots__ = ("engine_version", "tokens_in")
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_IN_FIELD_NUMBER: _ClassVar[int]
    engine_version: str
    tokens_in: int
    def __init__(self, engine_version: _Optional[str] = ..., tokens_in: _Optional[int] = ...) -> None: ...

class CancelExecutionRequest(_message.Message):
    __slots__ = ("execution_id",)
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    def __init__(self, execution_id: _Optional[str] = ...) -> None: ...

class CancelExecutionResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class CollectGarbageRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class GcDecision(_message.Message):
    __slots__ = ("model_id", "path", "size_bytes", "reason")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    path: str
    size_bytes: int
    reason: str
    def __init__(self, model_id: _Optional[str] = ..., path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CollectGarbageResponse(_message.Message):
    __slots__ = ("dry_run", "deleted", "kept", "disk_total_bytes", "disk_free_bytes_before", "disk_free_bytes_after", "stale_partials_removed")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    DISK_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    STALE_PARTIALS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    deleted: _containers.RepeatedCompositeFieldContainer[GcDecision]
    kept: _containers.RepeatedCompositeFieldContainer[GcDecision]
    disk_total_bytes: int
    disk_free_bytes_before: int
    disk_free_bytes_after: int
    stale_partials_removed: int
    def __init__(self, dry_run: _Optional[bool] = ..., deleted: _Optional[_Iterable[_Union[GcDecision, _Mapping]]] = ..., kept: _Optional[_Iterable[_Union[GcDecision, _Mapping]]] = ..., disk_total_bytes: _Optional[int] = ..., disk_free_bytes_before: _Optional[int] = ..., disk_free_bytes_after: _Optional[int] = ..., stale_partials_removed: _Optional[int] = ...) -> None: ...

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_ACTIVE: _ClassVar[ModelState]
    MODEL_STATE_RETIRED: _ClassVar[ModelState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_ACTIVE: ModelState
MODEL_STATE_RETIRED: ModelState

class Model(_message.Message):
    __slots__ = ("model_id", "source_ref", "sha256", "size_bytes", "facts", "state", "pinned", "created_unix_ms", "last_used_unix_ms", "state_changed_unix_ms")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REF_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    source_ref: str
    sha256: str
    size_bytes: int
    facts: ModelFacts
    state: ModelState
    pinned: bool
    created_unix_ms: int
    last_used_unix_ms: int
    state_changed_unix_ms: int
    def __init__(self, model_id: _Optional[str] = ..., source_ref: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., facts: _Optional[_Union[ModelFacts, _Mapping]] = ..., state: _Optional[_Union[ModelState, str]] = ..., pinned: _Optional[bool] = ..., created_unix_ms: _Optional[int] = ..., last_used_unix_ms: _Optional[int] = ..., state_changed_unix_ms: _Optional[int] = ...) -> None: ...

class ModelFacts(_message.Message):
    __slots__ = ("architecture", "parameter_count", "file_type", "context_length", "block_count", "embedding_length", "chat_template", "bos_token", "eos_token", "control_tokens")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    FILE_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_COUNT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONTROL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    parameter_count: int
    file_type: str
    context_length: int
    block_count: int
    embedding_length: int
    chat_template: str
    bos_token: str
    eos_token: str
    control_tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, architecture: _Optional[str] = ..., parameter_count: _Optional[int] = ..., file_type: _Optional[str] = ..., context_length: _Optional[int] = ..., block_count: _Optional[int] = ..., embedding_length: _Optional[int] = ..., chat_template: _Optional[str] = ..., bos_token: _Optional[str] = ..., eos_token: _Optional[str] = ..., control_tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelLocation(_message.Message):
    __slots__ = ("node_id", "path", "size_bytes", "last_used_unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    path: str
    size_bytes: int
    last_used_unix_ms: int
    def __init__(self, node_id: _Optional[str] = ..., path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., last_used_unix_ms: _Optional[int] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("model", "locations")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    model: Model
    locations: _containers.RepeatedCompositeFieldContainer[ModelLocation]
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., locations: _Optional[_Iterable[_Union[ModelLocation, _Mapping]]] = ...) -> None: ...

class RegisterModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state", "node_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: ModelState
    node_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., node_id: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class LocateModelRequest(_message.Message):
    __slots__ = ("model_id", "node_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    node_id: str
    def __init__(self, model_id: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class LocateModelResponse(_message.Message):
    __slots__ = ("locations",)
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    locations: _containers.RepeatedCompositeFieldContainer[ModelLocation]
    def __init__(self, locations: _Optional[_Iterable[_Union[ModelLocation, _Mapping]]] = ...) -> None: ...

class SetModelStateRequest(_message.Message):
    __slots__ = ("model_id", "state")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    state: ModelState
    def __init__(self, model_id: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ...) -> None: ...

class SetModelStateResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class SetModelPinnedRequest(_message.Message):
    __slots__ = ("model_id", "pinned")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    pinned: bool
    def __init__(self, model_id: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class SetModelPinnedResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class Engine(_message.Message):
    __slots__ = ("node_id", "name", "version", "backend", "build_info", "path", "gpu_offload", "backend_libraries", "checked_unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BUILD_INFO_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    GPU_OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    BACKEND_LIBRARIES_FIELD_NUMBER: _ClassVar[int]
    CHECKED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    version: str
    backend: str
    build_info: str
    path: str
    gpu_offload: bool
    backend_libraries: _containers.RepeatedScalarFieldContainer[str]
    checked_unix_ms: int
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., backend: _Optional[str] = ..., build_info: _Optional[str] = ..., path: _Optional[str] = ..., gpu_offload: _Optional[bool] = ..., backend_libraries: _Optional[_Iterable[str]] = ..., checked_unix_ms: _Optional[int] = ...) -> None: ...

class RegisterEngineRequest(_message.Message):
    __slots__ = ("engine",)
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    engine: Engine
    def __init__(self, engine: _Optional[_Union[Engine, _Mapping]] = ...) -> None: ...

class RegisterEngineResponse(_message.Message):
    __slots__ = ("engine",)
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    engine: Engine
    def __init__(self, engine: _Optional[_Union[Engine, _Mapping]] = ...) -> None: ...

class ListEnginesRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class ListEnginesResponse(_message.Message):
    __slots__ = ("engines",)
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    engines: _containers.RepeatedCompositeFieldContainer[Engine]
    def __init__(self, engines: _Optional[_Iterable[_Union[Engine, _Mapping]]] = ...) -> None: ...

class DeleteReplicaRequest(_message.Message):
    __slots__ = ("model_id", "node_id", "path")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    node_id: str
    path: str
    def __init__(self, model_id: _Optional[str] = ..., node_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class DeleteReplicaResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class GcPolicy(_message.Message):
    __slots__ = ("max_disk_usage_pct", "min_free_bytes", "keep_active", "keep_used_within_days", "delete_retired_after_days")
    MAX_DISK_USAGE_PCT_FIELD_NUMBER: _ClassVar[int]
    MIN_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEEP_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    KEEP_USED_WITHIN_DAYS_FIELD_NUMBER: _ClassVar[int]
    DELETE_RETIRED_AFTER_DAYS_FIELD_NUMBER: _ClassVar[int]
    max_disk_usage_pct: float
    min_free_bytes: int
    keep_active: bool
    keep_used_within_days: float
    delete_retired_after_days: float
    def __init__(self, max_disk_usage_pct: _Optional[float] = ..., min_free_bytes: _Optional[int] = ..., keep_active: _Optional[bool] = ..., keep_used_within_days: _Optional[float] = ..., delete_retired_after_days: _Optional[float] = ...) -> None: ...

class GetGcPolicyRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class GetGcPolicyResponse(_message.Message):
    __slots__ = ("policy", "node_specific")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    NODE_SPECIFIC_FIELD_NUMBER: _ClassVar[int]
    policy: GcPolicy
    node_specific: bool
    def __init__(self, policy: _Optional[_Union[GcPolicy, _Mapping]] = ..., node_specific: _Optional[bool] = ...) -> None: ...

class SetGcPolicyRequest(_message.Message):
    __slots__ = ("node_id", "policy")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    policy: GcPolicy
    def __init__(self, node_id: _Optional[str] = ..., policy: _Optional[_Union[GcPolicy, _Mapping]] = ...) -> None: ...

class SetGcPolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: GcPolicy
    def __init__(self, policy: _Optional[_Union[GcPolicy, _Mapping]] = ...) -> None: ...

class MarkModelsUsedRequest(_message.Message):
    __slots__ = ("node_id", "model_ids")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., model_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class MarkModelsUsedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("locations",)
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    locations: _containers.RepeatedCompositeFieldContainer[ModelLocation]
    def __init__(self, locations: _Optional[_Iterable[_Union[ModelLocation, _Mapping]]] = ...) -> None: ...

"""Catalog records to and from their protobuf, validated field by field on the way in.

The one place the catalog's wire forms are made: the catalog servicer, the pool manager's garbage
collector and the ``llorch`` command use these, so none of them imports another's servicer.
"""

from __future__ import annotations

import re

from llorch.catalog.v1 import catalog_pb2

from catalog.store import EngineRecord, GcPolicy, ModelRecord, ModelState
from mesh.errors import InvalidArgumentError
from mesh.ids import check_name

SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_INT64 = 2**63 - 1  # SQLite integers are signed 64-bit

MAX_CHAT_TEMPLATE_BYTES = 256 * 1024
MAX_CONTROL_TOKENS = 16384
MAX_CONTROL_TOKENS_BYTES = 512 * 1024
MAX_TOKEN_TEXT_BYTES = 256

STATE_TO_PB = {
    ModelState.ACTIVE: catalog_pb2.MODEL_STATE_ACTIVE,
    ModelState.RETIRED: catalog_pb2.MODEL_STATE_RETIRED,
}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}


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
    if policy.min_free_bytes > MAX_INT64:
        raise InvalidArgumentError("policy.min_free_bytes", f"must be at most {MAX_INT64}")
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


def engine_from_pb(engine: catalog_pb2.Engine) -> EngineRecord:
    """An engine record from the wire, validated field by field."""
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
            chat_template=record.chat_template,
            bos_token=record.bos_token,
            eos_token=record.eos_token,
            control_tokens=list(record.control_tokens),
        ),
        state=STATE_TO_PB[record.state],
        pinned=record.pinned,
        created_unix_ms=record.created_unix_ms,
        last_used_unix_ms=record.last_used_unix_ms,
        state_changed_unix_ms=record.state_changed_unix_ms,
    )


def model_record_from_pb(model: catalog_pb2.Model) -> ModelRecord:
    """A model record from the wire, validated field by field."""
    model_id = check_name(model.model_id, "model.model_id")
    if not SHA256_RE.fullmatch(model.sha256):
        raise InvalidArgumentError("model.sha256", "must be 64 lowercase hex digits")
    if not 0 < model.size_bytes <= MAX_INT64:
        raise InvalidArgumentError("model.size_bytes", f"must be between 1 and {MAX_INT64}")
    if model.facts.parameter_count > MAX_INT64:
        raise InvalidArgumentError("model.facts.parameter_count", f"must be at most {MAX_INT64}")
    if not model.source_ref:
        raise InvalidArgumentError("model.source_ref", "is required")
    if not model.facts.architecture:
        raise InvalidArgumentError("model.facts.architecture", "is required")
    if model.facts.context_length == 0:
        raise InvalidArgumentError("model.facts.context_length", "must be > 0")
    _check_tokenizer_facts(model.facts)
    if model.state == catalog_pb2.MODEL_STATE_UNSPECIFIED:
        state = ModelState.ACTIVE
    elif model.state in STATE_FROM_PB:
        state = STATE_FROM_PB[model.state]
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
        chat_template=model.facts.chat_template,
        bos_token=model.facts.bos_token,
        eos_token=model.facts.eos_token,
        control_tokens=tuple(model.facts.control_tokens),
    )


def _check_tokenizer_facts(facts: catalog_pb2.ModelFacts) -> None:
    """Bounds on the tokenizer facts, which every GetModel answer carries."""
    if len(facts.chat_template.encode()) > MAX_CHAT_TEMPLATE_BYTES:
        raise InvalidArgumentError(
            "model.facts.chat_template", f"must be at most {MAX_CHAT_TEMPLATE_BYTES} bytes"
        )
    for name in ("bos_token", "eos_token"):
        if len(getattr(facts, name).encode()) > MAX_TOKEN_TEXT_BYTES:
            raise InvalidArgumentError(
                f"model.facts.{name}", f"must be at most {MAX_TOKEN_TEXT_BYTES} bytes"
            )
    if len(facts.control_tokens) > MAX_CONTROL_TOKENS:
        raise InvalidArgumentError(
            "model.facts.control_tokens", f"must be at most {MAX_CONTROL_TOKENS} tokens"
        )
    total = 0
    for i, token in enumerate(facts.control_tokens):
        size = len(token.encode())
        if size > MAX_TOKEN_TEXT_BYTES:
            raise InvalidArgumentError(
                f"model.facts.control_tokens[{i}]", f"must be at most {MAX_TOKEN_TEXT_BYTES} bytes"
            )
        total += size
    if total > MAX_CONTROL_TOKENS_BYTES:
        raise InvalidArgumentError(
            "model.facts.control_tokens", f"must be at most {MAX_CONTROL_TOKENS_BYTES} bytes in all"
        )

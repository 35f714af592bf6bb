"""The one settings object of a process: defaults, bounds and a docstring for every field.

Values come from (highest first) explicit overrides (command-line flags), ``LLORCH_*``
environment variables (nested fields with ``__``, e.g.
``LLORCH_ORCHESTRATOR_SERVICE__QUEUE_CAPACITY``),
an optional TOML file, and the defaults below. Built once in ``main`` and passed down; nothing else
reads the environment.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mesh.ids import NAME_PATTERN, is_valid_name
from mesh.tls import TlsFiles


class ConfigError(Exception):
    """Settings failed validation; the message names every offending field."""


class _Section(BaseModel):
    """A section of the settings: a key it does not know (a misspelling in a TOML file or a
    JSON value) is an error naming it, not a setting silently left at its default."""

    model_config = ConfigDict(extra="forbid")


def _default_data_dir() -> Path:
    return platformdirs.user_data_path("llorch")


class TlsSettings(_Section):
    """TLS of this process (the cloud profile): the CA it trusts, its certificate and key.

    All three set: service ports (catalog, pool manager) take mTLS and check each caller's role;
    the orchestrator's client port takes TLS and API keys; every call to another service
    presents this certificate. None set: plaintext without auth, on loopback only.
    """

    ca_file: Path | None = None
    """CA certificate (``llorch certs init`` writes ``<dir>/ca.pem``)."""
    cert_file: Path | None = None
    """This process's certificate (``llorch certs issue`` writes ``<name>.pem``)."""
    key_file: Path | None = None
    """This process's private key (``<name>.key``, mode 0600)."""
    revoked_file: Path | None = None
    """Denylist of revoked certificates (``llorch certs revoke`` writes it), read again within
    a second of each change; unset: ``revoked.txt`` beside ``ca_file``. A missing file
    revokes nothing."""

    @model_validator(mode="after")
    def _all_or_none(self) -> TlsSettings:
        given = [self.ca_file, self.cert_file, self.key_file]
        if any(given) and not all(given):
            raise ValueError("set all of ca_file, cert_file and key_file, or none")
        if self.revoked_file is not None and self.ca_file is None:
            raise ValueError("revoked_file needs ca_file, cert_file and key_file")
        for path in given:
            if path is not None and not path.is_file():
                raise ValueError(f"{path} does not exist")
        return self

    def files(self) -> TlsFiles | None:
        """The files, or None without TLS."""
        if self.ca_file is None:
            return None
        return TlsFiles(self.ca_file, self.cert_file, self.key_file, self.revoked_file)


class TracingSettings(_Section):
    """OpenTelemetry traces (off unless an endpoint is set)."""

    otlp_endpoint: str = ""
    """OTLP/gRPC collector to send spans to, e.g. ``http://otel-collector:4317`` (``https://``
    for TLS, trusting the system's CAs); empty: no spans are made."""
    sample_ratio: float = Field(default=1.0, ge=0, le=1)
    """Share of new traces kept (a caller's sampling decision is followed)."""


class CatalogSettings(_Section):
    """Catalog service."""

    listen: str = "127.0.0.1:0"
    """Address the catalog listens on; port 0 picks a free port (home profile)."""
    db_path: Path | None = None
    """SQLite file; default ``<data_dir>/catalog.db``."""
    node_identity: Literal["certificate", "any"] = "certificate"
    """Which nodes' records (replicas, engines, use) a pool manager may write: ``certificate``,
    only those of the node its certificate names; ``any``, every node's, for fleets whose pool
    managers share one certificate (see orchestrator_service.node_identity)."""


MAX_SLOTS = 256
"""llama.cpp's most sequences in one context (``llama_max_parallel_sequences``)."""
CPU_DEFAULT_SLOTS = 4
"""Slots of a CPU pool that leaves them unset: on the 2-core VM 4 streams at once got 2.2x the
tokens/s of one slot, each stream still over half its lone speed (docs/operators.md, "Slots")."""
GPU_DEFAULT_SLOTS = 8
"""Slots of a GPU pool that leaves them unset: llama.cpp measured 3.3x the tokens/s of one
sequence at 8 on a GPU, with the cache at 8 contexts (docs/operators.md, "Slots")."""
CPU_PREFILL_CHUNK_TOKENS = 64
"""A CPU core reads a 64-token chunk of the 170 MiB bench model in 150-290 ms (more the
further into the prompt): the other streams' longest wait for a token (bench/engine_steps.py)."""
GPU_PREFILL_CHUNK_TOKENS = 512
"""A GPU reads a 512-token chunk in milliseconds: the whole batch."""


class PoolSettings(_Section):
    """One pool: a llama.cpp worker bound to some devices, serving one model."""

    pool_id: str = Field(pattern=f"^{NAME_PATTERN}$")
    """Id of the pool, unique on its node."""
    model_id: str = Field(pattern=f"^{NAME_PATTERN}$")
    """Catalog id of the model the pool loads at start."""
    devices: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)
    """GPU indexes (``"0"``, ``"1"``) or ``["cpu"]`` for a development pool."""
    n_ctx: int = Field(default=0, ge=0, le=1_048_576)
    """Context window in tokens; 0 takes the model's trained context length."""
    slots: int = Field(default=0, ge=0, le=MAX_SLOTS)
    """Sequences the pool's worker decodes at once, in one llama.cpp context (continuous
    batching); each has the full ``n_ctx``, so the KV cache holds ``slots * n_ctx`` tokens.
    0: ``CPU_DEFAULT_SLOTS`` on a CPU pool, ``GPU_DEFAULT_SLOTS`` on a GPU pool
    (docs/operators.md, "Slots")."""
    kv_cache_tokens: int = Field(default=0, ge=0, le=MAX_SLOTS * 1_048_576)
    """Cells of the KV cache the pool's sequences share; 0: ``slots * n_ctx``, so every
    execution always fits. Fewer saves memory (the VRAM estimate counts what is allocated):
    when the running sequences together outgrow it, the youngest ends UNAVAILABLE
    (``CONTEXT_FULL``, retriable) so that the others go on. At least ``n_ctx``."""
    prefill_chunk_tokens: int = Field(default=0, ge=0, le=4096)
    """Most prompt tokens the worker reads in one step while other sequences generate (a
    prompt alone takes the whole batch): a long prompt is read in chunks of this size, and each
    chunk delays the running streams' next token by its cost. 0: ``CPU_PREFILL_CHUNK_TOKENS``
    on a CPU pool, ``GPU_PREFILL_CHUNK_TOKENS`` on a GPU pool."""
    prefix_cache_entries: int = Field(default=16, ge=0, le=128)
    """Finished sequences the worker keeps resident in its KV cache, so that a prompt starting
    the same way (a system prompt, the earlier turns of a chat) copies their cells instead of
    reading that start again. They live in the cache's free cells and give them up first when
    running sequences need room: no memory is set aside for them. 0: off. Off by itself for
    models whose memory cannot share cells (recurrent, hybrid, sliding-window attention)."""
    n_threads: int = Field(default=0, ge=0, le=512)
    """CPU threads for decoding and prompts; 0: half the machine's cores."""
    cache_type: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] = "f16"
    """Element type of the KV cache; the VRAM estimate counts it."""
    swappable: bool = True
    """The orchestrator may load another model into this pool when queued tasks want a model
    no pool holds (only while the pool is idle and no queued task wants its model)."""
    token_batch_ms: float = Field(default=4.0, ge=0, le=100)
    """Longest a generated token waits to travel with the ones after it (the first token of an
    execution never waits; 0 sends every token alone). Each message costs every hop of the mesh
    CPU, so on an engine faster than one token per ``token_batch_ms`` this caps a stream at
    1000 / token_batch_ms messages per second; a slower engine is not delayed at all."""

    @field_validator("pool_id", "model_id")
    @classmethod
    def _name_valid(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError("must not contain '..'")
        return value

    @field_validator("devices")
    @classmethod
    def _devices_valid(cls, devices: list[str]) -> list[str]:
        if devices == ["cpu"]:
            return devices
        if "cpu" in devices or not all(d.isdigit() for d in devices):
            raise ValueError('either ["cpu"] or a list of GPU indexes such as ["0", "1"]')
        if len(set(devices)) != len(devices):
            raise ValueError("a device is listed twice")
        return devices

    @model_validator(mode="after")
    def _batching_defaults(self) -> PoolSettings:
        cpu = self.devices == ["cpu"]
        if self.slots == 0:
            self.slots = CPU_DEFAULT_SLOTS if cpu else GPU_DEFAULT_SLOTS
        if self.prefill_chunk_tokens == 0:
            self.prefill_chunk_tokens = (
                CPU_PREFILL_CHUNK_TOKENS if cpu else GPU_PREFILL_CHUNK_TOKENS
            )
        if self.kv_cache_tokens and self.n_ctx and self.kv_cache_tokens < self.n_ctx:
            raise ValueError(
                f"kv_cache_tokens ({self.kv_cache_tokens}) must hold at least one context "
                f"(n_ctx = {self.n_ctx})"
            )
        return self


class PoolManagerSettings(_Section):
    """Pool manager (one per machine)."""

    listen: str = "127.0.0.1:0"
    """Address the pool manager listens on."""
    node_id: str = Field(default="local", pattern=f"^{NAME_PATTERN}$")
    """Id of this machine in the mesh."""

    @field_validator("node_id")
    @classmethod
    def _node_id_valid(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError("must not contain '..'")
        return value

    catalog: str = ""
    """Catalog address; the home profile fills it in."""
    orchestrator: str = ""
    """The orchestrator's node port (its ``node_listen``): announce this pool manager there
    (NodeService.RegisterNode) at start and every few seconds. Empty: the orchestrator lists it
    in its settings instead."""
    advertise_address: str = ""
    """host:port the orchestrator reaches this pool manager at, as its certificate names it;
    empty: ``localhost:<port>`` when listening on loopback (required otherwise)."""
    pools: list[PoolSettings] = Field(default_factory=list)
    """Pools to run. The home profile adds one CPU pool for the default model when empty."""
    worker_start_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    """How long a worker may take to load its model before it counts as failed."""
    stop_grace_s: float = Field(default=5.0, ge=0, le=300)
    """How long a worker gets to exit after being asked before it is killed."""
    restart_backoff_s: float = Field(default=0.5, gt=0, le=60)
    """First wait before restarting a crashed worker; it doubles (with jitter) per crash."""
    restart_backoff_max_s: float = Field(default=30.0, gt=0, le=3600)
    """Longest wait between restarts."""
    breaker_crashes: int = Field(default=5, ge=1, le=1000)
    """Crashes (or failed starts) within ``breaker_window_s`` that open a pool's circuit breaker:
    the pool stays FAILED with the reason until an operator preloads or reloads it."""
    breaker_window_s: float = Field(default=300.0, gt=0, le=86_400)
    """Window in which crashes are counted for the breaker."""
    drain_deadline_s: float = Field(default=30.0, ge=0, le=3600)
    """Deadline of a drain (before an unload or a reload) when the request gives none."""
    health_check_timeout_s: float = Field(default=30.0, gt=0, le=600)
    """How long a freshly loaded worker gets to generate its health-check token."""
    vram_overhead_bytes: int = Field(default=768 * 1024 * 1024, ge=0, le=64 * 1024**3)
    """VRAM a worker takes per GPU besides weights, KV cache and compute buffers (CUDA context,
    cuBLAS); ~650 MB was measured on an H200 with CUDA 13 (docs/operators.md)."""
    staging_dir: Path | None = None
    """Where staged models live in RAM; default ``/dev/shm/llorch-<node_id>`` (a tmpfs)."""
    staging_budget_bytes: int = Field(default=4 * 1024**3, ge=0, le=16 * 1024**4)
    """Most bytes of models held in RAM; 0 turns staging off."""
    auto_stage: bool = True
    """Stage a model in RAM after it was loaded from disk, so the next load of it reads RAM."""
    model_store: Path | None = None
    """Directory of this node's model files (``llorch models pull`` writes there); garbage
    collection deletes only files inside it. The home profile's default is
    ``<data_dir>/models``; unset, garbage collection is off."""
    usage_report_s: float = Field(default=60.0, gt=0, le=86400)
    """How often the models that ran here are reported to the catalog (their last-used times,
    which garbage collection reads)."""
    gc_interval_s: float = Field(default=3600.0, ge=0, le=7 * 86400)
    """How often garbage collection runs in this pool manager; 0: only on request."""
    spare_workers: bool = True
    """Keep one spare worker process per pool, engine started (and on GPUs its CUDA contexts
    created), so a reload or a crash restart does not wait for a process to start. Costs per
    pool a process (~100 MiB RAM) and, on GPU pools, the CUDA context on each GPU (~0.5 GiB)."""


class OrchestratorSettings(_Section):
    """Orchestrator."""

    catalog: str = ""
    """Catalog address; the home profile fills it in."""
    pool_managers: list[str] = Field(default_factory=list)
    """Pool manager addresses; the home profile fills it in. Pool managers may also register
    themselves on ``node_listen``."""
    node_listen: str = ""
    """Address of the node port, where pool managers register themselves (NodeService; mTLS with
    TLS on). Empty: no node port, only ``pool_managers``."""
    pool_manager_tls_name: str = ""
    """With TLS: the DNS name pool managers' certificates carry, checked instead of the host
    dialled, for pool managers reached by IP (Kubernetes pods). Empty: the host dialled."""
    node_identity: Literal["certificate", "any"] = "certificate"
    """Which node ids a pool manager may register under: ``certificate``, only the name in its
    certificate (one certificate per node); ``any``, any node id, for fleets whose pool managers
    share one certificate (a Kubernetes DaemonSet). With ``any``, a compromised node can pose
    as another."""
    node_register_interval_s: float = Field(default=5.0, ge=0.5, le=600)
    """How often a registered pool manager announces itself again (so an orchestrator that
    restarted finds every node within this time)."""
    queue_capacity: int = Field(default=1024, ge=1, le=1_000_000)
    """Most tasks waiting at once; what happens to one more is ``queue_full_policy``."""
    queue_full_policy: Literal["reject", "drop-oldest-batch"] = "reject"
    """Full queue: refuse the new task (RESOURCE_EXHAUSTED with a retry delay), or drop the
    BATCH task waiting longest to make room (its stream ends RESOURCE_EXHAUSTED, reason
    QUEUE_DROPPED) and refuse only when no BATCH task waits."""
    position_interval_s: float = Field(default=0.05, ge=0, le=10)
    """Queue positions and predictions go out at most this often (placement never waits); a
    deep queue, whose replay costs more, less often (orchestrator.forecast.PUBLISH_SHARE)."""
    batch_max_wait_s: float = Field(default=30.0, gt=0, le=86_400)
    """A BATCH task that has waited this long is served before INTERACTIVE tasks."""
    tenant_weights: dict[str, float] = Field(default_factory=dict)
    """Queue shares of tenants, tenant → weight (> 0); unlisted tenants weigh 1."""

    @field_validator("tenant_weights")
    @classmethod
    def _weights_valid(cls, weights: dict[str, float]) -> dict[str, float]:
        for tenant, weight in weights.items():
            if not is_valid_name(tenant):
                raise ValueError(f"{tenant!r} is not a valid tenant name")
            if not 0 < weight <= 1000:
                raise ValueError(f"weight of {tenant!r} must be in (0, 1000]")
        return weights

    max_prompt_bytes: int = Field(default=65_536, ge=1, le=16 * 1024 * 1024)
    """Largest prompt accepted, in UTF-8 bytes."""
    default_max_tokens: int = Field(default=128, ge=1, le=1_048_576)
    """max_tokens of a request that leaves it unset (capped by the model's context)."""
    node_heartbeat_s: float = Field(default=1.0, ge=0.1, le=60)
    """Longest gap between two state messages a pool manager sends on its watch stream."""
    node_lost_s: float = Field(default=3.0, gt=0, le=600)
    """A pool manager silent this long is unreachable (its pools get no work until it returns)."""
    finished_task_ttl_s: float = Field(default=3600.0, ge=0, le=7 * 86400)
    """How long a finished task stays readable with GetTask and StreamTask."""
    prefix_affinity: bool = True
    """Placement prefers the pool whose workers hold the start of a task's prompt warm, by the
    cost model of docs/decisions.md ("Prefix reuse"); off: least loaded only."""
    prefix_wait_s: float = Field(default=5.0, ge=0, le=60)
    """Longest a queued task waits for a busy pool holding its prompt's start while another pool
    could take it now (it lets the tasks behind it take that pool). Within it, a task waits no
    longer than reading the cached part would take on that pool (its measured prefill rate:
    seconds on a CPU, milliseconds on a GPU). 0: never waits for one."""
    max_attempts: int = Field(default=3, ge=1, le=20)
    """Placements a task gets when its pool fails before the first token (then it fails)."""
    swap_failure_cooldown_s: float = Field(default=60.0, ge=0, le=86_400)
    """After loading a model into a pool on demand failed, how long that pool is not tried for
    that model again (queued tasks with no other pool fail with the load's error)."""
    journal: bool = True
    """Keep the task journal, so accepted tasks survive a restart (off: memory only)."""
    journal_path: Path | None = None
    """SQLite file of the journal; the home profile's default is
    ``<data_dir>/orchestrator/journal.db``."""
    keys_path: Path | None = None
    """SQLite file of the API keys (``llorch keys``), used when TLS is on; default
    ``<data_dir>/orchestrator/keys.db``."""


class Settings(BaseSettings):
    """Settings of one llama-orch process."""

    model_config = SettingsConfigDict(
        env_prefix="LLORCH_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    """Where the catalog, the model store and the default model live."""
    listen: str = "127.0.0.1:50051"
    """Address the orchestrator (the client entry point) listens on."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Lowest level logged."""
    log_format: Literal["json", "text"] = "json"
    """JSON lines (for collectors) or text (for people)."""
    models: dict[str, Path] = Field(default_factory=dict)
    """Home profile: GGUF files to register at start, model id → path (besides tiny-llama)."""
    metrics_listen: str = ""
    """Prometheus metrics of this process at ``http://<address>/metrics`` (HTTPS asking for a
    client certificate from the CA when ``tls`` is set; loopback only otherwise); empty: none."""
    gateway_listen: str = "127.0.0.1:8080"
    """``llorch up``: the REST edge (``llorch-gateway``, built by ``make gateway``) listens here,
    in front of the orchestrator and the catalog; empty: no REST edge. If it cannot start (the
    port is taken), ``llorch up`` says so and serves gRPC alone."""
    health_listen: str = ""
    """``llorch serve``: also answer grpc.health.v1 (and nothing else) in plaintext here, for
    probes that cannot speak TLS (Kubernetes gRPC probes); empty: no such port."""
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    """OpenTelemetry traces of this process."""
    tls: TlsSettings = Field(default_factory=TlsSettings)
    """TLS and authentication (the cloud profile); unset: loopback only, no auth."""
    in_process_link: bool = True
    """Home profile: the orchestrator calls its co-located pool manager in-process rather than over
    loopback gRPC (same messages and errors, ~3 ms less to the first token). Off: the fleet path."""

    @field_validator("models")
    @classmethod
    def _model_ids_valid(cls, models: dict[str, Path]) -> dict[str, Path]:
        for model_id in models:
            if not is_valid_name(model_id):
                raise ValueError(f"{model_id!r} is not a valid model id")
        return models

    # Section names differ from the client variables LLORCH_ORCHESTRATOR / LLORCH_CATALOG, which
    # hold addresses for the client commands.
    catalog_service: CatalogSettings = Field(default_factory=CatalogSettings)
    """Catalog service."""
    pool_manager: PoolManagerSettings = Field(default_factory=PoolManagerSettings)
    """Pool manager."""
    orchestrator_service: OrchestratorSettings = Field(default_factory=OrchestratorSettings)
    """Orchestrator."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _CONFIG_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


_CONFIG_FILE: dict[str, Path | None] = {"path": None}


OTHER_VARIABLES = frozenset(
    {"CONFIG", "GPU_CHECK_DIR"}
    | {
        f"GATEWAY_{flag}"
        for flag in (
            "LISTEN",
            "ORCHESTRATOR",
            "CATALOG",
            "CA",
            "TLS_NAME",
            "SERVE_CERT",
            "SERVE_KEY",
        )
    }
)
"""``LLORCH_*`` names read elsewhere: the settings file's path, the GPU check's work dir, and
the REST edge's flags (gateway/cmd/llorch-gateway, ``LLORCH_GATEWAY_<FLAG>``)."""


def _setting_names(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every environment name (without ``LLORCH_``) that reaches a field of ``model``: a field,
    and for a section every name inside it joined with ``__``."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        full = f"{prefix}{name.upper()}"
        names.add(full)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= _setting_names(annotation, f"{full}__")
    return names


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``LLORCH_*`` variables of ``environ`` that name no setting (case-insensitive, as
    pydantic-settings reads them), each with the closest known name when there is one."""
    known = (
        _setting_names(Settings)
        | {name.upper() for name in ClientSettings.model_fields}
        | OTHER_VARIABLES
    )
    out: list[str] = []
    for variable in sorted(environ):
        if not variable.upper().startswith("LLORCH_"):
            continue
        name = variable.upper().removeprefix("LLORCH_")
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        out.append(f"{variable} (did you mean LLORCH_{close[0]}?)" if close else variable)
    return out


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Builds and validates the settings; raises ConfigError naming each bad field, and each
    ``LLORCH_*`` environment variable that names no setting (a misspelt one would otherwise be
    ignored without a word)."""
    unknown = unknown_variables(os.environ)
    if unknown:
        raise ConfigError(f"unknown environment variables: {'; '.join(unknown)}")
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    _CONFIG_FILE["path"] = config_file
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
    finally:
        _CONFIG_FILE["path"] = None


class ClientSettings(BaseSettings):
    """Settings of the ``llorch`` client commands (generate, models)."""

    model_config = SettingsConfigDict(env_prefix="LLORCH_", extra="ignore")

    orchestrator: str = "127.0.0.1:50051"
    """Orchestrator address the client commands call."""
    catalog: str = ""
    """Catalog address for model commands; empty reads the one ``llorch up`` recorded."""
    data_dir: Path = Field(default_factory=_default_data_dir)
    """Data dir of the home profile, where ``llorch up`` records its service addresses."""
    ca_file: Path | None = None
    """CA certificate to trust: calls go over TLS when set (``LLORCH_CA_FILE``)."""
    cert_file: Path | None = None
    """Certificate to present to mTLS service ports (an operator's, from ``llorch certs``)."""
    key_file: Path | None = None
    """Private key of ``cert_file``."""
    api_key: str = ""
    """API key for the orchestrator's client port (``LLORCH_API_KEY``), sent as a bearer token."""

    def tls_files(self) -> TlsFiles | None:
        """The TLS files the client commands use, or None for plaintext."""
        if self.ca_file is None:
            return None
        return TlsFiles(self.ca_file, self.cert_file, self.key_file)

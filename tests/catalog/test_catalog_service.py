"""CatalogService against a real server on an ephemeral port with its SQLite store."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from catalog.app import CatalogApp, start_catalog
from catalog.client import CatalogClient
from mesh.errors import AlreadyExistsError, InvalidArgumentError
from mesh.settings import Settings
from provisioners.gguf_facts import sha256_file
from provisioners.models import ensure_default_model, register_local_file
from provisioners.tiny_model import CHATML_TEMPLATE, TinyModelSpec, write_tiny_model


@dataclass
class Catalog:
    app: CatalogApp
    stub: catalog_pb2_grpc.CatalogServiceStub
    data_dir: Path


@pytest.fixture
def tiny_file(tiny_model: Path) -> tuple[str, int]:
    """Resolved path and size of the tiny model, as the catalog records them."""
    return str(tiny_model.resolve()), tiny_model.stat().st_size


@pytest.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[Catalog]:
    app = await start_catalog(Settings(data_dir=tmp_path))
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield Catalog(app, catalog_pb2_grpc.CatalogServiceStub(channel), tmp_path)
    finally:
        await channel.close()
        await app.stop()


async def test_register_then_get_returns_the_gguf_facts(
    catalog: Catalog, tiny_model: Path, tiny_file: tuple[str, int]
) -> None:
    registered = await register_local_file(catalog.stub, "tiny-llama", tiny_model, "local")
    response = await catalog.stub.GetModel(catalog_pb2.GetModelRequest(model_id="tiny-llama"))
    model = response.model
    assert model == registered
    assert model.model_id == "tiny-llama"
    assert model.facts.architecture == "llama"
    assert model.facts.context_length == 2048
    assert model.facts.file_type == "F32"
    assert model.facts.block_count == 2
    assert model.facts.embedding_length == 64
    assert model.facts.parameter_count > 0
    assert re.fullmatch(r"[0-9a-f]{64}", model.sha256)
    assert model.size_bytes == tiny_file[1]
    assert model.source_ref == f"file:{tiny_file[0]}"
    assert model.state == catalog_pb2.MODEL_STATE_ACTIVE
    assert model.created_unix_ms > 0


async def test_registering_the_same_file_again_is_idempotent(
    catalog: Catalog, tiny_model: Path
) -> None:
    first = await register_local_file(catalog.stub, "tiny-llama", tiny_model, "local")
    second = await register_local_file(catalog.stub, "tiny-llama", tiny_model, "local")
    assert second == first
    listed = await catalog.stub.ListModels(catalog_pb2.ListModelsRequest())
    assert [m.model_id for m in listed.models] == ["tiny-llama"]
    located = await catalog.stub.LocateModel(catalog_pb2.LocateModelRequest(model_id="tiny-llama"))
    assert len(located.locations) == 1


async def test_same_id_with_another_file_is_already_exists(
    catalog: Catalog, tiny_model: Path, tiny_file: tuple[str, int], tmp_path: Path
) -> None:
    await register_local_file(catalog.stub, "tiny-llama", tiny_model, "local")
    other = write_tiny_model(tmp_path / "other.gguf", TinyModelSpec(seed=7))
    with pytest.raises(AlreadyExistsError) as info:
        await register_local_file(catalog.stub, "tiny-llama", other, "local")
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert info.value.reason == "MODEL_EXISTS"
    # The original stays registered, and the rejected file got no replica.
    located = await catalog.stub.LocateModel(catalog_pb2.LocateModelRequest(model_id="tiny-llama"))
    assert [loc.path for loc in located.locations] == [tiny_file[0]]


async def test_list_models_pages_in_id_order(catalog: Catalog, tiny_model: Path) -> None:
    ids = ["m-e", "m-a", "m-d", "m-b", "m-c"]
    for model_id in ids:
        await register_local_file(catalog.stub, model_id, tiny_model, "local")
    seen: list[str] = []
    pages = 0
    token = ""
    while True:
        page = await catalog.stub.ListModels(
            catalog_pb2.ListModelsRequest(page_size=2, page_token=token)
        )
        pages += 1
        assert len(page.models) <= 2
        seen += [m.model_id for m in page.models]
        token = page.next_page_token
        if not token:
            break
        assert pages < 10, "paging does not end"
    assert seen == sorted(ids)
    assert pages == 3
    # Default page size returns everything at once, with no token.
    everything = await catalog.stub.ListModels(catalog_pb2.ListModelsRequest())
    assert [m.model_id for m in everything.models] == sorted(ids)
    assert everything.next_page_token == ""


async def test_list_models_exact_multiple_of_the_page_size(
    catalog: Catalog, tiny_model: Path
) -> None:
    for model_id in ("a1", "a2"):
        await register_local_file(catalog.stub, model_id, tiny_model, "local")
    page = await catalog.stub.ListModels(catalog_pb2.ListModelsRequest(page_size=2))
    assert [m.model_id for m in page.models] == ["a1", "a2"]
    assert page.next_page_token == ""


async def test_list_models_of_an_empty_catalog(catalog: Catalog) -> None:
    page = await catalog.stub.ListModels(catalog_pb2.ListModelsRequest(page_size=2))
    assert list(page.models) == []
    assert page.next_page_token == ""


async def test_bad_page_token_is_invalid_argument(catalog: Catalog) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await catalog.stub.ListModels(catalog_pb2.ListModelsRequest(page_token="%%%not-base64"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (info.value.details() or "")


async def test_garbage_page_token_is_invalid_argument(catalog: Catalog, tiny_model: Path) -> None:
    await register_local_file(catalog.stub, "tiny-llama", tiny_model, "local")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await catalog.stub.ListModels(catalog_pb2.ListModelsRequest(page_token="????"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("page_size", [-1, 1001])
async def test_page_size_out_of_range_is_invalid_argument(catalog: Catalog, page_size: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await catalog.stub.ListModels(catalog_pb2.ListModelsRequest(page_size=page_size))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in (info.value.details() or "")


async def test_get_unknown_model_is_not_found(catalog: Catalog) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await catalog.stub.GetModel(catalog_pb2.GetModelRequest(model_id="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await catalog.stub.LocateModel(catalog_pb2.LocateModelRequest(model_id="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("model_id", ["", "UPPER", "../x", "a" * 200, "a/b", "a..b"])
async def test_invalid_ids_are_invalid_argument(
    catalog: Catalog, tiny_model: Path, model_id: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await catalog.stub.GetModel(catalog_pb2.GetModelRequest(model_id=model_id))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_id" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await catalog.stub.LocateModel(catalog_pb2.LocateModelRequest(model_id=model_id))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server checks the id itself, not just the client helper.
    registered = await register_local_file(catalog.stub, "valid", tiny_model, "local")
    bad = catalog_pb2.Model()
    bad.CopyFrom(registered)
    bad.model_id = model_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await catalog.stub.RegisterModel(catalog_pb2.RegisterModelRequest(model=bad))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.model_id" in (info.value.details() or "")
    # And the client helper refuses it before calling.
    with pytest.raises(InvalidArgumentError):
        await register_local_file(catalog.stub, model_id, tiny_model, "local")


async def test_register_validates_the_model_fields(catalog: Catalog, tiny_model: Path) -> None:
    good = await register_local_file(catalog.stub, "valid", tiny_model, "local")

    async def code_of(model: catalog_pb2.Model, **request: object) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await catalog.stub.RegisterModel(
                catalog_pb2.RegisterModelRequest(model=model, **request)
            )
        return info.value.code()

    for field, value in (("sha256", "ABC"), ("size_bytes", 0), ("source_ref", "")):
        bad = catalog_pb2.Model()
        bad.CopyFrom(good)
        bad.model_id = "other"
        setattr(bad, field, value)
        assert await code_of(bad) == grpc.StatusCode.INVALID_ARGUMENT, field
    relative = catalog_pb2.ModelLocation(node_id="local", path="relative/x.gguf", size_bytes=1)
    bad = catalog_pb2.Model()
    bad.CopyFrom(good)
    bad.model_id = "other"
    assert await code_of(bad, locations=[relative]) == grpc.StatusCode.INVALID_ARGUMENT


async def test_locate_model_by_node(
    catalog: Catalog, tiny_model: Path, tiny_file: tuple[str, int]
) -> None:
    await register_local_file(catalog.stub, "tiny-llama", tiny_model, "local")
    here = await catalog.stub.LocateModel(
        catalog_pb2.LocateModelRequest(model_id="tiny-llama", node_id="local")
    )
    assert len(here.locations) == 1
    location = here.locations[0]
    assert location.node_id == "local"
    assert location.path == tiny_file[0]
    assert location.size_bytes == tiny_file[1]
    elsewhere = await catalog.stub.LocateModel(
        catalog_pb2.LocateModelRequest(model_id="tiny-llama", node_id="gpu-box")
    )
    assert list(elsewhere.locations) == []
    # A second node's replica of the same file shows up when no node is named.
    await register_local_file(catalog.stub, "tiny-llama", tiny_model, "gpu-box")
    everywhere = await catalog.stub.LocateModel(
        catalog_pb2.LocateModelRequest(model_id="tiny-llama")
    )
    assert [loc.node_id for loc in everywhere.locations] == ["gpu-box", "local"]


async def test_sqlite_file_uses_wal(catalog: Catalog, tiny_model: Path) -> None:
    await register_local_file(catalog.stub, "tiny-llama", tiny_model, "local")
    db = catalog.data_dir / "catalog.db"
    assert db.is_file()
    conn = sqlite3.connect(db)
    try:
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        (count,) = conn.execute("SELECT COUNT(*) FROM models").fetchone()
    finally:
        conn.close()
    assert mode == "wal"
    assert count == 1


async def test_models_survive_a_restart(tmp_path: Path, tiny_model: Path) -> None:
    app = await start_catalog(Settings(data_dir=tmp_path))
    channel = grpc.aio.insecure_channel(app.address)
    try:
        await register_local_file(
            catalog_pb2_grpc.CatalogServiceStub(channel), "tiny-llama", tiny_model, "local"
        )
    finally:
        await channel.close()
        await app.stop()
    app = await start_catalog(Settings(data_dir=tmp_path))
    channel = grpc.aio.insecure_channel(app.address)
    try:
        response = await catalog_pb2_grpc.CatalogServiceStub(channel).GetModel(
            catalog_pb2.GetModelRequest(model_id="tiny-llama")
        )
        assert response.model.facts.architecture == "llama"
    finally:
        await channel.close()
        await app.stop()


async def test_sizes_beyond_int64_are_invalid_not_internal(
    catalog: Catalog, tiny_model: Path
) -> None:
    model = catalog_pb2.Model(
        model_id="huge",
        source_ref="file:/x",
        sha256="a" * 64,
        size_bytes=2**63,
        facts=catalog_pb2.ModelFacts(architecture="llama", context_length=10),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await catalog.stub.RegisterModel(catalog_pb2.RegisterModelRequest(model=model))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.size_bytes" in (info.value.details() or "")


async def test_retire_activate_pin_and_unpin(catalog: Catalog, tiny_model: Path) -> None:
    await register_local_file(catalog.stub, "m-a", tiny_model, "local")
    retired = await catalog.stub.SetModelState(
        catalog_pb2.SetModelStateRequest(model_id="m-a", state=catalog_pb2.MODEL_STATE_RETIRED)
    )
    assert retired.model.state == catalog_pb2.MODEL_STATE_RETIRED
    got = await catalog.stub.GetModel(catalog_pb2.GetModelRequest(model_id="m-a"))
    assert got.model.state == catalog_pb2.MODEL_STATE_RETIRED
    pinned = await catalog.stub.SetModelPinned(
        catalog_pb2.SetModelPinnedRequest(model_id="m-a", pinned=True)
    )
    assert pinned.model.pinned and pinned.model.state == catalog_pb2.MODEL_STATE_RETIRED
    active = await catalog.stub.SetModelState(
        catalog_pb2.SetModelStateRequest(model_id="m-a", state=catalog_pb2.MODEL_STATE_ACTIVE)
    )
    assert active.model.state == catalog_pb2.MODEL_STATE_ACTIVE and active.model.pinned
    unpinned = await catalog.stub.SetModelPinned(
        catalog_pb2.SetModelPinnedRequest(model_id="m-a", pinned=False)
    )
    assert not unpinned.model.pinned
    # Everything else about the model is unchanged.
    assert unpinned.model.sha256 == got.model.sha256 and unpinned.model.facts == got.model.facts


async def test_state_and_pin_changes_refuse_bad_input(catalog: Catalog, tiny_model: Path) -> None:
    await register_local_file(catalog.stub, "m-a", tiny_model, "local")
    cases = [
        (catalog_pb2.SetModelStateRequest(model_id="m-a"), "SetModelState", "state"),
        (
            catalog_pb2.SetModelStateRequest(model_id="m-a", state=7),  # type: ignore[arg-type]
            "SetModelState",
            "state",
        ),
        (catalog_pb2.SetModelStateRequest(state=1), "SetModelState", "model_id"),
        (catalog_pb2.SetModelPinnedRequest(model_id="../x"), "SetModelPinned", "model_id"),
        (catalog_pb2.ListModelsRequest(state=9), "ListModels", "state"),  # type: ignore[arg-type]
        (catalog_pb2.ListModelsRequest(node_id="Bad Node"), "ListModels", "node_id"),
    ]
    for request, method, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await getattr(catalog.stub, method)(request)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, request)
        assert field in (bad.value.details() or ""), (method, bad.value.details())
    for request, method in [
        (catalog_pb2.SetModelStateRequest(model_id="nope", state=2), "SetModelState"),
        (catalog_pb2.SetModelPinnedRequest(model_id="nope", pinned=True), "SetModelPinned"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await getattr(catalog.stub, method)(request)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_models_filters_by_state_and_node(catalog: Catalog, tiny_model: Path) -> None:
    for model_id, node in [("m-a", "n1"), ("m-b", "n2"), ("m-c", "n1"), ("m-d", "n1")]:
        await register_local_file(catalog.stub, model_id, tiny_model, node)
    await catalog.stub.SetModelState(
        catalog_pb2.SetModelStateRequest(model_id="m-c", state=catalog_pb2.MODEL_STATE_RETIRED)
    )

    async def ids(**filters: object) -> list[str]:
        seen, token = [], ""
        while True:  # one model a page: the token carries on with the same filters
            page = await catalog.stub.ListModels(
                catalog_pb2.ListModelsRequest(page_size=1, page_token=token, **filters)  # type: ignore[arg-type]
            )
            seen += [m.model_id for m in page.models]
            token = page.next_page_token
            if not token:
                return seen

    assert await ids() == ["m-a", "m-b", "m-c", "m-d"]
    assert await ids(state=catalog_pb2.MODEL_STATE_RETIRED) == ["m-c"]
    assert await ids(state=catalog_pb2.MODEL_STATE_ACTIVE) == ["m-a", "m-b", "m-d"]
    assert await ids(node_id="n1") == ["m-a", "m-c", "m-d"]
    assert await ids(node_id="n1", state=catalog_pb2.MODEL_STATE_ACTIVE) == ["m-a", "m-d"]
    assert await ids(node_id="n9") == []


def _engine(node_id: str = "n1", version: str = "0.3.36", **kw: object) -> catalog_pb2.Engine:
    fields: dict[str, object] = {
        "node_id": node_id,
        "name": "llama-cpp-python",
        "version": version,
        "backend": "cuda",
        "build_info": "CUDA : ARCHS = 900 |",
        "path": "/opt/llama_cpp",
        "gpu_offload": True,
        "backend_libraries": ["cpu", "cuda"],
        **kw,
    }
    return catalog_pb2.Engine(**fields)  # type: ignore[arg-type]


async def test_engines_are_recorded_per_node_and_replaced_on_a_new_check(
    catalog: Catalog,
) -> None:
    first = await catalog.stub.RegisterEngine(catalog_pb2.RegisterEngineRequest(engine=_engine()))
    assert first.engine.checked_unix_ms > 0 and first.engine.backend == "cuda"
    await catalog.stub.RegisterEngine(
        catalog_pb2.RegisterEngineRequest(engine=_engine("n2", backend="cpu", gpu_offload=False))
    )
    # The same node, name and version checked again: one entry, the newer facts.
    await catalog.stub.RegisterEngine(
        catalog_pb2.RegisterEngineRequest(engine=_engine(gpu_offload=False))
    )
    listed = (await catalog.stub.ListEngines(catalog_pb2.ListEnginesRequest())).engines
    assert [(e.node_id, e.backend, e.gpu_offload) for e in listed] == [
        ("n1", "cuda", False),
        ("n2", "cpu", False),
    ]
    assert list(listed[0].backend_libraries) == ["cpu", "cuda"]
    only = (await catalog.stub.ListEngines(catalog_pb2.ListEnginesRequest(node_id="n2"))).engines
    assert [e.node_id for e in only] == ["n2"]


@pytest.mark.parametrize(
    ("engine", "field"),
    [
        (_engine(node_id=""), "engine.node_id"),
        (_engine(name=""), "engine.name"),
        (_engine(version="0.3 36"), "engine.version"),
        (_engine(backend="gpu"), "engine.backend"),
        (_engine(path="relative/dir"), "engine.path"),
        (_engine(build_info="x" * 5000), "engine.build_info"),
        (_engine(backend_libraries=["cpu", "Warp Drive"]), "engine.backend_libraries[1]"),
    ],
)
async def test_engine_fields_are_validated(
    catalog: Catalog, engine: catalog_pb2.Engine, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await catalog.stub.RegisterEngine(catalog_pb2.RegisterEngineRequest(engine=engine))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (bad.value.details() or "")


async def test_gc_policy_default_and_per_node(catalog: Catalog) -> None:
    default = await catalog.stub.GetGcPolicy(catalog_pb2.GetGcPolicyRequest(node_id="n1"))
    assert not default.node_specific
    assert default.policy.max_disk_usage_pct == 90.0 and default.policy.keep_active
    policy = catalog_pb2.GcPolicy(
        max_disk_usage_pct=80,
        min_free_bytes=5,
        keep_active=False,
        keep_used_within_days=1,
        delete_retired_after_days=2,
    )
    await catalog.stub.SetGcPolicy(catalog_pb2.SetGcPolicyRequest(node_id="n1", policy=policy))
    own = await catalog.stub.GetGcPolicy(catalog_pb2.GetGcPolicyRequest(node_id="n1"))
    assert own.node_specific and own.policy == policy
    other = await catalog.stub.GetGcPolicy(catalog_pb2.GetGcPolicyRequest(node_id="n2"))
    assert not other.node_specific and other.policy.max_disk_usage_pct == 90.0
    everyone = catalog_pb2.GcPolicy(max_disk_usage_pct=70, keep_active=True)
    await catalog.stub.SetGcPolicy(catalog_pb2.SetGcPolicyRequest(policy=everyone))
    other = await catalog.stub.GetGcPolicy(catalog_pb2.GetGcPolicyRequest(node_id="n2"))
    assert other.policy == everyone and not other.node_specific


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (catalog_pb2.SetGcPolicyRequest(), "policy"),
        (
            catalog_pb2.SetGcPolicyRequest(policy=catalog_pb2.GcPolicy(max_disk_usage_pct=0)),
            "policy.max_disk_usage_pct",
        ),
        (
            catalog_pb2.SetGcPolicyRequest(
                policy=catalog_pb2.GcPolicy(max_disk_usage_pct=90, keep_used_within_days=-1)
            ),
            "policy.keep_used_within_days",
        ),
        (
            catalog_pb2.SetGcPolicyRequest(
                node_id="Bad", policy=catalog_pb2.GcPolicy(max_disk_usage_pct=90)
            ),
            "node_id",
        ),
    ],
)
async def test_gc_policy_is_validated(
    catalog: Catalog, request_: catalog_pb2.SetGcPolicyRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await catalog.stub.SetGcPolicy(request_)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (bad.value.details() or "")


async def test_delete_replica(
    catalog: Catalog, tiny_model: Path, tiny_file: tuple[str, int]
) -> None:
    await register_local_file(catalog.stub, "m-a", tiny_model, "n1")
    path = tiny_file[0]
    removed = await catalog.stub.DeleteReplica(
        catalog_pb2.DeleteReplicaRequest(model_id="m-a", node_id="n1", path=path)
    )
    again = await catalog.stub.DeleteReplica(
        catalog_pb2.DeleteReplicaRequest(model_id="m-a", node_id="n1", path=path)
    )
    assert removed.removed and not again.removed
    where = await catalog.stub.LocateModel(catalog_pb2.LocateModelRequest(model_id="m-a"))
    assert list(where.locations) == []
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await catalog.stub.DeleteReplica(
            catalog_pb2.DeleteReplicaRequest(model_id="m-a", node_id="n1", path="rel")
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_tokenizer_facts_round_trip(
    catalog: Catalog, tiny_model: Path, tmp_path: Path
) -> None:
    registered = await register_local_file(catalog.stub, "tiny-llama", tiny_model, "local")
    got = (await catalog.stub.GetModel(catalog_pb2.GetModelRequest(model_id="tiny-llama"))).model
    assert got == registered
    assert got.facts.chat_template == CHATML_TEMPLATE
    assert got.facts.bos_token == "<s>" and got.facts.eos_token == "</s>"
    assert list(got.facts.control_tokens) == ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    listed = await catalog.stub.ListModels(catalog_pb2.ListModelsRequest())
    assert [m.facts for m in listed.models] == [got.facts]
    # What other services read through the client.
    async with grpc.aio.insecure_channel(catalog.app.address) as channel:
        info = await CatalogClient(channel).model_info("tiny-llama")
    assert info.chat_template == CHATML_TEMPLATE
    assert (info.bos_token, info.eos_token) == ("<s>", "</s>")
    assert info.control_tokens == ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
    # A model without a template has none in the catalog.
    plain = write_tiny_model(tmp_path / "plain.gguf", TinyModelSpec(chat_template=""))
    model = await register_local_file(catalog.stub, "plain", plain, "local")
    assert model.facts.chat_template == "" and model.facts.eos_token == "</s>"


@pytest.mark.parametrize(
    ("facts", "field"),
    [
        ({"chat_template": "x" * (256 * 1024 + 1)}, "model.facts.chat_template"),
        ({"control_tokens": [f"<t{i}>" for i in range(16385)]}, "model.facts.control_tokens"),
        ({"control_tokens": ["x" * 256] * 2049}, "model.facts.control_tokens"),  # > 512 KiB
        ({"control_tokens": ["<ok>", "x" * 257]}, "model.facts.control_tokens[1]"),
        ({"eos_token": "x" * 257}, "model.facts.eos_token"),
        ({"bos_token": "\u00e9" * 129}, "model.facts.bos_token"),  # 258 bytes
    ],
)
async def test_tokenizer_facts_beyond_their_bounds_are_invalid(
    catalog: Catalog, facts: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await catalog.stub.RegisterModel(
            catalog_pb2.RegisterModelRequest(model=_model_with_facts("big", **facts))
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError):
        await catalog.stub.GetModel(catalog_pb2.GetModelRequest(model_id="big"))


async def test_tokenizer_facts_at_their_bounds_are_accepted(catalog: Catalog) -> None:
    model = _model_with_facts(
        "edge",
        chat_template="x" * (256 * 1024),
        control_tokens=["\u00e9" * 128] * 2048,  # 256 bytes of UTF-8 each: 512 KiB
        bos_token="x" * 256,
        eos_token="x" * 256,
    )
    response = await catalog.stub.RegisterModel(catalog_pb2.RegisterModelRequest(model=model))
    assert response.model.facts == model.facts


async def test_pages_of_big_records_stop_short_of_their_size_and_list_every_model(
    catalog: Catalog,
) -> None:
    for i in range(6):  # ~770 KiB each: a page of 100 would be 4.6 MiB, past gRPC's 4 MiB
        model = _model_with_facts(
            f"big-{i}", chat_template="x" * (256 * 1024), control_tokens=["y" * 256] * 2048
        )
        await catalog.stub.RegisterModel(catalog_pb2.RegisterModelRequest(model=model))
    sizes: list[int] = []
    seen: list[str] = []
    token = ""
    while True:
        page = await catalog.stub.ListModels(
            catalog_pb2.ListModelsRequest(page_size=100, page_token=token)
        )
        assert page.ByteSize() <= 2 * 1024 * 1024 + 1024
        sizes.append(len(page.models))
        seen += [m.model_id for m in page.models]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"big-{i}" for i in range(6)]
    assert len(sizes) > 1 and all(0 < n < 6 for n in sizes)


def _model_with_facts(model_id: str, **facts: object) -> catalog_pb2.Model:
    return catalog_pb2.Model(
        model_id=model_id,
        source_ref="file:/x",
        sha256="a" * 64,
        size_bytes=1,
        facts=catalog_pb2.ModelFacts(architecture="llama", context_length=10, **facts),
    )


# The models table as it was before the catalog recorded tokenizer facts.
_OLD_MODELS_TABLE = """
CREATE TABLE models (
    model_id TEXT PRIMARY KEY,
    source_ref TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    architecture TEXT NOT NULL,
    parameter_count INTEGER NOT NULL,
    file_type TEXT NOT NULL,
    context_length INTEGER NOT NULL,
    block_count INTEGER NOT NULL,
    embedding_length INTEGER NOT NULL,
    state TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    created_unix_ms INTEGER NOT NULL,
    last_used_unix_ms INTEGER NOT NULL DEFAULT 0,
    state_changed_unix_ms INTEGER NOT NULL DEFAULT 0
);
"""


async def test_a_catalog_from_before_the_tokenizer_facts_opens_and_fills_them_in(
    tmp_path: Path, tiny_model: Path
) -> None:
    digest = sha256_file(tiny_model)
    conn = sqlite3.connect(tmp_path / "catalog.db")
    try:
        conn.executescript(_OLD_MODELS_TABLE)
        conn.execute(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            ("old", "file:/old", digest, 123, "llama", 7, "F32", 2048, 2, 64, "active", 1, 5, 6, 0),
        )
        conn.commit()
    finally:
        conn.close()
    app = await start_catalog(Settings(data_dir=tmp_path))
    channel = grpc.aio.insecure_channel(app.address)
    try:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        old = (await stub.GetModel(catalog_pb2.GetModelRequest(model_id="old"))).model
        assert old.facts.architecture == "llama" and old.facts.context_length == 2048
        assert old.pinned and old.created_unix_ms == 5 and old.last_used_unix_ms == 6
        assert old.facts.chat_template == "" and old.facts.bos_token == ""
        assert old.facts.eos_token == "" and list(old.facts.control_tokens) == []
        # New models are recorded whole beside it.
        new = await register_local_file(stub, "new", tiny_model, "local")
        assert new.facts.chat_template == CHATML_TEMPLATE
        # Registering the old model's file again fills in the facts it lacked, and only those.
        again = await register_local_file(stub, "old", tiny_model, "local", "file:/old", digest)
        assert again.facts.chat_template == CHATML_TEMPLATE
        assert list(again.facts.control_tokens) == list(new.facts.control_tokens)
        assert (again.size_bytes, again.facts.parameter_count, again.pinned) == (123, 7, True)
    finally:
        await channel.close()
        await app.stop()


async def test_the_default_model_of_an_earlier_release_is_replaced_with_this_ones(
    catalog: Catalog, tmp_path: Path
) -> None:
    store = tmp_path / "models"
    old = write_tiny_model(store / "tiny-llama.gguf", TinyModelSpec(chat_template=""))
    old_sha = sha256_file(old)
    await register_local_file(catalog.stub, "tiny-llama", old, "local")
    model = await ensure_default_model(catalog.stub, store, "local")
    assert model.sha256 != old_sha and model.facts.chat_template == CHATML_TEMPLATE
    assert sha256_file(store / "tiny-llama.gguf") == model.sha256
    assert sorted(p.name for p in store.iterdir()) == ["tiny-llama.gguf"]
    again = await ensure_default_model(catalog.stub, store, "local")  # a second start
    assert again.sha256 == model.sha256
    assert sorted(p.name for p in store.iterdir()) == ["tiny-llama.gguf"]

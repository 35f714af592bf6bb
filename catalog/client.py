"""What other services need from the catalog, over gRPC: model facts and file locations."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from mesh.errors import NotFoundError, UnavailableError, from_rpc_error

_CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ModelInfo:
    """What admission and chat need to know about a model."""

    model_id: str
    context_length: int
    active: bool
    size_bytes: int = 0
    """The model file's size: the least VRAM its weights take."""
    chat_template: str = ""
    """The model's chat template (Jinja2); empty when it has none, and then it takes prompts
    only."""
    bos_token: str = ""
    """Text of the beginning-of-sequence token, for the template."""
    eos_token: str = ""
    """Text of the end-of-sequence token, for the template."""
    control_tokens: tuple[str, ...] = ()
    """Texts of the vocabulary's control tokens, which chat message content may not contain."""
    created_unix_ms: int = 0
    """When the model was registered."""


class CatalogClient:
    """A CatalogService stub with a short-lived cache of model facts (admission is hot)."""

    def __init__(self, channel: grpc.aio.Channel, cache_ttl_s: float = 2.0) -> None:
        self._stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        self._ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, ModelInfo]] = {}

    async def model_info(self, model_id: str) -> ModelInfo:
        """Facts of a model; NotFoundError when unknown, UnavailableError when unreachable."""
        hit = self._cache.get(model_id)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        try:
            response = await self._stub.GetModel(
                catalog_pb2.GetModelRequest(model_id=model_id), timeout=_CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as err:
            raise _catalog_error(err) from None
        info = _info_of(response.model)
        self._cache[model_id] = (now, info)
        return info

    async def active_models(self) -> list[ModelInfo]:
        """Every active model, in id order (every page); UnavailableError when unreachable.
        Pages are small: each record carries its chat template and control tokens."""
        out: list[ModelInfo] = []
        token = ""
        while True:
            try:
                response = await self._stub.ListModels(
                    catalog_pb2.ListModelsRequest(
                        page_size=100, page_token=token, state=catalog_pb2.MODEL_STATE_ACTIVE
                    ),
                    timeout=_CALL_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as err:
                raise _catalog_error(err) from None
            out.extend(_info_of(model) for model in response.models)
            token = response.next_page_token
            if not token:
                return out

    async def delete_model(self, model_id: str) -> list[catalog_pb2.ModelLocation]:
        """Deletes a model and its file records; the records. NotFoundError when unknown."""
        self._cache.pop(model_id, None)
        try:
            response = await self._stub.DeleteModel(
                catalog_pb2.DeleteModelRequest(model_id=model_id), timeout=_CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as err:
            raise _catalog_error(err) from None
        finally:
            self._cache.pop(model_id, None)
        return list(response.locations)

    async def local_path(self, model_id: str, node_id: str) -> str:
        """Path of a model's file on ``node_id``; NotFoundError when the node holds none."""
        try:
            response = await self._stub.LocateModel(
                catalog_pb2.LocateModelRequest(model_id=model_id, node_id=node_id),
                timeout=_CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            raise _catalog_error(err) from None
        if not response.locations:
            raise NotFoundError(
                f"node {node_id} holds no copy of model {model_id}", reason="MODEL_NOT_ON_NODE"
            )
        return str(response.locations[0].path)


def _info_of(model: catalog_pb2.Model) -> ModelInfo:
    return ModelInfo(
        model_id=model.model_id,
        context_length=model.facts.context_length,
        active=model.state == catalog_pb2.MODEL_STATE_ACTIVE,
        size_bytes=model.size_bytes,
        chat_template=model.facts.chat_template,
        bos_token=model.facts.bos_token,
        eos_token=model.facts.eos_token,
        control_tokens=tuple(model.facts.control_tokens),
        created_unix_ms=model.created_unix_ms,
    )


def _catalog_error(err: grpc.aio.AioRpcError) -> Exception:
    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(
            f"catalog unreachable: {err.details()}", reason="CATALOG_UNAVAILABLE", retry_delay_s=1.0
        )
    return from_rpc_error(err)

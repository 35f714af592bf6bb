"""Brings a model's file onto this node when a pool must load a model its store lacks.

The file comes from the model's source ref in the catalog, through the same provisioner as
``llorch models pull``: verified against the catalog's sha256 and GGUF check, written atomically
into this node's store, then recorded as this node's replica. One fetch per model at a time; a
pool asking while another fetches waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from catalog.client import CatalogClient
from mesh import logs
from mesh.errors import FailedPreconditionError, NotFoundError, from_rpc_error
from provisioners.models import pull_model
from provisioners.pull import PullError

_log = logs.get_logger("poolmanager.fetch")


class ModelFetcher:
    """Paths of model files on this node, fetching those it lacks into its store."""

    def __init__(
        self,
        catalog: CatalogClient,
        stub: catalog_pb2_grpc.CatalogServiceStub,
        node_id: str,
        store: Path,
        after_fetch: Callable[[], Awaitable[None]],
    ) -> None:
        self._catalog = catalog
        self._stub = stub
        self._node_id = node_id
        self._store = store
        self._after_fetch = after_fetch
        self._locks: dict[str, asyncio.Lock] = {}

    async def path(self, model_id: str) -> str:
        """The model's file on this node, fetched first if the node holds none.

        Raises:
            NotFoundError: the catalog has no such model.
            FailedPreconditionError: MODEL_FETCH_FAILED, saying where from and why.
        """
        lock = self._locks.setdefault(model_id, asyncio.Lock())
        async with lock:
            try:
                return await self._catalog.local_path(model_id, self._node_id)
            except NotFoundError as err:
                if err.reason != "MODEL_NOT_ON_NODE":
                    raise
            try:
                record = (
                    await self._stub.GetModel(
                        catalog_pb2.GetModelRequest(model_id=model_id), timeout=30
                    )
                ).model
            except grpc.aio.AioRpcError as err:
                raise from_rpc_error(err) from None
            _log.info(
                "fetching model %s onto node %s from %s",
                model_id,
                self._node_id,
                record.source_ref,
            )
            try:
                await pull_model(
                    self._stub,
                    record.source_ref,
                    self._store,
                    self._node_id,
                    name=model_id,
                    sha256=record.sha256,
                )
            except PullError as exc:
                raise FailedPreconditionError(
                    f"model {model_id} is not on node {self._node_id}, and fetching it from "
                    f"{record.source_ref} failed: {exc.reason}: {exc}",
                    reason="MODEL_FETCH_FAILED",
                ) from None
            await self._after_fetch()
            return await self._catalog.local_path(model_id, self._node_id)

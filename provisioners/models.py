"""Model provisioner: turns a GGUF file on this node into a catalog entry with a replica."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from pathlib import Path

import grpc
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from mesh.errors import AlreadyExistsError, InvalidArgumentError, from_rpc_error
from mesh.ids import check_name
from provisioners.gguf_facts import NotAGgufError, read_gguf_facts, sha256_file
from provisioners.pull import (
    Progress,
    PullOptions,
    model_name_for,
    parse_ref,
    pull,
    remove_stale_partials,
)
from provisioners.tiny_model import DEFAULT_MODEL_ID, TinyModelSpec, write_tiny_model


async def register_local_file(
    stub: catalog_pb2_grpc.CatalogServiceStub,
    model_id: str,
    path: Path,
    node_id: str,
    source_ref: str = "",
    sha256: str = "",
) -> catalog_pb2.Model:
    """Reads the file's GGUF facts (and its sha256, unless given) and registers it with a
    replica on ``node_id``; ``source_ref`` says where it came from (default ``file:<path>``).

    Raises:
        InvalidArgumentError: the id is invalid, or the file is missing or not a GGUF.
        LlorchError: what the catalog answered otherwise (e.g. ALREADY_EXISTS).
    """
    check_name(model_id, "model_id")
    path = await asyncio.to_thread(path.resolve)
    try:
        facts = await asyncio.to_thread(read_gguf_facts, path)
    except NotAGgufError as exc:
        raise InvalidArgumentError("path", str(exc)) from None
    digest = sha256 or await asyncio.to_thread(sha256_file, path)
    size = (await asyncio.to_thread(path.stat)).st_size
    request = catalog_pb2.RegisterModelRequest(
        model=catalog_pb2.Model(
            model_id=model_id,
            source_ref=source_ref or f"file:{path}",
            sha256=digest,
            size_bytes=size,
            facts=catalog_pb2.ModelFacts(
                architecture=facts.architecture,
                parameter_count=facts.parameter_count,
                file_type=facts.file_type,
                context_length=facts.context_length,
                block_count=facts.block_count,
                embedding_length=facts.embedding_length,
                chat_template=facts.chat_template,
                bos_token=facts.bos_token,
                eos_token=facts.eos_token,
                control_tokens=list(facts.control_tokens),
            ),
        ),
        locations=[catalog_pb2.ModelLocation(node_id=node_id, path=str(path), size_bytes=size)],
    )
    try:
        response = await stub.RegisterModel(request, timeout=30)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from None
    return response.model


async def ensure_default_model(
    stub: catalog_pb2_grpc.CatalogServiceStub, model_dir: Path, node_id: str
) -> catalog_pb2.Model:
    """Creates the embedded default model on first use and registers it as ``tiny-llama``.

    The model is generated, so a release may change it (this one gave it a chat template): a
    file from an earlier release is replaced by this release's, and the catalog's record of the
    old file is dropped first (it names the old sha256). Generating it takes milliseconds.
    """
    path = model_dir / f"{DEFAULT_MODEL_ID}.gguf"
    fresh = model_dir / f".{DEFAULT_MODEL_ID}.current.gguf"
    await asyncio.to_thread(write_tiny_model, fresh, TinyModelSpec())
    if path.is_file():
        old, new = await asyncio.gather(
            asyncio.to_thread(sha256_file, path), asyncio.to_thread(sha256_file, fresh)
        )
        if old == new:
            await asyncio.to_thread(fresh.unlink)
            return await register_local_file(stub, DEFAULT_MODEL_ID, path, node_id, sha256=old)
        try:
            got = await stub.GetModel(catalog_pb2.GetModelRequest(model_id=DEFAULT_MODEL_ID))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise from_rpc_error(err) from None
        else:
            if got.model.sha256 == old:
                await stub.DeleteModel(catalog_pb2.DeleteModelRequest(model_id=DEFAULT_MODEL_ID))
    await asyncio.to_thread(os.replace, fresh, path)
    return await register_local_file(stub, DEFAULT_MODEL_ID, path, node_id)


async def pull_model(
    stub: catalog_pb2_grpc.CatalogServiceStub,
    ref: str,
    store: Path,
    node_id: str,
    name: str = "",
    sha256: str = "",
    options: PullOptions | None = None,
    progress: Progress | None = None,
) -> catalog_pb2.Model:
    """``llorch models pull``: fetches ``ref`` into the node's model store, verifies it, and
    registers it with its replica; a failure at any step leaves neither file nor record.

    Raises:
        InvalidArgumentError: a bad ref, name or sha256.
        AlreadyExistsError: the name is taken by another file.
        PullError: the fetch or a check failed (its reason says which).
        LlorchError: what the catalog answered otherwise.
    """
    parsed = parse_ref(ref)
    model_id = check_name(name, "name") if name else model_name_for(parsed)
    try:
        existing: catalog_pb2.Model | None = (
            await stub.GetModel(catalog_pb2.GetModelRequest(model_id=model_id), timeout=30)
        ).model
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise from_rpc_error(err) from None
        existing = None
    if existing is not None:
        same = existing.sha256 == sha256.lower() if sha256 else existing.source_ref == str(parsed)
        if not same:
            raise AlreadyExistsError(
                f"model {model_id} is registered already (sha256 {existing.sha256}, from "
                f"{existing.source_ref}); choose another --name",
                reason="MODEL_EXISTS",
            )
        sha256 = existing.sha256  # the same model again: it must be the same file
    dest = store / f"{model_id}.gguf"
    if existing is not None and await asyncio.to_thread(_holds, dest, existing.sha256):
        # Pulled here before: make sure the replica is recorded, and that is all.
        return await register_local_file(stub, model_id, dest, node_id, str(parsed), sha256)
    await asyncio.to_thread(remove_stale_partials, store)  # of pulls that were killed
    stop = threading.Event()
    fetch = asyncio.get_running_loop().run_in_executor(
        None, functools.partial(pull, parsed, dest, sha256, options, progress, stop)
    )
    try:
        pulled = await asyncio.shield(fetch)
    except asyncio.CancelledError:  # Ctrl-C: stop the transfer and clean up before leaving
        stop.set()
        with contextlib.suppress(Exception):
            await fetch
        raise
    try:
        # Registering again is idempotent: it re-adds this node's replica if it was removed.
        return await register_local_file(
            stub, model_id, pulled.path, node_id, str(parsed), pulled.sha256
        )
    except BaseException:
        if existing is None:
            with contextlib.suppress(FileNotFoundError):
                pulled.path.unlink()  # not registered: not kept
        raise


def _holds(path: Path, sha256: str) -> bool:
    """Whether ``path`` is a file with this content."""
    return path.is_file() and sha256_file(path) == sha256

"""Garbage collection of this node's model store: gathers the facts for ``provisioners.gc``'s
planner (the catalog's policy and replicas, the disk, what this node uses) and carries out the
plan — each file's replica record first, then the file, so a crash in between leaves a file the
catalog does not know (the next collection removes it), never a record without its file.
Only files inside the store are ever deleted; files registered from elsewhere are the
operator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from catalog.convert import gc_policy_from_pb
from catalog.store import GcPolicy
from mesh import logs
from mesh.errors import FailedPreconditionError, from_rpc_error
from provisioners.gc import Disk, GcPlan, GcReplica, plan_gc
from provisioners.pull import remove_stale_partials

_log = logs.get_logger("poolmanager.gc")
_PARTIAL = re.compile(r"\.(.+)\.gguf\.(\d+)\.partial")
_CALL_TIMEOUT_S = 30.0
UNKNOWN_GRACE_S = 600.0
"""A store file the catalog does not know is left alone this long after its last write."""


@dataclass(frozen=True)
class Collection:
    """One garbage collection's outcome."""

    plan: GcPlan
    dry_run: bool
    stale_partials_removed: int
    unknown_files: list[str]
    """Store files no record names (removed unless a dry run)."""


class GarbageCollector:
    """Collects one node's model store."""

    def __init__(
        self,
        catalog: catalog_pb2_grpc.CatalogServiceStub,
        node_id: str,
        store: Path,
        in_use: Callable[[], dict[str, str]],
        clock: Callable[[], float] = time.time,
        after_collect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``after_collect`` runs after each collection that deleted something."""
        self._after_collect = after_collect
        self._catalog = catalog
        self._node_id = node_id
        self._store = store
        self._in_use = in_use
        self._clock = clock
        self._lock = asyncio.Lock()

    async def collect(self, dry_run: bool) -> Collection:
        """Plans a collection and, unless ``dry_run``, carries it out.

        Raises:
            LlorchError: the catalog could not be read (nothing was deleted) or answered a
                deletion with an error (what was deleted before stays deleted).
        """
        async with self._lock:
            try:
                await asyncio.to_thread(self._store.mkdir, parents=True, exist_ok=True)
            except OSError as exc:
                raise FailedPreconditionError(
                    f"the model store {self._store} cannot be used: {exc}",
                    reason="MODEL_STORE_UNUSABLE",
                ) from None
            partials = (
                0 if dry_run else len(await asyncio.to_thread(remove_stale_partials, self._store))
            )
            in_use = dict(self._in_use())
            for name in await asyncio.to_thread(self._being_pulled):
                in_use.setdefault(name, "being pulled")
            try:
                policy, replicas, known = await self._catalog_facts()
                usage = await asyncio.to_thread(shutil.disk_usage, self._store)
                plan = plan_gc(
                    replicas,
                    policy,
                    Disk(usage.total, usage.free),
                    in_use,
                    int(self._clock() * 1000),
                )
                if not dry_run:
                    for replica, reason in plan.delete:
                        await self._delete(replica, reason)
            except grpc.aio.AioRpcError as err:
                raise from_rpc_error(err) from None
            unknown = await asyncio.to_thread(self._unknown_files, known, not dry_run)
        if not dry_run and plan.delete and self._after_collect is not None:
            await self._after_collect()
        return Collection(plan, dry_run, partials, unknown)

    async def _catalog_facts(self) -> tuple[GcPolicy, list[GcReplica], set[str]]:
        answer = await self._catalog.GetGcPolicy(
            catalog_pb2.GetGcPolicyRequest(node_id=self._node_id), timeout=_CALL_TIMEOUT_S
        )
        policy = gc_policy_from_pb(answer.policy)
        replicas: list[GcReplica] = []
        # Every path any record names, of any node: a store shared by two node ids (or files
        # pulled under another node id) must never look unknown.
        known: set[str] = set()
        token = ""
        while True:
            page = await self._catalog.ListModels(
                catalog_pb2.ListModelsRequest(page_token=token), timeout=_CALL_TIMEOUT_S
            )
            for model in page.models:
                where = await self._catalog.LocateModel(
                    catalog_pb2.LocateModelRequest(model_id=model.model_id),
                    timeout=_CALL_TIMEOUT_S,
                )
                for location in where.locations:
                    known.add(location.path)
                    if location.node_id != self._node_id or not self._in_store(location.path):
                        continue  # another node's, or registered from elsewhere: not ours
                    replicas.append(
                        GcReplica(
                            model_id=model.model_id,
                            path=location.path,
                            size_bytes=location.size_bytes,
                            active=model.state == catalog_pb2.MODEL_STATE_ACTIVE,
                            pinned=model.pinned,
                            # This node's copy's, or the model's if the copy has none.
                            last_used_unix_ms=location.last_used_unix_ms or model.last_used_unix_ms,
                            state_changed_unix_ms=model.state_changed_unix_ms,
                            created_unix_ms=model.created_unix_ms,
                        )
                    )
            token = page.next_page_token
            if not token:
                return policy, replicas, known

    async def _delete(self, replica: GcReplica, reason: str) -> None:
        if replica.model_id in self._in_use():  # a pool started on it since the plan
            _log.info("gc kept %s: it came into use", replica.path)
            return
        await self._catalog.DeleteReplica(
            catalog_pb2.DeleteReplicaRequest(
                model_id=replica.model_id, node_id=self._node_id, path=replica.path
            ),
            timeout=_CALL_TIMEOUT_S,
        )
        try:
            await asyncio.to_thread(Path(replica.path).unlink, missing_ok=True)
        except OSError as exc:  # the record is gone; the next collection retries the file
            _log.warning("gc could not delete %s: %s", replica.path, exc)
            return
        _log.info(
            "gc deleted %s",
            replica.path,
            extra={"model_id": replica.model_id, "bytes": replica.size_bytes, "reason": reason},
        )

    def _in_store(self, path: str) -> bool:
        return Path(path).parent.resolve() == self._store.resolve()

    def _being_pulled(self) -> list[str]:
        if not self._store.is_dir():
            return []
        return [m[1] for p in self._store.iterdir() if (m := _PARTIAL.fullmatch(p.name))]

    def _unknown_files(self, known: set[str], remove: bool) -> list[str]:
        """Model files in the store that no replica record names and that are older than
        ``UNKNOWN_GRACE_S`` (a pull renames its file a moment before registering it): left by a
        crash between a record's removal and its file's, or between a pull's rename and its
        registration. Removed when ``remove``."""
        found: list[str] = []
        if not self._store.is_dir():
            return found
        now = self._clock()
        for path in sorted(self._store.glob("*.gguf")):
            if str(path) in known or str(path.resolve()) in known:
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime < UNKNOWN_GRACE_S:
                    continue
                if remove:
                    try:
                        path.unlink()
                    except OSError as exc:
                        _log.warning("gc could not delete %s: %s", path, exc)
                        continue
                    _log.info("gc deleted %s: no catalog record names it", path)
                found.append(str(path))
        return found

"""The host-RAM staging cache: model files copied into a tmpfs (``/dev/shm``) so that a reload
reads RAM, not disk. Bounded by a byte budget, least recently used first out, and never evicting
a model that a pool has loaded or is loading (its worker maps the file; removing it would not
give the RAM back). Why a tmpfs copy rather than mmap + mlock: docs/decisions.md.

``choose_evictions`` is the pure policy; ``StagingCache`` does the file work around it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mesh import logs
from mesh.errors import FailedPreconditionError, ResourceExhaustedError

_log = logs.get_logger("poolmanager.staging")


@dataclass
class StagedModel:
    """One model held in RAM."""

    model_id: str
    path: Path
    size_bytes: int
    last_used_s: float


def choose_evictions(
    lru: Iterable[tuple[str, int]], in_use: set[str], budget_bytes: int, needed_bytes: int
) -> list[str] | None:
    """Models to evict, least recently used first, so that ``needed_bytes`` more fit the budget.

    Args:
        lru: (model_id, size) of every staged model, least recently used first.
        in_use: models that must stay.
        budget_bytes: the cache's bound.
        needed_bytes: size of the model to add.

    Returns:
        The models to evict (possibly none), or None when it cannot fit even after evicting
        everything not in use.
    """
    entries = list(lru)
    used = sum(size for _, size in entries)
    if needed_bytes > budget_bytes:
        return None
    evict: list[str] = []
    for model_id, size in entries:
        if used + needed_bytes <= budget_bytes:
            break
        if model_id in in_use:
            continue
        evict.append(model_id)
        used -= size
    return evict if used + needed_bytes <= budget_bytes else None


def require_regular_file(model_id: str, path: Path) -> os.stat_result:
    """The stat of a model's file, which must be a regular file: a device or a pipe has no end
    to copy or load (/dev/zero would fill the staging tmpfs; a FIFO would hold a copy, a
    thread, or a worker's load forever).

    Raises:
        FailedPreconditionError: NOT_A_FILE.
    """
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise FailedPreconditionError(
            f"model {model_id}'s file {path} is not a regular file", reason="NOT_A_FILE"
        )
    return info


class StagingCache:
    """Model files in RAM, one file per model under ``directory``."""

    def __init__(
        self,
        directory: Path,
        budget_bytes: int,
        in_use: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.budget_bytes = budget_bytes
        self._in_use = in_use
        self._clock = clock
        self._models: OrderedDict[str, StagedModel] = OrderedDict()
        self._staging: dict[str, asyncio.Task[StagedModel]] = {}
        self.hits = 0
        """Loads that found their model staged."""
        self.misses = 0
        """Loads that read the model from disk."""

    def open(self) -> None:
        """Creates the directory and removes what an earlier run left (it is not verified)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.directory.iterdir():
            if leftover.is_file():
                leftover.unlink()

    def close(self) -> None:
        """Gives the RAM back."""
        for task in self._staging.values():
            task.cancel()
        shutil.rmtree(self.directory, ignore_errors=True)
        self._models.clear()

    @property
    def staged_bytes(self) -> int:
        """Bytes held now."""
        return sum(m.size_bytes for m in self._models.values())

    def models(self) -> list[StagedModel]:
        """Staged models, least recently used first."""
        return list(self._models.values())

    def is_staged(self, model_id: str) -> bool:
        """Whether the model is in RAM (without counting a hit)."""
        return model_id in self._models

    def lookup(self, model_id: str) -> Path | None:
        """The staged copy for a load (a hit, and most recently used), or None (a miss)."""
        staged = self._models.get(model_id)
        if staged is None or not staged.path.exists():
            self._models.pop(model_id, None)
            self.misses += 1
            return None
        self.hits += 1
        staged.last_used_s = self._clock()
        self._models.move_to_end(model_id)
        return staged.path

    async def stage(self, model_id: str, source: Path) -> StagedModel:
        """Copies a model into RAM (no-op when staged), evicting unused models as needed.

        Raises:
            ResourceExhaustedError: it does not fit the budget, even after evicting every model
                not in use.
            FailedPreconditionError: NOT_A_FILE, ``source`` is a device, a pipe or a directory.
        """
        if model_id in self._models:
            self._models.move_to_end(model_id)
            return self._models[model_id]
        running = self._staging.get(model_id)
        if running is None:
            running = asyncio.create_task(self._copy(model_id, source))
            self._staging[model_id] = running
            running.add_done_callback(lambda _: self._staging.pop(model_id, None))
        return await asyncio.shield(running)

    def unstage(self, model_id: str) -> bool:
        """Removes a staged model; False when it was not staged.

        Raises:
            FailedPreconditionError: a pool has it loaded or is loading it.
        """
        if model_id not in self._models:
            return False
        if self._in_use(model_id):
            raise FailedPreconditionError(
                f"model {model_id} is loaded or loading on a pool; unload it first",
                reason="MODEL_IN_USE",
            )
        self._drop(model_id)
        return True

    async def _copy(self, model_id: str, source: Path) -> StagedModel:
        size = (await asyncio.to_thread(require_regular_file, model_id, source)).st_size
        in_use = {m for m in self._models if self._in_use(m)}
        evict = choose_evictions(
            ((m.model_id, m.size_bytes) for m in self._models.values()),
            in_use,
            self.budget_bytes,
            size,
        )
        if evict is None:
            raise ResourceExhaustedError(
                f"model {model_id} ({size} bytes) does not fit the staging budget of "
                f"{self.budget_bytes} bytes ({self.staged_bytes} staged, in use: "
                f"{', '.join(sorted(in_use)) or 'none'})",
                reason="STAGING_FULL",
            )
        for victim in evict:
            _log.info("unstaging %s to make room for %s", victim, model_id)
            self._drop(victim)
        target = self.directory / f"{model_id}.gguf"
        started = time.monotonic()
        await asyncio.to_thread(_copy_file, source, target)
        staged = StagedModel(model_id, target, size, self._clock())
        self._models[model_id] = staged
        _log.info(
            "staged %s in RAM",
            model_id,
            extra={"bytes": size, "copy_ms": round((time.monotonic() - started) * 1000, 1)},
        )
        return staged

    def _drop(self, model_id: str) -> None:
        staged = self._models.pop(model_id)
        staged.path.unlink(missing_ok=True)


def remove_stale_dirs(base: Path, prefix: str) -> None:
    """Removes ``<base>/<prefix><pid>`` dirs whose process is gone (a pool manager killed
    before it could clean up leaves its staged models in RAM otherwise)."""
    for candidate in base.glob(f"{prefix}*"):
        pid = candidate.name.removeprefix(prefix)
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _log.info("removing the staging dir of a dead pool manager: %s", candidate)
            shutil.rmtree(candidate, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


def _copy_file(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

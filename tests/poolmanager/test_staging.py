"""The RAM staging cache: the eviction policy (property tests) and the cache over real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import FailedPreconditionError, ResourceExhaustedError
from poolmanager.staging import (
    StagingCache,
    choose_evictions,
    remove_stale_dirs,
    require_regular_file,
)

_entries = st.lists(
    st.tuples(st.sampled_from("abcdefgh"), st.integers(1, 100)),
    max_size=8,
    unique_by=lambda e: e[0],
)


@given(_entries, st.sets(st.sampled_from("abcdefgh")), st.integers(0, 400), st.integers(1, 150))
def test_evictions_fit_the_budget_and_spare_models_in_use(
    lru: list[tuple[str, int]], in_use: set[str], budget: int, needed: int
) -> None:
    held = sum(size for _, size in lru)
    evict = choose_evictions(lru, in_use, budget, needed)
    sizes = dict(lru)
    if evict is None:
        # Only when even evicting everything not in use would not make room.
        pinned = sum(size for model, size in lru if model in in_use)
        assert needed > budget or pinned + needed > budget
        return
    assert not set(evict) & in_use
    assert held - sum(sizes[m] for m in evict) + needed <= budget
    # Least recently used first: the evicted models are the first unpinned ones, in order.
    unpinned = [m for m, _ in lru if m not in in_use]
    assert evict == unpinned[: len(evict)]


def test_nothing_is_evicted_when_it_fits() -> None:
    assert choose_evictions([("a", 10), ("b", 10)], set(), 100, 50) == []


def _model(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(os.urandom(size))
    return path


async def test_lookup_counts_hits_and_misses(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path / "shm", 10_000, in_use=lambda _: False)
    cache.open()
    assert cache.lookup("a") is None
    source = _model(tmp_path, "a", 1000)
    staged = await cache.stage("a", source)
    assert staged.path.read_bytes() == source.read_bytes()
    assert cache.lookup("a") == staged.path
    assert (cache.hits, cache.misses, cache.staged_bytes) == (1, 1, 1000)


async def test_least_recently_used_goes_first(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path / "shm", 2500, in_use=lambda _: False)
    cache.open()
    for name in "abc"[:2]:
        await cache.stage(name, _model(tmp_path, name, 1000))
    cache.lookup("a")  # b is now the least recently used
    await cache.stage("c", _model(tmp_path, "c", 1000))
    assert [m.model_id for m in cache.models()] == ["a", "c"]
    assert not (tmp_path / "shm" / "b.gguf").exists()


async def test_a_model_in_use_is_never_evicted(tmp_path: Path) -> None:
    in_use = {"a"}
    cache = StagingCache(tmp_path / "shm", 1500, in_use=lambda m: m in in_use)
    cache.open()
    await cache.stage("a", _model(tmp_path, "a", 1000))
    with pytest.raises(ResourceExhaustedError, match="in use: a"):
        await cache.stage("b", _model(tmp_path, "b", 1000))
    with pytest.raises(FailedPreconditionError):
        cache.unstage("a")
    assert cache.lookup("a") is not None
    in_use.clear()
    await cache.stage("b", _model(tmp_path, "b", 1000))
    assert [m.model_id for m in cache.models()] == ["b"]


async def test_a_model_larger_than_the_budget_is_refused(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path / "shm", 500, in_use=lambda _: False)
    cache.open()
    with pytest.raises(ResourceExhaustedError, match="does not fit"):
        await cache.stage("a", _model(tmp_path, "a", 1000))
    assert cache.models() == [] and list((tmp_path / "shm").iterdir()) == []


async def test_leftovers_are_removed(tmp_path: Path) -> None:
    directory = tmp_path / "shm"
    directory.mkdir()
    (directory / "old.gguf").write_bytes(b"x")
    StagingCache(directory, 100, in_use=lambda _: False).open()
    assert list(directory.iterdir()) == []
    # The dir of a dead pool manager goes; a live one's stays.
    dead = tmp_path / "llorch-staging-n-999999999"
    alive = tmp_path / f"llorch-staging-n-{os.getppid()}"
    dead.mkdir()
    alive.mkdir()
    remove_stale_dirs(tmp_path, "llorch-staging-n-")
    assert not dead.exists() and alive.exists()


def test_a_model_file_must_be_a_regular_file(tmp_path: Path) -> None:
    """Staging or loading a FIFO would wait forever, a device would never end."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/null"), tmp_path):
        with pytest.raises(FailedPreconditionError) as refused:
            require_regular_file("m", path)
        assert refused.value.reason == "NOT_A_FILE"
    real = tmp_path / "real.gguf"
    real.write_bytes(b"GGUF")
    assert require_regular_file("m", real).st_size == 4

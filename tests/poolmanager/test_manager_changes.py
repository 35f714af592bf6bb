"""PoolManager change notification (what WatchNode streams): waiting, waking, and stopping."""

from __future__ import annotations

import asyncio

import pytest

from mesh.settings import PoolManagerSettings
from poolmanager.manager import PoolManager


async def _locate(model_id: str) -> str:
    raise AssertionError("no pool, nothing to locate")


def manager() -> PoolManager:
    # No pools: only the change counter is exercised.
    return PoolManager(PoolManagerSettings(catalog="unused:1"), _locate, {})


async def test_a_change_wakes_a_waiter_and_a_stale_version_returns_at_once() -> None:
    pm = manager()
    version = pm.version
    waiter = asyncio.create_task(pm.wait_change(version, 10))
    await asyncio.sleep(0)
    assert not waiter.done()
    await pm.mark_changed()
    await asyncio.wait_for(waiter, 1)
    assert pm.version == version + 1
    await asyncio.wait_for(pm.wait_change(version, 10), 1)  # already past that version


async def test_the_wait_ends_after_its_timeout() -> None:
    pm = manager()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await pm.wait_change(pm.version, 0.05)
    assert loop.time() - started >= 0.04


async def test_a_cancellation_arriving_with_a_change_is_never_swallowed() -> None:
    # A WatchNode stream is cancelled when its watcher goes away; if the cancellation and a
    # change land in the same loop turn the wait must still end cancelled, or the stream (and
    # the orchestrator's shutdown waiting for it) never ends. asyncio.wait_for on Python 3.11
    # returned normally in this case.
    pm = manager()
    for _ in range(20):
        waiter = asyncio.create_task(pm.wait_change(pm.version, 10))
        await asyncio.sleep(0)
        await pm.mark_changed()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

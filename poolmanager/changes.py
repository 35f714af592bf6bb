"""The change feed of a node: a version counted up on every change of its state (pool states,
slots in use, spares, staging, stored models), waiters woken on it (WatchNode), and the optional
callback the app hooks in (the orchestrator's registration).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

Notify = Callable[[], Awaitable[None]]
"""Tells the feed that the node's state changed (``ChangeFeed.changed``)."""


class ChangeFeed:
    """Counts changes and wakes the watchers waiting for one."""

    def __init__(self, on_change: Notify | None = None) -> None:
        self._on_change = on_change
        self._version = 0
        self._change = asyncio.Event()

    @property
    def version(self) -> int:
        """Counts changes of the node's state."""
        return self._version

    async def changed(self) -> None:
        """Counts a change, wakes every waiter, then runs the ``on_change`` callback."""
        self._version += 1
        self._change.set()
        self._change = asyncio.Event()
        if self._on_change is not None:
            await self._on_change()

    async def wait(self, version: int, timeout_s: float) -> None:
        """Returns once the state moved past ``version``, or after ``timeout_s``."""
        if self._version != version:
            return
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the event fires, and a watcher cancelled that way never stops.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._change.wait()

"""A pool's record: its state, model, worker and spare, what its loads measured, and its crash
history with the circuit breaker and restart backoff that read it. No I/O: the lifecycle and the
loader act on the record; the servicer and metrics read it.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import random
from dataclasses import dataclass, field

from mesh.settings import PoolSettings
from poolmanager.worker_process import SpareWorker, WorkerProcess


class PoolState(enum.Enum):
    """Lifecycle of a pool."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class BreakerPolicy:
    """When a pool's circuit breaker opens: ``crashes`` crashes within ``window_s``."""

    crashes: int
    """Crashes (or failed starts) within the window that open the breaker."""
    window_s: float
    """Window in which crashes are counted."""


@dataclass
class Pool:
    """One pool, its current model and worker, and what its supervisor has seen."""

    settings: PoolSettings
    model_id: str = ""
    """The model the pool runs (or loads); starts as the settings' model, changes on a reload."""
    state: PoolState = PoolState.UNLOADED
    engine_version: str = ""
    n_ctx: int = 0
    last_error: str = ""
    worker: WorkerProcess | None = None
    active: set[str] = field(default_factory=set)
    vram_estimate_bytes: int = 0
    vram_measured_bytes: int = 0
    load_ms: float = 0.0
    loaded_from: str = ""
    """Where the running model was read from: ``disk`` or ``staging`` (RAM)."""
    restarts: int = 0
    """Crashes and failed starts since the pool manager started."""
    breaker_open: bool = False
    crash_times: collections.deque[float] = field(default_factory=collections.deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    spare: SpareWorker | None = None
    """A warm worker process without a model, for the next load (see ``spare_workers``)."""
    spare_task: asyncio.Task[None] | None = None
    rollback_model_id: str = ""
    """During a reload, the model it rolls back to if the new one fails (kept on disk)."""
    loaded_in_spare: bool = False
    """The running worker was a spare: its load did not wait for a process to start."""
    prefix_lookup_tokens: int = 0
    """Prompt tokens of the executions that finished here (since the pool manager started)."""
    prefix_hit_tokens: int = 0
    """Of those, the tokens whose cells came from the worker's prefix cache."""

    @property
    def spare_ready(self) -> bool:
        """Whether a spare is warm for the next load."""
        return self.spare is not None and self.spare.alive

    def __post_init__(self) -> None:
        self.model_id = self.model_id or self.settings.model_id

    @property
    def pool_id(self) -> str:
        """Id of the pool."""
        return self.settings.pool_id

    @property
    def cpu_only(self) -> bool:
        """A development pool on the CPU (never a fallback for a GPU pool)."""
        return self.settings.devices == ["cpu"]

    @property
    def slots_free(self) -> int:
        """Slots not executing anything."""
        return max(0, self.settings.slots - len(self.active))

    def count_crash(self, what: str, breaker: BreakerPolicy, now: float) -> bool:
        """Counts a crash at ``now`` (monotonic); True when the breaker opens (``last_error``
        then says why)."""
        self.restarts += 1
        self.crash_times.append(now)
        window = breaker.window_s
        while self.crash_times and self.crash_times[0] < now - window:
            self.crash_times.popleft()
        self.last_error = what
        if len(self.crash_times) >= breaker.crashes:
            self.breaker_open = True
            self.last_error = (
                f"circuit breaker open: {len(self.crash_times)} crashes within {window:g}s; "
                f"last: {what}; PreloadPool or ReloadPool resets it"
            )
            return True
        return False

    def reset_breaker(self) -> None:
        """Forgets the crashes counted so far and closes the breaker (an operator's load)."""
        self.crash_times.clear()
        self.breaker_open = False


class Backoff:
    """Exponential restart backoff with jitter: each delay is the current step times a random
    factor in [0.5, 1); the step doubles up to ``max_s`` and ``reset()`` starts it over."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._step_s = initial_s

    def next_delay_s(self) -> float:
        """The delay before the next attempt; doubles the step for the one after."""
        delay = self._step_s * random.uniform(0.5, 1.0)
        self._step_s = min(self._step_s * 2, self._max_s)
        return delay

    def reset(self) -> None:
        """Starts over from the initial step (a worker that ran a long while)."""
        self._step_s = self._initial_s

"""The pool manager's side of one worker process: spawn, route events, cancel, stop.

The worker speaks the typed protocol of ``poolmanager.worker.protocol``. Each execution gets an
asyncio queue of its events; when the worker exits unexpectedly every open execution receives a
``WorkerExited`` marker at once, so no caller waits on a dead process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mesh import logs
from poolmanager.worker import protocol
from poolmanager.worker.protocol import (
    TERMINAL,
    CacheState,
    Cancel,
    Command,
    Event,
    Execute,
    Load,
    LoadFailed,
    LoadSpec,
    Ready,
    Spare,
)

_log = logs.get_logger("poolmanager.worker")
_LINE_LIMIT = 4 * 1024 * 1024


class WorkerStartError(Exception):
    """The worker could not load its model or did not become ready in time."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        """The engine refused the model for a reason a restart cannot fix (the VRAM-only rule)."""


@dataclass(frozen=True)
class WorkerExited:
    """Marker put on every open execution's queue when the process ends."""

    returncode: int | None


@dataclass(frozen=True)
class Interrupted:
    """Marker the pool manager puts on an execution's queue to end it with ``error`` (a
    drain's deadline), after the events already there."""

    error: Exception


ExecutionQueue = asyncio.Queue[Event | WorkerExited | Interrupted]
"""One execution's events, as they come from the worker, then maybe a marker."""


class SpareWorker:
    """A worker process started ahead of need: engine imported, GPUs' CUDA contexts created,
    no model. ``WorkerProcess.spawn(spare=...)`` turns it into a pool's worker, which saves a
    load the process start (about a second on a GPU machine)."""

    def __init__(self, proc: asyncio.subprocess.Process, warm_ms: float) -> None:
        self._proc: asyncio.subprocess.Process | None = proc
        self.warm_ms = warm_ms
        """How long the spare took to start and warm up, in milliseconds."""

    @property
    def pid(self) -> int:
        """Process id (0 once taken)."""
        return self._proc.pid if self._proc is not None else 0

    @property
    def alive(self) -> bool:
        """Whether the process is still there and not yet taken."""
        return self._proc is not None and self._proc.returncode is None

    @classmethod
    async def spawn(
        cls,
        *,
        gpu_devices: list[str],
        env: Mapping[str, str],
        start_timeout_s: float,
        log_level: str = "INFO",
    ) -> SpareWorker:
        """Starts a spare for a pool on ``gpu_devices`` (empty: a CPU pool) and waits until it
        is warm.

        Raises:
            WorkerStartError: it died or took too long.
        """
        args = [sys.executable, "-m", "poolmanager.worker", "--spare", "--log-level", log_level]
        if gpu_devices:
            args.append("--gpu")
        proc = await _start(args, gpu_devices, env)
        event = await _first_event(proc, start_timeout_s, "start a spare worker")
        if not isinstance(event, Spare):
            await _kill(proc)
            raise WorkerStartError(f"spare worker sent {event} instead of being ready")
        return cls(proc, event.warm_ms)

    def take(self) -> asyncio.subprocess.Process:
        """Hands the process over (once)."""
        proc, self._proc = self._proc, None
        assert proc is not None, "spare taken twice"
        return proc

    async def stop(self, grace_s: float) -> None:
        """Closes its input (it exits), then kills it after ``grace_s``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            async with asyncio.timeout(grace_s):
                await proc.wait()
        except TimeoutError:
            await _kill(proc)


class WorkerProcess:
    """One running worker."""

    def __init__(self, proc: asyncio.subprocess.Process, ready: Ready) -> None:
        self._proc = proc
        self.ready = ready
        self._executions: dict[str, ExecutionQueue] = {}
        self.cache = CacheState(entries=0, cells=0)
        """What the worker's prefix cache holds, as it last said."""
        self.on_cache: Callable[[], None] | None = None
        """Called when ``cache`` changes."""
        self._reader = asyncio.get_running_loop().create_task(self._read_events())
        self.exited = asyncio.Event()

    @property
    def pid(self) -> int:
        """Process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit code once the process ended (negative: the signal that ended it)."""
        return self._proc.returncode

    @classmethod
    async def spawn(
        cls,
        spec: LoadSpec,
        *,
        gpu_devices: list[str],
        env: Mapping[str, str],
        start_timeout_s: float,
        spare: SpareWorker | None = None,
    ) -> WorkerProcess:
        """Starts a worker for ``spec`` (in ``spare`` when one is given and alive) and waits
        until its model is loaded.

        Raises:
            WorkerStartError: the model failed to load, the process died, or it took too long.
        """
        if spare is not None and spare.alive:
            proc = spare.take()
            assert proc.stdin is not None
            proc.stdin.write(protocol.encode(Load(spec)))
        else:
            proc = await _start(
                [sys.executable, "-m", "poolmanager.worker", *_argv(spec)], gpu_devices, env
            )
        event = await _first_event(proc, start_timeout_s, f"load {spec.model}")
        if not isinstance(event, Ready):
            await proc.wait()
            if isinstance(event, LoadFailed):
                raise WorkerStartError(event.message, refused=event.refused)
            raise WorkerStartError(f"unexpected event {event}")
        return cls(proc, event)

    def submit(self, execute: Execute) -> ExecutionQueue:
        """Sends an execution; its events (then maybe a WorkerExited) arrive on the returned
        queue."""
        events: ExecutionQueue = asyncio.Queue()
        if self.exited.is_set():
            events.put_nowait(WorkerExited(self._proc.returncode))
            return events
        self._executions[execute.id] = events
        self._send(execute)
        return events

    def cancel(self, exec_id: str) -> None:
        """Asks the worker to stop an execution (its cells are freed at its next step)."""
        if exec_id in self._executions:
            self._send(Cancel(exec_id))

    def forget(self, exec_id: str) -> None:
        """Drops the event queue of an execution the caller no longer reads."""
        self._executions.pop(exec_id, None)

    async def stop(self, grace_s: float) -> None:
        """Closes the worker's input (it exits), then kills it after ``grace_s``."""
        stdin = self._proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        try:
            async with asyncio.timeout(grace_s):
                await self._proc.wait()
        except TimeoutError:
            await _kill(self._proc)
        await self._reader

    def kill(self) -> None:
        """SIGKILL (tests and crash handling)."""
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGKILL)

    def _send(self, command: Command) -> None:
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing():
            return
        stdin.write(protocol.encode(command))

    async def _read_events(self) -> None:
        assert self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while line := await stdout.readline():
                event = protocol.decode_event(line)
                if isinstance(event, CacheState):
                    self.cache = event
                    if self.on_cache is not None:
                        self.on_cache()
                    continue
                exec_id = getattr(event, "id", None)
                queue = self._executions.get(exec_id) if exec_id is not None else None
                if queue is not None:
                    queue.put_nowait(event)
                    if isinstance(event, TERMINAL):
                        del self._executions[event.id]
        except (ValueError, asyncio.LimitOverrunError) as exc:
            _log.error("worker %s sent a malformed event: %s", self._proc.pid, exc)
            await _kill(self._proc)
        code = await self._proc.wait()
        self.exited.set()
        marker = WorkerExited(code)
        for queue in self._executions.values():
            queue.put_nowait(marker)
        self._executions.clear()


async def _start(
    args: list[str], gpu_devices: list[str], env: Mapping[str, str]
) -> asyncio.subprocess.Process:
    child_env = dict(env)
    # The pool's devices and nothing else; an empty value hides every GPU from a CPU pool.
    child_env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_devices)
    return await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=child_env,
        limit=_LINE_LIMIT,
    )


def _argv(spec: LoadSpec) -> list[str]:
    """The command line of a worker that loads ``spec`` (``poolmanager.worker.main``)."""
    args = [
        "--model",
        spec.model,
        "--n-ctx",
        str(spec.n_ctx),
        "--slots",
        str(spec.slots),
        "--kv-cache-tokens",
        str(spec.kv_cache_tokens),
        "--prefill-chunk-tokens",
        str(spec.prefill_chunk_tokens),
        "--prefix-cache-entries",
        str(spec.prefix_cache_entries),
        "--n-threads",
        str(spec.n_threads),
        "--log-level",
        spec.log_level,
        "--token-batch-ms",
        str(spec.token_batch_ms),
        "--cache-type",
        spec.cache_type,
    ]
    if spec.gpu:
        args.append("--gpu")
    if spec.tensor_split:
        args += ["--tensor-split", ",".join(f"{share:.4f}" for share in spec.tensor_split)]
    return args


async def _first_event(proc: asyncio.subprocess.Process, timeout_s: float, doing: str) -> Event:
    """The worker's first event (ready, spare or load_failed); kills it on any failure."""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: see ChangeFeed.wait
            line = await proc.stdout.readline()
    except TimeoutError:
        await _kill(proc)
        raise WorkerStartError(f"worker did not {doing} within {timeout_s}s") from None
    except BaseException:  # cancelled while loading (shutdown): leave no orphan
        await asyncio.shield(_kill(proc))
        raise
    if not line:
        code = await proc.wait()
        raise WorkerStartError(f"worker exited with code {code} trying to {doing}")
    try:
        return protocol.decode_event(line)
    except protocol.ProtocolError:
        await _kill(proc)
        raise WorkerStartError(f"worker sent a malformed first line: {line[:200]!r}") from None


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()

"""The pool manager's side of one worker process: spawn, route events, cancel, stop.

The worker speaks JSON lines (see ``poolmanager.worker``). Each execution gets an asyncio queue
of events; when the worker exits unexpectedly every open execution receives a ``WorkerExited``
marker at once, so no caller waits on a dead process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh import logs

_log = logs.get_logger("poolmanager.worker")
_LINE_LIMIT = 4 * 1024 * 1024


class WorkerStartError(Exception):
    """The worker could not load its model or did not become ready in time."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        """The engine refused the model for a reason a restart cannot fix (the VRAM-only rule)."""


@dataclass(frozen=True)
class WorkerReady:
    """What the worker reported once its model was loaded."""

    engine_version: str
    n_ctx: int
    load_ms: float
    gpu_offload: bool


@dataclass(frozen=True)
class WorkerExited:
    """Marker put on every open execution's queue when the process ends."""

    returncode: int | None


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
        if event.get("ev") != "spare":
            await _kill(proc)
            raise WorkerStartError(f"spare worker sent {event} instead of being ready")
        return cls(proc, float(event.get("warm_ms", 0.0)))

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

    def __init__(self, proc: asyncio.subprocess.Process, ready: WorkerReady) -> None:
        self._proc = proc
        self.ready = ready
        self._executions: dict[str, asyncio.Queue[Any]] = {}
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
        model_path: str,
        *,
        n_ctx: int,
        n_threads: int,
        gpu_devices: list[str],
        env: Mapping[str, str],
        start_timeout_s: float,
        log_level: str = "INFO",
        token_batch_ms: float = 4.0,
        tensor_split: list[float] | None = None,
        cache_type: str = "f16",
        spare: SpareWorker | None = None,
    ) -> WorkerProcess:
        """Starts a worker (in ``spare`` when one is given and alive) and waits until its model
        is loaded.

        Raises:
            WorkerStartError: the model failed to load, the process died, or it took too long.
        """
        args = [
            "--model",
            model_path,
            "--n-ctx",
            str(n_ctx),
            "--n-threads",
            str(n_threads),
            "--log-level",
            log_level,
            "--token-batch-ms",
            str(token_batch_ms),
            "--cache-type",
            cache_type,
        ]
        if gpu_devices:
            args.append("--gpu")
        if tensor_split and len(tensor_split) > 1:
            args += ["--tensor-split", ",".join(f"{share:.4f}" for share in tensor_split)]
        if spare is not None and spare.alive:
            proc = spare.take()
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"op": "load", "argv": args}).encode() + b"\n")
        else:
            proc = await _start(
                [sys.executable, "-m", "poolmanager.worker", *args], gpu_devices, env
            )
        event = await _first_event(proc, start_timeout_s, f"load {model_path}")
        if event.get("ev") != "ready":
            await proc.wait()
            raise WorkerStartError(
                str(event.get("message") or f"unexpected event {event}"),
                refused=event.get("code") == "FAILED_PRECONDITION",
            )
        ready = WorkerReady(
            engine_version=str(event["engine_version"]),
            n_ctx=int(event["n_ctx"]),
            load_ms=float(event["load_ms"]),
            gpu_offload=bool(event["gpu_offload"]),
        )
        return cls(proc, ready)

    def submit(self, exec_id: str, job: dict[str, Any]) -> asyncio.Queue[Any]:
        """Sends an execution; its events (dicts, then maybe a WorkerExited) arrive on the
        returned queue."""
        events: asyncio.Queue[Any] = asyncio.Queue()
        if self.exited.is_set():
            events.put_nowait(WorkerExited(self._proc.returncode))
            return events
        self._executions[exec_id] = events
        self._send({"op": "exec", "id": exec_id, **job})
        return events

    def cancel(self, exec_id: str) -> None:
        """Asks the worker to stop an execution after its current token."""
        if exec_id in self._executions:
            self._send({"op": "cancel", "id": exec_id})

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

    def _send(self, command: dict[str, Any]) -> None:
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing():
            return
        stdin.write(json.dumps(command, separators=(",", ":")).encode() + b"\n")

    async def _read_events(self) -> None:
        assert self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while line := await stdout.readline():
                event = json.loads(line)
                queue = self._executions.get(str(event.get("id")))
                if queue is not None:
                    queue.put_nowait(event)
                    if event.get("ev") in ("done", "cancelled", "error"):
                        self._executions.pop(str(event["id"]), None)
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


async def _first_event(
    proc: asyncio.subprocess.Process, timeout_s: float, doing: str
) -> dict[str, Any]:
    """The worker's first event (ready, spare or load_failed); kills it on any failure."""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: see manager.wait_change
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
        event = json.loads(line)
    except ValueError:
        await _kill(proc)
        raise WorkerStartError(f"worker sent a malformed first line: {line[:200]!r}") from None
    if not isinstance(event, dict):
        await _kill(proc)
        raise WorkerStartError(f"worker sent a malformed first line: {line[:200]!r}")
    return event


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()

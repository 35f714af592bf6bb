"""The REST edge as a child process: ``llorch up`` starts ``llorch-gateway`` (built from gateway/
by ``make gateway``) in front of its orchestrator and catalog.

The edge is a Go program (grpc-gateway); this module only finds, starts and stops it. Its JSON log
lines go to this process's stderr. It holds a pipe on its stdin and stops when that closes, so it
never outlives a ``llorch up`` that was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

BINARY = "llorch-gateway"


def find_gateway() -> str | None:
    """The built edge: beside this Python (``.venv/bin``, where ``make gateway`` puts it) or on
    PATH; None when it is not built."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return shutil.which(BINARY, path=path)


@dataclass
class GatewayProcess:
    """A running edge."""

    process: asyncio.subprocess.Process
    url: str
    _pump: asyncio.Task[None]

    async def stop(self) -> None:
        """Stops the edge (SIGTERM; it ends open streams within 5 s), then forgets its logs."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._pump, 1)


async def start_gateway(
    binary: str, listen: str, orchestrator: str, catalog: str, timeout_s: float = 15.0
) -> GatewayProcess:
    """Starts the edge and returns once it listens; RuntimeError with its last words if not."""
    # Its flags say everything; LLORCH_GATEWAY_* meant for a standalone edge must not add to
    # them (a stray _CA would make it refuse the catalog's routes).
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLORCH_GATEWAY_")}
    process = await asyncio.create_subprocess_exec(
        binary,
        "-listen", listen,
        "-orchestrator", orchestrator,
        "-catalog", catalog,
        "-stop-on-stdin-close",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    assert process.stderr is not None
    said: list[str] = []
    url = ""
    try:
        async with asyncio.timeout(timeout_s):
            while not url:
                line = (await process.stderr.readline()).decode(errors="replace")
                if not line:
                    break
                said.append(line.rstrip())
                sys.stderr.write(line)
                with contextlib.suppress(ValueError, AttributeError):
                    record = json.loads(line)
                    if record.get("msg") == "listening":
                        url = str(record["url"])
    except TimeoutError:
        pass
    if not url:
        if process.returncode is None:
            process.kill()
        await process.wait()
        last = " | ".join(said[-3:]) or "nothing"
        raise RuntimeError(f"{BINARY} did not start on {listen} (gateway_listen): {last}")
    return GatewayProcess(process, url, asyncio.create_task(_pump(process.stderr)))


async def _pump(stream: asyncio.StreamReader) -> None:
    """Copies the edge's log lines to this process's stderr until it exits."""
    while line := await stream.readline():
        sys.stderr.write(line.decode(errors="replace"))

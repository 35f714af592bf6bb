"""The ``llorch`` command at its edges with people and pipes: a reader that closes the pipe
early (``llorch generate ... | head``) ends the command quietly, and its task is cancelled."""

from __future__ import annotations

import asyncio
import subprocess

from launch.cli import EXIT_BROKEN_PIPE
from launch.harness import LLORCH
from orchestrator.tasks import TaskState
from tests.conftest import Mesh


def _generate_into_a_closed_pipe(address: str) -> tuple[int, str]:
    args = ["generate", "--orchestrator", address, "--model", "tiny-llama"]
    args += ["--max-tokens", "1500", "--ignore-eos", "hello"]
    proc = subprocess.Popen(
        [*LLORCH, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)  # as `head -c 10` does, then it goes away
    proc.stdout.close()
    code = proc.wait(timeout=60)
    return code, proc.stderr.read()


async def test_a_reader_that_goes_away_ends_generate_quietly_and_cancels_its_task(
    mesh: Mesh,
) -> None:
    code, stderr = await asyncio.to_thread(_generate_into_a_closed_pipe, mesh.address)
    assert code == EXIT_BROKEN_PIPE
    assert stderr == "", stderr  # no traceback, no "Exception ignored"
    orchestrator = mesh.orchestrator.orchestrator
    async with asyncio.timeout(20):
        while True:  # the orchestrator's state has no event to await here
            (task,) = orchestrator.tasks()
            if task.terminal:
                break
            await asyncio.sleep(0.05)
    assert task.state is TaskState.CANCELLED  # the stream was closed on the way out
    assert task.tokens_out < 1500

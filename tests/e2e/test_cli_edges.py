"""The ``llorch`` command at its edges with people and pipes: a reader that closes the pipe
early (``llorch generate ... | head``) ends the command quietly, and its task is cancelled;
every error, a bug included, is one line with its documented exit status."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from launch.cli import EXIT_BROKEN_PIPE, EXIT_BUG, keys, main
from launch.harness import LLORCH
from orchestrator.tasks import TaskState
from tests.conftest import Mesh
from tests.e2e.helpers import run_llorch


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


UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["generate", "--model", "m", "--orchestrator", UNREACHABLE, "hi"], 1, "UNAVAILABLE"),
        (["models", "list", "--catalog", UNREACHABLE], 1, "UNAVAILABLE"),
        (["pools", "list", "--orchestrator", UNREACHABLE], 1, "UNAVAILABLE"),
        (["tasks", "get", "abc", "--orchestrator", UNREACHABLE], 1, "UNAVAILABLE"),
        (["keys", "list", "--keys-db", "/proc/no-such-dir/keys.db"], 1, "/proc/no-such-dir"),
        (["certs", "init", "--dir", "/proc/no-such-dir"], 1, "/proc/no-such-dir"),
        (["certs", "issue", "--role", "client", "--name", "x", "--dir", "/nowhere"], 1, "no CA"),
        (["models", "add", "x", "/nonexistent", "--catalog", UNREACHABLE], 1, "not a file"),
    ],
)
def test_every_error_is_one_line_with_its_status(args: list[str], status: int, says: str) -> None:
    done = run_llorch(*args)
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr  # no traceback


def test_a_bug_is_one_line_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise KeyError("oops")

    monkeypatch.setattr(keys, "_cmd_keys", broken)
    assert main(["keys", "list"]) == EXIT_BUG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: KeyError" in err[0]

"""Helpers for end-to-end tests: build requests, collect streams, read error details."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from llorch.catalog.v1 import catalog_pb2_grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2

from launch.harness import LLORCH, free_port, start_llorch
from mesh.server import open_channel
from provisioners.models import register_local_file

__all__ = [
    "free_port",
    "start_llorch",
]  # the tests' way to start ``llorch up`` or ``serve`` (launch.harness)

if TYPE_CHECKING:
    from tests.conftest import Mesh


def generate_request(
    prompt: str = "Hello there", model_id: str = "tiny-llama", **sampling: Any
) -> orchestrator_pb2.GenerateRequest:
    """A GenerateRequest; keyword arguments go into SamplingParams. The tiny model has random
    weights and may sample its end-of-sequence token at any point, so unless a test says
    otherwise the end of sequence is ignored and max_tokens is what arrives."""
    sampling.setdefault("ignore_eos", True)
    return orchestrator_pb2.GenerateRequest(
        model_id=model_id, prompt=prompt, sampling=common_pb2.SamplingParams(**sampling)
    )


@dataclass
class Collected:
    """What a stream delivered."""

    kinds: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    indexes: list[tuple[int, int]] = field(default_factory=list)
    events: list[orchestrator_pb2.TaskEvent] = field(default_factory=list)

    def add(self, event: orchestrator_pb2.TaskEvent) -> None:
        kind = event.WhichOneof("kind")
        self.kinds.append(kind)
        self.events.append(event)
        if kind == "token":
            self.indexes.append((event.token.index, len(event.token.token_ids)))
            self.token_ids.extend(event.token.token_ids)
            self.text += event.token.text

    def assert_contiguous(self, start: int = 0) -> None:
        expected = start
        for index, count in self.indexes:
            assert index == expected, f"token index {index}, expected {expected}"
            assert count > 0
            expected += count

    @property
    def finished(self) -> common_pb2.Finished:
        return self.events[-1].finished


async def collect(call: Any) -> Collected:
    """Reads a Generate or StreamTask call to its end."""
    out = Collected()
    async for response in call:
        out.add(response.event)
    return out


def error_details(err: grpc.aio.AioRpcError) -> dict[str, Any]:
    """ErrorInfo reason/retriable, RetryInfo delay and BadRequest fields of a failed call."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_details(status_pb2.Status.FromString(value))
    return {"fields": []}


def status_details(status: status_pb2.Status) -> dict[str, Any]:
    """ErrorInfo reason/retriable, RetryInfo delay and BadRequest fields of a google.rpc.Status."""
    found: dict[str, Any] = {"fields": []}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found["reason"] = info.reason
            found["retriable"] = info.metadata["retriable"] == "true"
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found["retry_delay_ms"] = retry.retry_delay.ToMilliseconds()
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found["fields"] = [v.field for v in bad.field_violations]
    return found


def run_llorch(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Runs ``llorch <args>`` as a user would, to its end, with its output captured; ``env``
    adds to this process's environment; ``stdin`` is its input."""
    return subprocess.run(
        [*LLORCH, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


async def register_model(mesh: Mesh, model_id: str, path: Path) -> None:
    """Registers a GGUF file of the mesh's node in its catalog."""
    channel = open_channel(mesh.catalog.address)
    try:
        await register_local_file(
            catalog_pb2_grpc.CatalogServiceStub(channel),
            model_id,
            path,
            mesh.pool_manager.manager.node_id,
        )
    finally:
        await channel.close()


def doc_recipes(page: Path, heading: str) -> list[str]:
    """The ``sh`` code blocks of one section of a docs page (from ``heading`` to the next
    second-level heading), for tests that run a page's recipes so they cannot rot."""
    section = page.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


async def run_recipes(recipes: list[str], env: dict[str, str]) -> list[str]:
    """Runs each recipe with bash (``-euo pipefail``), in order; fails the test on the first
    that fails. Returns what each printed."""
    outputs = []
    for recipe in recipes:
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-euo", "pipefail", "-c", recipe],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{recipe}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    return outputs

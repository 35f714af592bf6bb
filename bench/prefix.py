"""Prefix reuse benchmark: the worker's prefix cache, and placement by prefix across pools.

In one run, on the generated bench-170m model:

(a) ``reuse``: ``llorch up`` with one pool; chat sessions, each a ~1,500-token system prompt and
    a question, then a follow-up turn carrying the first answer. The follow-up's time to first
    token with the prefix cache on, against the same with it off (``prefix_cache_entries=0``).
    Target on the 2-core VM: <= 0.2x.
(b) ``affinity``: a cloud-profile fleet on loopback (catalog, orchestrator and two pool
    managers as ``llorch serve`` processes, mTLS between them, TLS and an API key at the
    client port), one pool each, serving interleaved chat sessions (each its own system prompt
    and a few turns, the sessions starting over --arrival-s, a think time between turns: a load
    the fleet keeps up with; start them together and the queue, not placement, sets every
    figure). Placement by prefix against least loaded
    (``prefix_affinity`` off): the share of follow-ups whose prompt start was cached, their time
    to first token p50 and p99, and aggregate tokens/s. Targets: >= 90% of follow-ups reuse a
    prefix; p50 <= 0.5x least loaded; tokens/s not lower.

The last line is JSON.

  .venv/bin/python bench/prefix.py                    # both parts, bench-170m
  .venv/bin/python bench/prefix.py --part reuse --sessions 2 --system-tokens 400   # quick
  python bench/prefix.py --part reuse --model 1g-8k --devices 0 --threads 4 --system-tokens 4000
                                  # a GPU (scripts/gpu_check.py, prefix): cold vs warm prefill
"""

from __future__ import annotations

# llama_cpp before anything that loads numpy's libraries (see bench/relay.py).
import llama_cpp  # noqa: F401  # isort: skip

import argparse
import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from llorch.catalog.v1 import catalog_pb2_grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2 as pb
from llorch.orchestrator.v1 import orchestrator_pb2_grpc
from relay import write_model  # bench/relay.py

from launch.harness import FleetPki, free_port, start_home, start_llorch, stop_home
from mesh.apikeys import ApiKeyStore
from mesh.server import open_channel
from mesh.tls import TlsFiles, channel_credentials
from provisioners.models import register_local_file

MODELS = {"170m": "bench-170m", "1g": "bench-1g", "1g-8k": "bench-1g-8k", "tiny": "tiny-llama"}
"""``1g-8k``: bench-1g's weights with an 8,192-token context, for prompts past 2,048 tokens."""
WORDS = (
    "the orchestrator worker engine and pool queue model token stream many of them while the "
    "river under a quiet cloud of silver signal came over the mountain"
).split()


CHARS_PER_TOKEN = 1.27
"""The bench models' tokenizer reads these words mostly letter by letter (measured: 8,667
characters, 6,806 tokens); the figures report the real token counts."""


def system_prompt(session: int, tokens: int) -> str:
    """A system prompt of about ``tokens`` tokens, different for every session from its start."""
    rng = random.Random(session)
    text = f"Session {session}. You are assistant number {session}."
    while len(text) < tokens * CHARS_PER_TOKEN:
        text += " " + rng.choice(WORDS)
    return text


def request(model_id: str, messages: list[pb.ChatMessage], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model_id=model_id,
        messages=messages,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


@dataclass
class Turn:
    """One answered turn, seen from the client."""

    ttft_ms: float
    tokens_in: int
    tokens_cached: int
    tokens_out: int
    text: str
    started: float
    ended: float
    node: str = ""
    queue_ms: float = 0.0
    previous: Turn | None = None
    """The session's turn before (follow-ups only)."""

    @property
    def reused(self) -> bool:
        """A follow-up whose cached tokens cover most of the turn before's prompt (every prompt
        shares the template's first few tokens, which do not count)."""
        return self.previous is not None and self.tokens_cached >= 0.9 * self.previous.tokens_in


async def ask(stub: Any, req: pb.GenerateRequest) -> Turn:
    started = time.perf_counter()
    first = 0.0
    text: list[str] = []
    finished = None
    node, queue_ms = "", 0.0
    async for response in stub.Generate(req, timeout=600):
        kind = response.event.WhichOneof("kind")
        if kind == "started":
            node, queue_ms = response.event.started.node_id, response.event.started.queue_ms
        elif kind == "token":
            first = first or time.perf_counter()
            text.append(response.event.token.text)
        elif kind == "finished":
            finished = response.event.finished
    ended = time.perf_counter()
    assert finished is not None
    return Turn(
        ((first or ended) - started) * 1000,
        finished.tokens_in,
        finished.tokens_cached,
        finished.tokens_out,
        "".join(text),
        started,
        ended,
        node,
        queue_ms,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


# ----- (a) reuse on one pool ---------------------------------------------------------------------


async def reuse_sessions(
    address: str, model_id: str, sessions: int, system_tokens: int, max_tokens: int, tag: str
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        await ask(stub, request(model_id, [pb.ChatMessage(role=pb.ROLE_USER, content="hi")], 2))
        firsts, follows = [], []
        for session in range(sessions):
            messages = [
                pb.ChatMessage(
                    role=pb.ROLE_SYSTEM, content=system_prompt(session, system_tokens) + tag
                ),
                pb.ChatMessage(role=pb.ROLE_USER, content="What does the orchestrator do?"),
            ]
            first = await ask(stub, request(model_id, messages, max_tokens))
            messages += [
                pb.ChatMessage(role=pb.ROLE_ASSISTANT, content=first.text),
                pb.ChatMessage(role=pb.ROLE_USER, content="And the pool?"),
            ]
            follow = await ask(stub, request(model_id, messages, max_tokens))
            firsts.append(first)
            follows.append(follow)
    return {
        "first_ttft_ms": round(statistics.median(t.ttft_ms for t in firsts), 1),
        "follow_up_ttft_ms": round(statistics.median(t.ttft_ms for t in follows), 1),
        "follow_up_tokens_in": round(statistics.median(t.tokens_in for t in follows)),
        "follow_up_tokens_cached": round(statistics.median(t.tokens_cached for t in follows)),
    }


def part_reuse(args: argparse.Namespace, model_id: str, path: Path, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, entries in (("on", 16), ("off", 0)):
        pool = {
            "pool_id": "bench-0",
            "model_id": model_id,
            "n_threads": args.threads,
            "devices": args.devices,
            "prefix_cache_entries": entries,
            "slots": 2,
        }
        proc, address = start_home(tmp / f"reuse-{mode}", [pool], {model_id: path})
        try:
            out[mode] = asyncio.run(
                reuse_sessions(
                    address, model_id, args.sessions, args.system_tokens, args.tokens, mode
                )
            )
        finally:
            stop_home(proc)
        print(f"(a) reuse {mode:>3}: {out[mode]}", flush=True)
    out["follow_up_ttft_ratio"] = round(
        out["on"]["follow_up_ttft_ms"] / max(out["off"]["follow_up_ttft_ms"], 1e-9), 3
    )
    print(f"(a) follow-up TTFT, reuse on / off: {out['follow_up_ttft_ratio']}x (target <= 0.2x)")
    return out


# ----- (b) affinity across a fleet -------------------------------------------------------------


class Fleet:
    """Catalog, orchestrator and two pool managers as ``llorch serve`` processes, with mTLS."""

    NODES = ("node-a", "node-b")

    def __init__(self, root: Path, model_id: str, model: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.model_id = model_id
        self.model = model
        self.args = args
        self.procs: list[subprocess.Popen[str]] = []
        self.pki = FleetPki(root, self.NODES)
        self.files = self.pki.files
        self.client_key = ""

    def env(self, name: str) -> dict[str, str]:
        return {**self.pki.env(name), "LLORCH_LOG_LEVEL": "WARNING", "GRPC_VERBOSITY": "ERROR"}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> str:
        proc, address = start_llorch(args, env, self.root / f"{name}.log")
        self.procs.append(proc)
        return address.replace("127.0.0.1", "localhost")

    async def boot(self, affinity: bool) -> str:
        catalog = self.start(
            "catalog",
            ["serve", "catalog", "--data-dir", str(self.root / "catalog")],
            {**self.env("catalog"), "LLORCH_CATALOG_SERVICE__LISTEN": "127.0.0.1:0"},
        )
        channel = open_channel(catalog, tls=self.files("ops"))
        try:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for node in self.NODES:
                await register_local_file(stub, self.model_id, self.model, node)
        finally:
            await channel.close()
        keys = ApiKeyStore(self.root / "orch" / "orchestrator" / "keys.db")
        self.client_key, _ = keys.create("bench", "client")
        keys.close()
        node_port = f"localhost:{free_port()}"
        orchestrator = self.start(
            "orchestrator",
            ["serve", "orchestrator", "--data-dir", str(self.root / "orch")],
            {
                **self.env("orch"),
                "LLORCH_LISTEN": "127.0.0.1:0",
                "LLORCH_ORCHESTRATOR_SERVICE__CATALOG": catalog,
                "LLORCH_ORCHESTRATOR_SERVICE__NODE_LISTEN": node_port.replace(
                    "localhost", "127.0.0.1"
                ),
                "LLORCH_ORCHESTRATOR_SERVICE__PREFIX_AFFINITY": str(affinity).lower(),
            },
        )
        for node in self.NODES:
            pools = [
                {
                    "pool_id": "cpu-0",
                    "model_id": self.model_id,
                    "n_threads": self.args.threads,
                    "devices": self.args.devices,
                    "slots": self.args.slots,
                }
            ]
            self.start(
                node,
                ["serve", "poolmanager", "--data-dir", str(self.root / node)],
                {
                    **self.env(node),
                    "LLORCH_POOL_MANAGER__NODE_ID": node,
                    "LLORCH_POOL_MANAGER__CATALOG": catalog,
                    "LLORCH_POOL_MANAGER__ORCHESTRATOR": node_port,
                    "LLORCH_POOL_MANAGER__POOLS": json.dumps(pools),
                    "LLORCH_POOL_MANAGER__SPARE_WORKERS": "false",
                    "LLORCH_POOL_MANAGER__USAGE_REPORT_S": "3600",
                },
            )
        return orchestrator

    def client(self, address: str) -> grpc.aio.Channel:
        credentials = grpc.composite_channel_credentials(
            channel_credentials(TlsFiles(self.files("orch").ca)),
            grpc.access_token_call_credentials(self.client_key),
        )
        return grpc.aio.secure_channel(address, credentials)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def fleet_sessions(
    fleet: Fleet, address: str, args: argparse.Namespace
) -> tuple[list[Turn], list[Turn]]:
    """Every session's turns; each session waits a think time between its turns."""
    async with fleet.client(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        warm = [pb.ChatMessage(role=pb.ROLE_USER, content="hi")]
        async with asyncio.timeout(120):
            while True:  # until both nodes have registered and serve
                try:
                    await asyncio.gather(
                        *(ask(stub, request(fleet.model_id, warm, 2)) for _ in range(4))
                    )
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.5)
        firsts: list[Turn] = []
        follows: list[Turn] = []

        async def session(k: int) -> None:
            rng = random.Random(1000 + k)
            await asyncio.sleep(rng.uniform(0, args.arrival_s))
            messages = [
                pb.ChatMessage(
                    role=pb.ROLE_SYSTEM, content=system_prompt(k, args.fleet_system_tokens)
                )
            ]
            previous: Turn | None = None
            for t in range(args.turns):
                messages.append(pb.ChatMessage(role=pb.ROLE_USER, content=f"Question {t}?"))
                answer = await ask(stub, request(fleet.model_id, messages, args.tokens))
                answer.previous = previous
                (follows if t else firsts).append(answer)
                previous = answer
                messages.append(pb.ChatMessage(role=pb.ROLE_ASSISTANT, content=answer.text))
                await asyncio.sleep(rng.uniform(0.5, 1.5) * args.think_s)

        await asyncio.gather(*(session(k) for k in range(args.fleet_sessions)))
    return firsts, follows


def fleet_figures(firsts: list[Turn], follows: list[Turn]) -> dict[str, Any]:
    turns = firsts + follows
    span = max(t.ended for t in turns) - min(t.started for t in turns)
    ttfts = [t.ttft_ms for t in follows]
    return {
        "follow_ups": len(follows),
        "hit_rate": round(sum(1 for t in follows if t.reused) / len(follows), 3),
        "same_node": round(
            sum(1 for t in follows if t.previous and t.node == t.previous.node) / len(follows), 3
        ),
        "nodes": dict(sorted(Counter(t.node for t in turns).items())),
        "queue_p50_ms": round(percentile([t.queue_ms for t in follows], 0.5), 1),
        "cached_share": round(
            sum(t.tokens_cached for t in follows) / sum(t.tokens_in for t in follows), 3
        ),
        "ttft_p50_ms": round(percentile(ttfts, 0.5), 1),
        "ttft_p99_ms": round(percentile(ttfts, 0.99), 1),
        "tokens_per_s": round(sum(t.tokens_out for t in turns) / span, 1),
    }


def part_affinity(args: argparse.Namespace, model_id: str, path: Path, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, affinity in (("affinity", True), ("least_loaded", False)):
        fleet = Fleet(tmp / f"fleet-{mode}", model_id, path, args)
        try:
            address = asyncio.run(fleet.boot(affinity))
            firsts, follows = asyncio.run(fleet_sessions(fleet, address, args))
        finally:
            fleet.stop()
        out[mode] = fleet_figures(firsts, follows)
        print(f"(b) {mode:>12}: {out[mode]}", flush=True)
    a, b = out["affinity"], out["least_loaded"]
    out["ttft_p50_ratio"] = round(a["ttft_p50_ms"] / max(b["ttft_p50_ms"], 1e-9), 3)
    out["tokens_per_s_ratio"] = round(a["tokens_per_s"] / max(b["tokens_per_s"], 1e-9), 3)
    print(
        f"(b) affinity / least loaded: hit rate {a['hit_rate']:.0%} vs {b['hit_rate']:.0%} "
        f"(target >= 90%), TTFT p50 {out['ttft_p50_ratio']}x (target <= 0.5x), "
        f"tokens/s {out['tokens_per_s_ratio']}x (target >= 1x)"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "reuse", "affinity"], default="all")
    parser.add_argument("--model", choices=sorted(MODELS), default="170m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--devices", type=lambda s: s.split(","), default=["cpu"])
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--sessions", type=int, default=3, help="(a) sessions, one at a time")
    parser.add_argument(
        "--system-tokens", type=int, default=1500, help="(a) system prompt (within the context)"
    )
    parser.add_argument("--fleet-sessions", type=int, default=16, help="(b) chat sessions")
    parser.add_argument("--fleet-system-tokens", type=int, default=300, help="(b) system prompt")
    parser.add_argument("--turns", type=int, default=3, help="(b) turns per session")
    parser.add_argument("--think-s", type=float, default=3.0, help="(b) think time scale")
    parser.add_argument("--slots", type=int, default=4, help="(b) slots per pool")
    parser.add_argument(
        "--arrival-s", type=float, default=12.0, help="(b) sessions start spread over this long"
    )
    parser.add_argument("--model-dir", type=Path, help="where <model id>.gguf already is")
    args = parser.parse_args()
    model_id = MODELS[args.model]
    results: dict[str, Any] = {"model": model_id}
    with tempfile.TemporaryDirectory(prefix="llorch-prefix-") as tmp_name:
        tmp = Path(tmp_name)
        path = args.model_dir / f"{model_id}.gguf" if args.model_dir else tmp / f"{model_id}.gguf"
        if not path.is_file():
            path = write_model(tmp / f"{model_id}.gguf", args.model)
        if args.part in ("all", "reuse"):
            results["reuse"] = part_reuse(args, model_id, path, tmp)
        if args.part in ("all", "affinity"):
            results["affinity"] = part_affinity(args, model_id, path, tmp)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    sys.exit(main())

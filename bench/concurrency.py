"""Concurrency benchmark: many streams at once on one pool, batched against one at a time.

In one run, on the same generated model and engine threads:
- ``serial``: a plain llama-cpp-python loop in this process (``Llama.generate``, one request after
  another), the serial peer and the engine's own baseline;
- ``slots=1``: ``llorch up`` with one pool of one slot (every stream waits its turn);
- ``slots=N``: ``llorch up`` with one pool of N slots (continuous batching).

Each path is started, measured and stopped in turn. At each level of concurrent streams (all
submitted at once, 64 tokens each, temperature 0) it prints time to first token (p50, p99, from
the moment the level started), per-stream tokens/s (median), aggregate tokens/s, and the ratios
of slots=N to slots=1 and to serial. Then the long-prompt phase on the slots=N mesh: while four
streams generate, a ~2,000-token prompt arrives; it reports how long the prompt took to its first
token and how much it delayed the four (their longest gap between tokens, and the time they lost
against their rate before), once per prefill chunk size. The last line is JSON.

  .venv/bin/python bench/concurrency.py                       # bench-170m, 1/4/8/16 streams
  .venv/bin/python bench/concurrency.py --levels 1,4 --rounds 1 --tokens 16   # quick
  python bench/concurrency.py --model 1g --devices 0 --threads 4 --levels 1,8,32 --slots 32
                                                   # a GPU (scripts/gpu_check.py, concurrency)

Targets on the 2-core VM (bench-170m, one engine thread): aggregate tokens/s at 8 streams
>= 2.5x slots=1 and >= 3x at 16; time to first token p50 at 8 streams <= 150 ms; a lone stream
>= 0.95x its slots=1 speed.
"""

from __future__ import annotations

# llama_cpp before anything that loads numpy's libraries (see bench/relay.py).
import llama_cpp  # noqa: F401  # isort: skip

import argparse
import asyncio
import gc
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from relay import direct_llama, write_model  # bench/relay.py

from launch.harness import start_home, stop_home

MODELS = {"170m": "bench-170m", "1g": "bench-1g", "tiny": "tiny-llama"}
PROMPT = "Hello"
"""Short (7 tokens on the bench models' vocabulary), so the levels measure decoding; the
long-prompt phase measures prompts."""
LONG_TEXT = "The orchestrator places every task on the least loaded pool and streams "
LONG_PROMPT_TOKENS = 2000
LONG_PHASE_STREAMS = 4


@dataclass
class Stream:
    """One stream of a level, times from the level's start (s)."""

    first_s: float = 0.0
    last_s: float = 0.0
    tokens: int = 0
    arrivals: list[float] = field(default_factory=list)


def level_figures(rounds: list[list[Stream]]) -> dict[str, float]:
    """TTFT p50/p99, per-stream and aggregate tokens/s of one level over its rounds."""
    ttfts = sorted(s.first_s * 1000 for streams in rounds for s in streams)
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    per_stream = [
        (s.tokens - 1) / (s.last_s - s.first_s)
        for streams in rounds
        for s in streams
        if s.last_s > s.first_s
    ]
    aggregate = [
        sum(s.tokens for s in streams) / max(s.last_s for s in streams) for streams in rounds
    ]
    return {
        "ttft_p50_ms": round(statistics.median(ttfts), 1),
        "ttft_p99_ms": round(p99, 1),
        "per_stream_tokens_per_s": round(statistics.median(per_stream), 1) if per_stream else 0.0,
        "aggregate_tokens_per_s": round(statistics.median(aggregate), 1),
    }


class Serial:
    """llama-cpp-python in this process, one request after another (the serial peer)."""

    def __init__(self, path: Path, threads: int, devices: list[str]) -> None:
        self.llm = direct_llama(path, threads, devices)

    def level(self, streams: int, tokens: int) -> list[Stream]:
        start = time.perf_counter()
        out = []
        for _ in range(streams):
            stream = Stream()
            prompt = self.llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
            for token in self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
                self.llm.detokenize([token])
                now = time.perf_counter() - start
                stream.tokens += 1
                if stream.tokens == 1:
                    stream.first_s = now
                stream.last_s = now
                if stream.tokens >= tokens:
                    break
            out.append(stream)
        return out

    def long_prompt(self) -> str:
        """A prompt of about LONG_PROMPT_TOKENS tokens of this model's vocabulary."""
        words = LONG_TEXT * 200
        ids = self.llm.tokenize(words.encode(), add_bos=True, special=False)
        return self.llm.detokenize(ids[1 : LONG_PROMPT_TOKENS - 8]).decode("utf-8", "replace")

    def close(self) -> None:
        del self.llm
        gc.collect()


def request(model_id: str, prompt: str, tokens: int) -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(
        model_id=model_id,
        prompt=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
    )


async def follow(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub,
    req: orchestrator_pb2.GenerateRequest,
    start: float,
) -> Stream:
    stream = Stream()
    async for response in stub.Generate(req, timeout=900):
        event = response.event
        if event.WhichOneof("kind") != "token":
            continue
        now = time.perf_counter() - start
        if stream.tokens == 0:
            stream.first_s = now
        stream.tokens += len(event.token.token_ids)
        stream.last_s = now
        stream.arrivals.extend([now] * len(event.token.token_ids))
    return stream


async def mesh_levels(
    address: str, model_id: str, levels: list[int], rounds: int, tokens: int
) -> dict[int, list[list[Stream]]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        await follow(stub, request(model_id, PROMPT, 8), time.perf_counter())  # warm-up
        out: dict[int, list[list[Stream]]] = {}
        for k in levels:
            out[k] = []
            for _ in range(rounds):
                start = time.perf_counter()
                req = request(model_id, PROMPT, tokens)
                out[k].append(
                    list(await asyncio.gather(*(follow(stub, req, start) for _ in range(k))))
                )
        return out


async def long_prompt_phase(address: str, model_id: str, long_prompt: str) -> dict[str, float]:
    """Four streams generate; a long prompt arrives; how long it took and what it cost them."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        await follow(stub, request(model_id, PROMPT, 8), time.perf_counter())  # warm-up
        start = time.perf_counter()
        running = [
            asyncio.create_task(follow(stub, request(model_id, PROMPT, 400), start))
            for _ in range(LONG_PHASE_STREAMS)
        ]
        await asyncio.sleep(1.5)  # they are generating
        submitted = time.perf_counter() - start
        long = await follow(stub, request(model_id, long_prompt, 4), start)
        streams = await asyncio.gather(*running)
    answered = long.first_s
    before, during, lost = [], [], []
    for s in streams:
        gaps = [(b, b - a) for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)]
        base = statistics.median(g for t, g in gaps if s.first_s < t <= submitted)
        window = [g for t, g in gaps if submitted < t <= answered + base]
        before.append(base)
        during.append(max(window) if window else 0.0)
        got = sum(1 for t in s.arrivals if submitted < t <= answered)
        lost.append(max(0.0, (answered - submitted) - got * base))
    return {
        "prompt_tokens": LONG_PROMPT_TOKENS,
        "long_ttft_ms": round((answered - submitted) * 1000, 1),
        "gap_before_ms": round(statistics.median(before) * 1000, 1),
        "gap_max_during_ms": round(max(during) * 1000, 1),
        "delay_per_stream_ms": round(statistics.median(lost) * 1000, 1),
    }


def ratios(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """a over b (0 where b measured nothing: a stream whose tokens all came in one message)."""

    def ratio(key: str) -> float:
        return round(a[key] / b[key], 2) if b[key] else 0.0

    return {
        "aggregate": ratio("aggregate_tokens_per_s"),
        "per_stream": ratio("per_stream_tokens_per_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="170m")
    parser.add_argument("--levels", default="1,4,8,16", help="concurrent streams, comma list")
    parser.add_argument(
        "--slots",
        type=int,
        default=0,
        help="slots of the batched pool (default: the largest level)",
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per level")
    parser.add_argument("--threads", type=int, default=1, help="engine threads on every path")
    parser.add_argument("--devices", default="cpu", help='"cpu", or GPU indexes such as 0')
    parser.add_argument(
        "--chunks",
        default="64,512",
        help="prefill chunk sizes of the long-prompt phase ('' skips it)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="use <dir>/<model>.gguf when it exists, else generate it there (default: a "
        "temporary directory)",
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    slots = args.slots or max(levels)
    devices = args.devices.split(",")
    model_id = MODELS[args.model]
    chunks = [int(x) for x in args.chunks.split(",") if x]
    figures: dict[str, Any] = {
        "model": model_id,
        "devices": args.devices,
        "threads": args.threads,
        "tokens": args.tokens,
        "slots": slots,
    }
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as tmp:
        tmp_path = Path(tmp)
        path = (args.model_dir or tmp_path) / f"{model_id}.gguf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_model(path, args.model)
        serial = Serial(path, args.threads, devices)
        serial_runs = {
            k: [serial.level(k, args.tokens) for _ in range(args.rounds)] for k in levels
        }
        long_prompt = serial.long_prompt()
        serial.close()
        paths: dict[str, dict[int, list[list[Stream]]]] = {"serial": serial_runs}
        long_phase: dict[str, dict[str, float]] = {}
        for name, pool_slots, chunk in [("slots=1", 1, 0), ("slots=N", slots, 0)] + [
            (f"long chunk={c}", slots, c) for c in chunks
        ]:
            pool: dict[str, Any] = {
                "pool_id": "bench",
                "model_id": model_id,
                "n_threads": args.threads,
                "devices": devices,
                "slots": pool_slots,
            }
            if chunk:
                pool["prefill_chunk_tokens"] = chunk
            proc, address = start_home(tmp_path / name.replace(" ", "-"), [pool], {model_id: path})
            try:
                if chunk:
                    long_phase[str(chunk)] = asyncio.run(
                        long_prompt_phase(address, model_id, long_prompt)
                    )
                else:
                    paths[name] = asyncio.run(
                        mesh_levels(address, model_id, levels, args.rounds, args.tokens)
                    )
            finally:
                stop_home(proc)

    table: dict[str, dict[str, Any]] = {}
    print(
        f"{'streams':>7} {'path':<8} {'TTFT p50':>9} {'TTFT p99':>9} {'per-stream':>11} "
        f"{'aggregate':>10}   (ms, ms, tokens/s, tokens/s)"
    )
    for k in levels:
        row = {name: level_figures(runs[k]) for name, runs in paths.items()}
        for name, f in row.items():
            print(
                f"{k:>7} {name:<8} {f['ttft_p50_ms']:>9.1f} {f['ttft_p99_ms']:>9.1f} "
                f"{f['per_stream_tokens_per_s']:>11.1f} {f['aggregate_tokens_per_s']:>10.1f}"
            )
        row["slots=N / slots=1"] = ratios(row["slots=N"], row["slots=1"])
        row["slots=N / serial"] = ratios(row["slots=N"], row["serial"])
        vs_one, vs_serial = row["slots=N / slots=1"], row["slots=N / serial"]
        print(
            f"{k:>7} ratios   slots=N/slots=1 aggregate {vs_one['aggregate']:.2f}x "
            f"per-stream {vs_one['per_stream']:.2f}x; "
            f"slots=N/serial aggregate {vs_serial['aggregate']:.2f}x"
        )
        table[str(k)] = row
    for chunk, f in long_phase.items():
        print(
            f"long prompt ({f['prompt_tokens']} tokens, prefill chunk {chunk}) beside "
            f"{LONG_PHASE_STREAMS} streams: first token after {f['long_ttft_ms']:.0f} ms; the "
            f"streams' gap {f['gap_before_ms']:.0f} ms before, at most "
            f"{f['gap_max_during_ms']:.0f} ms while it was read; each stream lost "
            f"{f['delay_per_stream_ms']:.0f} ms"
        )
    print(json.dumps({**figures, "levels": table, "long_prompt": long_phase}))


if __name__ == "__main__":
    main()

"""Relay benchmark: the same generations run directly with llama-cpp-python and through the mesh.

Direct: a ``Llama`` in this process, looping ``generate()`` with incremental detokenization.
Mesh: ``llorch up`` in its own process (orchestrator → pool manager → worker process), called
over gRPC from this process, twice: ``mesh`` is the home profile as shipped (the orchestrator
calls its co-located pool manager in-process), ``mesh-grpc`` the same with
``LLORCH_IN_PROCESS_LINK=false``, so orchestrator → pool manager is a loopback gRPC hop as
between machines of a fleet. All paths use the same model file, prompt, sampling, seeds and
engine threads, never at once, in blocks ordered direct, mesh, mesh-grpc, mesh-grpc, mesh,
direct so that a drift of the machine's speed affects them alike. Prints TTFT p50/p99 and decode
tokens/s for every path and the ratios against direct, then one line of JSON with the figures.

  .venv/bin/python bench/relay.py                      # tiny-llama and the ~170 MiB F16 model
  .venv/bin/python bench/relay.py --models tiny --runs 5 --tokens 64   # quick
  python bench/relay.py --devices 0 --threads 4        # on a GPU: every layer offloaded, both paths

Targets (for ``mesh``, the home profile): TTFT added by the mesh <= 5 ms p50; mesh tokens/s
>= 0.97x direct on the 170 MiB model and >= 0.8x on tiny-llama (where the engine outruns a
Python hop, so this measures the relay). ``mesh-grpc`` shows what one more gRPC hop costs.
"""

from __future__ import annotations

# llama_cpp before anything that loads numpy's libraries: with the CUDA build, a process that
# imported numpy first crashed inside llama_model_load_from_file (measured on the GPU machine).
import llama_cpp  # isort: skip

import argparse
import asyncio
import codecs
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from launch.harness import start_home, stop_home
from provisioners.tiny_model import TinyModelSpec

# Mesh variants: the home profile as shipped, and with orchestrator → pool manager over gRPC.
MESHES = {"mesh": True, "mesh-grpc": False}
PROMPT = "The orchestrator places every task on the least loaded pool and streams"
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 40}


@dataclass
class Run:
    """One generation seen from the caller."""

    ttft_ms: float
    tokens: int
    decode_s: float  # first token arrival to last token arrival


@dataclass
class Case:
    """A model to benchmark."""

    key: str
    model_id: str
    spec: TinyModelSpec
    runs: int
    tokens: int


def direct_llama(path: Path, threads: int, devices: list[str]) -> llama_cpp.Llama:
    """llama-cpp-python in this process, set up as a pool's worker is: every layer on the
    given GPUs (or none), the same threads for decoding and for prompts."""
    import os

    gpu = devices != ["cpu"]
    if gpu:  # the worker sees only its pool's GPUs; so does this process
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=0,
        n_gpu_layers=-1 if gpu else 0,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


class Direct:
    """llama-cpp-python in this process, decoding exactly as the worker does."""

    def __init__(self, path: Path, threads: int, devices: list[str]) -> None:
        self._llm = direct_llama(path, threads, devices)

    def run(self, case: Case, seed: int) -> Run:
        llm = self._llm
        start = time.perf_counter()
        prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
        llm.set_seed(seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        first = last = 0.0
        count = 0
        for token in llm.generate(
            prompt,
            top_k=SAMPLING["top_k"],
            top_p=SAMPLING["top_p"],
            min_p=0.0,
            temp=SAMPLING["temperature"],
            repeat_penalty=1.0,
            reset=True,
        ):
            decoder.decode(llm.detokenize([token]))
            count += 1
            last = time.perf_counter()
            if count == 1:
                first = last
            if count >= case.tokens:
                break
        return Run((first - start) * 1000, count, last - first)

    def close(self) -> None:
        del self._llm
        gc.collect()


async def mesh_run(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, case: Case, seed: int
) -> Run:
    """One generation through the mesh, over gRPC."""
    request = orchestrator_pb2.GenerateRequest(
        model_id=case.model_id,
        prompt=PROMPT,
        sampling=common_pb2.SamplingParams(
            max_tokens=case.tokens, seed=seed, ignore_eos=True, **SAMPLING
        ),
    )
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    async for response in stub.Generate(request, timeout=600):
        event = response.event
        if event.WhichOneof("kind") != "token":
            continue
        last = time.perf_counter()
        if count == 0:
            first = last
        count += len(event.token.token_ids)
    return Run((first - start) * 1000, count, last - first)


async def abcba(
    addresses: dict[str, str], path: Path, case: Case, threads: int, devices: list[str]
) -> dict[str, list[Run]]:
    """Blocks of runs: direct, then each mesh, then the meshes reversed, then direct again.

    Each block runs back to back (as a busy server would; two warm-up runs are dropped), and the
    mirrored order cancels a slow drift of the machine's speed between the paths.
    """
    direct = Direct(path, threads, devices)
    out: dict[str, list[Run]] = {"direct": [], **{name: [] for name in addresses}}
    order = ["direct", *addresses]
    half = max(1, case.runs // 2)
    channels = {name: grpc.aio.insecure_channel(a) for name, a in addresses.items()}
    try:
        stubs = {n: orchestrator_pb2_grpc.OrchestratorServiceStub(c) for n, c in channels.items()}
        for path_name in order + order[::-1]:
            for i, seed in enumerate(range(1, half + 3)):
                if path_name == "direct":
                    run = direct.run(case, seed)
                else:
                    run = await mesh_run(stubs[path_name], case, seed)
                if i >= 2:
                    out[path_name].append(run)
    finally:
        for channel in channels.values():
            await channel.close()
        direct.close()
    return out


def summarize(runs: list[Run]) -> dict[str, float]:
    """p50/p99 TTFT and decode tokens/s over the runs."""
    ttfts = sorted(r.ttft_ms for r in runs)
    p99_index = min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))
    tokens = sum(r.tokens - 1 for r in runs)
    seconds = sum(r.decode_s for r in runs)
    return {
        "ttft_p50_ms": round(statistics.median(ttfts), 3),
        "ttft_p99_ms": round(ttfts[p99_index], 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        "runs": len(runs),
        "tokens_per_run": runs[0].tokens if runs else 0,
    }


_WRITE_MODEL = """
import sys
from pathlib import Path
from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from dataclasses import replace
specs = {
    "170m": TinyModelSpec.bench(),
    "1g": TinyModelSpec.reload_bench(),
    "1g-8k": replace(TinyModelSpec.reload_bench(), context_length=8192, name="bench-1g-8k"),
}
spec = specs.get(sys.argv[2], TinyModelSpec())
write_tiny_model(Path(sys.argv[1]), spec)
"""


def write_model(path: Path, key: str) -> Path:
    """Generates a case's model in a child process. Generating it here (gguf and numpy) and then
    loading it with a CUDA build of llama-cpp-python in this same process crashed the process
    inside llama_model_load_from_file on the GPU machine; the direct path must own a clean
    process."""
    subprocess.run([sys.executable, "-c", _WRITE_MODEL, str(path), key], check=True)
    return path


def start_mesh(
    data_dir: Path,
    models: dict[str, Path],
    threads: int,
    devices: list[str],
    in_process_link: bool,
) -> tuple[subprocess.Popen[str], str]:
    """``llorch up`` with one pool per model; returns the process and orchestrator address."""
    pools = [
        {"pool_id": f"bench-{i}", "model_id": model_id, "n_threads": threads, "devices": devices}
        for i, model_id in enumerate(models)
    ]
    extra = {k: v for k, v in models.items() if k != "tiny-llama"}
    return start_home(data_dir, pools, extra, IN_PROCESS_LINK=str(in_process_link).lower())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,170m", help="comma list of: tiny, 170m")
    parser.add_argument(
        "--runs", type=int, default=0, help="runs per path, even (default per model)"
    )
    parser.add_argument("--tokens", type=int, default=0, help="tokens per run (default per model)")
    parser.add_argument("--threads", type=int, default=1, help="engine threads on both paths")
    parser.add_argument(
        "--devices", default="cpu", help='"cpu", or GPU indexes such as 0: every layer offloaded'
    )
    args = parser.parse_args()

    all_cases = {
        "tiny": Case("tiny", "tiny-llama", TinyModelSpec(), 40, 512),
        "170m": Case("170m", "bench-170m", TinyModelSpec.bench(), 8, 64),
    }
    cases = [all_cases[k] for k in args.models.split(",")]
    devices = args.devices.split(",")
    for case in cases:
        case.runs = args.runs or case.runs
        case.tokens = args.tokens or case.tokens

    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as tmp:
        tmp_path = Path(tmp)
        paths = {c.model_id: write_model(tmp_path / f"{c.model_id}.gguf", c.key) for c in cases}
        results: dict[str, dict[str, object]] = {}
        procs: list[subprocess.Popen[str]] = []
        try:
            addresses: dict[str, str] = {}
            for name, link in MESHES.items():
                proc, addresses[name] = start_mesh(
                    tmp_path / name, paths, args.threads, devices, link
                )
                procs.append(proc)
            for case in cases:
                runs = asyncio.run(
                    abcba(addresses, paths[case.model_id], case, args.threads, devices)
                )
                d = summarize(runs["direct"])
                result: dict[str, object] = {"direct": d}
                for name in MESHES:
                    m = summarize(runs[name])
                    result[name] = {
                        **m,
                        "ttft_added_p50_ms": round(m["ttft_p50_ms"] - d["ttft_p50_ms"], 3),
                        "tokens_per_s_ratio": round(m["tokens_per_s"] / d["tokens_per_s"], 3)
                        if d["tokens_per_s"]
                        else 0.0,
                    }
                results[case.model_id] = result
        finally:
            for proc in procs:
                stop_home(proc)

    print(f"{'model':<12} {'path':<10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'tokens/s':>10}")
    for model_id, r in results.items():
        for path in ("direct", *MESHES):
            f = r[path]
            assert isinstance(f, dict)
            print(
                f"{model_id:<12} {path:<10} {f['ttft_p50_ms']:>12.2f} {f['ttft_p99_ms']:>12.2f} "
                f"{f['tokens_per_s']:>10.1f}"
            )
        for path in MESHES:
            f = r[path]
            assert isinstance(f, dict)
            print(
                f"{model_id:<12} {path:<10} TTFT added p50 {f['ttft_added_p50_ms']:+.2f} ms, "
                f"tokens/s vs direct {f['tokens_per_s_ratio']:.3f}x"
            )
    print(json.dumps({"devices": args.devices, "threads": args.threads, **results}))


if __name__ == "__main__":
    main()

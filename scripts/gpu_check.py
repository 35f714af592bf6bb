"""The GPU check's measurements (started by scripts/gpu_check.sh, which provides the engine).

Phases, each printing JSON lines (also appended to OUT/gpu_check.jsonl):
  nvml         the GPUs as the pool manager's DeviceInventory reads them
  engine       plain llama.cpp on the GPU: full offload of generated models, llama.cpp's own
               buffer sizes and layer placement, VRAM measured by NVML against
               poolmanager.vram's estimate, load times (cold page cache, warm page cache,
               /dev/shm), decode speed
  poolmanager  the pool manager itself on a GPU pool: VRAM-only refusal, Ready with the estimate
               and the measurement in the pool state, reload from disk vs from the staging cache
  relay        bench/relay.py on GPU 0 (every layer offloaded) and on this machine's CPUs: what
               the mesh adds to the first token and to decode speed against llama-cpp-python
               called in-process
  concurrency  bench/concurrency.py on GPU 0: bench-1g fully offloaded, 1, 8 and 32 streams at
               once, slots=1 against slots=32 and a serial llama-cpp-python loop (aggregate
               tokens/s, time to first token), and a 2,000-token prompt beside four streams
  prefix       bench/prefix.py (reuse) on GPU 0: a chat's follow-up turn after a 4,000-token
               system prompt (bench-1g's weights with an 8,192-token context), its first token
               with the prefix cache on against off: cold against warm prefill
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORK = Path(os.environ.get("LLORCH_GPU_CHECK_DIR", "/tmp/llorch-gpu-check"))
_OUT: dict[str, Path | None] = {"file": None}
_KEEP: list[Any] = []


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if _OUT["file"] is not None:
        with open(_OUT["file"], "a") as handle:
            handle.write(line + "\n")


def models() -> dict[str, Path]:
    from provisioners.tiny_model import TinyModelSpec, write_tiny_model

    paths = {"tiny": WORK / "tiny-llama.gguf", "1g": WORK / "bench-1g.gguf"}
    if not paths["tiny"].exists():
        write_tiny_model(paths["tiny"])
    if not paths["1g"].exists():
        started = time.perf_counter()
        write_tiny_model(paths["1g"], TinyModelSpec.reload_bench())
        emit({"check": "generate_1g", "seconds": round(time.perf_counter() - started, 1)})
    return paths


def phase_nvml() -> None:
    from poolmanager.devices import DeviceInventory

    inventory = DeviceInventory()
    emit({"check": "nvml_open", "available": inventory.open(), "why": inventory.unavailable_reason})
    for device in inventory.devices():
        emit({"check": "nvml_device", **device.__dict__})


def probe_load(args: argparse.Namespace) -> None:
    """Child: loads one model with every layer offloaded and reports what llama.cpp did."""
    import llama_cpp
    import pynvml

    lines: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    _KEEP.append(capture)  # a freed log callback crashes the process at exit
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.model, n_ctx=args.n_ctx, n_gpu_layers=-1, verbose=False, use_mmap=True
    )
    load_ms = (time.perf_counter() - started) * 1000
    tokens = llm.tokenize(b"the quick brown fox", add_bos=True)
    started = time.perf_counter()
    produced = 0
    for _ in llm.generate(tokens, temp=0.0, reset=True):
        produced += 1
        if produced >= 64:
            break
    decode_s = time.perf_counter() - started
    text = "".join(lines)
    interesting = [
        line.strip()
        for line in text.splitlines()
        if re.search(r"offload|buffer size|assigned to device|ggml_cuda_init|Device \d", line)
    ]
    record: dict[str, Any] = {
        "check": "engine_load",
        "model": Path(args.model).name,
        "n_ctx": args.n_ctx,
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "load_ms": round(load_ms, 1),
        "tokens_per_s": round(produced / decode_s, 1),
        "log": interesting[:40],
        "pid": os.getpid(),
    }
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        record["device_used_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        record["processes"] = [
            {"pid": int(p.pid), "used": p.usedGpuMemory}
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        ]
    except pynvml.NVMLError as exc:
        record["nvml_error"] = str(exc)
    print(json.dumps(record), flush=True)


def _child_load(model: Path, n_ctx: int, visible: str = "0") -> dict[str, Any]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "probe-load", "--model", str(model), "--n-ctx", str(n_ctx)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    wall_ms = (time.perf_counter() - started) * 1000
    lines = proc.stdout.strip().splitlines()
    if not lines:
        return {"check": "engine_load", "model": model.name, "error": proc.stderr[-2000:]}
    record: dict[str, Any] = json.loads(lines[-1])
    record["process_wall_ms"] = round(wall_ms, 1)
    record["returncode"] = proc.returncode
    return record


def _device_used() -> int:
    import pynvml

    try:
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except pynvml.NVMLError:
        return -1


def phase_engine() -> None:
    from bench.reload import evict
    from poolmanager.vram import estimate_vram
    from provisioners.gguf_facts import read_model_shape

    paths = models()
    baseline = _device_used()
    for name, n_ctx in (("tiny", 512), ("1g", 512), ("1g", 8192)):
        record = _child_load(paths[name], n_ctx)
        shape = read_model_shape(paths[name])
        estimate = estimate_vram(shape, n_ctx=n_ctx)
        record["estimate"] = {**estimate.__dict__, "total_bytes": estimate.total_bytes}
        record["device_baseline_bytes"] = baseline
        emit(record)
    # A GPU pool whose GPU is hidden: llama.cpp would quietly run on the CPU; the worker refuses.
    refused = subprocess.run(
        [sys.executable, "-m", "poolmanager.worker", "--model", str(paths["tiny"]), "--gpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    emit(
        {
            "check": "worker_refuses_cpu_fallback",
            "returncode": refused.returncode,
            "event": refused.stdout.strip()[:600],
        }
    )
    # Load times of the 1 GiB model (a fresh process each: CUDA init included in process_wall_ms).
    timings: dict[str, Any] = {"check": "engine_load_times", "model": "bench-1g"}
    evict(paths["1g"])
    timings["cold_disk"] = _child_load(paths["1g"], 512)
    timings["warm_page_cache"] = _child_load(paths["1g"], 512)
    shm = Path("/dev/shm/llorch-gpu-check-bench-1g.gguf")
    shutil.copyfile(paths["1g"], shm)
    try:
        timings["dev_shm"] = _child_load(shm, 512)
    finally:
        shm.unlink(missing_ok=True)
    for key in ("cold_disk", "warm_page_cache", "dev_shm"):
        entry = timings[key]
        timings[key] = {k: entry.get(k) for k in ("load_ms", "process_wall_ms", "error")}
    emit(timings)


def phase_poolmanager() -> None:
    import asyncio

    paths = models()
    # The reload benchmark on GPU 0: cold disk vs RAM staging vs plain warm load.
    command = [sys.executable, "bench/reload.py", "--devices", "0", "--rounds", "2"]
    bench = subprocess.run(
        [*command, "--model-dir", str(WORK)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = bench.stdout.strip().splitlines()
    if bench.returncode == 0 and lines:
        emit({"check": "reload_bench", **json.loads(lines[-1])})
    else:
        emit({"check": "reload_bench", "error": bench.stderr[-3000:]})
    asyncio.run(_vram_refusal(paths["1g"]))


def phase_relay() -> None:
    for devices in ("0", "cpu"):
        command = [sys.executable, "bench/relay.py", "--devices", devices]
        try:
            bench = subprocess.run(command, capture_output=True, text=True, timeout=400)
        except subprocess.TimeoutExpired as exc:
            emit({"check": "relay_bench", "devices": devices, "error": f"timed out: {exc}"})
            continue
        lines = bench.stdout.strip().splitlines()
        if bench.returncode == 0 and lines:
            emit({"check": "relay_bench", **json.loads(lines[-1])})
        else:
            emit(
                {
                    "check": "relay_bench",
                    "devices": devices,
                    "returncode": bench.returncode,
                    "stdout": bench.stdout[-2000:],
                    "error": bench.stderr[-3000:],
                }
            )


def phase_concurrency() -> None:
    paths = models()
    command = [
        sys.executable,
        "bench/concurrency.py",
        "--model",
        "1g",
        "--devices",
        "0",
        "--threads",
        "4",
        "--levels",
        "1,8,32",
        "--slots",
        "32",
        "--rounds",
        "1",
        "--tokens",
        "128",
        "--chunks",
        "512",
        "--model-dir",
        str(paths["1g"].parent),
    ]
    _run_bench("concurrency_bench", command, timeout_s=420, echo=True)


def _run_bench(check: str, command: list[str], *, timeout_s: float, echo: bool = False) -> None:
    """Runs a bench/ script and emits its last (JSON) line as ``check``, or why it failed;
    ``echo``: its other lines are printed too."""
    try:
        bench = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        emit({"check": check, "error": f"timed out: {exc}"})
        return
    lines = bench.stdout.strip().splitlines()
    if bench.returncode == 0 and lines:
        emit({"check": check, **json.loads(lines[-1])})
        if echo:
            for line in lines[:-1]:
                print(line, flush=True)
    else:
        emit(
            {
                "check": check,
                "returncode": bench.returncode,
                "stdout": bench.stdout[-2000:],
                "error": bench.stderr[-3000:],
            }
        )


def phase_prefix() -> None:
    command = [
        sys.executable,
        "bench/prefix.py",
        "--part",
        "reuse",
        "--model",
        "1g-8k",
        "--devices",
        "0",
        "--threads",
        "4",
        "--system-tokens",
        "4000",
        "--sessions",
        "3",
        "--model-dir",
        str(WORK),
    ]
    _run_bench("prefix_bench", command, timeout_s=300)


async def _vram_refusal(model: Path) -> None:
    """Fills the GPU until the 1 GiB model cannot fit, asks for it, then frees and asks again."""
    import torch

    from mesh.errors import FailedPreconditionError, NotFoundError
    from mesh.settings import PoolManagerSettings, PoolSettings
    from poolmanager.manager import PoolManager

    async def locate(model_id: str) -> str:
        if model_id != "bench-1g":
            raise NotFoundError(model_id)
        return str(model)

    settings = PoolManagerSettings(
        catalog="unused:1",
        pools=[PoolSettings(pool_id="g0", model_id="bench-1g", devices=["0"], n_ctx=4096)],
        staging_budget_bytes=0,
    )
    free, _ = torch.cuda.mem_get_info()
    hold = torch.empty(free - 1024**3, dtype=torch.uint8, device="cuda")
    pm = PoolManager(settings, locate, dict(os.environ), log_level="WARNING")
    await pm.start()
    try:
        await pm.wait_ready(120)
        pool = pm.pools["g0"]
        emit(
            {
                "check": "vram_refusal_at_start",
                "state": pool.state.value,
                "last_error": pool.last_error,
                "worker_started": pool.worker is not None,
            }
        )
        del hold
        torch.cuda.empty_cache()
        try:
            await pm.preload("g0")
        except FailedPreconditionError as exc:
            emit({"check": "preload_after_freeing", "error": exc.message})
            return
        emit(
            {
                "check": "preload_after_freeing",
                "state": pool.state.value,
                "vram_estimate_bytes": pool.vram_estimate_bytes,
                "vram_measured_bytes": pool.vram_measured_bytes,
                "measured_over_estimate": round(
                    pool.vram_measured_bytes / max(1, pool.vram_estimate_bytes), 3
                ),
                "load_ms": round(pool.load_ms, 1),
                "gpus": [d.__dict__ for d in pm.inventory.devices()],
            }
        )
    finally:
        await pm.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    child = sub.add_parser("probe-load")
    child.add_argument("--model", required=True)
    child.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--phases", default="nvml,engine,poolmanager,relay,concurrency,prefix")
    args = parser.parse_args()
    if args.cmd == "probe-load":
        probe_load(args)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    _OUT["file"] = args.out / "gpu_check.jsonl"
    WORK.mkdir(parents=True, exist_ok=True)
    phases = {
        "nvml": phase_nvml,
        "engine": phase_engine,
        "poolmanager": phase_poolmanager,
        "relay": phase_relay,
        "concurrency": phase_concurrency,
        "prefix": phase_prefix,
    }
    for phase in args.phases.split(","):
        if phase not in phases:
            emit({"check": "phase", "phase": phase, "skipped": "not in this version"})
            continue
        started = time.perf_counter()
        phases[phase]()
        emit({"check": "phase", "phase": phase, "seconds": round(time.perf_counter() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

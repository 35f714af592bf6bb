"""The worker process: ``python -m poolmanager.worker --model PATH [...]``.

Started by the pool manager with ``CUDA_VISIBLE_DEVICES`` already set to the pool's devices, or
ahead of need as a spare (``--spare``): it then starts the engine and creates the GPUs' CUDA
contexts, sends ``Spare``, and waits for a ``Load`` carrying the ``LoadSpec`` it would have been
started with; from there on it is an ordinary worker. Native code that prints to stdout cannot
corrupt the event stream because fd 1 is pointed at stderr at start and events go to a private
copy of the pipe. SIGINT is ignored: the pool manager stops a worker by closing its stdin (or
with SIGTERM or SIGKILL).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
from typing import get_args

from poolmanager.worker import log
from poolmanager.worker.channel import CommandReader, EventWriter
from poolmanager.worker.protocol import (
    CacheType,
    Cancel,
    Execute,
    Load,
    LoadFailed,
    LoadSpec,
    LogLevel,
    Ready,
    Spare,
)


def _parser() -> argparse.ArgumentParser:
    default = LoadSpec(model="")
    parser = argparse.ArgumentParser(prog="poolmanager.worker")
    parser.add_argument("--model", help="GGUF file to load (required unless --spare)")
    parser.add_argument(
        "--spare", action="store_true", help="start the engine, then wait for a load command"
    )
    parser.add_argument("--n-ctx", type=int, default=default.n_ctx)
    parser.add_argument("--slots", type=int, default=default.slots)
    parser.add_argument("--kv-cache-tokens", type=int, default=default.kv_cache_tokens)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=default.prefill_chunk_tokens)
    parser.add_argument("--prefix-cache-entries", type=int, default=default.prefix_cache_entries)
    parser.add_argument("--n-threads", type=int, default=default.n_threads)
    parser.add_argument("--gpu", action="store_true", help="offload every layer to the GPU")
    parser.add_argument("--tensor-split", default="", help="shares of the visible GPUs, a,b,...")
    parser.add_argument("--cache-type", choices=get_args(CacheType), default=default.cache_type)
    parser.add_argument("--log-level", choices=get_args(LogLevel), default=default.log_level)
    parser.add_argument("--token-batch-ms", type=float, default=default.token_batch_ms)
    return parser


def _spec(args: argparse.Namespace) -> LoadSpec:
    split = tuple(float(x) for x in args.tensor_split.split(",")) if args.tensor_split else ()
    return LoadSpec(
        model=args.model,
        n_ctx=args.n_ctx,
        slots=args.slots,
        kv_cache_tokens=args.kv_cache_tokens,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        prefix_cache_entries=args.prefix_cache_entries,
        n_threads=args.n_threads,
        gpu=args.gpu,
        tensor_split=split,
        cache_type=args.cache_type,
        log_level=args.log_level,
        token_batch_ms=args.token_batch_ms,
    )


_CUDA_RUNTIMES = ("libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so")


def _warm_gpus() -> int:
    """Creates the CUDA context of every visible GPU now, so a later load does not pay for it;
    returns how many GPUs were warmed (0 without a CUDA runtime, e.g. a CPU-only engine).

    The engine's CUDA runtime is already in the process; ``cudaFree(0)`` is the usual way to make
    the runtime create a device's primary context, which llama.cpp then reuses."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():  # also registers llama.cpp's GPU backends
        return 0
    for name in _CUDA_RUNTIMES:
        try:
            cudart = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0
    count = ctypes.c_int(0)
    if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0:
        return 0
    for device in range(count.value):
        cudart.cudaSetDevice(device)
        cudart.cudaFree(None)
    cudart.cudaSetDevice(0)
    return count.value


def _wait_for_load(gpu: bool, out: EventWriter, commands: CommandReader) -> LoadSpec | None:
    """Spare mode: starts the engine (and the GPUs' CUDA contexts), says so, and waits for a
    ``Load``; returns its spec, None on EOF."""
    started = time.perf_counter()
    import llama_cpp

    from poolmanager.worker.engine import EngineLog

    EngineLog.install()
    llama_cpp.llama_backend_init()
    gpus = _warm_gpus() if gpu else 0
    out.send([Spare(warm_ms=(time.perf_counter() - started) * 1000, gpus=gpus)])
    while not commands.eof:
        for command in commands.wait():
            if isinstance(command, Load):
                return command.spec
            log.log("WARNING", f"spare worker ignored a {type(command).__name__} command")
    return None


def _gpu_refusal(cpu_layers: list[int]) -> str:
    """Why a model loaded for a GPU pool breaks the VRAM-only rule; empty when it does not."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        return (
            "llama.cpp has no GPU to offload to: either this llama-cpp-python was built without "
            "GPU offload (a GPU pool needs a CUDA build: docs/operators.md, 'Building the engine "
            f"with CUDA') or no GPU is visible to the worker (CUDA_VISIBLE_DEVICES={visible!r})"
        )
    if cpu_layers:
        return (
            f"llama.cpp placed layers {cpu_layers} on the CPU; a GPU pool runs wholly in VRAM or "
            "not at all (are the pool's GPUs visible to the worker?)"
        )
    return ""


def serve(spec: LoadSpec, out: EventWriter, commands: CommandReader) -> int:
    """Loads the model, says ``Ready`` (or ``LoadFailed``), then runs the batching loop until
    the command pipe closes. Returns the exit code."""
    started = time.perf_counter()
    import llama_cpp

    from poolmanager.worker.batching import BatchEngine
    from poolmanager.worker.engine import EngineError, EngineLog, LlamaEngine, engine_version

    engine_log = EngineLog.install()
    engine_log.lines.clear()
    engine_log.loading = True
    try:
        engine = LlamaEngine(spec)
    except EngineError as exc:
        out.send([LoadFailed(f"cannot load {spec.model}: {exc}")])
        return 3
    finally:
        engine_log.loading = False
    refusal = _gpu_refusal(engine_log.cpu_layers()) if spec.gpu else ""
    if refusal:
        out.send([LoadFailed(refusal, refused=True)])
        return 3
    out.send(
        [
            Ready(
                engine_version=engine_version(),
                n_ctx=engine.n_ctx,
                slots=engine.slots,
                kv_cache_tokens=engine.kv_cache_tokens,
                n_batch=engine.n_batch,
                n_vocab=engine.n_vocab,
                load_ms=(time.perf_counter() - started) * 1000,
                gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
            )
        ]
    )
    log.log(
        "INFO",
        "worker ready",
        slots=engine.slots,
        n_ctx=engine.n_ctx,
        kv_cache_tokens=engine.kv_cache_tokens,
    )
    spare_ids = engine.n_seq_ids - engine.slots
    if spec.prefix_cache_entries and not engine.prefix_cache_supported:
        log.log("INFO", "prefix cache off: this model's memory cannot share cells")
    elif spare_ids < spec.prefix_cache_entries:
        log.log(
            "WARNING",
            f"prefix cache holds {spare_ids} entries, not {spec.prefix_cache_entries}: "
            "slots and entries share llama.cpp's 256 sequence ids",
        )
    batcher = BatchEngine(
        engine,
        prefill_chunk_tokens=spec.prefill_chunk_tokens,
        prefix_cache_entries=spec.prefix_cache_entries,
    )
    while True:
        if batcher.idle:
            out.flush()
            received = commands.wait()
        else:
            received = commands.poll()
        for command in received:
            if isinstance(command, Execute):
                batcher.submit(command)
            elif isinstance(command, Cancel):
                batcher.cancel(command.id)
            else:
                log.log("WARNING", "a loaded worker ignored a Load command")
        if commands.eof:
            batcher.cancel_all()
        out.send(batcher.step())
        if commands.eof and batcher.idle:
            out.flush()
            return 0


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C in a terminal signals the whole process group, workers too. The pool manager
    # stops its workers itself (it closes their stdin), so a worker does not die under it
    # first: that would be a crash to restart, and a traceback on the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.spare and not args.model:
        parser.error("--model is required unless --spare")
    log.set_level(args.log_level)

    # Events get a private copy of the stdout pipe; fd 1 now goes to stderr.
    out = EventWriter(os.fdopen(os.dup(1), "wb", buffering=0), window_s=args.token_batch_ms / 1000)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    commands = CommandReader(sys.stdin.fileno())

    try:
        if args.spare:
            loaded = _wait_for_load(args.gpu, out, commands)
            if loaded is None:  # the pool manager is gone, or stopped the spare
                return 0
            spec = loaded
            log.set_level(spec.log_level)
            out.window_s = spec.token_batch_ms / 1000
        else:
            spec = _spec(args)
        code = serve(spec, out, commands)
    except BrokenPipeError:
        # The pool manager died (SIGKILL) while this worker wrote events: nobody reads them
        # any more. Exit as on EOF, without a traceback in the pool manager's log.
        log.log("INFO", "the pool manager is gone (its event pipe is closed); exiting")
        code = 0
    # Every event is written; nothing else in this process needs an orderly end. Skipping the
    # interpreter's teardown (freeing the model, unloading modules) lets the process exit in
    # milliseconds instead of ~100, which a reload waits for.
    sys.stderr.flush()
    os._exit(code)

"""The worker process of one pool: loads a model with llama-cpp-python and generates.

Started by the pool manager as ``python -m poolmanager.worker --model PATH ...`` with
``CUDA_VISIBLE_DEVICES`` already set to the pool's devices, or ahead of need as a spare
(``--spare``): it then imports the engine and creates the GPUs' CUDA contexts, sends
``{"ev": "spare"}``, and waits for ``{"op": "load", "argv": [...]}`` with the arguments it would
have been started with; from there on it is an ordinary worker. It speaks JSON lines: commands on
stdin, events on the original stdout. Native code that prints to stdout cannot corrupt the event
stream because fd 1 is pointed at stderr at start and events go to a private copy of the pipe.

Commands (one JSON object a line):
  {"op": "exec", "id", "prompt", "max_tokens", "max_tokens_defaulted", "temperature", "top_p",
   "top_k", "seed", "stop": [...], "ignore_eos", "cid", "tp"}   tp: W3C traceparent (optional)
  {"op": "cancel", "id"}
EOF on stdin means the pool manager is gone: the worker exits.

Events:
  {"ev": "spare", "warm_ms", "gpus"}                   a spare is waiting for its load command
  {"ev": "ready", "engine_version", "n_ctx", "n_vocab", "load_ms", "gpu_offload"}
  {"ev": "load_failed", "message"}
  {"ev": "tok", "id", "i", "ids": [...], "text"}     one or more tokens, index of the first
  {"ev": "done", "id", "reason": "stop"|"stop_sequence"|"length", "tokens_in", "tokens_out",
   "ttft_ms", "decode_ms", "t0", "t1", "t2"}   t*: wall ns of prompt start, first token, end
  {"ev": "cancelled", "id"}
  {"ev": "error", "id", "code": "INVALID_ARGUMENT"|"INTERNAL", "field", "message"}

Decoding loops ``Llama.generate`` and decodes each token incrementally (never
``create_completion(stream=True)``, which re-detokenizes the whole text on every token).

Few thread hand-offs on the way to the first token, since each wake-up of a sleeping thread costs
time: the main thread reads commands itself (blocking when idle, polling the pipe during a
decode so a cancel lands within a millisecond) and writes the urgent events (first token, end of
an execution) itself; only later tokens go through the writer thread, which merges them.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import select
import sys
import threading
import time
from collections import deque
from typing import IO, Any


class _Out:
    """Events to the pool manager.

    Urgent events (the first token of an execution, its end, load events) are written at once by
    the caller, after whatever is pending, so the order holds. Later tokens are left to a writer
    thread that sends them at most once per ``window_s`` per execution, merged: a fast engine then
    costs every hop of the mesh a message per window instead of one per token, and a slower one
    is not delayed at all.
    """

    def __init__(self, stream: IO[bytes], window_s: float) -> None:
        self._stream = stream
        self.window_s = window_s
        self._pending: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._holding = False
        self._last_token_write: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def send(self, event: dict[str, Any], *, urgent: bool = True) -> None:
        """Sends an event; a non-urgent token event may wait up to ``window_s``."""
        with self._cond:
            self._pending.append(event)
            if urgent:
                batch, self._pending = self._pending, []
                self._write(batch)
            elif not self._holding:
                # While holding, the writer wakes by itself; waking it for every token would
                # cost the decode loop a GIL hand-off per token.
                self._cond.notify()

    def close(self) -> None:
        """Writes what is pending and stops the writer."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                hold = self._hold_s()
                if hold > 0 and not self._closed:
                    self._holding = True
                    self._cond.wait(hold)
                    self._holding = False
                batch, self._pending = self._pending, []
                if batch:
                    self._write(batch)

    def _hold_s(self) -> float:
        now = time.perf_counter()
        wait = 0.0
        for event in self._pending:
            last = self._last_token_write.get(event["id"], 0.0)
            wait = max(wait, last + self.window_s - now)
        return wait

    def _write(self, batch: list[dict[str, Any]]) -> None:
        """Writes a batch, merging consecutive tokens of an execution (lock held)."""
        merged: list[dict[str, Any]] = []
        for event in batch:
            prev = merged[-1] if merged else None
            if (
                prev is not None
                and event["ev"] == "tok"
                and prev["ev"] == "tok"
                and prev["id"] == event["id"]
            ):
                prev["ids"] = prev["ids"] + event["ids"]
                prev["text"] += event["text"]
            else:
                merged.append(dict(event))
        now = time.perf_counter()
        for event in merged:
            if event["ev"] == "tok":
                self._last_token_write[event["id"]] = now
            elif event["ev"] in ("done", "cancelled", "error"):
                self._last_token_write.pop(event["id"], None)
        data = b"".join(
            json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            for e in merged
        )
        self._stream.write(data)
        self._stream.flush()


class _Commands:
    """Command lines from the pool manager, read from fd 0 without a thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self.eof = False

    def wait(self) -> list[dict[str, Any]]:
        """Blocks until at least one command arrives (or EOF)."""
        while not self.eof:
            commands = self._read(block=True)
            if commands:
                return commands
        return []

    def poll(self) -> list[dict[str, Any]]:
        """Commands already waiting in the pipe, without blocking."""
        return [] if self.eof else self._read(block=False)

    def _read(self, *, block: bool) -> list[dict[str, Any]]:
        if not block and not select.select([self._fd], [], [], 0)[0]:
            return []
        chunk = os.read(self._fd, 1 << 16)
        if not chunk:
            self.eof = True
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        commands = []
        for line in lines:
            try:
                commands.append(json.loads(line))
            except json.JSONDecodeError:
                _log("ERROR", "bad command line from pool manager")
        return commands


_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
_min_level = {"value": 20}


def _trace_ids(traceparent: Any) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of a W3C traceparent (``00-<trace>-<span>-<flags>``), for
    log lines; none when it is missing or not in that form. The pool manager made it with the
    OpenTelemetry propagator; the worker only reads it, and stays free of the SDK."""
    parts = traceparent.split("-") if isinstance(traceparent, str) else []
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return {}
    return {"trace_id": parts[1], "span_id": parts[2]}


def _log(level: str, msg: str, **fields: Any) -> None:
    if _LEVELS[level] < _min_level["value"]:
        return
    entry = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "level": level,
        "logger": "llorch.worker",
        "msg": msg,
        **{k: v for k, v in fields.items() if v},
    }
    print(json.dumps(entry), file=sys.stderr, flush=True)


class StopMatcher:
    """Holds back text that may be the start of a stop sequence.

    ``push`` returns the text that is safe to emit; once a stop sequence appears, ``stopped`` is
    set and the text before it is returned.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if not self._stops:
            return text
        self._held += text
        # The stop that completes first in the stream wins (earliest end), as it would have token
        # by token; among those ending together, the earliest start.
        matches = [(i + len(s), i) for s in self._stops if (i := self._held.find(s)) >= 0]
        if matches:
            self.stopped = True
            cut = min(matches)[1]
            out, self._held = self._held[:cut], ""
            return out
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._held)), 0, -1):
                if self._held.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return out

    @property
    def holding(self) -> bool:
        """Whether some text is held back."""
        return bool(self._held)

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class Worker:
    """Runs executions one at a time on one llama.cpp context."""

    # How often the decode loop looks for a cancel in the command pipe.
    _POLL_INTERVAL_S = 0.001

    def __init__(self, llm: Any, out: _Out, commands: _Commands) -> None:
        self._llm = llm
        self._out = out
        self._commands = commands
        self._jobs: deque[dict[str, Any]] = deque()
        self._cancelled: set[str] = set()
        self._last_poll = 0.0

    def _apply(self, commands: list[dict[str, Any]]) -> None:
        for cmd in commands:
            if cmd.get("op") == "exec":
                self._jobs.append(cmd)
            elif cmd.get("op") == "cancel":
                self._cancelled.add(str(cmd.get("id")))

    def _is_cancelled(self, exec_id: str) -> bool:
        """Whether the execution was cancelled (or the pool manager went away)."""
        now = time.perf_counter()
        if now - self._last_poll >= self._POLL_INTERVAL_S:
            self._last_poll = now
            self._apply(self._commands.poll())
        return exec_id in self._cancelled or self._commands.eof

    def serve(self) -> None:
        """Main loop: one execution after another until the command pipe closes."""
        while True:
            if not self._jobs:
                self._apply(self._commands.wait())
                if self._commands.eof and not self._jobs:
                    return
                continue
            job = self._jobs.popleft()
            exec_id = str(job["id"])
            if exec_id in self._cancelled or self._commands.eof:
                self._out.send({"ev": "cancelled", "id": exec_id})
            else:
                try:
                    self._execute(job)
                except Exception as exc:  # a bug or an engine failure: report, keep serving
                    _log("ERROR", f"execution failed: {exc!r}", correlation_id=job.get("cid"))
                    self._out.send(
                        {
                            "ev": "error",
                            "id": exec_id,
                            "code": "INTERNAL",
                            "message": f"engine error: {exc}",
                        }
                    )
            self._cancelled.discard(exec_id)

    def _execute(self, job: dict[str, Any]) -> None:
        llm = self._llm
        exec_id = str(job["id"])
        max_tokens = int(job["max_tokens"])
        prompt_tokens = llm.tokenize(job["prompt"].encode("utf-8"), add_bos=True, special=False)
        tokens_in = len(prompt_tokens)
        n_ctx = llm.n_ctx()
        # llama.cpp fails one step past n_ctx: refuse, or shorten a defaulted max_tokens,
        # before decoding anything.
        problem = ""
        if tokens_in >= n_ctx:
            field = "prompt"
            problem = f"prompt is {tokens_in} tokens; the pool's context is {n_ctx} tokens"
        elif tokens_in + max_tokens > n_ctx:
            if job.get("max_tokens_defaulted"):
                max_tokens = n_ctx - tokens_in
            else:
                field = "sampling.max_tokens"
                problem = (
                    f"prompt ({tokens_in} tokens) + max_tokens ({max_tokens}) exceeds the "
                    f"pool's context of {n_ctx} tokens"
                )
        if problem:
            self._out.send(
                {
                    "ev": "error",
                    "id": exec_id,
                    "code": "INVALID_ARGUMENT",
                    "field": field,
                    "message": problem,
                }
            )
            return
        trace_ids = _trace_ids(job.get("tp"))
        _log(
            "INFO",
            "execution started",
            correlation_id=job.get("cid"),
            execution_id=exec_id,
            tokens_in=tokens_in,
            **trace_ids,
        )
        llm.set_seed(int(job["seed"]))
        eos = llm.token_eos()
        ignore_eos = bool(job.get("ignore_eos"))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(list(job.get("stop") or []))
        held_ids: list[int] = []
        pending_text = ""
        index = 0
        reason = "length"
        start = time.perf_counter()
        start_ns = time.time_ns()
        first = 0.0
        first_ns = 0
        produced = 0
        for token in llm.generate(
            prompt_tokens,
            top_k=int(job["top_k"]),
            top_p=float(job["top_p"]),
            min_p=0.0,
            temp=float(job["temperature"]),
            repeat_penalty=1.0,
            reset=True,
        ):
            if self._is_cancelled(exec_id):
                self._out.send({"ev": "cancelled", "id": exec_id})
                return
            if produced == 0:
                first = time.perf_counter()
                first_ns = time.time_ns()
            if token == eos and not ignore_eos:
                reason = "stop"
                break
            produced += 1
            held_ids.append(token)
            pending_text += stops.push(decoder.decode(llm.detokenize([token])))
            if stops.stopped:
                reason = "stop_sequence"
                break
            # Ids travel with their text: a token whose bytes end mid-character, or whose text
            # may begin a stop sequence, waits for the tokens that complete it.
            if pending_text and not stops.holding:
                self._send_tokens(exec_id, index, held_ids, pending_text)
                index += len(held_ids)
                held_ids, pending_text = [], ""
            if produced >= max_tokens:
                break
        if not stops.stopped:
            pending_text += stops.flush() + decoder.decode(b"", final=True)
        if held_ids:
            self._send_tokens(exec_id, index, held_ids, pending_text)
            index += len(held_ids)
        end = time.perf_counter()
        self._out.send(
            {
                "ev": "done",
                "id": exec_id,
                "reason": reason,
                "tokens_in": tokens_in,
                "tokens_out": index,
                "ttft_ms": ((first or end) - start) * 1000,
                "decode_ms": (end - (first or end)) * 1000,
                "t0": start_ns,
                "t1": first_ns,
                "t2": time.time_ns(),
            }
        )
        _log(
            "INFO",
            "execution finished",
            correlation_id=job.get("cid"),
            execution_id=exec_id,
            tokens_out=index,
            reason=reason,
            **trace_ids,
        )

    def _send_tokens(self, exec_id: str, index: int, ids: list[int], text: str) -> None:
        self._out.send(
            {"ev": "tok", "id": exec_id, "i": index, "ids": list(ids), "text": text},
            urgent=index == 0 or self._out.window_s == 0,
        )


def engine_version() -> str:
    """Engine name and version, e.g. ``llama-cpp-python/0.3.36``."""
    import llama_cpp

    return f"llama-cpp-python/{llama_cpp.__version__}"


# ggml type ids of the KV cache types (ggml.h).
_CACHE_TYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "bf16": 30,
}
_LAYER_DEVICE = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")


class _EngineLog:
    """Collects llama.cpp's log lines while the model loads (they say where each layer went),
    then keeps only warnings and errors. The callback object must outlive the engine: llama.cpp
    calls it until the process ends, and a freed callback crashes the process at exit."""

    def __init__(self) -> None:
        import llama_cpp

        self.loading = True
        self.lines: list[str] = []

        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def callback(level: int, text: bytes, user_data: Any) -> None:
            if self.loading:
                self.lines.append(text.decode("utf-8", "replace"))
            elif level in (2, 3):  # GGML_LOG_LEVEL_WARN, _ERROR
                sys.stderr.write(text.decode("utf-8", "replace"))

        self._callback = callback
        llama_cpp.llama_log_set(callback, None)

    def cpu_layers(self) -> list[int]:
        """Layers llama.cpp placed on the CPU (a GPU pool must have none)."""
        text = "".join(self.lines)
        return [int(m[1]) for m in _LAYER_DEVICE.finditer(text) if m[2].startswith("CPU")]


_ENGINE_LOG: list[_EngineLog] = []  # kept alive until the process exits


def _gpu_refusal(engine_log: _EngineLog) -> str:
    """Why a model loaded for a GPU pool breaks the VRAM-only rule; empty when it does not."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        return (
            "llama.cpp has no GPU to offload to: either this llama-cpp-python was built without "
            "GPU offload (a GPU pool needs a CUDA build: docs/operators.md, 'Building the engine "
            f"with CUDA') or no GPU is visible to the worker (CUDA_VISIBLE_DEVICES={visible!r})"
        )
    cpu = engine_log.cpu_layers()
    if cpu:
        return (
            f"llama.cpp placed layers {cpu} on the CPU; a GPU pool runs wholly in VRAM or not "
            "at all (are the pool's GPUs visible to the worker?)"
        )
    return ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolmanager.worker")
    parser.add_argument("--model", help="GGUF file to load (required unless --spare)")
    parser.add_argument(
        "--spare", action="store_true", help="start the engine, then wait for a load command"
    )
    parser.add_argument("--n-ctx", type=int, default=0)
    parser.add_argument("--n-threads", type=int, default=0)
    parser.add_argument("--gpu", action="store_true", help="offload every layer to the GPU")
    parser.add_argument("--tensor-split", default="", help="shares of the visible GPUs, a,b,...")
    parser.add_argument("--cache-type", choices=list(_CACHE_TYPES), default="f16")
    parser.add_argument("--log-level", choices=list(_LEVELS), default="INFO")
    parser.add_argument("--token-batch-ms", type=float, default=4.0)
    return parser


_CUDA_RUNTIMES = ("libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so")


def _warm_gpus() -> int:
    """Creates the CUDA context of every visible GPU now, so a later load does not pay for it;
    returns how many GPUs were warmed (0 without a CUDA runtime, e.g. a CPU-only engine).

    The engine's CUDA runtime is already in the process; ``cudaFree(0)`` is the usual way to make
    the runtime create a device's primary context, which llama.cpp then reuses."""
    import ctypes

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


def _wait_for_load(
    parser: argparse.ArgumentParser, args: argparse.Namespace, out: _Out, commands: _Commands
) -> argparse.Namespace | None:
    """Spare mode: starts the engine (and the GPUs' CUDA contexts), says so, and waits for
    ``{"op": "load", "argv": [...]}``; returns the arguments of the load, None on EOF."""
    started = time.perf_counter()
    import llama_cpp

    engine_log = _EngineLog()
    _ENGINE_LOG.append(engine_log)
    llama_cpp.llama_backend_init()
    gpus = _warm_gpus() if args.gpu else 0
    engine_log.loading = False
    out.send({"ev": "spare", "warm_ms": (time.perf_counter() - started) * 1000, "gpus": gpus})
    while not commands.eof:
        for command in commands.wait():
            if command.get("op") == "load":
                loaded = parser.parse_args([str(a) for a in command.get("argv", [])])
                if loaded.spare or not loaded.model:
                    parser.error("a load command needs --model and no --spare")
                return loaded
            _log("WARNING", f"spare worker ignored command {command.get('op')!r}")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.spare and not args.model:
        parser.error("--model is required unless --spare")
    _min_level["value"] = _LEVELS[args.log_level]

    # Events get a private copy of the stdout pipe; fd 1 now goes to stderr.
    out = _Out(os.fdopen(os.dup(1), "wb", buffering=0), window_s=args.token_batch_ms / 1000)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    commands = _Commands(sys.stdin.fileno())

    if args.spare:
        loaded = _wait_for_load(parser, args, out, commands)
        if loaded is None:  # the pool manager is gone, or stopped the spare
            out.close()
            return 0
        args = loaded
        _min_level["value"] = _LEVELS[args.log_level]
        out.window_s = args.token_batch_ms / 1000

    started = time.perf_counter()
    try:
        import llama_cpp

        if _ENGINE_LOG:
            engine_log = _ENGINE_LOG[0]
        else:
            engine_log = _EngineLog()
            _ENGINE_LOG.append(engine_log)
        engine_log.lines.clear()
        engine_log.loading = True
        split = [float(x) for x in args.tensor_split.split(",")] if args.tensor_split else None
        cache_type = _CACHE_TYPES[args.cache_type]
        llm = llama_cpp.Llama(
            model_path=args.model,
            n_ctx=args.n_ctx,
            n_threads=args.n_threads or None,
            # Prompts use as many threads as decoding: more would wait on cores that the rest of
            # the machine (the pool manager, other pools) is using.
            n_threads_batch=args.n_threads or None,
            n_gpu_layers=-1 if args.gpu else 0,
            tensor_split=split,
            type_k=cache_type,
            type_v=cache_type,
            verbose=False,
        )
        engine_log.loading = False
    except (ValueError, RuntimeError, OSError) as exc:
        out.send({"ev": "load_failed", "message": f"cannot load {args.model}: {exc}"})
        out.close()
        return 3
    refusal = _gpu_refusal(engine_log) if args.gpu else ""
    if refusal:
        out.send({"ev": "load_failed", "message": refusal, "code": "FAILED_PRECONDITION"})
        out.close()
        return 3
    out.send(
        {
            "ev": "ready",
            "engine_version": engine_version(),
            "n_ctx": llm.n_ctx(),
            "n_vocab": llm.n_vocab(),
            "load_ms": (time.perf_counter() - started) * 1000,
            "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        }
    )
    worker = Worker(llm, out, commands)
    worker.serve()
    out.close()
    # Every event is written; nothing else in this process needs an orderly end. Skipping the
    # interpreter's teardown (freeing the model, unloading modules) lets the process exit in
    # milliseconds instead of ~100, which a reload waits for.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

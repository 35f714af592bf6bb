"""What the REST edge costs a client: time to first token and to the last, over REST through
llorch-gateway (our NDJSON routes, and the OpenAI-compatible SSE routes /openai/v1/completions
and /chat/completions) beside gRPC straight to the orchestrator, against one `llorch up`, calls
interleaved so all see the same machine.

    python bench/gateway.py [--runs 30] [--tokens 32] [--model tiny|170m]

Prints a table, then one JSON line (medians in ms, and REST / gRPC ratios). Needs the built
edge (`make gateway`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from launch.gateway import find_gateway
from launch.harness import start_home, stop_home
from provisioners.tiny_model import DEFAULT_MODEL_ID, TinyModelSpec, write_tiny_model


def _grpc_call(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, model: str, tokens: int, chat: bool
) -> tuple[float, float]:
    """One Generate: the prompt, or (``chat``) the one user message the OpenAI chat call
    sends, so each edge path has a gRPC twin doing the same work."""
    request = orchestrator_pb2.GenerateRequest(
        model_id=model,
        sampling=common_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True, seed=1),
    )
    if chat:
        request.messages.add(role=orchestrator_pb2.ROLE_USER, content="Hello there")
    else:
        request.prompt = "Hello there"
    started = time.perf_counter()
    first = 0.0
    for response in stub.Generate(request, timeout=120):
        kind = response.event.WhichOneof("kind")
        if kind == "token" and not first:
            first = time.perf_counter()
        if kind == "finished":
            assert response.event.finished.tokens_out == tokens
    ended = time.perf_counter()
    return (first - started) * 1000, (ended - started) * 1000


def _rest_call(conn: http.client.HTTPConnection, model: str, tokens: int) -> tuple[float, float]:
    body = json.dumps(
        {
            "model_id": model,
            "prompt": "Hello there",
            "sampling": {"max_tokens": tokens, "ignore_eos": True, "seed": 1},
        }
    )
    started = time.perf_counter()
    conn.request("POST", "/v1/generate", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    first = 0.0
    while line := response.readline():
        event = json.loads(line)["result"]["event"]
        if "token" in event and not first:
            first = time.perf_counter()
        if "finished" in event:
            assert event["finished"]["tokens_out"] == tokens
    ended = time.perf_counter()
    return (first - started) * 1000, (ended - started) * 1000


def _openai_call(
    conn: http.client.HTTPConnection, model: str, tokens: int, route: str
) -> tuple[float, float]:
    """One streamed OpenAI call (``completions``: the same prompt as the others; ``chat``: one
    user message, rendered with the model's template). SSE lines are read as they come."""
    body: dict[str, object] = {
        "model": model,
        "max_tokens": tokens,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if route == "chat":
        body["messages"] = [{"role": "user", "content": "Hello there"}]
        path = "/openai/v1/chat/completions"
    else:
        body["prompt"] = "Hello there"
        path = "/openai/v1/completions"
    started = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    first = 0.0
    usage = None
    while line := response.readline():
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[len(b"data: ") :])
        for choice in chunk["choices"]:
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text and not first:
                first = time.perf_counter()
        usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    assert usage is not None and usage["completion_tokens"] == tokens
    return (first - started) * 1000, (ended - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", choices=["tiny", "170m"], default="tiny")
    args = parser.parse_args()
    if find_gateway() is None:
        print("llorch-gateway is not built: run `make gateway`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="llorch-bench-gateway-") as tmp:
        data_dir = Path(tmp)
        models: dict[str, Path] = {}
        model_id = DEFAULT_MODEL_ID
        if args.model == "170m":
            model_id = "bench-170m"
            models[model_id] = write_tiny_model(data_dir / "bench-170m.gguf", TinyModelSpec.bench())
        proc, address = start_home(
            data_dir / "home",
            [{"pool_id": "cpu-0", "model_id": model_id}],
            models,
            GATEWAY_LISTEN="127.0.0.1:0",
        )
        try:
            endpoints = json.loads((data_dir / "home" / "run" / "endpoints.json").read_text())
            host, port = endpoints["gateway"].removeprefix("http://").rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            with grpc.insecure_channel(address) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                for _ in range(3):  # warm every path (connections, caches)
                    _grpc_call(stub, model_id, args.tokens, chat=False)
                    _grpc_call(stub, model_id, args.tokens, chat=True)
                    _rest_call(conn, model_id, args.tokens)
                    _openai_call(conn, model_id, args.tokens, "completions")
                    _openai_call(conn, model_id, args.tokens, "chat")
                grpc_runs, grpc_chat_runs, rest_runs = [], [], []
                completion_runs, chat_runs = [], []
                for _ in range(args.runs):
                    grpc_runs.append(_grpc_call(stub, model_id, args.tokens, chat=False))
                    grpc_chat_runs.append(_grpc_call(stub, model_id, args.tokens, chat=True))
                    rest_runs.append(_rest_call(conn, model_id, args.tokens))
                    completion_runs.append(_openai_call(conn, model_id, args.tokens, "completions"))
                    chat_runs.append(_openai_call(conn, model_id, args.tokens, "chat"))
            conn.close()
        finally:
            stop_home(proc)

    def median(runs: list[tuple[float, float]], i: int) -> float:
        return round(statistics.median(r[i] for r in runs), 2)

    figures = {
        "bench": "gateway",
        "model": model_id,
        "runs": args.runs,
        "tokens": args.tokens,
    }
    # Each edge path beside its gRPC twin: the prompt's, or the same chat message's.
    paths = {
        "grpc": ("gRPC prompt", grpc_runs, ""),
        "grpc_chat": ("gRPC chat", grpc_chat_runs, ""),
        "rest": ("REST (NDJSON)", rest_runs, "grpc"),
        "openai_completions": ("OpenAI completions", completion_runs, "grpc"),
        "openai_chat": ("OpenAI chat", chat_runs, "grpc_chat"),
    }
    for kind, (_, runs, _) in paths.items():
        figures[f"{kind}_ttft_ms"] = median(runs, 0)
        figures[f"{kind}_total_ms"] = median(runs, 1)
    print(f"{model_id}, {args.tokens} tokens, median of {args.runs} calls each:")
    for kind, (label, _, twin) in paths.items():
        ttft, total = figures[f"{kind}_ttft_ms"], figures[f"{kind}_total_ms"]
        ratio = ""
        if twin:
            for what in ("ttft", "total"):
                figures[f"{kind}_over_grpc_{what}"] = round(
                    figures[f"{kind}_{what}_ms"] / figures[f"{twin}_{what}_ms"], 2
                )
            ratio = (
                f"   / {paths[twin][0]}: first {figures[f'{kind}_over_grpc_ttft']}x, "
                f"all {figures[f'{kind}_over_grpc_total']}x"
            )
        print(f"  {label:<19} first token {ttft:8.2f} ms   all {total:8.2f} ms{ratio}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``llorch generate``: stream one task's tokens from the orchestrator."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import grpc

from launch.cli.common import ORCHESTRATOR, call, orchestrator_address


def add_parsers(sub: Any) -> None:
    """Adds ``generate``."""
    gen = sub.add_parser(
        "generate", parents=[ORCHESTRATOR], help="generate text and print tokens as they arrive"
    )
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, help="catalog id of the model")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate max_tokens even past the model's end-of-generation tokens",
    )
    gen.add_argument("--priority", choices=["interactive", "batch"], default="interactive")
    gen.add_argument("--timeout", type=float, help="deadline in seconds")
    gen.add_argument("--json", action="store_true", help="print every event as a JSON line")
    gen.set_defaults(run=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from llorch.common.v1 import common_pb2
    from llorch.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    sampling = common_pb2.SamplingParams(stop=args.stop, ignore_eos=args.ignore_eos)
    for field in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(sampling, field, value)
    request = orchestrator_pb2.GenerateRequest(
        model_id=args.model,
        prompt=args.prompt,
        sampling=sampling,
        priority=common_pb2.PRIORITY_BATCH
        if args.priority == "batch"
        else common_pb2.PRIORITY_INTERACTIVE,
    )

    async def run(channel: grpc.aio.Channel) -> None:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        started = time.perf_counter()
        try:
            async for response in stub.Generate(request, timeout=args.timeout):
                event = response.event
                if args.json:
                    print(json_format.MessageToJson(event, indent=None), flush=True)
                    continue
                kind = event.WhichOneof("kind")
                if kind == "token":
                    sys.stdout.write(event.token.text)
                    sys.stdout.flush()
                elif kind == "finished":
                    f = event.finished
                    print()
                    print(
                        f"[{f.tokens_out} tokens, ttft {f.ttft_ms:.1f} ms, "
                        f"total {(time.perf_counter() - started) * 1000:.0f} ms]",
                        file=sys.stderr,
                    )
        except grpc.aio.AioRpcError:
            if not args.json:
                print()  # end the line of tokens before the error
            raise

    return call(orchestrator_address(args), run)

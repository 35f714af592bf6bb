"""``llorch chat MODEL``: a conversation with a model, rendered with its own chat template.

Each line read from stdin is the user's next message; the answer streams back as it is
generated and joins the conversation, so the next turn sees all of it. An empty line is
skipped; ``/reset`` starts the conversation again; end of input (Ctrl-D) ends it. A refused turn
(a message the template refuses, say) prints its error and is left out of the conversation.

``--json`` is for scripts: the same conversation, one line of JSON per answer (content, finish
reason, token counts) on stdout, and the first error ends the command with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from launch.cli.common import ORCHESTRATOR, call, failed, orchestrator_address
from mesh.errors import LlorchError, UnavailableError


def add_parsers(sub: Any) -> None:
    """Adds ``chat``."""
    chat = sub.add_parser(
        "chat",
        parents=[ORCHESTRATOR],
        help="talk with a model: stdin lines are your turns, answers stream back",
    )
    chat.add_argument("model", help="catalog id of the model")
    chat.add_argument("--system", help="a system message that opens the conversation")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--top-k", type=int)
    chat.add_argument("--seed", type=int)
    chat.add_argument(
        "--schema",
        metavar="FILE",
        type=Path,
        help="a JSON Schema every answer must match (enforced while sampling)",
    )
    chat.add_argument(
        "--json", action="store_true", help="print each answer as one JSON line (for scripts)"
    )
    chat.set_defaults(run=_cmd_chat)


def _cmd_chat(args: argparse.Namespace) -> int:
    from llorch.common.v1 import common_pb2
    from llorch.orchestrator.v1 import orchestrator_pb2 as pb
    from llorch.orchestrator.v1 import orchestrator_pb2_grpc

    sampling = common_pb2.SamplingParams()
    for field in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(sampling, field, value)
    response_format = pb.ResponseFormat()
    if args.schema is not None:
        try:
            response_format.json_schema.schema = args.schema.read_text()
        except OSError as exc:
            return failed("INVALID_ARGUMENT", f"--schema: {exc}")
    opening = [] if not args.system else [pb.ChatMessage(role=pb.ROLE_SYSTEM, content=args.system)]
    interactive = sys.stdin.isatty() and not args.json

    async def run(channel: grpc.aio.Channel) -> int:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        conversation = list(opening)
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return 0
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.strip() == "/reset":
                conversation = list(opening)
                continue
            turn = [*conversation, pb.ChatMessage(role=pb.ROLE_USER, content=text)]
            request = pb.GenerateRequest(
                model_id=args.model,
                messages=turn,
                sampling=sampling,
                response_format=response_format,
            )
            try:
                answer, finished = await _answer(stub, request, stream=not args.json)
            except grpc.aio.AioRpcError as err:
                if args.json:
                    raise
                failed(err.code().name, err.details() or "")
                continue
            except LlorchError as err:
                if args.json:
                    raise
                failed(err.code.name, str(err))
                continue
            conversation = [*turn, pb.ChatMessage(role=pb.ROLE_ASSISTANT, content=answer)]
            if args.json:
                print(
                    json.dumps(
                        {
                            "content": answer,
                            "finish_reason": common_pb2.FinishReason.Name(finished.finish_reason)
                            .removeprefix("FINISH_REASON_")
                            .lower(),
                            "tokens_in": finished.tokens_in,
                            "tokens_out": finished.tokens_out,
                        }
                    ),
                    flush=True,
                )

    return call(orchestrator_address(args), run)


async def _answer(stub: Any, request: Any, *, stream: bool) -> tuple[str, Any]:
    """The answer's text and its Finished event; with ``stream``, its tokens are printed as
    they come.

    Raises:
        UnavailableError: the stream ended without its Finished event (the answer is partial).
    """
    parts: list[str] = []
    finished = None
    try:
        async for response in stub.Generate(request):
            event = response.event
            kind = event.WhichOneof("kind")
            if kind == "token":
                parts.append(event.token.text)
                if stream:
                    sys.stdout.write(event.token.text)
                    sys.stdout.flush()
            elif kind == "finished":
                finished = event.finished
    finally:
        if stream and parts:
            print(flush=True)
    if finished is None:
        raise UnavailableError("the answer's stream ended before it finished; ask again")
    return "".join(parts), finished

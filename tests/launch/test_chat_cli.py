"""``llorch chat``'s reading of an answer stream (launch.cli.chat._answer).

The stub here is a stand-in, and says why: the orchestrator always ends a Generate stream with
Finished or a status, so the stream that ends without either (a proxy cutting it short) cannot
be had from the real server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import orchestrator_pb2 as pb

from launch.cli.chat import _answer
from mesh.errors import UnavailableError


class _Stub:
    def __init__(self, *events: pb.TaskEvent) -> None:
        self._events = events

    async def Generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        for event in self._events:
            yield pb.GenerateResponse(event=event)


def _token(text: str) -> pb.TaskEvent:
    return pb.TaskEvent(token=common_pb2.Token(text=text))


async def test_an_answer_is_its_tokens_and_its_finished_event() -> None:
    finished = pb.TaskEvent(
        finished=common_pb2.Finished(
            finish_reason=common_pb2.FINISH_REASON_STOP, tokens_in=3, tokens_out=2
        )
    )
    text, end = await _answer(_Stub(_token("a"), _token("b"), finished), None, stream=False)
    assert text == "ab" and end.tokens_out == 2


async def test_a_stream_without_its_finished_event_is_an_error_not_a_crash() -> None:
    with pytest.raises(UnavailableError, match="before it finished"):
        await _answer(_Stub(_token("a")), None, stream=False)

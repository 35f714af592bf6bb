"""The worker's pipes: token merging within the window, urgent first tokens and endings, and
commands read between steps. Real pipes; the window is set so that timing cannot decide."""

from __future__ import annotations

import io
import os

from poolmanager.worker.channel import CommandReader, EventWriter
from poolmanager.worker.protocol import (
    Cancel,
    Cancelled,
    Done,
    Event,
    Execute,
    Tokens,
    decode_event,
    encode,
)


def written(buffer: io.BytesIO) -> list[Event]:
    lines = buffer.getvalue().splitlines()
    buffer.seek(0)
    buffer.truncate()
    return [decode_event(line) for line in lines]


def done(exec_id: str) -> Done:
    return Done(
        id=exec_id,
        reason="length",
        tokens_in=1,
        tokens_out=3,
        ttft_ms=1,
        decode_ms=1,
        started_ns=0,
        first_token_ns=0,
        ended_ns=0,
    )


def test_first_tokens_go_at_once_later_ones_merge_until_the_end() -> None:
    buffer = io.BytesIO()
    out = EventWriter(buffer, window_s=3600)  # a window no test outlives
    out.send([Tokens("a", 0, (1,), "x"), Tokens("b", 0, (9,), "p")])
    assert written(buffer) == [Tokens("a", 0, (1,), "x"), Tokens("b", 0, (9,), "p")]
    out.send([Tokens("a", 1, (2,), "y")])
    out.send([Tokens("a", 2, (3,), "z"), Tokens("b", 1, (8,), "q")])
    assert written(buffer) == [] and out.holding
    out.send([done("a")])  # the end flushes a's merged tokens first; b's keep waiting
    assert written(buffer) == [Tokens("a", 1, (2, 3), "yz"), done("a")]
    out.send([Cancelled("b")])
    assert written(buffer) == [Tokens("b", 1, (8,), "q"), Cancelled("b")]
    assert not out.holding


def test_a_zero_window_sends_every_token_alone() -> None:
    buffer = io.BytesIO()
    out = EventWriter(buffer, window_s=0)
    for i in range(3):
        out.send([Tokens("a", i, (i,), str(i))])
    assert [e.index for e in written(buffer)] == [0, 1, 2]  # type: ignore[union-attr]


def test_flush_writes_what_is_held() -> None:
    buffer = io.BytesIO()
    out = EventWriter(buffer, window_s=3600)
    out.send([Tokens("a", 0, (1,), "x")])
    out.send([Tokens("a", 1, (2,), "y")])
    written(buffer)
    out.flush()
    assert written(buffer) == [Tokens("a", 1, (2,), "y")]


def test_commands_are_read_whole_across_partial_writes_and_eof_is_seen() -> None:
    read_fd, write_fd = os.pipe()
    reader = CommandReader(read_fd)
    try:
        assert reader.poll() == []  # nothing there: no blocking
        line = encode(Execute(id="e", prompt="long " * 1000, max_tokens=2))
        os.write(write_fd, line[:100])
        assert reader.poll() == []  # half a line waits for the rest
        os.write(write_fd, line[100:] + encode(Cancel("e")) + b"garbage\n")
        got = reader.wait()
        assert [type(c).__name__ for c in got] == ["Execute", "Cancel"]  # the bad line is dropped
        os.close(write_fd)
        assert reader.wait() == [] and reader.eof
    finally:
        os.close(read_fd)

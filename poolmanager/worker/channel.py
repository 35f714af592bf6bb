"""The worker's two pipes: commands in (stdin), events out (a private copy of stdout).

No threads: the batching loop reads commands itself between steps (blocking only when it has
nothing to do) and writes each step's events in one write. Tokens after an execution's first
wait up to ``window_s`` to travel with the ones after them, merged into one event: a fast engine
then costs every hop of the mesh a message per window instead of one per token, and a slower one
is not delayed at all (its steps are longer than the window). An execution's first tokens and
its end go out at once.
"""

from __future__ import annotations

import os
import select
import time
from typing import IO

from poolmanager.worker import log
from poolmanager.worker.protocol import (
    TERMINAL,
    Command,
    Event,
    ProtocolError,
    Tokens,
    decode_command,
    encode,
)


class CommandReader:
    """Command lines from the pool manager, read from ``fd`` without a thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self.eof = False

    def wait(self) -> list[Command]:
        """Blocks until at least one command arrives (or EOF)."""
        while not self.eof:
            commands = self._read(block=True)
            if commands:
                return commands
        return []

    def poll(self) -> list[Command]:
        """Commands already waiting in the pipe, without blocking."""
        return [] if self.eof else self._read(block=False)

    def _read(self, *, block: bool) -> list[Command]:
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
                commands.append(decode_command(line))
            except ProtocolError as exc:
                log.log("ERROR", f"bad command line from the pool manager: {exc}")
        return commands


class EventWriter:
    """Events to the pool manager, tokens merged per execution within ``window_s``."""

    def __init__(self, stream: IO[bytes], window_s: float) -> None:
        self._stream = stream
        self.window_s = window_s
        self._pending: dict[str, Tokens] = {}  # merged tokens not yet written, by execution
        self._last_write: dict[str, float] = {}

    def send(self, events: list[Event]) -> None:
        """Writes what is due now (in one write) and keeps later tokens for a later call."""
        now = time.perf_counter()
        due: list[Event] = []
        for event in events:
            if isinstance(event, Tokens):
                held = self._pending.pop(event.id, None)
                if held is not None:
                    event = Tokens(
                        event.id, held.index, held.ids + event.ids, held.text + event.text
                    )
                first = event.id not in self._last_write
                if first or now - self._last_write[event.id] >= self.window_s:
                    due.append(event)
                    self._last_write[event.id] = now
                else:
                    self._pending[event.id] = event
            else:
                if isinstance(event, TERMINAL):
                    held = self._pending.pop(event.id, None)
                    if held is not None:
                        due.append(held)
                    self._last_write.pop(event.id, None)
                due.append(event)
        for exec_id, held in list(self._pending.items()):
            if now - self._last_write[exec_id] >= self.window_s:
                due.append(held)
                del self._pending[exec_id]
                self._last_write[exec_id] = now
        if due:
            self._write(due)

    def flush(self) -> None:
        """Writes every held token now."""
        held, self._pending = list(self._pending.values()), {}
        if held:
            self._write(list(held))

    @property
    def holding(self) -> bool:
        """Whether tokens wait for their window."""
        return bool(self._pending)

    def next_due_s(self) -> float:
        """Seconds until the earliest held token is due (0 when none is held)."""
        if not self._pending:
            return 0.0
        now = time.perf_counter()
        return max(0.0, min(self._last_write[i] + self.window_s - now for i in self._pending))

    def _write(self, events: list[Event]) -> None:
        self._stream.write(b"".join(encode(e) for e in events))
        self._stream.flush()

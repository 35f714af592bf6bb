"""Generated tokens to streamed text, one ``TextStream`` per sequence. Pure.

Each token's bytes go through an incremental UTF-8 decoder (a character split across tokens is
emitted once whole) and a ``StopMatcher`` (text that may begin a stop sequence is held until it
is known not to be one). Token ids travel with their text: a token whose bytes end mid-character,
or whose text may begin a stop sequence, waits for the tokens that complete it.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


class StopMatcher:
    """Holds back text that may be the start of a stop sequence.

    ``push`` returns the text that is safe to emit; once a stop sequence appears, ``stopped`` is
    set and the text before it is returned.
    """

    def __init__(self, stops: list[str] | tuple[str, ...]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Takes the next text; returns what is safe to emit."""
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
        """The held text (the stream ended without a stop)."""
        out, self._held = self._held, ""
        return out


@dataclass(frozen=True)
class TextChunk:
    """Tokens ready to go out, starting at ``index``, with their text."""

    index: int
    ids: tuple[int, ...]
    text: str


class TextStream:
    """One sequence's tokens → text chunks that are UTF-8 complete and free of stop sequences."""

    def __init__(self, stops: list[str] | tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)
        self._ids: list[int] = []
        self._text = ""
        self.sent = 0
        """Tokens emitted so far (the index of the next chunk)."""

    @property
    def stopped(self) -> bool:
        """A stop sequence appeared: the stream is over."""
        return self._stops.stopped

    def push(self, token: int, piece: bytes) -> TextChunk | None:
        """Takes one token and its bytes; returns the chunk that became safe, if any. After a
        stop sequence it returns the text before the stop (and ``stopped`` is set)."""
        self._ids.append(token)
        self._text += self._stops.push(self._decoder.decode(piece))
        if self._stops.stopped:
            return self._take()
        if self._text and not self._stops.holding:
            return self._take()
        return None

    def finish(self) -> TextChunk | None:
        """The stream ended (length, EOG): whatever is held goes out."""
        if not self._stops.stopped:
            self._text += self._stops.flush() + self._decoder.decode(b"", final=True)
        return self._take()

    def _take(self) -> TextChunk | None:
        if not self._ids:
            return None
        chunk = TextChunk(self.sent, tuple(self._ids), self._text)
        self.sent += len(self._ids)
        self._ids, self._text = [], ""
        return chunk

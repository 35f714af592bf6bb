"""The worker's prefix cache: finished sequences left resident in the KV cache, so that a new
execution whose prompt starts the same way copies those cells instead of reading them again.

Bookkeeping only; the batching engine (poolmanager.worker.batching) makes the llama.cpp calls.
An entry is a sequence id whose cells hold ``tokens`` at positions 0..len-1 and that no
execution is running on. In the unified KV cache a copy (``llama_memory_seq_cp``) adds the new
sequence id to the same cells: nothing is computed or moved, and the cells are shared until one
side frees them. Entries are evicted least recently used: when their ids are wanted, when
their cells are wanted, or past ``capacity``. An entry is only ever the source of a copy, so no
execution depends on it staying; a running sequence keeps the cells it copied whatever happens
to the entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mesh.prefix import MAX_SUMMARY_HASHES, prefix_block_hashes

MIN_REUSE_TOKENS = 8
"""Shorter common starts (a BOS and a word) are not worth an entry's bookkeeping."""

_BLOCK = 256
"""Tokens compared at once (list slices compare in C) before the last block is walked."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common start of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i + _BLOCK <= n and a[i : i + _BLOCK] == b[i : i + _BLOCK]:
        i += _BLOCK
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Cells:
    """Identity of one holder's cells (a running sequence's, handed on to its entry): a copy
    made from them is counted as shared while this holder is alive."""

    __slots__ = ()


@dataclass
class Entry:
    """A resident finished sequence."""

    seq_id: int
    tokens: list[int]
    """The tokens in its cells, positions 0..len-1."""
    text: str
    """The text of those tokens as the execution had it (prompt, then what was generated)."""
    cells: Cells = field(default_factory=Cells)
    hashes: list[int] = field(default_factory=list)


class PrefixCache:
    """Resident entries in least-recently-used order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # by sequence id, oldest first
        self.version = 0
        """Changes whenever the set of entries does (the worker reports it then)."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._entries

    @property
    def cells(self) -> int:
        """Cells the entries hold, counting shared ones once per entry (an upper bound)."""
        return sum(len(e.tokens) for e in self._entries.values())

    def alive(self) -> set[Cells]:
        """The ``Cells`` of every entry."""
        return {e.cells for e in self._entries.values()}

    def entries(self) -> Iterable[Entry]:
        """Oldest first."""
        return self._entries.values()

    def best(self, prompt: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest start with ``prompt``, and that length."""
        best: Entry | None = None
        length = 0
        for entry in self._entries.values():
            n = common_prefix(prompt, entry.tokens)
            if n > length:
                best, length = entry, n
        return best, length

    def touch(self, entry: Entry) -> None:
        """Marks an entry used now."""
        self._entries.move_to_end(entry.seq_id)

    def add(self, entry: Entry) -> list[Entry]:
        """Adds an entry; returns those it makes redundant or pushes out, to be freed.

        An older entry whose tokens start the new one is redundant (the new one serves every
        prompt it would, as far or further); a new entry that starts an older one is itself
        redundant and returned at once."""
        dropped: list[Entry] = []
        if self.capacity == 0:
            return [entry]
        for old in list(self._entries.values()):
            n = common_prefix(old.tokens, entry.tokens)
            if n == len(entry.tokens):
                self.touch(old)
                if dropped:
                    self.version += 1
                return [*dropped, entry]
            if n == len(old.tokens):
                dropped.append(self._entries.pop(old.seq_id))
        entry.hashes = prefix_block_hashes(entry.text)
        self._entries[entry.seq_id] = entry
        while len(self._entries) > self.capacity:
            dropped.append(self._entries.popitem(last=False)[1])
        self.version += 1
        return dropped

    def take(self, seq_id: int) -> Entry:
        """Removes an entry (its sequence id is reused or freed)."""
        entry = self._entries.pop(seq_id)
        self.version += 1
        return entry

    def oldest(self, *, keep: Entry | None = None) -> Entry | None:
        """The least recently used entry other than ``keep``, if any."""
        for entry in self._entries.values():
            if entry is not keep:
                return entry
        return None

    def summary(self, extra: Iterable[list[int]] = ()) -> tuple[int, ...]:
        """Block hashes of the entries (newest first) and of ``extra`` (running sequences'
        prompts, first), at most ``MAX_SUMMARY_HASHES`` and each once."""
        seen: dict[int, None] = {}
        for hashes in [*extra, *(e.hashes for e in reversed(self._entries.values()))]:
            for h in hashes:
                if len(seen) >= MAX_SUMMARY_HASHES:
                    return tuple(seen)
                seen.setdefault(h, None)
        return tuple(seen)

"""Prompt prefixes as chained block hashes: how a worker says which prompt starts it holds warm,
and how the orchestrator finds the pool holding the longest start of a task's prompt, without a
tokenizer on either side of the comparison.

The text (UTF-8) is cut into blocks of ``PREFIX_BLOCK_BYTES``; hash ``k`` covers blocks 0..k
(each hash is of the one before and the block), so equal hashes mean equal text from the start
to the end of that block. Only whole blocks count: the last partial block of a text has no hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection

PREFIX_BLOCK_BYTES = 256
"""Bytes of text per block: ~64 tokens of English; the granularity of prefix placement."""

MAX_SUMMARY_HASHES = 1024
"""Most hashes a pool reports (8 KiB): the newest prefixes first."""

BYTES_PER_TOKEN = 4
"""What placement assumes a token of prompt text is, to turn cached bytes into prefill saved."""


def prefix_block_hashes(text: str, *, max_blocks: int | None = None) -> list[int]:
    """The chained hash of every whole block of ``text``, first block first (unsigned 64-bit)."""
    data = text.encode("utf-8")
    blocks = len(data) // PREFIX_BLOCK_BYTES
    if max_blocks is not None:
        blocks = min(blocks, max_blocks)
    out: list[int] = []
    digest = b""
    for k in range(blocks):
        start = k * PREFIX_BLOCK_BYTES
        digest = hashlib.blake2b(
            digest + data[start : start + PREFIX_BLOCK_BYTES], digest_size=8
        ).digest()
        out.append(int.from_bytes(digest, "big"))
    return out


def hit_blocks(hashes: list[int], held: Collection[int]) -> int:
    """How many leading blocks of a text (its ``prefix_block_hashes``) a pool holds: the
    longest k with hash k-1 in ``held`` (a chained hash stands for every block before it)."""
    for k in range(len(hashes), 0, -1):
        if hashes[k - 1] in held:
            return k
    return 0

"""Conversions of ``llorch.common.v1`` values that more than one service uses."""

from __future__ import annotations

import math
from collections.abc import Sequence

from llorch.common.v1 import common_pb2

from mesh.errors import InvalidArgumentError

MAX_STOP_SEQUENCES = 8
MAX_STOP_BYTES = 256
MAX_GRAMMAR_BYTES = 256 * 1024
"""Largest GBNF grammar an execution may carry (a response format compiles to one)."""

FINISH_REASON_TO_PB = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "stop_sequence": common_pb2.FINISH_REASON_STOP_SEQUENCE,
    "length": common_pb2.FINISH_REASON_LENGTH,
}
"""Finish reasons as the domain names them → the protobuf enum."""

FINISH_REASON_FROM_PB = {v: k for k, v in FINISH_REASON_TO_PB.items()}
"""The protobuf enum → finish reasons as the domain names them."""


def check_sampling(temperature: float, top_p: float, top_k: int, stop: Sequence[str]) -> None:
    """Raises INVALID_ARGUMENT naming the ``sampling.*`` field that is out of range."""
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgumentError("sampling.temperature", "must be >= 0")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidArgumentError("sampling.top_p", "must be in (0, 1]")
    if top_k < 0:
        raise InvalidArgumentError("sampling.top_k", "must be >= 0")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgumentError("sampling.stop", f"at most {MAX_STOP_SEQUENCES} sequences")
    for i, sequence in enumerate(stop):
        if not 0 < len(sequence.encode()) <= MAX_STOP_BYTES:
            raise InvalidArgumentError(f"sampling.stop[{i}]", f"must be 1-{MAX_STOP_BYTES} bytes")

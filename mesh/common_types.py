"""Conversions of ``llorch.common.v1`` values that more than one service uses."""

from __future__ import annotations

from llorch.common.v1 import common_pb2

FINISH_REASON_TO_PB = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "stop_sequence": common_pb2.FINISH_REASON_STOP_SEQUENCE,
    "length": common_pb2.FINISH_REASON_LENGTH,
}
"""Finish reasons as the domain names them → the protobuf enum."""

FINISH_REASON_FROM_PB = {v: k for k, v in FINISH_REASON_TO_PB.items()}
"""The protobuf enum → finish reasons as the domain names them."""

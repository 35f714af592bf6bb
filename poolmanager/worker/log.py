"""The worker's log: JSON lines on stderr, which the pool manager passes on.

The worker stays free of the logging and OpenTelemetry machinery of the services (it starts in
milliseconds and imports little); its lines have the same shape as theirs.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
_min_level = {"value": 20}


def set_level(level: str) -> None:
    """Lowest level written from now on."""
    _min_level["value"] = LEVELS[level]


def log(level: str, msg: str, **fields: Any) -> None:
    """Writes one line (fields that are empty are left out). Never a prompt or a key."""
    if LEVELS[level] < _min_level["value"]:
        return
    entry = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "level": level,
        "logger": "llorch.worker",
        "msg": msg,
        **{k: v for k, v in fields.items() if v or v == 0},
    }
    print(json.dumps(entry), file=sys.stderr, flush=True)


def trace_ids(traceparent: str) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of a W3C traceparent (``00-<trace>-<span>-<flags>``), for
    log lines; none when it is missing or not in that form. The pool manager made it with the
    OpenTelemetry propagator; the worker only reads it."""
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return {}
    return {"trace_id": parts[1], "span_id": parts[2]}

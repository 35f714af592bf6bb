"""Structured logging shared by every service.

Each record carries the correlation id, task id, pool id and node id of the work it belongs to,
taken from context variables that the server interceptor and the task runners set, and the
``trace_id`` and ``span_id`` of the current OpenTelemetry span when tracing is on. Lines are JSON
(one object a line) by default, or plain text for people at a terminal.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace

correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")
task_id: contextvars.ContextVar[str] = contextvars.ContextVar("task_id", default="")
pool_id: contextvars.ContextVar[str] = contextvars.ContextVar("pool_id", default="")
node_id: contextvars.ContextVar[str] = contextvars.ContextVar("node_id", default="")

_CONTEXT_FIELDS = (
    ("correlation_id", correlation_id),
    ("task_id", task_id),
    ("pool_id", pool_id),
    ("node_id", node_id),
)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, var.get())
        span = trace.get_current_span().get_span_context()
        if span.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = f"{span.trace_id:032x}"
            record.span_id = f"{span.span_id:016x}"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the context ids that are set, extras."""

    _RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._RESERVED and value not in ("", None):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the context ids appended."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        ids = " ".join(
            f"{name}={getattr(record, name)}"
            for name, _ in _CONTEXT_FIELDS
            if getattr(record, name, "")
        )
        if ids:
            line += f"  [{ids}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Sends every ``llorch`` log record to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("llorch")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``llorch`` tree, e.g. ``get_logger("orchestrator")``."""
    return logging.getLogger(f"llorch.{name}")

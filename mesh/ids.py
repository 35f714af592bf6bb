"""Validated names shared by every service (model ids, pool ids, node ids)."""

from __future__ import annotations

import re

from mesh.errors import InvalidArgumentError

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,127}"
_NAME_RE = re.compile(NAME_PATTERN)


def is_valid_name(value: str) -> bool:
    """Whether ``value`` is a valid model, pool or node name (never a path)."""
    return _NAME_RE.fullmatch(value) is not None and ".." not in value


def check_name(value: str, field: str) -> str:
    """Returns ``value`` or raises INVALID_ARGUMENT naming ``field``."""
    if not value:
        raise InvalidArgumentError(field, "is required")
    if not is_valid_name(value):
        raise InvalidArgumentError(
            field,
            "must be 1-128 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or "
            "digit, without '..'",
        )
    return value

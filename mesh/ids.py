"""Validated names shared by every service (model ids, pool ids, node ids), and random ids."""

from __future__ import annotations

import os
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


_random_ids: list[str] = []
os.register_at_fork(after_in_child=_random_ids.clear)  # a child must not repeat its parent's


def random_id() -> str:
    """128 random bits as 32 hex digits, for task, execution and correlation ids: unguessable.

    The bits come from ``os.urandom`` 4 KiB at a time; one read per id (``uuid.uuid4``) cost
    more than a tenth of admitting a task. ``list.pop`` is atomic, so threads may share it.
    """
    try:
        return _random_ids.pop()
    except IndexError:
        block = os.urandom(4096).hex()
        _random_ids.extend(block[i : i + 32] for i in range(0, len(block), 32))
        return _random_ids.pop()

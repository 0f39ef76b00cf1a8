"""Topic and group names that every broker accepts."""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a valid topic or group name, else raise ValueError saying why.

    Portable names are 1-200 characters of letters, digits, ``.``, ``_`` and ``-``, not starting
    with ``.`` or ``-`` (the intersection of what RabbitMQ, Kafka, Redis and SQS accept).
    """
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a string, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise ValueError(
            f"invalid {kind} name {shown!r}: use 1-200 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )
    return name

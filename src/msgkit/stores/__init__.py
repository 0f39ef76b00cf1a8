"""Dedup stores for :class:`msgkit.middleware.idempotency.Idempotency`: memory, Redis and SQL.

``DedupStore`` and ``MemoryDedupStore`` import nothing beyond msgkit; ``RedisDedupStore`` (needs
``msgkit[redis]``) and ``SqlDedupStore`` (needs ``msgkit[sql]``) load their client library when
first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from msgkit.stores.base import Claim, ClaimStatus, DedupStore
from msgkit.stores.memory import MemoryDedupStore

if TYPE_CHECKING:
    from msgkit.stores.redis import RedisDedupStore
    from msgkit.stores.sql import SqlDedupStore

_LAZY = {"RedisDedupStore": "msgkit.stores.redis", "SqlDedupStore": "msgkit.stores.sql"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["Claim", "ClaimStatus", "DedupStore", "MemoryDedupStore", "RedisDedupStore", "SqlDedupStore"]

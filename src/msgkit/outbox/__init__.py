"""Inbox and transactional outbox on PostgreSQL or SQLite (needs ``pip install "msgkit[sql]"``).

* :class:`Outbox` adds messages to the ``msgkit_outbox`` table in your own transaction.
* :class:`OutboxRelay` publishes them at-least-once, in order per key (in-process, or
  ``msgkit outbox relay DB_URL BROKER_URL``).
* :class:`Inbox` runs a handler in a transaction that also records the message as processed.
* :func:`create_schema` creates the tables (``msgkit outbox create-schema DB_URL``);
  :func:`schema_sql` gives their DDL for your own migrations.

Importing :mod:`msgkit` does not import this package or SQLAlchemy.
"""

from __future__ import annotations

from msgkit.outbox.db import async_url, engine_from_url
from msgkit.outbox.inbox import Inbox
from msgkit.outbox.relay import OutboxRelay, RelaySettings
from msgkit.outbox.schema import create_schema, drop_schema, schema_sql
from msgkit.outbox.writer import Outbox

__all__ = [
    "Inbox",
    "Outbox",
    "OutboxRelay",
    "RelaySettings",
    "async_url",
    "create_schema",
    "drop_schema",
    "engine_from_url",
    "schema_sql",
]

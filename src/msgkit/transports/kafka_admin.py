"""Deleting a msgkit group and its topics on Kafka, with aiokafka's admin client.

aiokafka 0.14 has no ``delete_consumer_groups``: DeleteGroups goes to the group's coordinator
through the admin client's connection, like aiokafka's own admin calls do.

Whether a topic is still used is answered from two cheap sources: the retry and dead-letter
topics that other msgkit groups of the topic created, and the committed offsets of every other
consumer group (one ListGroups, then one OffsetFetch per group, a few at a time). With more
groups than :data:`MAX_GROUPS_CHECKED` the check is not cheap any more and the topic is kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import errors as kafka_errors  # type: ignore[import-untyped]
from aiokafka.protocol.admin import DeleteGroupsRequest  # type: ignore[import-untyped]
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]

from msgkit.errors import BrokerUnavailableError, MsgkitError

#: With more consumer groups than this on the cluster, a topic is kept rather than checked.
MAX_GROUPS_CHECKED = 2000
#: OffsetFetch requests in flight at once while checking other groups.
_CONCURRENCY = 16
_GROUP_NOT_EMPTY = 68
_GROUP_NOT_FOUND = 69
_UNKNOWN_TOPIC = 3
#: Coordinator loading, not available, not the coordinator: ask again.
_RETRIABLE = frozenset({14, 15, 16})


async def delete_groups(admin: Any, group_ids: Sequence[str], timeout: float) -> None:
    """Delete consumer groups (their committed offsets); a missing group is fine.

    A group whose members are still leaving (a consumer stopped a moment ago) is retried until
    ``timeout`` seconds pass; one that still has members then is an error.
    """
    deadline = time.monotonic() + timeout
    for group_id in group_ids:
        while True:
            try:
                coordinator = await admin.find_coordinator(group_id)
                response = await admin._client.send(coordinator, DeleteGroupsRequest([group_id]))
                code = dict(response.results).get(group_id, 0)
            except kafka_errors.KafkaError as exc:
                if time.monotonic() >= deadline:
                    raise BrokerUnavailableError(f"deleting consumer group {group_id!r}: {exc}") from exc
                code = -1
            if code in (0, _GROUP_NOT_FOUND):
                break
            if code != -1 and code != _GROUP_NOT_EMPTY and code not in _RETRIABLE:
                error = kafka_errors.for_code(code)
                raise MsgkitError(f"Kafka refused to delete consumer group {group_id!r}: {error.__name__}")
            if time.monotonic() >= deadline:
                if code == _GROUP_NOT_EMPTY:
                    raise MsgkitError(
                        f"consumer group {group_id!r} still has members: stop its consumers (in every process) first"
                    )
                raise BrokerUnavailableError(f"deleting consumer group {group_id!r}: error code {code}")
            await asyncio.sleep(0.2)


async def delete_topics(admin: Any, topics: Sequence[str], timeout: float) -> None:
    """Delete ``topics`` (a missing one is fine) and wait until the cluster no longer lists them,
    so that creating one of them again right away makes a new, empty topic."""
    if not topics:
        return
    try:
        response = await admin.delete_topics(list(topics), timeout_ms=int(timeout * 1000))
    except kafka_errors.KafkaError as exc:
        raise BrokerUnavailableError(f"deleting topics {list(topics)}: {exc}") from exc
    for name, code, *_ in response.topic_error_codes:
        if code not in (0, _UNKNOWN_TOPIC):
            error = kafka_errors.for_code(code)
            raise MsgkitError(f"Kafka refused to delete topic {name!r}: {error.__name__}")
    deadline = time.monotonic() + timeout
    pending = set(topics)
    while True:
        try:
            pending &= set(await admin.list_topics())
        except kafka_errors.KafkaError:
            pass  # asked again below
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise BrokerUnavailableError(f"topics {sorted(pending)} were still listed {timeout:.0f}s after deletion")
        await asyncio.sleep(0.05)


async def topic_in_use(admin: Any, topic: str, own_group: str, own_topics: Sequence[str]) -> str | None:
    """Why ``topic`` must stay (another group uses it, or that cannot be told), or None.

    Evidence of another group: a retry or dead-letter topic ``TOPIC.GROUP.retry|dlq`` that is not
    one of ``own_topics``, or committed offsets on the topic of a consumer group other than
    ``own_group``. A msgkit group that was declared with ``retry=inline`` and never consumed
    leaves neither, so it cannot be seen.
    """
    try:
        listed = await admin.list_topics()
        if topic not in listed:
            return None
        for name in listed:
            if name not in own_topics and name.startswith(f"{topic}.") and name.endswith((".retry", ".dlq")):
                return f"topic {name!r} belongs to another group of it"
        described = await admin.describe_topics([topic])
        partitions = [TopicPartition(topic, p["partition"]) for d in described for p in d["partitions"] or ()]
        groups = [g[0] for g in await admin.list_consumer_groups() if g[0] != own_group]
    except kafka_errors.KafkaError as exc:
        return f"the cluster could not be asked ({type(exc).__name__})"
    if len(groups) > MAX_GROUPS_CHECKED:
        return f"{len(groups)} consumer groups are too many to check"
    slots = asyncio.Semaphore(_CONCURRENCY)

    async def committed(group_id: str) -> bool:
        async with slots:
            offsets = await admin.list_consumer_group_offsets(group_id, partitions=partitions)
        return any(meta.offset >= 0 for meta in offsets.values())

    try:
        found = await asyncio.gather(*(committed(g) for g in groups))
    except kafka_errors.KafkaError as exc:
        return f"the offsets of other groups could not be read ({type(exc).__name__})"
    users = [g for g, uses in zip(groups, found, strict=True) if uses]
    if users:
        return f"consumer group {users[0]!r} has committed offsets on it"
    return None

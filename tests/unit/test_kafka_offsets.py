"""Offset bookkeeping and partition assignment of the Kafka transport: pure logic, no broker."""

from __future__ import annotations

import random

import pytest

from msgkit.transports.kafka_offsets import (
    Member,
    PartitionOffsets,
    Resume,
    assign,
    decode_member,
    decode_metadata,
    encode_member,
    encode_metadata,
)


def _fetch(offsets: PartitionOffsets, *numbers: int) -> list[int | None]:
    return [offsets.accept(n) for n in numbers]


def test_the_commit_point_is_the_lowest_unfinished_offset() -> None:
    offsets = PartitionOffsets(committed=10)
    assert offsets.commit_point() == 10  # nothing fetched yet: stay where the group is
    assert _fetch(offsets, 10, 11, 12, 13) == [0, 0, 0, 0]
    offsets.finish(11)
    offsets.finish(13)
    assert offsets.commit_point() == 10, "an unfinished offset below finished ones must hold the commit"
    offsets.finish(10)
    assert offsets.commit_point() == 12
    offsets.finish(12)
    assert offsets.commit_point() == 14
    assert offsets.unfinished == 0


def test_offsets_that_never_arrive_count_as_done() -> None:
    offsets = PartitionOffsets(committed=0)
    _fetch(offsets, 0, 5, 9)  # gaps: compaction or transaction markers
    for n in (0, 5, 9):
        offsets.finish(n)
    assert offsets.commit_point() == 10


def test_a_record_fetched_again_is_not_handed_out_twice() -> None:
    offsets = PartitionOffsets(committed=0)
    assert _fetch(offsets, 0, 1, 2) == [0, 0, 0]
    offsets.finish(1)
    assert _fetch(offsets, 0, 1, 2, 3) == [None, None, None, 0]


def test_without_a_commit_the_first_record_sets_the_start() -> None:
    offsets = PartitionOffsets(committed=None)
    assert offsets.commit() is None
    assert _fetch(offsets, 42) == [0]
    assert offsets.commit_point() == 42
    offsets.finish(42)
    assert offsets.commit() == (43, "")


def test_a_log_reset_below_the_commit_starts_over() -> None:
    offsets = PartitionOffsets(committed=100, metadata=encode_metadata(100, 105, [(101, 0)]))
    assert _fetch(offsets, 3, 4) == [0, 0], "records below the committed offset after a reset must be delivered"


def test_finishing_twice_or_unknown_offsets_is_harmless() -> None:
    offsets = PartitionOffsets(committed=0)
    _fetch(offsets, 0)
    assert offsets.finish(0) is True
    assert offsets.finish(0) is False
    assert offsets.finish(99) is False
    assert offsets.commit_point() == 1


def test_metadata_round_trips_unfinished_offsets_and_attempts() -> None:
    unfinished = [(100, 0), (101, 0), (102, 0), (110, 3), (111, 0), (200, 0), (300, 0), (400, 0)]
    text = encode_metadata(100, 450, unfinished)
    assert len(text) < 60, text
    assert decode_metadata(100, text) == Resume(450, dict(unfinished))


@pytest.mark.parametrize("text", ["", "some other client's note", "msgkit1;x;1", "msgkit1;5;9", "msgkit1;-1;"])
def test_foreign_or_broken_metadata_is_ignored(text: str) -> None:
    assert decode_metadata(7, text) is None


def test_metadata_that_would_be_too_long_claims_less_never_more() -> None:
    rng = random.Random(7)
    unfinished = sorted((o, 0) for o in rng.sample(range(1000, 1_000_000), 2000))
    text = encode_metadata(1000, 1_000_001, unfinished, limit=500)
    assert len(text) <= 500
    resume = decode_metadata(1000, text)
    assert resume is not None
    claimed_done = set(range(1000, resume.high)) - set(resume.redo)
    assert not claimed_done & {o for o, _ in unfinished}, "an unfinished offset was claimed done"


def test_a_new_owner_skips_what_the_previous_owner_finished() -> None:
    before = PartitionOffsets(committed=0)
    _fetch(before, *range(10))
    for n in (1, 2, 4, 5, 6, 8, 9):
        before.finish(n)
    before.set_attempts(3, 4)
    state = before.commit()
    assert state is not None
    point, metadata = state
    assert point == 0

    after = PartitionOffsets(committed=point, metadata=metadata)
    delivered = {n: a for n in range(12) if (a := after.accept(n)) is not None}
    assert delivered == {0: 0, 3: 4, 7: 0, 10: 0, 11: 0}, "only unfinished work (with its attempts) comes back"


def test_a_claim_not_yet_fetched_again_is_carried_into_the_next_commit() -> None:
    first = PartitionOffsets(committed=0)
    _fetch(first, *range(6))
    for n in (1, 2, 3, 4, 5):
        first.finish(n)
    state = first.commit()
    assert state is not None
    second = PartitionOffsets(*state)
    assert second.commit() == state, "committing before fetching must not forget the finished records"
    _fetch(second, 0)
    second.finish(0)
    assert second.commit() == (6, "")


def test_a_random_history_never_commits_past_unfinished_work() -> None:
    rng = random.Random(2024)
    offsets = PartitionOffsets(committed=0)
    pending: set[int] = set()
    next_offset = 0
    for step in range(5000):
        if rng.random() < 0.5:
            if offsets.accept(next_offset) is not None:
                pending.add(next_offset)
            next_offset += rng.choice((1, 1, 1, 2))
        elif pending:
            done = rng.choice(sorted(pending))
            pending.discard(done)
            offsets.finish(done)
        state = offsets.commit()
        if state is not None:
            point, metadata = state
            assert all(point <= p for p in pending)
            resume = decode_metadata(point, metadata)
            if resume is not None:
                assert pending <= set(resume.redo) | set(range(resume.high, next_offset + 1))
            if step % 50 == 0:  # a new owner starting from this commit gets every unfinished record
                successor = PartitionOffsets(point, metadata)
                again = {o for o in range(point, next_offset) if successor.accept(o) is not None}
                assert pending <= again


# ---------------------------------------------------------------------------------- assignment


def _members(**members: Member) -> dict[str, Member]:
    return dict(members)


def test_each_topic_is_spread_evenly_over_its_subscribers() -> None:
    topics = frozenset({"orders", "orders.g.retry"})
    result = assign({"orders": [0, 1, 2, 3], "orders.g.retry": [0, 1]}, _members(a=Member(topics), b=Member(topics)))
    for member in ("a", "b"):
        assert sorted(t for t, _ in result[member]) == ["orders", "orders", "orders.g.retry"]
    assert sorted(result["a"] + result["b"]) == [("orders", p) for p in range(4)] + [
        ("orders.g.retry", p) for p in (0, 1)
    ]


def test_partitions_with_work_in_flight_stay_with_their_owner() -> None:
    topics = frozenset({"t"})
    owned = frozenset(("t", p) for p in range(3))
    busy = frozenset({("t", 2)})
    for newcomer in ("0-first-by-id", "z-last-by-id"):
        members = {"m-old": Member(topics, owned, busy), newcomer: Member(topics)}
        result = assign({"t": [0, 1, 2]}, members)
        assert ("t", 2) in result["m-old"]
        assert len(result[newcomer]) == 1, "the newcomer gets its share of the idle partitions"


def test_owners_keep_their_partitions_up_to_a_fair_share() -> None:
    topics = frozenset({"t"})
    owned = frozenset(("t", p) for p in range(6))
    result = assign({"t": list(range(6))}, _members(x=Member(topics, owned), y=Member(topics), z=Member(topics)))
    assert len(result["x"]) == len(result["y"]) == len(result["z"]) == 2
    assert set(result["x"]) <= owned


def test_members_only_get_topics_they_subscribe_to() -> None:
    result = assign({"a": [0, 1], "b": [0]}, _members(m1=Member(frozenset({"a"})), m2=Member(frozenset({"a", "b"}))))
    assert ("b", 0) in result["m2"]
    assert all(t == "a" for t, _ in result["m1"])


def test_member_user_data_round_trips_and_garbage_means_nothing_owned() -> None:
    data = encode_member([("t", 1), ("t", 0)], [("t", 1)])
    assert decode_member(["t"], data) == Member(
        frozenset({"t"}), frozenset({("t", 0), ("t", 1)}), frozenset({("t", 1)})
    )
    assert decode_member(["t"], b"\xff not json") == Member(frozenset({"t"}))
    assert decode_member(["t"], None) == Member(frozenset({"t"}))

"""Queue priority order and the global stop flag."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conveyor.queues import (
    ALL_QUEUES,
    DEFAULT_QUEUE,
    DEFAULT_QUEUE_ORDER,
    claimable_queues,
    order_queues,
)


def test_default_order_is_urgent_first():
    assert DEFAULT_QUEUE_ORDER == ("urgent", "production", "default", "test", "dev")
    assert DEFAULT_QUEUE in DEFAULT_QUEUE_ORDER


def test_configured_order_comes_first():
    assert order_queues(["dev", "urgent", "test"], DEFAULT_QUEUE_ORDER) == [
        "urgent",
        "test",
        "dev",
    ]


def test_unknown_queues_come_after_in_the_given_order():
    wanted = ["zeta", "dev", "alpha", "urgent"]
    assert order_queues(wanted, DEFAULT_QUEUE_ORDER) == ["urgent", "dev", "zeta", "alpha"]


def test_duplicates_are_dropped():
    assert order_queues(["dev", "x", "dev", "x", "urgent"], DEFAULT_QUEUE_ORDER) == [
        "urgent",
        "dev",
        "x",
    ]


def test_an_iterator_is_accepted():
    assert order_queues(iter(["test", "urgent"]), ["urgent", "test"]) == ["urgent", "test"]


def test_custom_order():
    assert order_queues(["a", "b", "c"], ["c", "a"]) == ["c", "a", "b"]


@given(
    wanted=st.lists(st.sampled_from(["urgent", "production", "default", "test", "dev", "x", "y"])),
)
def test_order_queues_is_a_deduplicated_permutation(wanted):
    ordered = order_queues(wanted, DEFAULT_QUEUE_ORDER)
    assert sorted(ordered) == sorted(set(wanted))
    known = [q for q in ordered if q in DEFAULT_QUEUE_ORDER]
    assert ordered[: len(known)] == known
    assert known == sorted(known, key=DEFAULT_QUEUE_ORDER.index)


def test_claimable_skips_paused_queues_and_keeps_order():
    ordered = ["urgent", "default", "dev"]
    assert claimable_queues(ordered, []) == ordered
    assert claimable_queues(ordered, {"default"}) == ["urgent", "dev"]
    assert claimable_queues(ordered, ["unrelated"]) == ordered


def test_global_stop_flag_pauses_everything():
    assert ALL_QUEUES == "*"
    assert claimable_queues(["urgent", "default"], ["*"]) == []
    assert claimable_queues(["urgent", "default"], iter(["dev", "*"])) == []

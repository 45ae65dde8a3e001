"""allot: which claim candidates fit in the free slots of concurrency-limited pipelines."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conveyor.store.rows import allot


def test_unlimited_pipelines_always_fit():
    candidates = [(1, "noop"), (2, "noop"), (3, "sleep")]
    assert allot(candidates, {}) == [1, 2, 3]


def test_limited_pipeline_gets_at_most_its_free_slots_in_order():
    candidates = [(1, "spotbot"), (2, "noop"), (3, "spotbot"), (4, "spotbot"), (5, "noop")]
    assert allot(candidates, {"spotbot": 2}) == [1, 2, 3, 5]


def test_no_free_slots_means_none_of_that_pipeline():
    candidates = [(1, "spotbot"), (2, "noop")]
    assert allot(candidates, {"spotbot": 0}) == [2]
    assert allot(candidates, {"spotbot": -3}) == [2]


def test_several_limited_pipelines():
    candidates = [(1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, "b")]
    assert allot(candidates, {"a": 1, "b": 2}) == [1, 2, 4]


def test_slots_mapping_is_not_changed():
    slots = {"a": 1}
    allot([(1, "a"), (2, "a")], slots)
    assert slots == {"a": 1}


def test_nothing_to_allot():
    assert allot([], {"a": 3}) == []


@given(
    names=st.lists(st.sampled_from(["a", "b", "c"])),
    slots=st.dictionaries(st.sampled_from(["a", "b"]), st.integers(-1, 4)),
)
def test_allot_properties(names, slots):
    candidates = [(100 + i, name) for i, name in enumerate(names)]
    picked = allot(candidates, slots)
    # order kept: the picks come in claim order
    assert picked == sorted(picked)
    pipeline_of = dict(candidates)
    chosen = [(task_id, pipeline_of[task_id]) for task_id in picked]
    for name in ("a", "b", "c"):
        count = sum(1 for _, p in chosen if p == name)
        wanted = sum(1 for _, p in candidates if p == name)
        if name in slots:
            assert count == min(wanted, max(slots[name], 0))
        else:
            assert count == wanted

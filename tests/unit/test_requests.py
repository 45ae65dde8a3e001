"""Request status, its transition table, splitting params into tasks, and params hashing."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.requests import (
    REQUEST_TRANSITIONS,
    TERMINAL_REQUEST_STATUSES,
    NewRequest,
    RequestStatus,
    SplitError,
    TaskCounts,
    canonical_json,
    check_request_transition,
    derive_request_status,
    params_hash,
    request_sources,
    split_params,
)
from conveyor.tasks import TransitionError

RQ, RUN, OK, FAIL, CANC = (
    RequestStatus.REQUESTED,
    RequestStatus.RUNNING,
    RequestStatus.SUCCEEDED,
    RequestStatus.FAILED,
    RequestStatus.CANCELLED,
)


# derived status ------------------------------------------------------------


def test_statuses_are_the_stored_strings():
    assert {s.value for s in RequestStatus} == {
        "requested",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    }
    assert {s for s in RequestStatus if s.terminal} == {OK, FAIL, CANC}
    assert {OK, FAIL, CANC} == TERMINAL_REQUEST_STATUSES


@pytest.mark.parametrize(
    ("counts", "started", "expected"),
    [
        (TaskCounts(total=3), False, RQ),
        (TaskCounts(total=3), True, RUN),
        (TaskCounts(total=3, succeeded=2), True, RUN),
        (TaskCounts(total=3, succeeded=1, failed=1), True, RUN),
        (TaskCounts(total=3, succeeded=3), True, OK),
        (TaskCounts(total=3, succeeded=2, failed=1), True, FAIL),
        (TaskCounts(total=3, succeeded=1, failed=1, cancelled=1), True, CANC),
        (TaskCounts(total=2, failed=1, cancelled=1), True, CANC),
        (TaskCounts(total=1, cancelled=1), False, CANC),
        (TaskCounts(total=1, failed=1), False, FAIL),
    ],
)
def test_derive_request_status(counts, started, expected):
    assert derive_request_status(counts, started) is expected


def test_a_request_with_no_tasks_yet_is_not_finished():
    assert derive_request_status(TaskCounts(), started=False) is RQ
    assert derive_request_status(TaskCounts(), started=True) is RUN


@given(
    succeeded=st.integers(0, 5),
    failed=st.integers(0, 5),
    cancelled=st.integers(0, 5),
    unfinished=st.integers(0, 5),
    started=st.booleans(),
)
def test_derived_status_precedence(succeeded, failed, cancelled, unfinished, started):
    total = succeeded + failed + cancelled + unfinished
    counts = TaskCounts(total, succeeded, failed, cancelled)
    status = derive_request_status(counts, started)
    if total == 0 or unfinished:
        assert status is (RUN if started else RQ)
    elif cancelled:
        assert status is CANC
    elif failed:
        assert status is FAIL
    else:
        assert status is OK


def test_task_counts_finished():
    assert TaskCounts(total=9, succeeded=2, failed=3, cancelled=1).finished == 6


# transitions --------------------------------------------------------------

ALLOWED = {
    (RQ, RUN),
    (RQ, OK),
    (RQ, FAIL),
    (RQ, CANC),
    (RUN, OK),
    (RUN, FAIL),
    (RUN, CANC),
    # an operator's retry of a finished, unsuccessful request
    (FAIL, RUN),
    (FAIL, RQ),
    (CANC, RUN),
    (CANC, RQ),
}


def test_transition_table_covers_every_status():
    assert set(REQUEST_TRANSITIONS) == set(RequestStatus)


@pytest.mark.parametrize("current", list(RequestStatus))
@pytest.mark.parametrize("new", list(RequestStatus))
def test_check_request_transition(current, new):
    if current == new or (current, new) in ALLOWED:
        check_request_transition(current, new)
    else:
        with pytest.raises(TransitionError) as info:
            check_request_transition(current, new)
        assert current.value in str(info.value)
        assert new.value in str(info.value)


def test_a_succeeded_request_is_final():
    for new in set(RequestStatus) - {OK}:
        with pytest.raises(TransitionError):
            check_request_transition(OK, new)


def test_a_running_request_cannot_go_back_to_requested():
    with pytest.raises(TransitionError):
        check_request_transition(RUN, RQ)


@pytest.mark.parametrize("target", list(RequestStatus))
def test_request_sources_is_the_guard_for_a_target(target):
    assert request_sources(target) == {s for (s, t) in ALLOWED if t == target}


def test_nothing_leads_back_into_succeeded_from_a_failure():
    assert request_sources(OK) == {RQ, RUN}


# split ----------------------------------------------------------------------


def test_without_split_one_task_gets_the_whole_params():
    params = {"a": 1, "items": [1, 2]}
    assert split_params(params, None) == [params]
    assert split_params([1, 2, 3], None) == [[1, 2, 3]]


def test_one_task_per_element_with_the_other_keys_shared():
    params = {
        "site": "lab",
        "logs_to_process": [
            {"rawbinlog_bin": "a.bin", "output_dir": "out/a"},
            {"rawbinlog_bin": "b.bin", "output_dir": "out/b"},
        ],
    }
    tasks = split_params(params, "logs_to_process")
    assert tasks == [
        {"site": "lab", "rawbinlog_bin": "a.bin", "output_dir": "out/a"},
        {"site": "lab", "rawbinlog_bin": "b.bin", "output_dir": "out/b"},
    ]


def test_an_element_overrides_a_shared_key():
    tasks = split_params({"mode": "fast", "jobs": [{"mode": "slow"}, {}]}, "jobs")
    assert tasks == [{"mode": "slow"}, {"mode": "fast"}]


def test_scalar_elements_are_named_by_the_key_and_as_item():
    tasks = split_params({"files": ["x.csv", "y.csv"], "sep": ";"}, "files")
    assert tasks == [
        {"sep": ";", "files": "x.csv", "item": "x.csv"},
        {"sep": ";", "files": "y.csv", "item": "y.csv"},
    ]


def test_split_keeps_order_and_duplicates():
    tasks = split_params({"n": [3, 1, 3, 2]}, "n")
    assert [t["item"] for t in tasks] == [3, 1, 3, 2]


def test_split_does_not_change_the_submitted_params():
    params = {"shared": {"deep": [1]}, "items": [{"a": 1}, {"b": 2}]}
    before = copy.deepcopy(params)
    split_params(params, "items")
    assert params == before


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"other": [1]}, ["logs"]),
        ({"logs": "a,b"}, ["logs", "array"]),
        ({"logs": {"a": 1}}, ["logs", "array"]),
        ({"logs": None}, ["logs", "array"]),
        ({"logs": []}, ["logs", "empty"]),
        ([1, 2], ["logs"]),
        ("logs", ["logs"]),
        (None, ["logs"]),
    ],
)
def test_split_errors_name_the_key(params, words):
    with pytest.raises(SplitError) as info:
        split_params(params, "logs")
    for word in words:
        assert word in str(info.value)


def test_split_error_is_a_value_error():
    assert issubclass(SplitError, ValueError)


@given(st.lists(st.integers(), min_size=1, max_size=20))
def test_split_makes_one_task_per_element(items):
    assert len(split_params({"k": items, "shared": True}, "k")) == len(items)


# hashing ----------------------------------------------------------------------


def test_canonical_json_sorts_keys_and_is_compact():
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == '{"a":[1,{"c":3,"d":2}],"b":1}'


def test_canonical_json_keeps_unicode_and_round_trips():
    value = {"name": "café ☕", "n": 1.5}
    text = canonical_json(value)
    assert "café ☕" in text
    assert json.loads(text) == value


def test_params_hash_ignores_key_order():
    a = {"x": 1, "y": {"p": [1, 2], "q": "s"}}
    b = {"y": {"q": "s", "p": [1, 2]}, "x": 1}
    assert params_hash("spotbot", a) == params_hash("spotbot", b)


def test_params_hash_depends_on_pipeline_and_values():
    params = {"x": 1}
    assert params_hash("spotbot", params) != params_hash("noop", params)
    assert params_hash("spotbot", params) != params_hash("spotbot", {"x": 2})
    # list order is meaningful: it is the order of the tasks
    assert params_hash("p", {"l": [1, 2]}) != params_hash("p", {"l": [2, 1]})


def test_params_hash_does_not_confuse_pipeline_name_and_params():
    # the boundary between the name and the params must not shift
    assert params_hash("a", "bc") != params_hash("ab", "c")
    assert params_hash("p1", {"x": 1}) != params_hash("p", {"x": 1})


def test_params_hash_is_a_stable_hex_digest():
    digest = params_hash("p", {"x": 1})
    assert len(digest) == 64
    int(digest, 16)
    assert digest == params_hash("p", {"x": 1})


def test_new_request_hash_is_params_hash():
    new = NewRequest(
        pipeline="p",
        params={"b": 2, "a": 1},
        task_params=[{"b": 2, "a": 1}],
        queue="default",
        priority=0,
        max_attempts=1,
        timeout=None,
    )
    assert new.params_hash == params_hash("p", {"a": 1, "b": 2})


def test_a_new_requests_params_are_serialised_for_the_hash_once(monkeypatch):
    """A submit compares the hash up to three times; large params take long to serialise."""
    import conveyor.requests as requests_module

    calls = []
    real = requests_module.params_hash
    monkeypatch.setattr(requests_module, "params_hash", lambda *a: calls.append(a) or real(*a))
    new = NewRequest("p", {"items": list(range(1000))}, [], "default", 0, 1, None)
    first = new.params_hash
    assert new.params_hash == first == real("p", {"items": list(range(1000))})
    assert len(calls) == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


def _reorder(value, rand):
    """The same value with every object's keys in another order."""
    if isinstance(value, dict):
        keys = list(value)
        rand.shuffle(keys)
        return {k: _reorder(value[k], rand) for k in keys}
    if isinstance(value, list):
        return [_reorder(v, rand) for v in value]
    return value


@given(value=json_values, rand=st.randoms(use_true_random=False))
def test_params_hash_invariant_under_key_reordering(value, rand):
    reordered = _reorder(value, rand)
    assert params_hash("pipe", reordered) == params_hash("pipe", value)
    assert canonical_json(reordered) == canonical_json(value)

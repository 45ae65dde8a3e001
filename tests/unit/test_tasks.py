"""The task life-cycle table and the retry policy."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.tasks import (
    TASK_TRANSITIONS,
    TERMINAL_TASK_STATUSES,
    Progress,
    RetryPolicy,
    TaskAction,
    TaskStatus,
    TransitionError,
    backoff_delay,
    decide_retry,
    next_task_status,
    task_sources,
    task_target,
)

Q, R, S, F, C = (
    TaskStatus.QUEUED,
    TaskStatus.RUNNING,
    TaskStatus.SUCCEEDED,
    TaskStatus.FAILED,
    TaskStatus.CANCELLED,
)
A = TaskAction

# The life-cycle of the design brief, written out independently of the code's table:
# queued -> running -> succeeded | failed | cancelled; a failed attempt with retries left,
# a released task and an operator's requeue go back to queued.
EXPECTED = {
    (Q, A.CLAIM): R,
    (R, A.SUCCEED): S,
    (R, A.FAIL): F,
    (R, A.RETRY): Q,
    (R, A.RELEASE): Q,
    (Q, A.CANCEL): C,
    (R, A.CANCEL): C,
    (F, A.REQUEUE): Q,
    (C, A.REQUEUE): Q,
}


def test_statuses_are_the_stored_strings():
    assert [s.value for s in TaskStatus] == [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert TaskStatus("running") is R
    assert str(TaskStatus.FAILED) == "failed"


def test_terminal_statuses():
    assert {s for s in TaskStatus if s.terminal} == {S, F, C}
    assert {S, F, C} == TERMINAL_TASK_STATUSES
    assert not Q.terminal
    assert not R.terminal


def test_every_action_is_in_the_table():
    assert set(TASK_TRANSITIONS) == set(TaskAction)


@pytest.mark.parametrize("status", list(TaskStatus))
@pytest.mark.parametrize("action", list(TaskAction))
def test_next_task_status_follows_the_life_cycle(status, action):
    if (status, action) in EXPECTED:
        assert next_task_status(status, action) is EXPECTED[(status, action)]
    else:
        with pytest.raises(TransitionError):
            next_task_status(status, action)


def test_transition_error_is_a_value_error_naming_status_and_action():
    with pytest.raises(ValueError, match="succeeded") as info:
        next_task_status(S, A.CANCEL)
    assert "cancel" in str(info.value)


def test_a_succeeded_task_never_moves_again():
    for action in TaskAction:
        with pytest.raises(TransitionError):
            next_task_status(S, action)


@pytest.mark.parametrize("action", list(TaskAction))
def test_sources_and_target_are_the_guard_of_each_action(action):
    expected_sources = {s for (s, a) in EXPECTED if a == action}
    assert task_sources(action) == expected_sources
    targets = {t for (s, a), t in EXPECTED.items() if a == action}
    assert {task_target(action)} == targets


# retry -------------------------------------------------------------------


def test_max_attempts_is_retries_plus_the_first():
    assert RetryPolicy().max_attempts == 1
    assert RetryPolicy(retries=2).max_attempts == 3


def test_backoff_is_exponential_without_jitter():
    policy = RetryPolicy(backoff_base=1.5, backoff_factor=2.0, backoff_max=1000, jitter=0)
    delays = [backoff_delay(policy, n) for n in range(1, 6)]
    assert delays == [1.5, 3.0, 6.0, 12.0, 24.0]


def test_backoff_before_any_failure_is_the_base():
    policy = RetryPolicy(backoff_base=2.0, jitter=0)
    assert backoff_delay(policy, 0) == 2.0


def test_backoff_is_capped():
    policy = RetryPolicy(backoff_base=1, backoff_factor=2, backoff_max=10, jitter=0)
    assert backoff_delay(policy, 4) == 8
    assert backoff_delay(policy, 5) == 10
    assert backoff_delay(policy, 50) == 10


def test_backoff_stays_capped_for_very_many_attempts():
    # The cap is the promise: however many attempts were made, the wait is at most
    # backoff_max (times the jitter), never an arithmetic error.
    policy = RetryPolicy(backoff_base=1.0, backoff_factor=2.0, backoff_max=60.0, jitter=0.0)
    assert backoff_delay(policy, 5000) == 60.0


def test_backoff_with_a_seeded_random_is_reproducible():
    policy = RetryPolicy(backoff_base=10, jitter=0.5)
    first = [backoff_delay(policy, n, random.Random(7)) for n in range(1, 5)]
    again = [backoff_delay(policy, n, random.Random(7)) for n in range(1, 5)]
    assert first == again


def test_jitter_spreads_delays():
    policy = RetryPolicy(backoff_base=10, jitter=0.25)
    rand = random.Random(1)
    delays = {backoff_delay(policy, 1, rand) for _ in range(50)}
    assert len(delays) > 1
    assert all(7.5 <= d <= 12.5 for d in delays)


def test_jitter_larger_than_one_never_gives_a_negative_delay():
    policy = RetryPolicy(backoff_base=10, jitter=3.0)
    rand = random.Random(3)
    assert all(backoff_delay(policy, 1, rand) >= 0 for _ in range(200))


@given(
    base=st.floats(min_value=0, max_value=100),
    factor=st.floats(min_value=1, max_value=5),
    cap=st.floats(min_value=0, max_value=3600),
    jitter=st.floats(min_value=0, max_value=1),
    attempt=st.integers(min_value=0, max_value=60),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_within_cap_and_jitter_bounds(base, factor, cap, jitter, attempt, seed):
    policy = RetryPolicy(backoff_base=base, backoff_factor=factor, backoff_max=cap, jitter=jitter)
    delay = backoff_delay(policy, attempt, random.Random(seed))
    assert 0 <= delay <= cap * (1 + jitter) + 1e-9
    nominal = min(base * factor ** max(attempt - 1, 0), cap)
    assert nominal * (1 - jitter) - 1e-9 <= delay <= nominal * (1 + jitter) + 1e-9


def test_decide_retry_retries_while_attempts_are_left():
    policy = RetryPolicy(retries=2, backoff_base=4, jitter=0)
    first = decide_retry(1, policy.max_attempts, policy)
    assert first.action is TaskAction.RETRY
    assert first.delay == 4
    second = decide_retry(2, policy.max_attempts, policy)
    assert second.action is TaskAction.RETRY
    assert second.delay == 8


def test_decide_retry_fails_when_attempts_are_used_up():
    policy = RetryPolicy(retries=2)
    decision = decide_retry(3, 3, policy)
    assert decision.action is TaskAction.FAIL
    assert decision.delay == 0
    # a lease expiry can count an attempt past the limit: still a failure
    assert decide_retry(4, 3, policy).action is TaskAction.FAIL


def test_decide_retry_without_retries_fails_at_once():
    assert decide_retry(1, 1, RetryPolicy()).action is TaskAction.FAIL


def test_decide_retry_uses_the_given_random():
    policy = RetryPolicy(retries=5, backoff_base=10, jitter=0.5)
    a = decide_retry(1, 6, policy, random.Random(42))
    b = decide_retry(1, 6, policy, random.Random(42))
    assert a == b
    assert 5 <= a.delay <= 15


@given(attempts=st.integers(0, 200), max_attempts=st.integers(1, 101))
def test_decide_retry_retries_iff_attempts_below_max(attempts, max_attempts):
    decision = decide_retry(attempts, max_attempts, RetryPolicy(retries=max_attempts - 1))
    expected = TaskAction.RETRY if attempts < max_attempts else TaskAction.FAIL
    assert decision.action is expected
    assert decision.delay >= 0


# progress ----------------------------------------------------------------


def test_progress_fraction():
    assert Progress(3, 10).fraction == pytest.approx(0.3)
    assert Progress(12, 10).fraction == 1.0
    assert Progress(-1, 10).fraction == 0.0
    assert Progress(5).fraction is None
    assert Progress(5, 0).fraction is None

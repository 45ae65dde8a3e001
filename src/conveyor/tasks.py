"""Tasks: the unit of execution, its life-cycle and its retry policy.

Everything here is pure: the store turns these decisions into guarded updates.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_TASK_STATUSES


TERMINAL_TASK_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class TaskAction(enum.StrEnum):
    """What can happen to a task. Each action is an edge set of the life-cycle."""

    CLAIM = "claim"  # a worker takes it
    SUCCEED = "succeed"  # the attempt succeeded
    FAIL = "fail"  # the attempt failed and no attempts are left
    RETRY = "retry"  # the attempt failed (or its lease expired) and it goes back to the queue
    RELEASE = "release"  # a stopping worker hands it back without counting the attempt
    CANCEL = "cancel"  # somebody cancelled it
    REQUEUE = "requeue"  # an operator retries a finished, unsuccessful task


class TransitionError(ValueError):
    """An action that the life-cycle does not allow from the current status."""


_S = TaskStatus
TASK_TRANSITIONS: Mapping[TaskAction, tuple[frozenset[TaskStatus], TaskStatus]] = {
    TaskAction.CLAIM: (frozenset({_S.QUEUED}), _S.RUNNING),
    TaskAction.SUCCEED: (frozenset({_S.RUNNING}), _S.SUCCEEDED),
    TaskAction.FAIL: (frozenset({_S.RUNNING}), _S.FAILED),
    TaskAction.RETRY: (frozenset({_S.RUNNING}), _S.QUEUED),
    TaskAction.RELEASE: (frozenset({_S.RUNNING}), _S.QUEUED),
    TaskAction.CANCEL: (frozenset({_S.QUEUED, _S.RUNNING}), _S.CANCELLED),
    TaskAction.REQUEUE: (frozenset({_S.FAILED, _S.CANCELLED}), _S.QUEUED),
}


def task_sources(action: TaskAction) -> frozenset[TaskStatus]:
    """The statuses from which `action` is allowed: the guard of its update."""
    return TASK_TRANSITIONS[action][0]


def task_target(action: TaskAction) -> TaskStatus:
    return TASK_TRANSITIONS[action][1]


def next_task_status(current: TaskStatus, action: TaskAction) -> TaskStatus:
    sources, target = TASK_TRANSITIONS[action]
    if current not in sources:
        raise TransitionError(f"a {current.value} task cannot {action.value}")
    return target


@dataclass(frozen=True)
class RetryPolicy:
    """How failed attempts are retried: `retries` more attempts after the first,
    waiting base * factor**(n-1) seconds (capped), spread by +/- jitter."""

    retries: int = 0
    backoff_base: float = 1.0
    backoff_factor: float = 2.0
    backoff_max: float = 300.0
    jitter: float = 0.25

    @property
    def max_attempts(self) -> int:
        return self.retries + 1


@dataclass(frozen=True)
class RetryDecision:
    action: TaskAction  # RETRY or FAIL
    delay: float = 0.0


def backoff_delay(policy: RetryPolicy, attempt: int, rand: random.Random | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1`, after `attempt` failed ones."""
    try:
        raw = policy.backoff_base * policy.backoff_factor ** max(attempt - 1, 0)
    except OverflowError:
        raw = policy.backoff_max
    capped = min(raw, policy.backoff_max)
    spread = (rand or random).uniform(-policy.jitter, policy.jitter)
    return max(0.0, capped * (1.0 + spread))


def decide_retry(
    attempts: int, max_attempts: int, policy: RetryPolicy, rand: random.Random | None = None
) -> RetryDecision:
    """After a failed attempt (`attempts` made so far, including it): retry later or fail."""
    if attempts < max_attempts:
        return RetryDecision(TaskAction.RETRY, backoff_delay(policy, attempts, rand))
    return RetryDecision(TaskAction.FAIL)


@dataclass(frozen=True)
class Progress:
    current: float = 0
    total: float | None = None
    message: str | None = None

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return max(0.0, min(1.0, self.current / self.total))


NO_PROGRESS = Progress()


class Task(NamedTuple):
    """One task as stored. A tuple: workers make thousands of these a second."""

    id: int
    request_id: int
    pipeline: str
    queue: str
    priority: int
    seq: int
    params: Any
    status: TaskStatus
    attempts: int
    max_attempts: int
    timeout: float | None
    created_at: float
    available_at: float
    started_at: float | None = None
    finished_at: float | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    progress: Progress = NO_PROGRESS
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What a worker reports for one claimed task."""

    task_id: int
    action: TaskAction  # SUCCEED, FAIL, RETRY or RELEASE
    result: Any = None
    error: str | None = None
    delay: float = 0.0  # for RETRY: seconds before the task is claimable again
    # The attempt it is about (the claimed task's `attempts`): an outcome of an earlier
    # attempt, which lost its lease while the task was claimed again, is not recorded.
    # None: whichever attempt is running.
    attempt: int | None = None
    # The whole log of a quiet attempt (its command line and how it ended), kept in the
    # database with the outcome: such an attempt has no log file (see `TaskContext`).
    log: str | None = None
    # When the log was taken (None: when the outcome is written). The same outcome
    # written again adds no second copy to a log kept already for its attempt.
    logged_at: float | None = None

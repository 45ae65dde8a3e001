"""Requests: one submission, how it splits into tasks, and how its status follows them.

Everything here is pure.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from conveyor.tasks import Task, TransitionError


class RequestStatus(enum.StrEnum):
    REQUESTED = "requested"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_REQUEST_STATUSES


TERMINAL_REQUEST_STATUSES = frozenset(
    {RequestStatus.SUCCEEDED, RequestStatus.FAILED, RequestStatus.CANCELLED}
)

_R = RequestStatus
# Which request status may follow which. The store only ever moves a request along
# these edges, and checks the current status in the same update.
REQUEST_TRANSITIONS: Mapping[RequestStatus, frozenset[RequestStatus]] = {
    _R.REQUESTED: frozenset({_R.RUNNING, _R.SUCCEEDED, _R.FAILED, _R.CANCELLED}),
    _R.RUNNING: frozenset({_R.SUCCEEDED, _R.FAILED, _R.CANCELLED}),
    # an operator's retry sends a finished, unsuccessful request back to work
    _R.FAILED: frozenset({_R.RUNNING, _R.REQUESTED}),
    _R.CANCELLED: frozenset({_R.RUNNING, _R.REQUESTED}),
    _R.SUCCEEDED: frozenset(),
}


def check_request_transition(current: RequestStatus, new: RequestStatus) -> None:
    if new != current and new not in REQUEST_TRANSITIONS[current]:
        raise TransitionError(f"a {current.value} request cannot become {new.value}")


def request_sources(target: RequestStatus) -> frozenset[RequestStatus]:
    """The statuses a request may move to `target` from: the guard of its update."""
    return frozenset(s for s, targets in REQUEST_TRANSITIONS.items() if target in targets)


@dataclass(frozen=True)
class TaskCounts:
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled


def derive_request_status(counts: TaskCounts, started: bool) -> RequestStatus:
    """A request's status from its tasks: done when every task is done; cancelled if
    any task was cancelled (somebody chose to stop it), else failed if any task failed,
    else succeeded."""
    if counts.total and counts.finished >= counts.total:
        if counts.cancelled:
            return RequestStatus.CANCELLED
        if counts.failed:
            return RequestStatus.FAILED
        return RequestStatus.SUCCEEDED
    return RequestStatus.RUNNING if started else RequestStatus.REQUESTED


class SplitError(ValueError):
    """The params cannot be split as the pipeline declares."""


def split_params(params: Any, split: str | None) -> list[Any]:
    """One task's params per element of `params[split]` (the other keys are shared by
    every task); without `split`, one task for the whole params."""
    if split is None:
        return [params]
    if not isinstance(params, dict) or split not in params:
        raise SplitError(f"params must have an array '{split}' to split on")
    items = params[split]
    if not isinstance(items, list):
        raise SplitError(f"params.{split} must be an array to split on")
    if not items:
        raise SplitError(f"params.{split} is empty: nothing to do")
    shared = {k: v for k, v in params.items() if k != split}
    out: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            out.append({**shared, **item})
        else:
            out.append({**shared, split: item, "item": item})
    return out


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def params_hash(pipeline: str, params: Any) -> str:
    """Identifies identical work for the result cache."""
    digest = hashlib.sha256()
    digest.update(pipeline.encode())
    digest.update(b"\0")
    digest.update(canonical_json(params).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class CachePolicy:
    """A request's use of the pipeline's result cache."""

    read: bool = True  # may reuse an earlier result
    write: bool = True  # its own result may be reused later


@dataclass(frozen=True)
class NewRequest:
    """A validated submission, ready to store."""

    pipeline: str
    params: Any
    task_params: list[Any]
    queue: str
    priority: int
    max_attempts: int
    timeout: float | None
    idempotency_key: str | None = None
    submitter: str | None = None
    cache: CachePolicy = field(default_factory=CachePolicy)
    cache_ttl: float | None = None  # the pipeline's cache age; None: no caching

    @cached_property
    def params_hash(self) -> str:
        """Worked out once: a submit compares it up to three times (idempotency key,
        result cache, the row), and large params take a while to serialise."""
        return params_hash(self.pipeline, self.params)


@dataclass(frozen=True)
class Request:
    id: int
    pipeline: str
    params: Any
    queue: str
    priority: int
    status: RequestStatus
    counts: TaskCounts
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    idempotency_key: str | None = None
    submitter: str | None = None
    reused_request_id: int | None = None
    tasks: tuple[Task, ...] = ()

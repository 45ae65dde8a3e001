"""Records the unit tests build over and over."""

from __future__ import annotations

from typing import Any

from conveyor.tasks import Task, TaskStatus


def make_task(params: Any = None, **kw: Any) -> Task:
    """A running task with plausible values; keywords override any field."""
    defaults: dict[str, Any] = dict(
        id=11,
        request_id=5,
        pipeline="p",
        queue="default",
        priority=0,
        seq=0,
        params={} if params is None else params,
        status=TaskStatus.RUNNING,
        attempts=1,
        max_attempts=3,
        timeout=None,
        created_at=0.0,
        available_at=0.0,
    )
    defaults.update(kw)
    return Task(**defaults)

"""Rows and records: converting between the database's rows and the domain's immutable
records, the event rows every change appends, and small pure helpers the store shares."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row

from conveyor.events import Event
from conveyor.requests import Request, RequestStatus, TaskCounts
from conveyor.store import schema as t
from conveyor.store.base import Listener
from conveyor.tasks import Progress, Task, TaskAction, TaskStatus

TASK_COLUMNS = [c.name for c in t.tasks.columns]
EventRow = dict[str, Any]


def in_list(statuses: frozenset[Any]) -> str:
    """A SQL list of status literals. Only enum values reach it, never request data."""
    return ", ".join(f"'{s.value}'" for s in sorted(statuses))


def dumps(value: Any) -> str | None:
    """JSON as both databases take it: NaN and infinities, which PostgreSQL's json
    refuses (and JSON has not), raise ValueError."""
    return None if value is None else json.dumps(value, separators=(",", ":"), allow_nan=False)


def stored_text(value: str | None) -> str | None:
    """`value` as a text column keeps it on both databases: PostgreSQL's text holds no
    NUL character, so each becomes U+FFFD (as undecodable output does in a log)."""
    return value.replace("\x00", "\ufffd") if value and "\x00" in value else value


def typed_tasks(sql: str) -> sa.TextualSelect:
    """Raw SQL that returns task rows, read with the columns' types (JSON decoded)."""
    return sa.text(sql).columns(*t.tasks.c)


def task_from_row(row: Any) -> Task:
    m = row._mapping if isinstance(row, Row) else row
    return Task(
        id=m["id"],
        request_id=m["request_id"],
        pipeline=m["pipeline"],
        queue=m["queue"],
        priority=m["priority"],
        seq=m["seq"],
        params=m["params"],
        status=TaskStatus(m["status"]),
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        timeout=m["timeout"],
        created_at=m["created_at"],
        available_at=m["available_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        progress=Progress(m["progress_current"], m["progress_total"], m["progress_message"]),
        result=m["result"],
        error=m["error"],
    )


def counts_from(m: Mapping[str, Any]) -> TaskCounts:
    return TaskCounts(
        total=m["tasks_total"],
        succeeded=m["tasks_succeeded"],
        failed=m["tasks_failed"],
        cancelled=m["tasks_cancelled"],
    )


def request_from_row(row: Any, tasks: Sequence[Task] = ()) -> Request:
    m = row._mapping
    return Request(
        id=m["id"],
        pipeline=m["pipeline"],
        params=m["params"],
        queue=m["queue"],
        priority=m["priority"],
        status=RequestStatus(m["status"]),
        counts=counts_from(m),
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        idempotency_key=m["idempotency_key"],
        submitter=m["submitter"],
        reused_request_id=m["reused_request_id"],
        tasks=tuple(tasks),
    )


def event_from_row(r: Any) -> Event:
    return Event(
        id=r.id,
        ts=r.ts,
        kind=r.kind,
        request_id=r.request_id,
        task_id=r.task_id,
        pipeline=r.pipeline,
        queue=r.queue,
        data=r.data,
    )


def event_row(
    ts: float,
    kind: str,
    request_id: int | None = None,
    task_id: int | None = None,
    pipeline: str | None = None,
    queue: str | None = None,
    data: Any = None,
) -> EventRow:
    return {
        "ts": ts,
        "kind": kind,
        "request_id": request_id,
        "task_id": task_id,
        "pipeline": pipeline,
        "queue": queue,
        "data": data,
    }


OUTCOME_EVENTS = {
    TaskAction.SUCCEED: "task.succeeded",
    TaskAction.FAIL: "task.failed",
    TaskAction.RETRY: "task.retrying",
    TaskAction.RELEASE: "task.released",
}


class LocalWakeup:
    """Wakes waiters in this process at once; other processes rely on the dialect's
    notifications or on polling."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def fire(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def listener(self) -> Listener:
        return _LocalListener(self)


class _LocalListener:
    def __init__(self, wakeup: LocalWakeup) -> None:
        self._w = wakeup
        self._seen = wakeup._generation

    def wait(self, timeout: float) -> bool:
        w = self._w
        with w._cond:
            if w._generation == self._seen:
                w._cond.wait(timeout)
            fired = w._generation != self._seen
            self._seen = w._generation
            return fired

    def close(self) -> None:
        pass


def allot(candidates: Sequence[tuple[int, str]], slots: Mapping[str, int]) -> list[int]:
    """Of the candidate (task id, pipeline) pairs, in claim order, those that fit in the
    free slots of concurrency-limited pipelines; unlimited pipelines always fit."""
    left = dict(slots)
    picked = []
    for task_id, pipeline in candidates:
        if pipeline in left:
            if left[pipeline] <= 0:
                continue
            left[pipeline] -= 1
        picked.append(task_id)
    return picked


def describe_error(exc: Exception) -> str:
    orig = getattr(exc, "orig", None) or exc
    if getattr(orig, "sqlstate", None) == "42P01" or "no such table" in str(orig):
        return "the database has no Conveyor tables yet: run `conveyor db upgrade`"
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


# What a claim returns: the Task fields a claimed task has, in Task's order (status is
# running; progress, result and error are reset).
CLAIMED_COLUMNS = (
    "id",
    "request_id",
    "pipeline",
    "queue",
    "priority",
    "seq",
    "params",
    "attempts",
    "max_attempts",
    "timeout",
    "created_at",
    "available_at",
    "started_at",
    "lease_owner",
    "lease_expires_at",
)


def claimed_tasks(rows: Sequence[Sequence[Any]], params_text: bool = False) -> list[Task]:
    """Tasks from claim rows of CLAIMED_COLUMNS, in the order given. `params_text`: the
    driver hands JSON columns over as text (SQLite), so params are decoded here."""
    running = TaskStatus.RUNNING
    loads = json.loads
    return [
        Task(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            (loads(r[6]) if r[6] is not None else None) if params_text else r[6],
            running,
            r[7],
            r[8],
            r[9],
            r[10],
            r[11],
            r[12],
            None,
            r[13],
            r[14],
        )
        for r in rows
    ]

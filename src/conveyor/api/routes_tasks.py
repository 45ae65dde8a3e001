"""Tasks: one task, and its log (streamed, optionally followed while the attempt runs)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from conveyor.api import models, problems
from conveyor.api.auth import Reader, conveyor_of
from conveyor.api.models import ID_MAX
from conveyor.api.stream import EventHub
from conveyor.app import Conveyor
from conveyor.logs import CHUNK, AttemptLog, start_offset
from conveyor.store import NotFound
from conveyor.tasks import Task, TaskStatus
from conveyor.views import task_view

router = APIRouter(tags=["tasks"])

TaskId = Annotated[int, Path(ge=1, le=ID_MAX, description="Task id.")]
FOLLOW_POLL = 0.2  # seconds between looks at a followed log
STATUS_POLL = 0.5  # seconds between looks at a followed task's status


@router.get(
    "/tasks/{task_id}",
    summary="A task",
    response_model=None,
    responses={
        200: {"description": "The task", "model": models.Task},
        **problems.responses(401, 403, 404, 422, 503),
    },
    openapi_extra={"x-required-role": "read"},
)
def get_task(request: Request, caller: Reader, task_id: TaskId) -> JSONResponse:
    app = conveyor_of(request)
    return JSONResponse(task_view(app.task(task_id), app.task_artifacts(task_id)))


def attempt_over(task: Task, attempt: int) -> bool:
    """Whether an attempt can write no more to its log."""
    if task.status.terminal or task.attempts > attempt:
        return True
    return task.attempts == attempt and task.status != TaskStatus.RUNNING


def shown_attempt(task: Task, logged: list[int], follow: bool) -> int | None:
    """The attempt whose log is shown when none is named: the latest with a log; when
    following, the running attempt (a command that prints nothing has no log until it
    ends, when its two lines are kept with its outcome)."""
    if follow and task.status == TaskStatus.RUNNING and task.attempts:
        return task.attempts
    return logged[-1] if logged else None


def attempt_may_come(task: Task, attempt: int | None) -> bool:
    """Whether following may yet see a log for this attempt (any attempt: None)."""
    if task.status.terminal:
        return False
    return attempt is None or not attempt_over(task, attempt)


def _read(path: FilePath, pos: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(pos)
            return f.read(CHUNK)
    except FileNotFoundError:
        return b""


def _find_log(app: Conveyor, task: Task, attempt: int) -> AttemptLog | None:
    """The log of the task's `attempt` (the task as just read), if it has one."""
    try:
        return app.task_log(task, attempt)
    except NotFound:
        return None


async def _log_stream(
    app: Conveyor,
    hub: EventHub,
    task: Task,
    attempt: int | None,
    found: AttemptLog | None,
    tail: int | None,
    follow: bool,
    timeout: float | None,
) -> AsyncIterator[bytes]:
    """`found`: the attempt's log as the request's look found it, if it had one;
    `attempt` None: the task has not started, and its next attempt is followed. While
    following an attempt with no log yet, each look is at its file alone; the database
    is asked again only for the task's status, and once the attempt is over, for the log
    a quiet attempt keeps there."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if found is not None and found.kept is not None:  # a quiet attempt's, kept at its end
        if data := found.read(tail):
            yield data
        return
    shown = attempt if attempt is not None else task.attempts + 1
    path: FilePath | None = None if found is None else found.path
    pos = 0 if path is None else start_offset(path, tail)
    # where the attempt's log file will be, once it prints (worked out once)
    coming = app.artifacts.log_path(task.request_id, task.id, shown)
    next_look = 0.0  # look at once: a finished attempt needs no waiting
    while True:
        if path is None and coming.exists():  # it has printed: its log is a file
            path, pos = coming, start_offset(coming, tail)
        if path is not None:
            chunk = _read(path, pos)
            if chunk:
                pos += len(chunk)
                yield chunk
                continue
        if not follow or hub.closed:
            return
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return
        if now >= next_look:
            next_look = now + STATUS_POLL
            try:
                task = await run_in_threadpool(app.task, task.id)
            except NotFound:  # pruned meanwhile
                return
            if path is not None and attempt_over(task, shown):
                while chunk := _read(path, pos):  # what was written before it ended
                    pos += len(chunk)
                    yield chunk
                return
            if path is None and not attempt_may_come(task, shown):
                # A quiet attempt's log comes with its end, maybe since the last look.
                last = await run_in_threadpool(_find_log, app, task, shown)
                if last is not None and (data := last.read(tail)):
                    yield data
                return
        await asyncio.sleep(FOLLOW_POLL)


@router.get(
    "/tasks/{task_id}/log",
    summary="A task attempt's log",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The log (stdout and stderr of the attempt), streamed",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **problems.responses(401, 403, 404, 422, 503),
    },
    openapi_extra={"x-required-role": "read"},
)
async def task_log(
    request: Request,
    caller: Reader,
    task_id: TaskId,
    attempt: Annotated[
        int | None, Query(ge=1, le=1_000_000, description="Attempt (default: the latest).")
    ] = None,
    tail: Annotated[
        int | None, Query(ge=0, le=1_000_000, description="Only the last N lines.")
    ] = None,
    follow: Annotated[
        bool,
        Query(description="Keep streaming while the attempt runs; end when it finishes."),
    ] = False,
    timeout: Annotated[
        float | None,
        Query(gt=0, le=86400, description="With follow: stop after this many seconds."),
    ] = None,
) -> StreamingResponse:
    """The attempt's output as it is written. With `follow=true` the answer stays open
    while the attempt runs (waiting for it to start, if need be) and ends when it ends."""
    app = conveyor_of(request)
    task, logs = await run_in_threadpool(app.task_logs, task_id)
    chosen = attempt if attempt is not None else shown_attempt(task, list(logs), follow)
    found = None if chosen is None else logs.get(chosen)
    if found is None and not (follow and attempt_may_come(task, chosen)):
        if chosen is None:
            raise NotFound(f"task {task_id} has no log yet")
        raise NotFound(f"task {task_id} has no log for attempt {chosen}")
    hub: EventHub = request.app.state.hub
    return StreamingResponse(
        _log_stream(app, hub, task, chosen, found, tail, follow, timeout),
        media_type="text/plain; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

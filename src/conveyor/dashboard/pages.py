"""The dashboard's pages: overview, requests, request detail, failed tasks, queues and
workers. Each is a thin adapter: it asks the application object, and renders. With
htmx's `HX-Request` header a page answers with its live fragment only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from conveyor.api.routes_artifacts import artifact_response
from conveyor.api.routes_tasks import attempt_over, shown_attempt
from conveyor.dashboard import charts, views
from conveyor.dashboard.ui import dashboard_of
from conveyor.logs import AttemptLog
from conveyor.queues import ALL_QUEUES
from conveyor.stats import DAY, HOUR, bars, failure_rate
from conveyor.store import NotFound, RequestFilter
from conveyor.tasks import Task

router = APIRouter(include_in_schema=False)
PAGE = 50
MAX_TASKS = 500  # tasks listed on a request's page (a request may have thousands)
LOG_TAIL_FAILED = 20  # lines of log shown with each failed task
Text = Annotated[str | None, Query(max_length=500)]


def _paused(request: Request) -> tuple[set[str], bool]:
    paused = dashboard_of(request).app.store.paused_queues()
    return paused - {ALL_QUEUES}, ALL_QUEUES in paused


@router.get("/")
def overview(request: Request) -> Response:
    ui = dashboard_of(request)
    viewer = ui.viewer(request)
    app = ui.app
    now = app.clock()
    counts = app.status_counts()
    activity = ui.activity()
    hourly = bars(activity, now, HOUR, 48)
    daily = bars(activity, now, DAY, 14)
    paused, everything = _paused(request)
    workers = app.workers(alive_only=True)
    return ui.render(
        request,
        "overview.html",
        viewer,
        fragment="_overview.html",
        tables=views.tables(counts),
        task_statuses=views.TASK_STATUSES,
        request_statuses=views.REQUEST_STATUSES,
        hourly_chart=charts.bar_chart(hourly, "Tasks finished per hour, last 48 hours"),
        daily_chart=charts.bar_chart(daily, "Tasks finished per day, last 14 days"),
        hourly=hourly,
        daily=daily,
        failure_day=failure_rate(hourly[-24:]),
        failure_week=failure_rate(daily[-7:]),
        workers=workers,
        running=sum(w.running for w in workers),
        slots=sum(w.concurrency for w in workers),
        paused=sorted(paused),
        everything_paused=everything,
        ingest=app.ingest_totals(),
    )


@router.get("/requests")
def requests_page(
    request: Request,
    q: Text = None,
    submitter: Text = None,
    status: Text = None,
    pipeline: Text = None,
    queue: Text = None,
    since: Text = None,
    until: Text = None,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    ui = dashboard_of(request)
    viewer = ui.viewer(request)
    app = ui.app
    errors: list[str] = []
    after_ts = before_ts = None
    try:
        after_ts = views.parse_time(since)
    except ValueError as exc:
        errors.append(f"From: {exc}")
    try:
        before_ts = views.parse_time(until)
    except ValueError as exc:
        errors.append(f"Until: {exc}")
    if status and status not in views.REQUEST_STATUSES:
        errors.append(f"Status: {status!r} is not a request status")
        status = None
    text = (q or "").strip()
    found = []
    more = False
    if text.isdigit() and len(text) < 19:
        # An id: that request, whatever the filters.
        try:
            found = [app.get(int(text), with_tasks=False)]
        except NotFound:
            found = []
    else:
        flt = RequestFilter(
            status=status or None,
            pipeline=pipeline or None,
            queue=queue or None,
            submitter=(submitter or "").strip() or None,
            created_after=after_ts,
            created_before=before_ts,
            before_id=before,
            text=text or None,
            limit=PAGE + 1,
        )
        found = app.list_requests(flt)
        more = len(found) > PAGE
        found = found[:PAGE]
    kept = {
        k: v
        for k, v in {
            "q": q,
            "submitter": submitter,
            "status": status,
            "pipeline": pipeline,
            "queue": queue,
            "since": since,
            "until": until,
        }.items()
        if v
    }
    return ui.render(
        request,
        "requests.html",
        viewer,
        fragment="_requests.html",
        found=found,
        more=more,
        next_before=found[-1].id if (more and found) else None,
        first_page=before is None,
        kept=kept,
        errors=errors,
        statuses=views.REQUEST_STATUSES,
        pipelines=sorted(app.config.pipelines),
        queues=list(app.config.queue_order),
    )


@router.get("/requests/{request_id}")
def request_page(request: Request, request_id: int) -> Response:
    ui = dashboard_of(request)
    viewer = ui.viewer(request)
    app = ui.app
    try:
        req, outputs = app.get_with_outputs(request_id)
    except NotFound:
        return ui.render(
            request,
            "error.html",
            viewer,
            status_code=404,
            title="Not found",
            message=f"There is no request {request_id}.",
        )
    now = app.clock()
    return ui.render(
        request,
        "request.html",
        viewer,
        fragment="_request.html",
        req=req,
        shown=req.tasks[:MAX_TASKS],
        events=app.events(request_id=request_id, limit=500),
        timeline=charts.gantt(req.tasks, now),
        durations={t.id: views.task_duration(t, now) for t in req.tasks},
        percent=views.percent,
        outputs=views.outputs,
        kept=outputs,
    )


@router.get("/tasks/{task_id}/log")
def task_log(
    request: Request,
    task_id: int,
    attempt: Annotated[int | None, Query(ge=1)] = None,
    tail: Annotated[int, Query(ge=1, le=100_000)] = 200,
    follow: bool = True,
) -> Response:
    """The end of an attempt's log, as a panel that keeps itself up to date (htmx
    polling) while the attempt runs."""
    ui = dashboard_of(request)
    viewer = ui.viewer(request)
    try:
        task, logs = ui.app.task_logs(task_id)
    except NotFound:
        return ui.render(
            request, "_log.html", viewer, status_code=404, task=None, missing=f"no task {task_id}"
        )
    logged = list(logs)
    chosen = attempt or shown_attempt(task, logged, follow)
    text = ""
    if chosen is not None and chosen in logs:
        text = _tail(logs[chosen], tail)
    over = _attempt_over(task, chosen)
    live = follow and not over
    return ui.render(
        request,
        "_log.html",
        viewer,
        task=task,
        attempts=logged,
        attempt=chosen,
        text=text,
        tail=tail,
        live=live,
        over=over,
        follow=follow,
        missing=None,
    )


@router.get("/tasks/{task_id}/outputs/{name:path}")
async def task_output(request: Request, task_id: int, name: str) -> Response:
    """An output (or uploaded log) of the task, for a logged-in viewer: streamed, or a
    redirect to a time-limited link where the store makes them."""
    ui = dashboard_of(request)
    await run_in_threadpool(ui.viewer, request)
    try:
        artifact = await run_in_threadpool(ui.app.artifact, task_id, name)
    except NotFound as exc:
        return Response(f"{exc}\n", status_code=404, media_type="text/plain")
    return await artifact_response(ui.app, artifact, stream=False)


@router.get("/tasks/{task_id}/log.txt")
def task_log_file(
    request: Request, task_id: int, attempt: Annotated[int | None, Query(ge=1)] = None
) -> Response:
    """The whole log of an attempt, as text to read or download."""
    ui = dashboard_of(request)
    ui.viewer(request)
    try:
        body = ui.app.log(task_id, attempt).read()
    except NotFound:
        return Response("no such log\n", status_code=404, media_type="text/plain")
    name = f"task-{task_id}-attempt-{attempt or 'latest'}.log"
    return Response(
        body,
        media_type="text/plain; charset=utf-8",
        headers={
            "Content-Disposition": f'inline; filename="{name}"',
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )


@router.get("/failed")
def failed_page(
    request: Request, q: Text = None, before: Annotated[int | None, Query(ge=1)] = None
) -> Response:
    ui = dashboard_of(request)
    viewer = ui.viewer(request)
    app = ui.app
    found = app.failed_tasks(PAGE + 1, before, (q or "").strip() or None)
    more = len(found) > PAGE
    found = found[:PAGE]
    return ui.render(
        request,
        "failed.html",
        viewer,
        fragment="_failed.html",
        found=found,
        tails={t.id: _latest_tail(request, t) for t in found},
        more=more,
        next_before=found[-1].id if (more and found) else None,
        first_page=before is None,
        q=q or "",
    )


@router.get("/queues")
def queues_page(request: Request) -> Response:
    ui = dashboard_of(request)
    viewer = ui.viewer(request)
    app = ui.app
    paused, everything = _paused(request)
    rows = views.queue_rows(
        app.status_counts(),
        paused,
        ui.rates(),
        app.config.queue_order,
        everything,
    )
    return ui.render(
        request,
        "queues.html",
        viewer,
        fragment="_queues.html",
        rows=rows,
        everything_paused=everything,
    )


@router.get("/workers")
def workers_page(request: Request) -> Response:
    ui = dashboard_of(request)
    viewer = ui.viewer(request)
    app = ui.app
    now = app.clock()
    found = app.workers()
    states = {w.id: views.worker_state(w, now, app.config.lease) for w in found}
    order = {"running": 0, "stale": 1, "stopped": 2}
    found.sort(key=lambda w: (order[states[w.id]], -w.last_heartbeat))
    return ui.render(
        request,
        "workers.html",
        viewer,
        fragment="_workers.html",
        workers=found[:500],
        states=states,
        alive=sum(1 for s in states.values() if s == "running"),
    )


def _tail(log: AttemptLog, lines: int) -> str:
    return log.read(lines, 256 * 1024).decode("utf-8", errors="replace")


def _latest_tail(request: Request, task: Task) -> str:
    app = dashboard_of(request).app
    try:
        return _tail(app.task_log(task), LOG_TAIL_FAILED)
    except NotFound:
        return ""


def _attempt_over(task: Task, attempt: int | None) -> bool:
    if attempt is None:
        return task.status.terminal
    return attempt_over(task, attempt)

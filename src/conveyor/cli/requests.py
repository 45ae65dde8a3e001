"""Commands about requests on this machine's database: submit, status, wait, list,
cancel, retry, and a task's log."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from conveyor.app import Conveyor, SubmitOptions, WaitTimeout
from conveyor.cli.common import (
    EXIT_ERROR,
    EXIT_TIMEOUT,
    CliError,
    JsonOption,
    app_of,
    cli,
    out,
    progress_bar,
    ts,
)
from conveyor.requests import CachePolicy, Request, RequestStatus
from conveyor.store import RequestFilter
from conveyor.views import request_view


def _print_request(req: Request) -> None:
    out.print(
        f"request {req.id}  [bold]{req.status.value}[/bold]  pipeline={req.pipeline} "
        f"queue={req.queue} priority={req.priority}"
    )
    out.print(
        f"created {ts(req.created_at)}  started {ts(req.started_at)}  "
        f"finished {ts(req.finished_at)}"
    )
    if req.reused_request_id:
        out.print(f"result reused from request {req.reused_request_id}")
    if not req.tasks:
        return
    table = Table(box=None)
    for col in ("task", "status", "attempts", "progress", "error"):
        table.add_column(col)
    for t in req.tasks:
        frac = t.progress.fraction
        prog = (
            f"{frac:.0%}"
            if frac is not None
            else (f"{t.progress.current:g}" if t.progress.current else "")
        )
        if t.progress.message:
            prog += f" {t.progress.message}"
        table.add_row(
            str(t.id), t.status.value, f"{t.attempts}/{t.max_attempts}", prog, t.error or ""
        )
    out.print(table)


def _read_params(source: str | None, sets: list[str]) -> Any:
    params: Any = {}
    if source is not None:
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text()
        except FileNotFoundError:
            raise CliError(f"params file not found: {source}") from None
        except OSError as exc:
            raise CliError(f"cannot read {source}: {exc.strerror}") from None
        try:
            params = json.loads(text)
        except json.JSONDecodeError as exc:
            name = "standard input" if source == "-" else source
            raise CliError(
                f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise CliError(f"--set expects key=value, got {item!r}", code=2)
        if not isinstance(params, dict):
            raise CliError("--set needs the params to be a JSON object")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = params
        *path, last = key.split(".")
        for part in path:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise CliError(f"--set {key}: {part} is not an object")
        target[last] = value
    return params


def _wait(app: Conveyor, request_id: int, timeout: float | None, as_json: bool) -> int:
    with progress_bar(not as_json) as update:
        try:
            req = app.wait(request_id, timeout, on_update=update)
        except WaitTimeout as exc:
            if as_json:
                out.print_json(data=request_view(exc.request))
            raise CliError(str(exc), code=EXIT_TIMEOUT) from None
    if as_json:
        out.print_json(data=request_view(req))
    else:
        out.print(f"request {req.id} {req.status.value}")
    return 0 if req.status == RequestStatus.SUCCEEDED else EXIT_ERROR


# --------------------------------------------------------------------- commands
@cli.command()
def submit(
    ctx: typer.Context,
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    params_file: Annotated[
        str | None, typer.Argument(help="JSON params file, or - for standard input.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="key=value (value parsed as JSON if it can be)."),
    ] = None,
    queue: Annotated[str | None, typer.Option(help="Queue (default: the pipeline's).")] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first within a queue.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Idempotency key.")] = None,
    submitter: Annotated[str | None, typer.Option(help="Who submits.")] = None,
    no_cache_read: Annotated[bool, typer.Option(help="Do not reuse a cached result.")] = False,
    no_cache_write: Annotated[
        bool, typer.Option(help="Do not offer this result to the cache.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it finishes.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: seconds to wait.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a request; prints its id."""
    app = app_of(ctx)
    params = _read_params(params_file, set_ or [])
    opts = SubmitOptions(
        queue=queue,
        priority=priority,
        idempotency_key=key,
        submitter=submitter or os.environ.get("USER"),
        cache=CachePolicy(read=not no_cache_read, write=not no_cache_write),
    )
    submitted = app.submit(pipeline, params, opts)
    req = submitted.request
    if wait:
        if not as_json:
            out.print(req.id)
        raise typer.Exit(_wait(app, req.id, timeout, as_json))
    if as_json:
        out.print_json(data={**request_view(req), "created": submitted.created})
    else:
        out.print(req.id)


@cli.command()
def status(
    ctx: typer.Context,
    request_id: Annotated[int, typer.Argument(help="Request id.")],
    as_json: JsonOption = False,
) -> None:
    """Show a request and its tasks."""
    req = app_of(ctx).get(request_id)
    if as_json:
        out.print_json(data=request_view(req))
    else:
        _print_request(req)


@cli.command("wait")
def wait_cmd(
    ctx: typer.Context,
    request_id: Annotated[int, typer.Argument(help="Request id.")],
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait (default: no limit).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Wait for a request: exit 0 succeeded, 1 failed or cancelled, 2 timed out."""
    raise typer.Exit(_wait(app_of(ctx), request_id, timeout, as_json))


@cli.command("list")
def list_cmd(
    ctx: typer.Context,
    status_: Annotated[str | None, typer.Option("--status", help="Filter by status.")] = None,
    pipeline: Annotated[str | None, typer.Option(help="Filter by pipeline.")] = None,
    queue: Annotated[str | None, typer.Option(help="Filter by queue.")] = None,
    submitter: Annotated[str | None, typer.Option(help="Filter by submitter.")] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 50,
    before: Annotated[int | None, typer.Option(help="Only ids below this (next page).")] = None,
    as_json: JsonOption = False,
) -> None:
    """List requests, newest first."""
    if status_ is not None and status_ not in {s.value for s in RequestStatus}:
        raise CliError(f"--status must be one of {', '.join(s.value for s in RequestStatus)}", 2)
    reqs = app_of(ctx).list_requests(
        RequestFilter(
            status=status_,
            pipeline=pipeline,
            queue=queue,
            submitter=submitter,
            limit=limit,
            before_id=before,
        )
    )
    if as_json:
        out.print_json(data=[request_view(r, with_tasks=False) for r in reqs])
        return
    table = Table(box=None)
    for col in ("id", "pipeline", "status", "queue", "tasks", "created"):
        table.add_column(col)
    for r in reqs:
        c = r.counts
        table.add_row(
            str(r.id),
            r.pipeline,
            r.status.value,
            r.queue,
            f"{c.finished}/{c.total}",
            ts(r.created_at),
        )
    out.print(table)


@cli.command()
def cancel(ctx: typer.Context, request_id: Annotated[int, typer.Argument()]) -> None:
    """Cancel a request: queued tasks never run, running ones are stopped."""
    req = app_of(ctx).cancel(request_id)
    out.print(f"request {req.id} {req.status.value}")


@cli.command()
def retry(ctx: typer.Context, request_id: Annotated[int, typer.Argument()]) -> None:
    """Run the failed and cancelled tasks of a finished request again."""
    req = app_of(ctx).retry(request_id)
    out.print(f"request {req.id} {req.status.value}")


@cli.command()
def logs(
    ctx: typer.Context,
    task_id: Annotated[int, typer.Argument(help="Task id.")],
    attempt: Annotated[int | None, typer.Option(help="Attempt (default: the latest).")] = None,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
) -> None:
    """Print a task attempt's log (stdout and stderr)."""
    data = app_of(ctx).log(task_id, attempt).read(tail)
    sys.stdout.write(data.decode("utf-8", errors="replace"))

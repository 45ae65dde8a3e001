"""The `conveyor` command: a thin adapter over the application object.

Exit codes: 0 success; 1 an error (the request failed, bad input, not found); 2 a usage
error or, for `wait`, a time-out; 3 the database cannot be reached.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from conveyor.app import Conveyor, SubmitOptions, UnknownPipeline, WaitTimeout
from conveyor.config import ConfigError, load_config
from conveyor.executors.python import HandlerError
from conveyor.pipelines import ParamsError
from conveyor.requests import CachePolicy, Request, RequestStatus
from conveyor.store import Conflict, NotFound, RequestFilter, StoreError, Unavailable
from conveyor.tasks import TransitionError
from conveyor.tokens import Role, TokenNameError
from conveyor.views import queue_view, request_view, token_view, worker_view

cli = typer.Typer(
    name="conveyor",
    help="Conveyor: durable data-processing requests, tasks and workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_ERROR = 1
EXIT_TIMEOUT = 2
EXIT_UNAVAILABLE = 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


@cli.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        str | None,
        typer.Option(
            "--config", "-c", help="conveyor.toml (default: $CONVEYOR_CONFIG, ./conveyor.toml)"
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = {"config": config}


def _app(ctx: typer.Context) -> Conveyor:
    obj = ctx.find_root().obj
    if "app" not in obj:
        obj["app"] = Conveyor(load_config(obj["config"]))
        ctx.call_on_close(obj["app"].close)
    app: Conveyor = obj["app"]
    return app


# ------------------------------------------------------------------- formatting
def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_request(req: Request) -> None:
    out.print(
        f"request {req.id}  [bold]{req.status.value}[/bold]  pipeline={req.pipeline} "
        f"queue={req.queue} priority={req.priority}"
    )
    out.print(
        f"created {_ts(req.created_at)}  started {_ts(req.started_at)}  "
        f"finished {_ts(req.finished_at)}"
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


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[Request], None]]:
    if not enabled or not err.is_terminal:
        yield lambda _req: None
        return
    with Progress(
        TextColumn("request {task.fields[rid]} {task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task_id = bar.add_task("wait", total=None, rid="", status="")

        def update(req: Request) -> None:
            bar.update(
                task_id,
                total=req.counts.total or None,
                completed=req.counts.finished,
                rid=req.id,
                status=req.status.value,
            )

        yield update


def _wait(app: Conveyor, request_id: int, timeout: float | None, as_json: bool) -> int:
    with _progress_bar(not as_json) as update:
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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Submit a request; prints its id."""
    app = _app(ctx)
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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a request and its tasks."""
    req = _app(ctx).get(request_id)
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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Wait for a request: exit 0 succeeded, 1 failed or cancelled, 2 timed out."""
    raise typer.Exit(_wait(_app(ctx), request_id, timeout, as_json))


@cli.command("list")
def list_cmd(
    ctx: typer.Context,
    status_: Annotated[str | None, typer.Option("--status", help="Filter by status.")] = None,
    pipeline: Annotated[str | None, typer.Option(help="Filter by pipeline.")] = None,
    queue: Annotated[str | None, typer.Option(help="Filter by queue.")] = None,
    submitter: Annotated[str | None, typer.Option(help="Filter by submitter.")] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 50,
    before: Annotated[int | None, typer.Option(help="Only ids below this (next page).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List requests, newest first."""
    if status_ is not None and status_ not in {s.value for s in RequestStatus}:
        raise CliError(f"--status must be one of {', '.join(s.value for s in RequestStatus)}", 2)
    reqs = _app(ctx).list_requests(
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
            _ts(r.created_at),
        )
    out.print(table)


@cli.command()
def cancel(ctx: typer.Context, request_id: Annotated[int, typer.Argument()]) -> None:
    """Cancel a request: queued tasks never run, running ones are stopped."""
    req = _app(ctx).cancel(request_id)
    out.print(f"request {req.id} {req.status.value}")


@cli.command()
def retry(ctx: typer.Context, request_id: Annotated[int, typer.Argument()]) -> None:
    """Run the failed and cancelled tasks of a finished request again."""
    req = _app(ctx).retry(request_id)
    out.print(f"request {req.id} {req.status.value}")


@cli.command()
def logs(
    ctx: typer.Context,
    task_id: Annotated[int, typer.Argument(help="Task id.")],
    attempt: Annotated[int | None, typer.Option(help="Attempt (default: the latest).")] = None,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
) -> None:
    """Print a task attempt's log (stdout and stderr)."""
    path = _app(ctx).log_path(task_id, attempt)
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    sys.stdout.write("".join(lines))


@cli.command()
def queues(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """Queues in priority order, with task counts."""
    stats = _app(ctx).queues()
    if as_json:
        out.print_json(data=[queue_view(q) for q in stats])
        return
    table = Table(box=None)
    for col in ("queue", "state", "queued", "running", "succeeded", "failed", "cancelled"):
        table.add_column(col)
    for q in stats:
        table.add_row(
            q.name,
            "paused" if q.paused else "open",
            str(q.queued),
            str(q.running),
            str(q.succeeded),
            str(q.failed),
            str(q.cancelled),
        )
    out.print(table)


@cli.command()
def pause(
    ctx: typer.Context,
    queue: Annotated[str | None, typer.Argument(help="Queue; none: everything.")] = None,
) -> None:
    """Stop workers taking tasks from a queue (or from all); running tasks finish."""
    _app(ctx).pause(queue)
    out.print(f"paused {queue or 'all queues'}")


@cli.command()
def resume(
    ctx: typer.Context,
    queue: Annotated[str | None, typer.Argument(help="Queue; none: everything.")] = None,
) -> None:
    """Let workers take tasks from a queue (or all) again."""
    _app(ctx).resume(queue)
    out.print(f"resumed {queue or 'all queues'}")


@cli.command()
def workers(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Include stopped workers.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Workers with their host, pid, queues and last heartbeat."""
    found = _app(ctx).workers(alive_only=not all_)
    if as_json:
        out.print_json(data=[worker_view(w) for w in found])
        return
    table = Table(box=None)
    for col in ("worker", "status", "queues", "running", "heartbeat"):
        table.add_column(col)
    for w in found:
        table.add_row(
            w.id,
            w.status,
            ",".join(w.queues),
            f"{w.running}/{w.concurrency}",
            _ts(w.last_heartbeat),
        )
    out.print(table)


def _queues_opt(value: str | None) -> list[str]:
    return [q.strip() for q in value.split(",") if q.strip()] if value else []


@cli.command()
def worker(
    ctx: typer.Context,
    queues_: Annotated[str | None, typer.Option("--queues", help="a,b,c (default: all).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks at once.")] = 4,
    burst: Annotated[bool, typer.Option(help="Exit when nothing is left to do.")] = False,
    lease: Annotated[float | None, typer.Option(min=1, help="Lease seconds.")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="Most tasks claimed at once.")] = None,
    grace: Annotated[
        float, typer.Option(help="On SIGTERM, seconds running tasks may take.")
    ] = 30.0,
) -> None:
    """Run a worker until SIGTERM (or, with --burst, until the queues are empty)."""
    from conveyor.worker import Worker, WorkerOptions

    app = _app(ctx)
    app.store.upgrade()
    w = Worker(
        app,
        WorkerOptions(
            queues=_queues_opt(queues_),
            concurrency=concurrency,
            burst=burst,
            lease=lease,
            batch=batch,
            grace=grace,
        ),
    )
    w.install_signal_handlers()
    err.print(f"worker {w.id} on {', '.join(w.queues)} (concurrency {concurrency})")
    stats = w.run()
    err.print(
        f"worker {w.id} stopped: {stats.succeeded} succeeded, {stats.failed} failed, "
        f"{stats.retried} retried, {stats.released} released"
    )


def _listen(host: str, port: int) -> socket.socket:
    from conveyor.api.server import listen

    try:
        return listen(host, port)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _safe_url(url: str) -> str:
    """The database URL without its password, for printing."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


@cli.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
) -> None:
    """Serve the HTTP API (and the legacy Spotbot endpoint) until SIGTERM."""
    from conveyor.api import create_app
    from conveyor.api.server import run, url_of

    app = _app(ctx)
    app.store.upgrade()
    sock = _listen(host, port)
    err.print(f"conveyor serve: {url_of(sock)} (database {_safe_url(app.config.database_url)})")
    run(create_app(app), sock)


@cli.command()
def up(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks at once.")] = 4,
    grace: Annotated[
        float, typer.Option(help="On SIGTERM, seconds running tasks may take.")
    ] = 30.0,
) -> None:
    """Everything in one process: migrations, the HTTP API and a worker."""
    from conveyor.api import create_app
    from conveyor.api.server import run, url_of
    from conveyor.worker import Worker, WorkerOptions

    app = _app(ctx)
    app.store.upgrade()
    sock = _listen(host, port)
    names = ", ".join(sorted(app.config.pipelines)) or "none"
    err.print(f"conveyor up: {url_of(sock)}; database {_safe_url(app.config.database_url)}")
    err.print(f"artifacts {app.config.artifacts_dir}; pipelines: {names}")
    w = Worker(app, WorkerOptions(concurrency=concurrency, grace=grace))
    if not run(create_app(app), sock, worker=w):
        raise CliError("the worker stopped on an error (see the log above)")


# ----------------------------------------------------------------------- tokens
token_cli = typer.Typer(help="API tokens.", no_args_is_help=True)
cli.add_typer(token_cli, name="token")


@token_cli.command("create")
def token_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Who uses it; the submitter of what it submits.")],
    role: Annotated[Role, typer.Option(help="read < submit < admin.")] = Role.READ,
) -> None:
    """Make a token and print it, once: only its hash is kept."""
    app = _app(ctx)
    app.store.upgrade()  # often the first thing done with a new database
    token, secret = app.create_token(name, role)
    out.print(secret, markup=False)
    err.print(
        f"token {token.id} {token.name!r} ({token.role.value}): store it now, "
        "it cannot be shown again"
    )


@token_cli.command("list")
def token_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Tokens with their role, first characters and when they were last used."""
    tokens = _app(ctx).list_tokens()
    if as_json:
        out.print_json(data=[token_view(t) for t in tokens])
        return
    table = Table(box=None)
    for col in ("id", "name", "role", "token", "created", "last used", "revoked"):
        table.add_column(col)
    for t in tokens:
        table.add_row(
            str(t.id),
            t.name,
            t.role.value,
            f"{t.prefix}…",
            _ts(t.created_at),
            _ts(t.last_used_at),
            _ts(t.revoked_at),
        )
    out.print(table)


@token_cli.command("revoke")
def token_revoke(
    ctx: typer.Context,
    name_or_id: Annotated[str, typer.Argument(help="The token's name (or its id).")],
) -> None:
    """Revoke a token: it stops working at once."""
    token = _app(ctx).revoke_token(name_or_id)
    out.print(f"revoked token {token.id} {token.name!r}")


@db_cli.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply the schema migrations."""
    app = _app(ctx)
    app.store.upgrade()
    out.print(f"database at the latest schema: {app.config.database_url}")


@cli.command()
def bench(
    ctx: typer.Context,
    tasks: Annotated[int, typer.Option(min=1, help="How many no-op tasks.")] = 10_000,
    per_request: Annotated[int, typer.Option(min=1, help="Tasks per request.")] = 100,
    concurrency: Annotated[int, typer.Option(min=1, help="Worker concurrency.")] = 64,
    batch: Annotated[int, typer.Option(min=1, help="Claim batch size.")] = 500,
    database: Annotated[
        str | None, typer.Option(help="Database URL (default: a fresh SQLite file).")
    ] = None,
    pickups: Annotated[
        int, typer.Option(min=0, help="Single tasks timed for pickup latency.")
    ] = 200,
    claim_scale: Annotated[
        int, typer.Option(min=0, help="Also time claims with this many tasks queued (0: skip).")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Enqueue N no-op tasks, drain them with one worker process, and time it."""
    from conveyor.bench import BenchOptions, run_bench

    result = run_bench(
        BenchOptions(
            tasks=tasks,
            per_request=per_request,
            concurrency=concurrency,
            batch=batch,
            database=database,
            pickups=pickups,
            claim_scale=claim_scale,
        ),
        progress=None if as_json else err,
    )
    if as_json:
        out.print_json(data=result)
    else:
        for k, v in result.items():
            out.print(f"{k}: {v}")


# ------------------------------------------------------------------------ entry
def _fail(message: str, code: int) -> NoReturn:
    err.print(f"conveyor: {message}", markup=False)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    # Typer answers usage errors itself (exit 2); the domain's errors become one line.
    try:
        cli(args=argv, prog_name="conveyor")
    except CliError as exc:
        _fail(str(exc), exc.code)
    except Unavailable as exc:
        _fail(f"database unavailable: {exc}", EXIT_UNAVAILABLE)
    except (
        UnknownPipeline,
        ParamsError,
        ConfigError,
        NotFound,
        Conflict,
        TransitionError,
        HandlerError,
        StoreError,
        TokenNameError,
    ) as exc:
        message = str(exc.args[0]) if isinstance(exc, LookupError) and exc.args else str(exc)
        if isinstance(exc, ParamsError):
            message = f"params invalid at {exc.path}: {exc.message}"
        _fail(message, EXIT_ERROR)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


if __name__ == "__main__":
    main()

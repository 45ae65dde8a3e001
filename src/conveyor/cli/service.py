"""Commands that run or steer the service: serve, up, worker, notify, workers, queues,
pause, resume, db upgrade."""

from __future__ import annotations

import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from conveyor.app import Conveyor
from conveyor.cli.common import CliError, JsonOption, app_of, cli, err, out, safe_url, ts
from conveyor.views import queue_view, worker_view

if TYPE_CHECKING:
    from conveyor.notifier import Notifier
    from conveyor.worker import WorkerOptions

NotifyOption = Annotated[
    bool,
    typer.Option("--notify/--no-notify", help="Also send the pipelines' completion notifications."),
]


def _notifier(app: Conveyor, wanted: bool) -> Notifier | None:
    """A started notifier, when asked for and some pipeline has `notify` set."""
    from conveyor.notifier import Notifier, notify_settings

    if not wanted or not notify_settings(app):
        return None
    notifier = Notifier(app)
    notifier.start()
    return notifier


db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")


@cli.command()
def queues(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Queues in priority order, with task counts."""
    stats = app_of(ctx).queues()
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
    app_of(ctx).pause(queue)
    out.print(f"paused {queue or 'all queues'}")


@cli.command()
def resume(
    ctx: typer.Context,
    queue: Annotated[str | None, typer.Argument(help="Queue; none: everything.")] = None,
) -> None:
    """Let workers take tasks from a queue (or all) again."""
    app_of(ctx).resume(queue)
    out.print(f"resumed {queue or 'all queues'}")


@cli.command()
def workers(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Include stopped workers.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Workers with their host, pid, queues and last heartbeat."""
    found = app_of(ctx).workers(alive_only=not all_)
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
            ts(w.last_heartbeat),
        )
    out.print(table)


def _queues_opt(value: str | None) -> list[str]:
    return [q.strip() for q in value.split(",") if q.strip()] if value else []


@cli.command()
def worker(
    ctx: typer.Context,
    queues_: Annotated[str | None, typer.Option("--queues", help="a,b,c (default: all).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks at once (in each process).")] = 4,
    processes: Annotated[
        int,
        typer.Option(
            min=1, max=64, help="Worker processes, each with --concurrency slots (one per core)."
        ),
    ] = 1,
    burst: Annotated[bool, typer.Option(help="Exit when nothing is left to do.")] = False,
    lease: Annotated[float | None, typer.Option(min=1, help="Lease seconds.")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="Most tasks claimed at once.")] = None,
    grace: Annotated[
        float, typer.Option(help="On SIGTERM, seconds running tasks may take.")
    ] = 30.0,
    notify: NotifyOption = True,
) -> None:
    """Run a worker until SIGTERM (or, with --burst, until the queues are empty)."""
    from conveyor.worker import WorkerOptions

    app = app_of(ctx)
    app.store.upgrade()
    opts = WorkerOptions(
        queues=_queues_opt(queues_),
        concurrency=concurrency,
        burst=burst,
        lease=lease,
        batch=batch,
        grace=grace,
    )
    if processes == 1:
        _run_worker(app, opts, notify)
        return
    err.print(f"conveyor worker: {processes} processes, concurrency {concurrency} each")

    def work(own: Conveyor) -> bool:
        # SIGTERM only: a Ctrl-C reaches every process of the terminal, and the first
        # passes it on as SIGTERM (a second signal would release running tasks). Each
        # sends notifications: deliveries are claimed in the database.
        _run_worker(own, opts, notify, (signal.SIGTERM,))
        return True

    if not _in_processes(app, processes, work, ends_ok=burst):
        raise CliError("a worker process failed (see the log above)")


def _in_processes(
    app: Conveyor, processes: int, body: Callable[[Conveyor], bool], ends_ok: bool = False
) -> bool:
    """`body` in `processes` forked processes, each with an application object (and
    database connections) of its own; see `conveyor.processes.run_processes`."""
    from conveyor.processes import run_processes

    config = app.config
    app.close()  # each process makes its own connections

    def one() -> bool:
        own = Conveyor(config)
        try:
            return body(own)
        finally:
            own.close()

    return run_processes(one, processes, ends_ok)


def _run_worker(
    app: Conveyor,
    opts: WorkerOptions,
    notify: bool,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    from conveyor.worker import Worker

    w = Worker(app, opts)
    w.install_signal_handlers(signals)
    err.print(f"worker {w.id} on {', '.join(w.queues)} (concurrency {opts.concurrency})")
    notifier = _notifier(app, notify)
    try:
        stats = w.run()
    finally:
        if notifier is not None:
            notifier.stop()
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


@cli.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Server processes sharing the port.")
    ] = 1,
) -> None:
    """Serve the HTTP API (and the legacy Spotbot endpoint) until SIGTERM."""
    from conveyor.api import create_app
    from conveyor.api.server import run, url_of

    app = app_of(ctx)
    app.store.upgrade()
    sock = _listen(host, port)
    where = f"{url_of(sock)} (database {safe_url(app.config.database_url)})"
    if workers == 1:
        err.print(f"conveyor serve: {where}")
        run(create_app(app), sock)
        return
    err.print(f"conveyor serve: {where}, {workers} processes")

    def serve_one(own: Conveyor) -> bool:
        return run(create_app(own), sock, signals=(signal.SIGTERM,))

    # The processes count their API requests in files here, which /metrics of any of
    # them sums; the directory goes when they do.
    with tempfile.TemporaryDirectory(prefix="conveyor-metrics-") as counts:
        from conveyor.metrics import enable_multiprocess

        enable_multiprocess(counts)
        if not _in_processes(app, workers, serve_one):
            raise CliError("a server process failed (see the log above)")


@cli.command()
def up(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks at once.")] = 4,
    grace: Annotated[
        float, typer.Option(help="On SIGTERM, seconds running tasks may take.")
    ] = 30.0,
    notify: NotifyOption = True,
) -> None:
    """Everything in one process: migrations, the HTTP API, a worker, the notifier, the
    declared spools' ingesters and, with `[conveyor] retention`, pruning every hour."""
    from conveyor.api import create_app
    from conveyor.api.server import run, url_of
    from conveyor.housekeeping import Housekeeper
    from conveyor.ingest.service import SpoolService
    from conveyor.worker import Worker, WorkerOptions

    app = app_of(ctx)
    app.store.upgrade()
    sock = _listen(host, port)
    names = ", ".join(sorted(app.config.pipelines)) or "none"
    err.print(f"conveyor up: {url_of(sock)}; database {safe_url(app.config.database_url)}")
    err.print(f"artifacts {app.config.artifacts_dir}; pipelines: {names}")
    w = Worker(app, WorkerOptions(concurrency=concurrency, grace=grace))
    notifier = _notifier(app, notify)
    keeper = Housekeeper(app)
    keeper.start()
    spools = SpoolService(app, app.config.spools.values())
    if spools.spools:
        err.print(f"spools: {', '.join(f'{s.name} ({s.dir})' for s in spools.spools)}")
    spools.start()
    try:
        if not run(create_app(app), sock, worker=w):
            raise CliError("the worker stopped on an error (see the log above)")
    finally:
        keeper.stop()
        spools.stop()
        if notifier is not None:
            notifier.stop()


@cli.command("notify")
def notify_cmd(
    ctx: typer.Context,
    poll: Annotated[float, typer.Option(min=0.05, help="Seconds between looks.")] = 0.5,
) -> None:
    """Send completion notifications until SIGTERM (without running tasks)."""
    from conveyor.notifier import Notifier

    app = app_of(ctx)
    app.store.upgrade()
    notifier = Notifier(app, poll=poll)
    if not notifier.enabled:
        raise CliError("no pipeline has [pipelines.NAME.notify] configured")
    done = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    notifier.start()
    err.print(f"conveyor notify: {', '.join(sorted(notifier.settings))}")
    while not done.wait(1.0):
        pass
    notifier.stop()


@db_cli.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply the schema migrations."""
    app = app_of(ctx)
    app.store.upgrade()
    out.print(f"database at the latest schema: {app.config.database_url}")

"""What every command shares: the root `conveyor` command, the consoles, the one-line
errors and exit codes, the application object, and the progress bar of waiting."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Protocol

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from conveyor.app import Conveyor
from conveyor.config import load_config
from conveyor.requests import RequestStatus, TaskCounts

cli = typer.Typer(
    name="conveyor",
    help="Conveyor: durable data-processing requests, tasks and workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_ERROR = 1
EXIT_TIMEOUT = 2
EXIT_UNAVAILABLE = 3

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


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


def app_of(ctx: typer.Context) -> Conveyor:
    """The application object (made on first use, closed when the command ends)."""
    obj = ctx.find_root().obj
    if "app" not in obj:
        obj["app"] = Conveyor(load_config(obj["config"]))
        ctx.call_on_close(obj["app"].close)
    app: Conveyor = obj["app"]
    return app


def ts(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def safe_url(url: str) -> str:
    """A database URL without its password, for printing."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


class Watched(Protocol):
    """A request as a progress bar follows it: the application's or the client's."""

    @property
    def id(self) -> int: ...
    @property
    def status(self) -> RequestStatus: ...
    @property
    def counts(self) -> TaskCounts: ...


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[Watched], None]]:
    """A bar of finished tasks on stderr, when it is a terminal; yields the update."""
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

        def update(req: Watched) -> None:
            bar.update(
                task_id,
                total=req.counts.total or None,
                completed=req.counts.finished,
                rid=req.id,
                status=req.status.value,
            )

        yield update

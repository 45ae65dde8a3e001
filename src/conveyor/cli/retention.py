"""`conveyor prune`: delete old finished requests and everything kept about them."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from conveyor.cli.common import CliError, JsonOption, app_of, cli, err, out
from conveyor.retention import AgeError, Pruned, parse_age


@cli.command("prune")
def prune(
    ctx: typer.Context,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            help="Delete requests finished longer ago than this: 30d, 12h, 90m "
            "(default: \\[conveyor] retention).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be deleted.")
    ] = False,
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="Requests per transaction.")] = 500,
    as_json: JsonOption = False,
) -> None:
    """Delete requests that finished before the cut-off, with their tasks, events,
    logs, work directories and stored outputs. Running and queued work is never
    touched, nor a request whose result a newer request reused."""
    app = app_of(ctx)
    if older_than is not None:
        try:
            age = parse_age(older_than)
        except AgeError as exc:
            raise CliError(f"--older-than: {exc}", 2) from None
    elif app.config.retention is not None:
        age = app.config.retention
    else:
        raise CliError("say how old: --older-than 30d (or set [conveyor] retention)", 2)

    if dry_run:
        found = app.prunable(age)
    else:
        with Progress(
            SpinnerColumn(),
            TextColumn("pruning: {task.completed} requests"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=as_json or not err.is_terminal,
        ) as bar:
            tick = bar.add_task("prune", total=None)

            def advance(done: Pruned) -> None:
                bar.advance(tick, done.requests)

            found = app.prune(age, batch=batch, on_batch=advance)
    summary = found.summary()
    if as_json:
        out.print(json.dumps({"dry_run": dry_run, "older_than_s": age, **summary}))
        return
    verb = "would delete" if dry_run else "deleted"
    parts = ", ".join(f"{n} {name}" for name, n in summary.items())
    out.print(f"{verb} {parts}")

"""`conveyor ingest` (a spool directory into a sink), `conveyor load-sqlite` (SQLite
result files into tables) and `conveyor bench-ingest`."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from conveyor.cli.common import EXIT_ERROR, CliError, app_of, cli, err, out
from conveyor.ingest.pipeline import IngestStats
from conveyor.ingest.settings import SpoolConfig


def _spool(
    declared: dict[str, SpoolConfig], name: str | None, spool_dir: Path | None, sink: str | None
) -> SpoolConfig:
    if name is not None:
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none configured"
            raise CliError(f"unknown spool {name!r} (known: {known})")
        spool = declared[name]
    elif spool_dir is not None:
        resolved = spool_dir.resolve()
        spool = next(
            (s for s in declared.values() if s.dir == resolved),
            SpoolConfig(name=resolved.name, dir=resolved, sink=sink or "kcidb"),
        )
    else:
        raise CliError("name a spool (--spool NAME) or a directory (--spool-dir DIR)")
    if sink is not None:
        spool = dataclasses.replace(spool, sink=sink)
    if not spool.dir.is_dir():
        raise CliError(f"spool directory does not exist: {spool.dir}")
    return spool


@cli.command()
def ingest(
    ctx: typer.Context,
    spool_dir: Annotated[
        Path | None, typer.Option("--spool-dir", help="The spool directory.")
    ] = None,
    sink: Annotated[str | None, typer.Option(help="Sink name (a [sinks.NAME], or kcidb).")] = None,
    spool_name: Annotated[
        str | None, typer.Option("--spool", help="A spool declared as [spools.NAME].")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=0, max=64, help="Parsing processes (0: in-process).")
    ] = None,
    interval: Annotated[float | None, typer.Option(min=0.01, help="Seconds between scans.")] = None,
    settle: Annotated[
        float | None,
        typer.Option(min=0, help="Seconds a file must be unchanged before it is taken."),
    ] = None,
    once: Annotated[bool, typer.Option(help="Ingest what is there, then exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the totals as JSON.")] = False,
) -> None:
    """Ingest a spool directory of JSON submissions into a sink, until SIGTERM (or, with
    --once, until the spool is empty). Exit 1 with --once when a file failed."""
    app = app_of(ctx)
    app.store.upgrade()
    spool = _spool(dict(app.config.spools), spool_name, spool_dir, sink)
    changes = {
        k: v
        for k, v in {"workers": workers, "interval": interval, "settle": settle}.items()
        if v is not None
    }
    spool = dataclasses.replace(spool, **changes)  # type: ignore[arg-type]
    try:
        app.sink(spool.sink)
    except LookupError as exc:
        raise CliError(str(exc.args[0])) from None
    show_bar = once and err.is_terminal and not as_json
    bar = Progress(
        TextColumn(f"ingest {spool.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rows]} rows, {task.fields[failed]} failed"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not show_bar,
    )
    task = bar.add_task("ingest", total=None, rows=0, failed=0)

    shown: list[bool] = []

    def progress(stats: IngestStats) -> None:
        if show_bar and not shown:
            # Started only now: the bar draws from a thread of its own, and the worker
            # processes are forked (fast) only while this process has no other thread.
            shown.append(True)
            bar.start()
        bar.update(
            task,
            completed=stats.files + stats.failed_total,
            rows=stats.rows,
            failed=stats.failed_total,
        )

    try:
        ingester = app.ingester(spool, on_progress=progress)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if show_bar:
        bar.update(task, total=ingester.spool.count())

    def stop(_sig: int, _frame: FrameType | None) -> None:
        ingester.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if not once:
        err.print(f"conveyor ingest: {spool.dir} -> sink {spool.sink} ({spool.workers} workers)")
    try:
        stats = ingester.run(once=once)
    finally:
        if shown:
            bar.stop()
        ingester.writer.close()
    totals = stats.as_dict()
    if as_json:
        out.print_json(json.dumps(totals))
    else:
        failed = ", ".join(f"{n} at {stage}" for stage, n in sorted(stats.failed.items()))
        out.print(
            f"ingested {stats.files} files ({stats.rows} rows) in {totals['seconds']}s; "
            f"failed {stats.failed_total}{' (' + failed + ')' if failed else ''}; "
            f"empty deleted {stats.empty}"
        )
    if once and stats.failed_total:
        raise typer.Exit(EXIT_ERROR)


@cli.command("bench-ingest")
def bench_ingest(
    database: Annotated[
        str | None,
        typer.Option(help="PostgreSQL server URL (a scratch database is made there)."),
    ] = None,
    files: Annotated[int, typer.Option(min=10, help="Files to split the samples into.")] = 2000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 2,
    samples: Annotated[
        Path, typer.Option(help="Folder with cki-v5.json, cki-v1.json, kernelci-v1.json.")
    ] = Path("../shared/data/kcidb"),
    baseline_files: Annotated[
        int | None, typer.Option(min=1, help="Time the baseline on this many files only.")
    ] = None,
    repeat: Annotated[
        int, typer.Option(min=1, max=20, help="Runs of each; the fastest is reported.")
    ] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Benchmark ingestion: the ingester against the one-file-at-a-time baseline and a
    bare batched insert of the same rows."""
    from conveyor.ingest.bench import IngestBenchOptions, run_ingest_bench

    if not (samples / "cki-v5.json").is_file():
        raise CliError(f"no KCIDB samples in {samples} (use --samples)")
    results = run_ingest_bench(
        IngestBenchOptions(
            samples=samples,
            files=files,
            workers=workers,
            database=database,
            baseline_files=baseline_files,
            repeat=repeat,
        ),
        say=(lambda _m: None) if as_json else (lambda m: err.print(m)),
    )
    out.print_json(json.dumps(results))


@cli.command("load-sqlite")
def load_sqlite_cmd(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="SQLite result files.")],
    mapping: Annotated[Path, typer.Option(help="Mapping (TOML or YAML).")],
    request_id: Annotated[int | None, typer.Option(help="Link the rows to this request.")] = None,
    task_id: Annotated[
        int | None,
        typer.Option(help="Link the rows to this task (one file; its load replaces the last)."),
    ] = None,
) -> None:
    """Load SQLite result files into database tables: each file all or nothing, and
    loading a file again replaces what it loaded before."""
    from conveyor.ingest.loader import LoadError, read_mapping

    if task_id is not None and len(files) > 1:
        raise CliError("--task-id links one file to a task: name one file")
    app = app_of(ctx)
    app.store.upgrade()
    try:
        spec = read_mapping(mapping)
    except LoadError as exc:
        raise CliError(str(exc)) from None
    failed = 0
    for file in files:
        try:
            result = app.load_sqlite(file, spec, request_id, task_id)
        except LoadError as exc:
            err.print(f"conveyor: {file}: {exc}", markup=False)
            failed += 1
            continue
        tables = ", ".join(f"{n} {t}" for t, n in result.rows.items())
        out.print(f"loaded {file}: {tables}", markup=False)
    if failed:
        raise CliError(f"{failed} of {len(files)} files not loaded")

"""The benchmarks: `conveyor bench` (the store and workers), `bench-api` (the HTTP API),
`bench-dashboard` (page renders) and `bench-exec` (the command executor)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from conveyor.cli.common import CliError, JsonOption, cli, err, out

ServerDatabase = Annotated[
    str | None,
    typer.Option(help="PostgreSQL server URL (default: a temporary SQLite file)."),
]


def _report(result: dict[str, Any], as_json: bool) -> None:
    """The figures as JSON, or a `name: value` line each."""
    if as_json:
        out.print_json(data=result)
        return
    for k, v in result.items():
        out.print(f"{k}: {v}")


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
    as_json: JsonOption = False,
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
    _report(result, as_json)


@cli.command("bench-api")
def bench_api(
    database: ServerDatabase = None,
    clients: Annotated[int, typer.Option(min=1, max=256, help="Connections submitting.")] = 32,
    readers: Annotated[
        int, typer.Option(min=0, max=256, help="Connections reading requests meanwhile.")
    ] = 4,
    seconds: Annotated[float, typer.Option(min=1, max=600, help="Seconds measured.")] = 20.0,
    warmup: Annotated[float, typer.Option(min=0, max=60, help="Seconds not measured.")] = 2.0,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Server processes (serve --workers).")
    ] = 2,
    as_json: JsonOption = False,
) -> None:
    """Submit rate and status latency of the HTTP API, against `conveyor serve` on a
    scratch database, from this process."""
    from conveyor.bench_api import ApiBenchOptions, run_api_bench

    result = run_api_bench(
        ApiBenchOptions(
            database=database,
            clients=clients,
            readers=readers,
            seconds=seconds,
            warmup=warmup,
            workers=workers,
        ),
        say=None if as_json else err.print,
    )
    _report(result, as_json)


@cli.command("bench-dashboard")
def bench_dashboard(
    database: ServerDatabase = None,
    requests: Annotated[int, typer.Option(min=10, max=5_000_000, help="Requests.")] = 100_000,
    tasks_per_request: Annotated[int, typer.Option(min=1, max=100, help="Tasks each.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="Renders timed per page.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Render times of the dashboard's overview, a filtered requests page and a request's
    detail, over a scratch database filled with a large history."""
    from conveyor.bench_dashboard import DashBenchOptions, run_dashboard_bench

    result = run_dashboard_bench(
        DashBenchOptions(
            database=database,
            requests=requests,
            tasks_per_request=tasks_per_request,
            rounds=rounds,
        ),
        say=None if as_json else err.print,
    )
    if as_json:
        _report(result, as_json)
        return
    _report({k: v for k, v in result.items() if k != "pages"}, as_json)
    for name, figures in result["pages"].items():
        out.print(
            f"{name} ({figures['path']}): median {figures['median_ms']} ms, "
            f"p90 {figures['p90_ms']} ms, first {figures['first_ms']} ms"
        )


@cli.command("bench-exec")
def bench_exec(
    tasks: Annotated[int, typer.Option(min=1, help="How many `true` tasks a round.")] = 1000,
    concurrency: Annotated[int, typer.Option(min=1, help="Worker concurrency.")] = 8,
    processes: Annotated[
        int,
        typer.Option(
            min=1, max=64, help="Worker processes sharing the concurrency (worker --processes)."
        ),
    ] = 1,
    rounds: Annotated[int, typer.Option(min=1, max=50, help="Alternating rounds.")] = 5,
    command: Annotated[
        str, typer.Option(help="The command each task runs (split like a shell line).")
    ] = "true",
    scratch: Annotated[
        Path | None,
        typer.Option(
            help="Where the rounds keep their database, logs and work directories "
            "(a temporary directory inside it; default: the system's).",
            file_okay=False,
            exists=True,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """The command executor against a bare Python loop running the same processes with
    the same parallelism, on a scratch SQLite database."""
    from conveyor.bench_exec import ExecBenchOptions, run_exec_bench

    if concurrency % processes:
        raise CliError(
            f"--concurrency {concurrency} cannot be shared evenly by --processes {processes}"
        )
    result = run_exec_bench(
        ExecBenchOptions(
            tasks=tasks,
            concurrency=concurrency,
            processes=processes,
            rounds=rounds,
            command=tuple(shlex.split(command)) or ("true",),
            scratch=scratch,
        ),
        say=None if as_json else err.print,
    )
    _report(result, as_json)

"""`conveyor scan`: the Spotbot ETL's client side. Scan a field-test tree for logs, print
the `logs_to_process` request, or submit it to a Conveyor server (over the HTTP API,
with the Python client) and wait for it."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from conveyor.cli.common import (
    EXIT_ERROR,
    EXIT_TIMEOUT,
    CliError,
    JsonOption,
    cli,
    err,
    out,
    progress_bar,
)
from conveyor.client import Client, ClientError, Request, Task, WaitTimeout
from conveyor.scan import DEFAULT_PATTERN, Scan, scan_tree
from conveyor.tasks import TaskStatus

DEFAULT_TIMEOUT = 1800.0  # the seed's ETL gave Spotbot 30 minutes


def _report(scan: Scan, strict: bool, root: str) -> None:
    """Say what was left out (or, with --strict, refuse); refuse when nothing is left."""
    for folder in scan.unreadable:
        err.print(f"conveyor: warning: cannot read {folder}", markup=False)
    if scan.incomplete and strict:
        listed = "; ".join(i.describe() for i in scan.incomplete)
        raise CliError(f"{len(scan.incomplete)} log(s) are missing files: {listed}")
    for missing in scan.incomplete:
        err.print(f"conveyor: warning: skipped {missing.describe()}", markup=False)
    if not scan.logs:
        raise CliError(f"no complete logs under {root}")


def _print(req: Request) -> None:
    out.print_json(json.dumps(asdict(req)))


@cli.command()
def scan(
    root: Annotated[str, typer.Argument(help="The field-test tree to scan.")],
    pattern: Annotated[
        str, typer.Option(help="File names of the logs (shell-style pattern).")
    ] = DEFAULT_PATTERN,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail when a log is missing a file (else skip it).")
    ] = False,
    submit: Annotated[
        bool, typer.Option("--submit", help="Submit the request (else print it).")
    ] = False,
    url: Annotated[
        str | None, typer.Option(envvar="CONVEYOR_URL", help="The Conveyor server.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="CONVEYOR_TOKEN", help="A submit token.", show_default=False),
    ] = None,
    pipeline: Annotated[str, typer.Option(help="The pipeline to submit to.")] = "spotbot",
    wait: Annotated[
        bool, typer.Option("--wait", help="With --submit: wait until it finishes.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0, help="With --wait: seconds to wait.")
    ] = DEFAULT_TIMEOUT,
    as_json: JsonOption = False,
) -> None:
    """Scan a field-test tree for logs; print or submit their request.

    Each log (rawbinlog.bin) goes with its .time and .protocols.xml siblings, its output
    into its folder; a log missing a sibling is skipped with a warning (--strict: fail).
    Prints the request's params; with --submit, submits them and prints the request
    id; with --wait, exits 0 when it succeeds, 1 when it fails, 2 when the wait times
    out."""
    if wait and not submit:
        raise CliError("--wait needs --submit", code=2)
    if submit and not url:
        raise CliError("--submit needs --url (or $CONVEYOR_URL)", code=2)
    try:
        found = scan_tree(root, pattern)
    except NotADirectoryError as exc:
        raise CliError(str(exc)) from None
    _report(found, strict, root)
    params = found.params()
    if not submit:
        out.print_json(json.dumps(params))
        return
    assert url is not None
    with Client(url, token) as client:
        req = client.submit(pipeline, params)
        if not as_json:
            out.print(req.id)
        err.print(f"request {req.id}: {len(found.logs)} log(s) to {pipeline}")
        if not wait:
            if as_json:
                _print(req)
            return
        with progress_bar(not as_json) as update:
            try:
                req = client.wait(req.id, timeout, on_update=update)
            except WaitTimeout as exc:
                if as_json:
                    _print(exc.request)
                raise CliError(str(exc), code=EXIT_TIMEOUT) from None
        if as_json:
            _print(req)
        else:
            out.print(f"request {req.id} {req.status.value}")
        if not req.succeeded:
            for task in req.tasks:
                if task.status == TaskStatus.FAILED:
                    err.print(_failure(client, task), markup=False)
            raise typer.Exit(EXIT_ERROR)


def _failure(client: Client, task: Task) -> str:
    """One line on a failed task: its log, its error and the last words of its output
    (the log's last line that is neither the command run nor the error itself)."""
    what = task.params.get("rawbinlog_bin") if isinstance(task.params, dict) else None
    line = f"task {task.id} failed" + (f" ({what})" if what else "") + f": {task.error}"
    try:
        tail = client.logs(task.id, tail=5).read().splitlines()
    except ClientError:
        tail = []
    said = [t.strip() for t in tail if t.strip() and not t.startswith("$ ") and t != task.error]
    return line + (f": {said[-1]}" if said else "")

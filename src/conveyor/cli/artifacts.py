"""Commands about a task's artifacts: list its outputs, download one."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from conveyor.artifacts import ArtifactError, Readable
from conveyor.cli.common import CliError, JsonOption, app_of, cli, err, out, ts
from conveyor.views import artifact_view

CHUNK = 1024 * 1024


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@cli.command()
def outputs(
    ctx: typer.Context,
    task_id: Annotated[int, typer.Argument(help="Task id.")],
    as_json: JsonOption = False,
) -> None:
    """List a task's outputs (and logs kept in the artifact store)."""
    found = app_of(ctx).task_artifacts(task_id)
    if as_json:
        out.print_json(data=[artifact_view(a) for a in found])
        return
    table = Table(box=None)
    for col in ("name", "kind", "attempt", "size", "sha256", "url", "kept"):
        table.add_column(col, overflow="fold")  # a URL is shown whole, if on two lines
    for a in found:
        table.add_row(
            a.name,
            a.kind.value,
            str(a.attempt),
            _size(a.size),
            a.sha256[:12],
            a.url,
            ts(a.created_at),
        )
    out.print(table)


@cli.command()
def download(
    ctx: typer.Context,
    task_id: Annotated[int, typer.Argument(help="Task id.")],
    name: Annotated[str, typer.Argument(help="The artifact's name (see `conveyor outputs`).")],
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="File to write (default: the name's last part; -: stdout)."
        ),
    ] = None,
) -> None:
    """Fetch one of a task's artifacts; its sha256 is checked before the file is kept
    (with `-o -`, after it is written out: a mismatch is an error all the same)."""
    app = app_of(ctx)
    artifact = app.artifact(task_id, name)
    target = output or artifact.name.rsplit("/", 1)[-1]
    digest = hashlib.sha256()

    def chunks(body: Readable) -> Iterator[bytes]:
        """The artifact's bytes, hashed as they come; a failed read is the store's."""
        while True:
            try:
                chunk = body.read(CHUNK)
            except Exception as exc:  # a stalled or cut stream: the store's error
                raise ArtifactError(f"{artifact.url}: reading failed: {exc}") from exc
            if not chunk:
                return
            digest.update(chunk)
            yield chunk

    def check() -> None:
        if digest.hexdigest() != artifact.sha256:
            kept = "written out" if target == "-" else "not kept"
            raise CliError(
                f"{artifact.url}: sha256 {digest.hexdigest()} is not the recorded "
                f"{artifact.sha256}; {kept}"
            )

    try:
        body = app.open_artifact(artifact)
        try:
            if target == "-":
                for chunk in chunks(body):
                    sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                check()
            else:
                dest = Path(target)
                fd, tmp = tempfile.mkstemp(dir=dest.resolve().parent, prefix=".download-")
                try:
                    with os.fdopen(fd, "wb") as f:
                        for chunk in chunks(body):
                            f.write(chunk)
                    check()
                    os.replace(tmp, dest)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        finally:
            body.close()
    except ArtifactError as exc:
        raise CliError(f"artifact store: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror or exc}") from None
    if target != "-":
        err.print(f"{artifact.name} -> {target} ({_size(artifact.size)}, sha256 ok)")

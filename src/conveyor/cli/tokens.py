"""`conveyor token create | list | revoke`: the HTTP API's tokens."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from conveyor.cli.common import JsonOption, app_of, cli, err, out, ts
from conveyor.tokens import Role
from conveyor.views import token_view

token_cli = typer.Typer(help="API tokens.", no_args_is_help=True)
cli.add_typer(token_cli, name="token")


@token_cli.command("create")
def token_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Who uses it; the submitter of what it submits.")],
    role: Annotated[Role, typer.Option(help="read < submit < admin.")] = Role.READ,
) -> None:
    """Make a token and print it, once: only its hash is kept."""
    app = app_of(ctx)
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
    as_json: JsonOption = False,
) -> None:
    """Tokens with their role, first characters and when they were last used."""
    tokens = app_of(ctx).list_tokens()
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
            ts(t.created_at),
            ts(t.last_used_at),
            ts(t.revoked_at),
        )
    out.print(table)


@token_cli.command("revoke")
def token_revoke(
    ctx: typer.Context,
    name_or_id: Annotated[str, typer.Argument(help="The token's name (or its id).")],
) -> None:
    """Revoke a token: it stops working at once."""
    token = app_of(ctx).revoke_token(name_or_id)
    out.print(f"revoked token {token.id} {token.name!r}")

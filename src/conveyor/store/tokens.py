"""The store's API-token verbs, as statements on a connection the caller's transaction
owns. Only hashes are stored; a token itself never reaches the database."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from conveyor.store import schema as t
from conveyor.store.base import Conflict, NotFound
from conveyor.tokens import NewToken, Role, Token

_c = t.api_tokens.c


def token_from_row(row: Any) -> Token:
    return Token(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        prefix=row.prefix,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def _active_named(conn: Connection, name: str) -> Any:
    return conn.execute(
        sa.select(t.api_tokens).where(_c.name == name, _c.revoked_at.is_(None))
    ).first()


def insert_token(conn: Connection, new: NewToken, now: float) -> Token:
    if _active_named(conn, new.name) is not None:
        raise name_taken(new.name)
    token_id = conn.execute(
        t.api_tokens.insert()
        .values(
            name=new.name,
            role=new.role.value,
            token_hash=new.token_hash,
            prefix=new.prefix,
            created_at=now,
        )
        .returning(_c.id)
    ).scalar_one()
    return Token(token_id, new.name, new.role, new.prefix, now)


def token_by_hash(conn: Connection, token_hash: str) -> Token | None:
    row = conn.execute(sa.select(t.api_tokens).where(_c.token_hash == token_hash)).first()
    return None if row is None else token_from_row(row)


def all_tokens(conn: Connection) -> list[Token]:
    return [token_from_row(r) for r in conn.execute(sa.select(t.api_tokens).order_by(_c.id))]


def revoke(conn: Connection, name_or_id: str, now: float) -> Token:
    """Revoke the active token of that name, else the token of that id (revoking a
    revoked token changes nothing)."""
    row = _active_named(conn, name_or_id)
    if row is None and name_or_id.isdigit() and len(name_or_id) < 19:
        row = conn.execute(sa.select(t.api_tokens).where(_c.id == int(name_or_id))).first()
    if row is None:
        raise NotFound(f"no active token named {name_or_id!r} and no token with that id")
    token = token_from_row(row)
    if token.revoked_at is not None:
        return token
    conn.execute(t.api_tokens.update().where(_c.id == token.id).values(revoked_at=now))
    return replace(token, revoked_at=now)


def touch(conn: Connection, token_id: int, now: float) -> None:
    conn.execute(t.api_tokens.update().where(_c.id == token_id).values(last_used_at=now))


def name_taken(name: str) -> Conflict:
    return Conflict(f"a token named {name!r} exists: revoke it first, or pick another")

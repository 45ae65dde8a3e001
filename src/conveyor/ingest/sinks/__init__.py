"""Sinks: what a validated submission becomes. A sink turns a document into rows per
table (a pure function, run in the worker processes); the writer upserts them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

Rows = dict[str, list[dict[str, Any]]]


class MappingError(ValueError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class TableSpec:
    """A target table as the writer needs it: its columns (with their PostgreSQL types,
    for the bulk path), its key, and which columns hold JSON."""

    name: str
    key: tuple[str, ...]
    columns: tuple[str, ...]
    pg_types: tuple[str, ...]
    json_columns: frozenset[str]


class Sink(Protocol):
    name: str
    tables: Mapping[str, TableSpec]

    def rows(self, doc: Any) -> Rows:
        """The rows the document becomes, per table; raises MappingError."""


def spec_of(table: Any, key: tuple[str, ...] | None = None) -> TableSpec:
    """A TableSpec from a SQLAlchemy table (declared or reflected)."""
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    cols = list(table.columns)
    pk = key or tuple(c.name for c in table.primary_key.columns)
    return TableSpec(
        name=table.name,
        key=tuple(pk),
        columns=tuple(c.name for c in cols),
        pg_types=tuple(c.type.compile(dialect=dialect) for c in cols),
        json_columns=frozenset(c.name for c in cols if isinstance(c.type, sa.JSON)),
    )

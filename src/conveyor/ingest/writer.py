"""The one writer per database: rows of many files upserted in one transaction.

Upserts keep the first non-null value of each field (`COALESCE(table.col,
excluded.col)`), so a re-submitted or re-ingested file changes nothing and a later file
can only fill gaps. On PostgreSQL each table's rows go as one JSON document unpacked by
the server (`json_to_recordset`): one round trip per table per batch.
"""

from __future__ import annotations

import itertools
import operator
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from conveyor.ingest.sinks import Rows, TableSpec


def _ENCODE(value: Any) -> str:
    return orjson.dumps(value).decode()


class SinkUnavailable(RuntimeError):
    """The database failed in a way worth trying again (connection lost, lock time-out,
    server shutting down): the batch was rolled back whole."""


class SinkRejected(RuntimeError):
    """The database refused the rows themselves (a type or constraint violation)."""


def make_engine(url: str, lock_timeout: float = 60.0) -> Engine:
    """An engine for a sink database. `lock_timeout`: how long a write waits for a lock
    another client holds before the batch fails (and is tried again later)."""
    if url.startswith("sqlite"):
        from conveyor.store.sqlite import sqlite_engine

        return sqlite_engine(url, lock_timeout, foreign_keys=False)
    from conveyor.store.postgres import sqlalchemy_url

    return sa.create_engine(
        sqlalchemy_url(url),
        pool_size=2,
        max_overflow=2,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": 10,
            "options": f"-c jit=off -c lock_timeout={int(lock_timeout * 1000)}",
        },
    )


def merge_rows(rows: Iterable[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per key, the first non-null value of each field winning (as the upsert
    does): one statement may not touch a row twice."""
    get = key_of(key)
    merged: dict[Any, dict[str, Any]] = {}
    for row in rows:
        _merge_into(merged, get(row), dict(row))
    return list(merged.values())


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _update_clause(spec: TableSpec, dialect: str) -> str:
    rest = [c for c in spec.columns if c not in spec.key]
    conflict = f"ON CONFLICT ({', '.join(_q(k) for k in spec.key)})"
    if not rest:
        return f"{conflict} DO NOTHING"
    table = _q(spec.name)
    sets = ", ".join(f"{_q(c)} = COALESCE({table}.{_q(c)}, excluded.{_q(c)})" for c in rest)
    return f"{conflict} DO UPDATE SET {sets}"


# One file's rows of one table as the worker processes hand them to the writer: each
# row's key, in order (a value, or a tuple for a composite key), and the rows already in
# the form the database takes, so the writer only joins them and few objects cross the
# process boundary: for PostgreSQL the rows as one JSON array (one encoder call per
# table, not per row), for SQLite a tuple of values per row. A plain tuple: a named one
# costs a Python call per table per file to pickle.
TableRows = tuple[list[Any], bytes | list[tuple[Any, ...]]]
Encoded = dict[str, TableRows]  # one file's rows, per table
Batch = Mapping[str, list[TableRows]]  # the rows of several files, per table


def key_of(key: tuple[str, ...]) -> Callable[[dict[str, Any]], Any]:
    """A row's key: the value of a one-column key, else a tuple of values."""
    if not key:
        return lambda _row: ()
    return operator.itemgetter(*key)


def encode_rows(rows: Rows, tables: Mapping[str, TableSpec], dialect: str) -> Encoded:
    out: Encoded = {}
    for table, table_rows in rows.items():
        spec = tables[table]
        keys = list(map(key_of(spec.key), table_rows))
        if dialect == "postgresql":
            out[table] = (keys, orjson.dumps(table_rows))
        else:
            out[table] = (keys, [_tuple(spec, r) for r in table_rows])
    return out


def _tuple(spec: TableSpec, row: dict[str, Any]) -> tuple[Any, ...]:
    if not spec.json_columns:
        return tuple(row.get(c) for c in spec.columns)
    return tuple(
        (None if row.get(c) is None else _ENCODE(row[c])) if c in spec.json_columns else row.get(c)
        for c in spec.columns
    )


def _clashing(parts: list[TableRows]) -> set[Any]:
    """The keys found more than once among the parts' rows."""
    total = sum(len(keys) for keys, _ in parts)
    if len(set(itertools.chain.from_iterable(keys for keys, _ in parts))) == total:
        return set()  # the usual case, found at the cost of one set
    seen: set[Any] = set()
    twice: set[Any] = set()
    for keys, _ in parts:
        for k in keys:
            (twice if k in seen else seen).add(k)
    return twice


def merge_parts(parts: list[TableRows]) -> TableRows:
    """The parts' rows (JSON arrays or tuples, as encoded) as one part with one row per
    key, the first non-null value of each field winning, and the keys in the rows'
    order. Only the parts holding a key seen twice are decoded and merged; the others
    are passed on as they are. A worker process merges the files it prepared together
    this way, and the writer the parts of a batch."""
    clashing = _clashing(parts)
    if len(parts) == 1 and not clashing:
        return parts[0]
    if parts and isinstance(parts[0][1], list):
        return _merge_tuples(parts, clashing)
    keys: list[Any] = []
    kept: list[bytes | memoryview] = []
    merged: dict[Any, dict[str, Any]] = {}
    for part_keys, payload in parts:
        assert isinstance(payload, bytes)
        if clashing and not clashing.isdisjoint(part_keys):
            for k, row in zip(part_keys, orjson.loads(payload), strict=True):
                _merge_into(merged, k, row)
        elif part_keys:
            kept.append(memoryview(payload)[1:-1])
            keys.extend(part_keys)
    if merged:
        kept.append(orjson.dumps(list(merged.values()))[1:-1])
        keys.extend(merged)
    return keys, b"[" + b",".join(kept) + b"]"


def _merge_tuples(parts: list[TableRows], clashing: set[Any]) -> TableRows:
    if not clashing:
        keys: list[Any] = []
        rows: list[tuple[Any, ...]] = []
        for part_keys, payload in parts:
            assert isinstance(payload, list)
            keys.extend(part_keys)
            rows.extend(payload)
        return keys, rows
    first: dict[Any, tuple[Any, ...]] = {}
    for part_keys, payload in parts:
        assert isinstance(payload, list)
        for k, row in zip(part_keys, payload, strict=True):
            have = first.get(k)
            first[k] = (
                row
                if have is None
                else tuple(a if a is not None else b for a, b in zip(have, row, strict=True))
            )
    return list(first), list(first.values())


def json_rows(parts: list[TableRows]) -> str:
    """The parts' rows (JSON arrays) as one JSON array with one row per key."""
    payload = merge_parts(parts)[1]
    assert isinstance(payload, bytes)
    return payload.decode()


def _merge_into(merged: dict[Any, dict[str, Any]], key: Any, row: dict[str, Any]) -> None:
    have = merged.get(key)
    if have is None:
        merged[key] = row
        return
    for col, value in row.items():
        if have.get(col) is None and value is not None:
            have[col] = value


def tuple_rows(parts: list[TableRows]) -> list[tuple[Any, ...]]:
    """The parts' rows (tuples) with one row per key."""
    payload = merge_parts(parts)[1]
    assert isinstance(payload, list)
    return payload


class RowWriter:
    """Upserts rows into the tables of one database."""

    def __init__(self, engine: Engine, tables: Mapping[str, TableSpec]) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.tables = dict(tables)
        self._sql = {name: self._statement(spec) for name, spec in self.tables.items()}

    def _statement(self, spec: TableSpec) -> str:
        cols = ", ".join(_q(c) for c in spec.columns)
        if self.dialect == "postgresql":
            typed = ", ".join(
                f"{_q(c)} {t}" for c, t in zip(spec.columns, spec.pg_types, strict=True)
            )
            return (
                f"INSERT INTO {_q(spec.name)} ({cols}) SELECT {cols} "
                f"FROM json_to_recordset(%(rows)s::json) AS x({typed}) "
                + _update_clause(spec, self.dialect)
            )
        marks = ", ".join("?" for _ in spec.columns)
        return f"INSERT INTO {_q(spec.name)} ({cols}) VALUES ({marks}) " + _update_clause(
            spec, self.dialect
        )

    def encode(self, rows: Rows) -> Encoded:
        return encode_rows(rows, self.tables, self.dialect)

    def write(self, conn: Connection, batch: Batch) -> int:
        """Upsert every table's rows on `conn` (inside the caller's transaction)."""
        written = 0
        for table, parts in batch.items():
            count = sum(len(keys) for keys, _ in parts)
            if not count:
                continue
            if self.dialect == "postgresql":
                conn.exec_driver_sql(self._sql[table], {"rows": json_rows(parts)})
            else:
                conn.exec_driver_sql(self._sql[table], tuple_rows(parts))
            written += count
        return written

    def commit(self, rows: Rows) -> int:
        """Write the rows in one transaction; raises SinkUnavailable or SinkRejected."""
        return self.commit_encoded({t: [r] for t, r in self.encode(rows).items()})

    def commit_encoded(self, data: Batch) -> int:
        try:
            with self.engine.begin() as conn:
                return self.write(conn, data)
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sqlite3.OperationalError) as exc:
            raise SinkUnavailable(describe(exc)) from exc
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise SinkUnavailable(describe(exc)) from exc
            raise SinkRejected(describe(exc)) from exc

    def close(self) -> None:
        self.engine.dispose()


def describe(exc: Exception) -> str:
    """A database error in a line: the driver's first line, wrapped or not."""
    orig = getattr(exc, "orig", None) or exc  # the driver's error, wrapped or not
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__
